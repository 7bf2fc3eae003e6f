//! The liveness canary: at every check the agent writes 4 KiB of its own,
//! with O_DIRECT, to a file in its state directory, and the very next drain
//! must hold that write's submission on the disk under the file.
//!
//! Every other proof watches for *lost* events; none shows that the
//! programs still run and still see writes at all (detached by someone,
//! an op table that no longer matches the kernel, a tracepoint that stopped
//! firing). The kernel-counter witness would, but it is blind on a device
//! that is never idle or whose `queue/iostats` is 0.
//!
//! Why the next drain must hold it: the submission program publishes before
//! the bio can complete, and the write returns only after it completed.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::devices::{DeviceKey, Disk};

/// Bytes of the canary file; writes rotate over its 4 KiB blocks.
const FILE_BYTES: u64 = 64 << 10;
const WRITE_BYTES: usize = 4096;

/// One page, aligned as O_DIRECT needs.
#[repr(C, align(4096))]
struct Page([u8; WRITE_BYTES]);

pub struct Canary {
    file: File,
    path: PathBuf,
    disk: Disk,
    next_block: u64,
    page: Box<Page>,
}

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is on no block device (st_dev {major}:{minor}): no canary")]
    NoBlockDevice { path: PathBuf, major: u32, minor: u32 },
}

impl Canary {
    /// A canary file in `dir`, written through once so that later writes
    /// land on allocated blocks.
    pub fn in_dir(dir: &Path) -> Result<Self, CanaryError> {
        let path = dir.join("canary");
        let io_err = |source| CanaryError::Io { path: path.clone(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(io_err)?;
        let mut canary = {
            let dev = file.metadata().map_err(io_err)?.dev();
            let (major, minor) = (libc::major(dev), libc::minor(dev));
            let disk = Disk::holding(major, minor)
                .map_err(|_| CanaryError::NoBlockDevice { path: path.clone(), major, minor })?;
            Self { file, path: path.clone(), disk, next_block: 0, page: Box::new(Page([0; WRITE_BYTES])) }
        };
        for _ in 0..FILE_BYTES / WRITE_BYTES as u64 {
            canary.write().map_err(io_err)?;
        }
        canary.file.sync_all().map_err(io_err)?;
        Ok(canary)
    }

    /// The disk whose submissions must show the canary's writes.
    pub fn disk(&self) -> DeviceKey {
        self.disk.key
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks for the writes on `disk` instead of the one they go to, as if
    /// the programs did not see them: only for tests proving the check.
    #[cfg(feature = "fault-injection")]
    pub fn misdirected(mut self, disk: Disk) -> Self {
        self.disk = disk;
        self
    }

    /// Writes the next 4 KiB block; returns once the write completed.
    pub fn write(&mut self) -> io::Result<()> {
        let offset = self.next_block * WRITE_BYTES as u64;
        self.next_block = (self.next_block + 1) % (FILE_BYTES / WRITE_BYTES as u64);
        self.page.0[..8].copy_from_slice(&offset.to_le_bytes());
        self.file.write_all_at(&self.page.0, offset)
    }
}
