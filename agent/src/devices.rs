//! Block devices as sysfs shows them: names, instance numbers (`diskseq`)
//! and the kernel's own I/O counters used as an independent witness.

use std::{fmt, fs, path::PathBuf};

/// Kernel-internal `dev_t` encoding used by tracepoints and `bd_dev`.
const MINOR_BITS: u32 = 20;

/// A device *instance*: a `dev_t` can be handed to another disk after a
/// detach, `diskseq` cannot (contract §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DeviceKey {
    /// `major << 20 | minor`.
    pub dev: u32,
    pub diskseq: u64,
}

impl DeviceKey {
    pub fn major(&self) -> u32 {
        self.dev >> MINOR_BITS
    }
    pub fn minor(&self) -> u32 {
        self.dev & ((1 << MINOR_BITS) - 1)
    }
    pub fn from_major_minor(major: u32, minor: u32, diskseq: u64) -> Self {
        Self { dev: major << MINOR_BITS | minor, diskseq }
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}#{}", self.major(), self.minor(), self.diskseq)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
    #[error("{0} is not a block device")]
    NotBlock(PathBuf),
}

pub(crate) fn read(path: PathBuf) -> Result<String, DeviceError> {
    fs::read_to_string(&path).map_err(|source| DeviceError::Io { path, source })
}

pub(crate) fn parse<T: std::str::FromStr>(path: PathBuf) -> Result<T, DeviceError> {
    let content = read(path.clone())?;
    content.trim().parse().map_err(|_| DeviceError::Parse { path, content })
}

/// The kernel's completed-I/O counters for a whole disk (`/sys/block/X/stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelCounters {
    pub write_sectors: u64,
    pub discard_sectors: u64,
    /// Writes (and discards) in flight; all I/O if the kernel does not
    /// tell them apart.
    pub in_flight: u64,
    /// The device holds I/O where none of these counters sees it (a
    /// suspended device-mapper device queues bios before accounting them):
    /// "nothing in flight" proves nothing.
    #[serde(default)]
    pub holds_io: bool,
    /// The kernel does not account this device's I/O (`queue/iostats` is
    /// 0): its counters and in-flight figures stay still whatever happens,
    /// so they prove nothing and witness nothing.
    #[serde(default)]
    pub blind: bool,
}

impl KernelCounters {
    /// Every sector an op that changes content completed on (writes,
    /// write-zeroes and secure erase count as writes, discards apart).
    pub fn changed_sectors(&self) -> u64 {
        self.write_sectors + self.discard_sectors
    }
}

/// A device node's place on its whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub disk: Disk,
    pub offset_bytes: u64,
    pub size_bytes: u64,
}

/// A whole disk present now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub key: DeviceKey,
}

pub(crate) fn sys_block(name: &str) -> PathBuf {
    PathBuf::from("/sys/block").join(name)
}

impl Disk {
    /// Reads the disk `name` (e.g. `loop3`) from sysfs.
    pub fn by_name(name: &str) -> Result<Self, DeviceError> {
        let base = sys_block(name);
        let devnum = read(base.join("dev"))?;
        let (major, minor) = devnum
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| DeviceError::Parse { path: base.join("dev"), content: devnum.clone() })?;
        let diskseq = parse(base.join("diskseq"))?;
        Ok(Self { name: name.to_string(), key: DeviceKey::from_major_minor(major, minor, diskseq) })
    }

    /// The whole disk for a device node or sysfs name, e.g. `/dev/loop3p1`
    /// resolves to `loop3`.
    pub fn for_path(path: &std::path::Path) -> Result<Self, DeviceError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = fs::metadata(path).map_err(|source| DeviceError::Io { path: path.into(), source })?;
        if !meta.file_type().is_block_device() {
            return Err(DeviceError::NotBlock(path.into()));
        }
        let rdev = meta.rdev();
        Self::holding(libc::major(rdev), libc::minor(rdev)).map_err(|e| match e {
            DeviceError::NotBlock(_) => DeviceError::NotBlock(path.into()),
            e => e,
        })
    }

    /// The whole disk of block device `major:minor` (a disk or a partition).
    pub fn holding(major: u32, minor: u32) -> Result<Self, DeviceError> {
        let link = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let real = fs::canonicalize(&link).map_err(|source| DeviceError::Io { path: link.clone(), source })?;
        // A partition's sysfs dir has a `partition` file; its parent is the disk.
        let disk_dir = if real.join("partition").exists() { real.parent().map(PathBuf::from).unwrap_or(real) } else { real };
        let name = disk_dir.file_name().and_then(|n| n.to_str()).ok_or(DeviceError::NotBlock(link))?;
        Self::by_name(name)
    }

    /// Where the device node `path` (a disk or a partition) lies: its disk,
    /// its start on the disk and its size, in bytes.
    pub fn extent_of(path: &std::path::Path) -> Result<Extent, DeviceError> {
        use std::os::unix::fs::MetadataExt;
        let disk = Self::for_path(path)?;
        let rdev = fs::metadata(path).map_err(|source| DeviceError::Io { path: path.into(), source })?.rdev();
        let node = PathBuf::from(format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev)));
        let start_sectors: u64 = if node.join("partition").exists() { parse(node.join("start"))? } else { 0 };
        let size_sectors: u64 = parse(node.join("size"))?;
        // The disk may have changed hands between the reads.
        if Self::for_path(path)?.key != disk.key {
            return Err(DeviceError::Parse { path: path.into(), content: "device replaced while reading".into() });
        }
        Ok(Extent { disk, offset_bytes: start_sectors * 512, size_bytes: size_sectors * 512 })
    }

    /// Every whole disk present now.
    pub fn all() -> Vec<Self> {
        let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| Self::by_name(&name).ok())
            .collect()
    }

    /// The current counters, or `None` if this instance is gone (the name
    /// now belongs to another diskseq, or to nothing).
    pub fn counters(&self) -> Option<KernelCounters> {
        let now = Self::by_name(&self.name).ok()?;
        if now.key != self.key {
            return None;
        }
        let stat = read(sys_block(&self.name).join("stat")).ok()?;
        let mut counters = parse_stat(&stat)?;
        // Reads in flight say nothing about changes, and a device being
        // probed (blkid, udev) is never idle by the total count.
        if let Some(writes) = read(sys_block(&self.name).join("inflight")).ok().and_then(|s| parse_inflight_writes(&s)) {
            counters.in_flight = writes;
        }
        counters.holds_io = read(sys_block(&self.name).join("dm/suspended")).is_ok_and(|s| s.trim() != "0");
        counters.blind = read(sys_block(&self.name).join("queue/iostats")).is_ok_and(|s| s.trim() == "0");
        // Re-check: the device may have been replaced between the reads.
        (Self::by_name(&self.name).ok()?.key == self.key).then_some(counters)
    }
}

/// Parses `/sys/block/X/stat` (Documentation/block/stat.rst).
pub fn parse_stat(stat: &str) -> Option<KernelCounters> {
    let fields: Vec<u64> = stat.split_whitespace().map(|f| f.parse().ok()).collect::<Option<_>>()?;
    Some(KernelCounters {
        write_sectors: *fields.get(6)?,
        in_flight: *fields.get(8)?,
        discard_sectors: fields.get(13).copied().unwrap_or(0),
        holds_io: false,
        blind: false,
    })
}

/// The writes (including discards) in flight, from `/sys/block/X/inflight`
/// ("reads writes").
pub fn parse_inflight_writes(inflight: &str) -> Option<u64> {
    inflight.split_whitespace().nth(1)?.parse().ok()
}

/// The device currently holding `dev`, for hooks that do not report the
/// instance (classic tracepoints).
pub fn instance_of(dev: u32) -> Option<Disk> {
    let key = DeviceKey { dev, diskseq: 0 };
    let link = PathBuf::from(format!("/sys/dev/block/{}:{}", key.major(), key.minor()));
    let real = fs::canonicalize(link).ok()?;
    Disk::by_name(real.file_name()?.to_str()?).ok()
}

/// This boot's id: `CLOCK_MONOTONIC` readings and `diskseq` values only
/// compare within one boot.
pub fn boot_id() -> std::io::Result<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_fields() {
        let line = "  100 0 800 5  42 3 4096 9  2 10 20  7 0 1024 1  0 0\n";
        let c = parse_stat(line).unwrap();
        assert_eq!(c.write_sectors, 4096);
        assert_eq!(c.in_flight, 2);
        assert_eq!(c.discard_sectors, 1024);
        assert_eq!(c.changed_sectors(), 5120);
        // Old kernels without discard fields still parse.
        assert_eq!(parse_stat("1 2 3 4 5 6 7 8 9 10 11").unwrap().discard_sectors, 0);
        assert!(parse_stat("garbage").is_none());
        assert_eq!(parse_inflight_writes("       3        5\n"), Some(5));
        assert_eq!(parse_inflight_writes("3"), None);
    }

    #[test]
    fn key_encoding_matches_kernel() {
        let k = DeviceKey::from_major_minor(7, 3, 9);
        assert_eq!(k.dev, 7 << 20 | 3);
        assert_eq!((k.major(), k.minor()), (7, 3));
        assert_eq!(k.to_string(), "7:3#9");
    }
}
