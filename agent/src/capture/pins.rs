//! Where a capture's kernel objects are pinned in bpffs, so that they (and
//! the events they keep publishing) outlive the agent process.
//!
//! One directory per agent: the programs' links (which keep them attached),
//! the programs (for their statistics) and the maps the agent reads.

use std::path::{Path, PathBuf};

/// bpffs' `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

const RINGS: &str = "rings";
const UNPUBLISHABLE: &str = "unpublishable";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{0} is not on a bpf filesystem and mounting one there failed")]
    NotBpffs(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The pin directory of one agent.
#[derive(Debug, Clone)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// `dir` must be (inside) a bpffs mount; `/sys/fs/bpf` is mounted if
    /// nothing is mounted there yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory under `root` of the agent whose state is `key` (a
    /// path): agents with different state never share pins.
    pub fn keyed(root: &Path, key: &Path) -> Self {
        let key = std::fs::canonicalize(key).unwrap_or_else(|_| key.to_path_buf());
        let digest = crc32c::crc32c(key.as_os_str().as_encoded_bytes());
        Self::new(root.join(format!("{digest:08x}")))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn rings(&self) -> PathBuf {
        self.dir.join(RINGS)
    }

    pub fn unpublishable(&self) -> PathBuf {
        self.dir.join(UNPUBLISHABLE)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(format!("prog_{name}"))
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join(format!("link_{name}"))
    }

    pub fn exists(&self) -> bool {
        self.rings().exists()
    }

    /// Creates the (empty) directory, mounting bpffs first if needed.
    pub fn create(&self) -> Result<(), PinError> {
        let root = self.dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(root) {
            mount_default_bpffs();
            let root = self.dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
            if !is_bpffs(root) {
                return Err(PinError::NotBpffs(self.dir.clone()));
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| PinError::Io { path: self.dir.clone(), source })
    }

    /// Unpins everything: links first (which detaches the programs once no
    /// process holds them), then the rest. Missing pins are not an error.
    pub fn release(&self) -> Result<bool, PinError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(PinError::Io { path: self.dir.clone(), source }),
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        // Links before programs and maps: detach before anything else goes.
        paths.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
        for path in paths {
            std::fs::remove_file(&path).map_err(|source| PinError::Io { path, source })?;
        }
        std::fs::remove_dir(&self.dir).map_err(|source| PinError::Io { path: self.dir.clone(), source })?;
        Ok(true)
    }
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into a zeroed, correctly sized struct.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type as i64 == BPF_FS_MAGIC
}

/// bpffs is not mounted by default on every host (it is in most
/// distributions and Kubernetes nodes).
fn mount_default_bpffs() {
    let target = Path::new("/sys/fs/bpf");
    if is_bpffs(target) {
        return;
    }
    let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::debug!("bpffs not mounted at /sys/fs/bpf and mount failed");
    }
}
