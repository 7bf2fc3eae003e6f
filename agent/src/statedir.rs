//! The agent's state directory: one agent at a time, and a run marker that
//! tells whether the previous run ended cleanly (contract §7: "The process
//! writes a 'dirty' marker when it starts tracking and 'clean' only after its
//! final flush; starting on a dirty state turns the unflushed interval into a
//! gap").
//!
//! Layout: `lock` (holds the `flock` and the holder's pid), `run-marker`, and
//! whatever the agent keeps there (the change-log journal, and copies of a
//! damaged one: `changelog.journal.damaged-*`).
//!
//! Marker format (little-endian), written with [`write_atomic`]:
//! `"CBTM" | version u32 = 1 | state u32 | info length u32 | info | crc32c(all before) u32`.
//! Anything that does not decode exactly (or is over 64 KiB) reads as dirty.
//!
//! The marker is read back, not only written: at a clean stop its info pins
//! the change-log journal's end ([`crate::journal::JournalEnd`]), and the
//! next load treats any other end, or a torn tail, as damage (see
//! `ChangeLog::load`). After a crash (dirty) a torn tail is benign.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::journal::{io_err, remove_if_present, sync_parent, temp_path, write_atomic, JournalError};

const LOCK_FILE: &str = "lock";
const MARKER_FILE: &str = "run-marker";
const MARKER_MAGIC: [u8; 4] = *b"CBTM";
const MARKER_VERSION: u32 = 1;
const STATE_DIRTY: u32 = 0x5954_5244; // "DRTY"
const STATE_CLEAN: u32 = 0x4e41_454c; // "LEAN"
const MARKER_FIXED_LEN: usize = 20;
const MAX_MARKER_LEN: u64 = 64 << 10;

/// How the previous run left the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// True only for an intact marker written by [`StateDir::mark_clean`].
    pub clean: bool,
    /// What the run stored with the marker (empty when unreadable).
    pub info: Vec<u8>,
    /// Why the marker could not be read; it then counts as dirty.
    pub unreadable: Option<String>,
}

impl Marker {
    fn unreadable(reason: String) -> Marker {
        Marker {
            clean: false,
            info: Vec::new(),
            unreadable: Some(reason),
        }
    }
}

/// An exclusively held state directory. The lock is released when this is
/// dropped (or the process dies).
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: File,
    previous: Option<Marker>,
}

impl StateDir {
    /// Creates the directory (mode 0700) if needed and takes an exclusive
    /// `flock` on its lock file; fails with [`JournalError::InUse`] at once if
    /// another process holds it. Reads the marker the previous run left.
    pub fn open(path: &Path) -> Result<StateDir, JournalError> {
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                let e = io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory");
                return Err(io_err("opening the state directory", path)(e));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(io_err("creating the state directory", path))?;
                sync_parent(path)?;
            }
            Err(e) => return Err(io_err("opening the state directory", path)(e)),
        }

        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        // SAFETY: flock only uses the descriptor, which `lock` keeps open.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err("locking", &lock_path)(e));
            }
            let pid = fs::read_to_string(&lock_path).ok().and_then(|s| s.trim().parse().ok());
            return Err(JournalError::InUse {
                dir: path.to_path_buf(),
                pid,
            });
        }
        let pid = format!("{}\n", std::process::id());
        lock.set_len(0)
            .and_then(|()| lock.write_all_at(pid.as_bytes(), 0))
            .map_err(io_err("writing the pid to", &lock_path))?;

        let marker = path.join(MARKER_FILE);
        remove_if_present(&temp_path(&marker))?;
        let previous = read_marker_in(path);
        Ok(StateDir {
            path: path.to_path_buf(),
            _lock: lock,
            previous,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The marker as it was when this run opened the directory; `None` if
    /// there was none (no previous run kept state here).
    pub fn previous_marker(&self) -> Option<&Marker> {
        self.previous.as_ref()
    }

    /// Records that this run is tracking and its state may be unflushed.
    pub fn mark_dirty(&self, info: &[u8]) -> Result<(), JournalError> {
        mark_dirty_in(&self.path, info)
    }

    /// Records that this run's final flush is done. Call nothing after it
    /// that changes state without [`StateDir::mark_dirty`] first.
    pub fn mark_clean(&self, info: &[u8]) -> Result<(), JournalError> {
        write_atomic(&self.path.join(MARKER_FILE), &encode_marker(STATE_CLEAN, info))
    }
}

fn encode_marker(state: u32, info: &[u8]) -> Vec<u8> {
    let info_len = u32::try_from(info.len()).expect("marker info under 4 GiB");
    let mut m = Vec::with_capacity(MARKER_FIXED_LEN + info.len());
    m.extend_from_slice(&MARKER_MAGIC);
    m.extend_from_slice(&MARKER_VERSION.to_le_bytes());
    m.extend_from_slice(&state.to_le_bytes());
    m.extend_from_slice(&info_len.to_le_bytes());
    m.extend_from_slice(info);
    let crc = crc32c::crc32c(&m);
    m.extend_from_slice(&crc.to_le_bytes());
    m
}

/// The run marker in the state directory `dir`, as the last run left it
/// (`None`: there is none). For code that runs while the caller holds
/// `dir` and has not written the marker yet (the change log's load).
pub fn read_marker_in(dir: &Path) -> Option<Marker> {
    let path = dir.join(MARKER_FILE);
    // A marker is a few dozen bytes: a bigger file is not one, and is not
    // read whole.
    match fs::metadata(&path) {
        Ok(m) if m.len() > MAX_MARKER_LEN => {
            return Some(Marker::unreadable(format!(
                "{}: {} bytes, not a run marker",
                path.display(),
                m.len()
            )))
        }
        _ => {}
    }
    match fs::read(&path) {
        Ok(bytes) => Some(decode_marker(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(Marker::unreadable(format!("{}: reading: {e}", path.display()))),
    }
}

/// [`StateDir::mark_dirty`] for code that only has the directory's path
/// (the change log, when its load changed the state); the caller holds it.
pub(crate) fn mark_dirty_in(dir: &Path, info: &[u8]) -> Result<(), JournalError> {
    write_atomic(&dir.join(MARKER_FILE), &encode_marker(STATE_DIRTY, info))
}

fn decode_marker(m: &[u8]) -> Marker {
    let u32_at = |i: usize| u32::from_le_bytes(m[i..i + 4].try_into().expect("4 bytes"));
    if m.len() < MARKER_FIXED_LEN || m[..4] != MARKER_MAGIC {
        return Marker::unreadable("not a run marker".to_string());
    }
    let body = m.len() - 4;
    if crc32c::crc32c(&m[..body]) != u32_at(body) {
        return Marker::unreadable("run marker checksum mismatch".to_string());
    }
    if u32_at(4) != MARKER_VERSION {
        return Marker::unreadable(format!("run marker version {} is not supported", u32_at(4)));
    }
    if u32_at(12) as usize != body - 16 {
        return Marker::unreadable("run marker length mismatch".to_string());
    }
    let clean = match u32_at(8) {
        STATE_CLEAN => true,
        STATE_DIRTY => false,
        other => return Marker::unreadable(format!("unknown run marker state {other:#x}")),
    };
    Marker {
        clean,
        info: m[16..body].to_vec(),
        unreadable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::tests::Scratch;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_open_fails_while_the_first_is_alive() {
        let scratch = Scratch::new("statedir-lock");
        let dir = scratch.path("state/nested");
        let first = StateDir::open(&dir).expect("first open");
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let err = StateDir::open(&dir).expect_err("second open while the first holds it");
        match &err {
            JournalError::InUse { dir: d, pid } => {
                assert_eq!(d, &dir);
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("is in use by pid"), "{msg}");
        assert!(msg.contains("state/nested"), "{msg}");
        drop(first);
        StateDir::open(&dir).expect("open after the first is gone");
    }

    #[test]
    fn the_marker_round_trips() {
        let scratch = Scratch::new("statedir-marker");
        let dir = scratch.path("state");
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(state.previous_marker(), None);
        state.mark_dirty(b"run 1").unwrap();
        // "previous" is what was there at open, not what this run wrote.
        assert_eq!(state.previous_marker(), None);
        drop(state);

        let state = StateDir::open(&dir).unwrap();
        let dirty = Marker {
            clean: false,
            info: b"run 1".to_vec(),
            unreadable: None,
        };
        assert_eq!(state.previous_marker(), Some(&dirty));
        state.mark_clean(b"").unwrap();
        drop(state);

        let state = StateDir::open(&dir).unwrap();
        let clean = Marker {
            clean: true,
            info: Vec::new(),
            unreadable: None,
        };
        assert_eq!(state.previous_marker(), Some(&clean));
        let mut names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["lock", "run-marker"]);
    }

    #[test]
    fn a_damaged_marker_reads_as_dirty() {
        let scratch = Scratch::new("statedir-damaged");
        let dir = scratch.path("state");
        StateDir::open(&dir).unwrap().mark_clean(b"clean shutdown").unwrap();
        let marker = dir.join(MARKER_FILE);
        let good = fs::read(&marker).unwrap();
        let mut variants: Vec<Vec<u8>> = Vec::new();
        for i in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut m = good.clone();
                m[i] ^= mask;
                variants.push(m);
            }
        }
        variants.extend((0..good.len()).map(|cut| good[..cut].to_vec()));
        variants.push([&good[..], &b"trailing"[..]].concat());
        // A huge (sparse) marker is not read whole.
        let mut huge = good.clone();
        huge.resize(MAX_MARKER_LEN as usize + 1, 0);
        variants.push(huge);
        for (n, m) in variants.iter().enumerate() {
            fs::write(&marker, m).unwrap();
            let state = StateDir::open(&dir).unwrap();
            let seen = state.previous_marker().expect("a marker file exists");
            assert!(!seen.clean, "variant {n} read as clean");
            assert!(seen.unreadable.is_some(), "variant {n}");
        }
    }
}
