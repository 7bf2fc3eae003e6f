//! Volumes: named block devices whose snapshots the agent registers.
//! Standalone mode names them on the command line; the Kubernetes watcher
//! will name them from PersistentVolumes.

use std::{fmt, path::PathBuf, str::FromStr};

use crate::devices::{DeviceError, Disk, Extent};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub device: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume spec {0:?} must be NAME=DEVICE, e.g. data=/dev/loop3")]
    Spec(String),
    #[error("volume name {0:?} must be 1-253 characters of [A-Za-z0-9._-]")]
    Name(String),
    #[error("volume {0:?} is given twice")]
    Duplicate(String),
    #[error("unknown volume {0:?}")]
    Unknown(String),
    #[error("{path}:{line}: {source}")]
    File {
        path: PathBuf,
        line: usize,
        #[source]
        source: Box<VolumeError>,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume:?}: {source}")]
    Device {
        volume: String,
        #[source]
        source: DeviceError,
    },
}

impl FromStr for VolumeSpec {
    type Err = VolumeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, device) = s.split_once('=').ok_or_else(|| VolumeError::Spec(s.to_string()))?;
        let valid = (1..=253).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(VolumeError::Name(name.to_string()));
        }
        if device.is_empty() {
            return Err(VolumeError::Spec(s.to_string()));
        }
        Ok(Self { name: name.to_string(), device: PathBuf::from(device) })
    }
}

impl fmt::Display for VolumeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.device.display())
    }
}

/// Reads volumes from a file: one `NAME=DEVICE` per line, as on the
/// command line; blank lines and `#` comments are skipped.
pub fn read_specs(path: &std::path::Path) -> Result<Vec<VolumeSpec>, VolumeError> {
    let text = std::fs::read_to_string(path).map_err(|source| VolumeError::Read { path: path.into(), source })?;
    parse_specs(&text).map_err(|(line, source)| VolumeError::File { path: path.into(), line, source: Box::new(source) })
}

fn parse_specs(text: &str) -> Result<Vec<VolumeSpec>, (usize, VolumeError)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.split('#').next().unwrap_or("").trim()))
        .filter(|(_, line)| !line.is_empty())
        .map(|(n, line)| line.parse().map_err(|e| (n, e)))
        .collect()
}

/// The volumes this agent serves.
#[derive(Debug, Clone, Default)]
pub struct Volumes {
    specs: Vec<VolumeSpec>,
}

impl Volumes {
    pub fn new(specs: Vec<VolumeSpec>) -> Result<Self, VolumeError> {
        for (i, spec) in specs.iter().enumerate() {
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(VolumeError::Duplicate(spec.name.clone()));
            }
        }
        Ok(Self { specs })
    }

    pub fn iter(&self) -> impl Iterator<Item = &VolumeSpec> {
        self.specs.iter()
    }

    /// Where `name` is now: the device instance behind its node, and its
    /// extent on that disk.
    pub fn locate(&self, name: &str) -> Result<Extent, VolumeError> {
        let spec = self.specs.iter().find(|s| s.name == name).ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
        Disk::extent_of(&spec.device).map_err(|source| VolumeError::Device { volume: name.to_string(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_rejects_bad_ones() {
        let v: VolumeSpec = "data-1=/dev/loop3".parse().unwrap();
        assert_eq!((v.name.as_str(), v.device.to_str().unwrap()), ("data-1", "/dev/loop3"));
        assert!(matches!("nodevice".parse::<VolumeSpec>(), Err(VolumeError::Spec(_))));
        assert!(matches!("a b=/dev/x".parse::<VolumeSpec>(), Err(VolumeError::Name(_))));
        assert!(matches!("=/dev/x".parse::<VolumeSpec>(), Err(VolumeError::Name(_))));
        assert!(matches!("x=".parse::<VolumeSpec>(), Err(VolumeError::Spec(_))));
        let twice = vec![v.clone(), v];
        assert!(matches!(Volumes::new(twice), Err(VolumeError::Duplicate(_))));
    }

    #[test]
    fn reads_a_volumes_file_with_line_numbers_in_errors() {
        let specs = parse_specs("# volumes\n\ndata=/dev/vdb  # the big one\nlogs=/dev/vdc1\n").unwrap();
        assert_eq!(specs.iter().map(ToString::to_string).collect::<Vec<_>>(), ["data=/dev/vdb", "logs=/dev/vdc1"]);
        let (line, _) = parse_specs("a=/dev/x\nbroken\n").unwrap_err();
        assert_eq!(line, 2);
    }
}
