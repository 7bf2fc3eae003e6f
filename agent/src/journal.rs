//! An append-only journal of opaque records: the crash-safe persistence
//! primitive of the change log (contract §7: "Persisted state survives
//! kill -9 and power loss at any instant: it is either the old or the new
//! version, never a torn mix, and a checksum catches a damaged file").
//!
//! # File format
//!
//! All integers are little-endian.
//!
//! ```text
//! header (24 bytes):  magic "CBTJRNL\0" (8) | version u32 = 1 | salt (8) | crc32c(previous 20 bytes) u32
//! frame, repeated:    length u32 | crc u32 | payload (length bytes)
//!                     crc = crc32c(salt ‖ length bytes ‖ payload)
//! ```
//!
//! The salt is random, drawn whenever a file is written from scratch (on
//! creation and on every [`Journal::rewrite`]), so a frame left in a disk block
//! by another file, or by an older incarnation of this one, never passes the
//! checksum here. It is drawn so that an all-zero frame (length 0, crc 0) is
//! never valid. A payload is at most [`MAX_RECORD_LEN`] bytes.
//!
//! # Reading after a crash: torn tail or damage
//!
//! [`Journal::open`] accepts frames from the header on while they are intact
//! (complete, plausible length, checksum correct). At the first frame that is
//! not, the rest of the file is judged:
//!
//! - **torn tail** (an append cut short; benign, those bytes were never made
//!   durable by [`Journal::sync`]): fewer than 8 bytes remain; or the frame's
//!   declared end lies past the end of the file; or the frame is complete but
//!   fails its checksum and only zero bytes (if any) follow it. Filesystems can
//!   extend a file with zeroes after a power loss, so a zero-filled tail from a
//!   frame boundary on is a torn tail too. The tail is cut off (and fsynced).
//! - **damage** (bytes that were written, maybe acknowledged, are lost): the
//!   frame declares a length over [`MAX_RECORD_LEN`] (this writer never writes
//!   one, and an interrupted write only ever stores a prefix of what was
//!   written); or it is complete, fails its checksum, and non-zero bytes follow
//!   it; or an intact frame can be found at any later offset in the rest of
//!   the file (so a corrupted length that points past the end is not mistaken
//!   for a torn tail). The search checks every offset, but only candidates of
//!   at most 64 KiB or ending in the file's trailing zeroes (or exactly at its
//!   end): it is linear, and misses only a run of corrupted frames in which
//!   every intact frame is larger than 64 KiB and the file also ends torn. If
//!   it would hash more than 1 GiB it gives up and calls the tail damage. On
//!   damage the whole file is first copied aside (`<name>.damaged-<unix-secs>`,
//!   fsynced), then cut back to the last intact frame so appends continue.
//!
//! Every record before the first bad frame is returned; no record whose bytes
//! changed is ever returned (up to crc32c's 2^-32 chance). What cannot be
//! told apart: damage inside the *last* frame that leaves no intact frame
//! after it reads as a torn tail. A caller that knows the previous run ended
//! cleanly (see [`crate::statedir`]) should treat any torn tail as damage.
//!
//! # Writing
//!
//! [`Journal::append`] buffers; [`Journal::sync`] writes the buffer and
//! `fdatasync`s, after which every appended record is durable. A new file
//! (creation, [`Journal::rewrite`], [`write_atomic`]) is written to a temp file
//! in the same directory, fsynced, renamed over the target, and the directory
//! is fsynced: a crash leaves the old file or the new one, and the next
//! [`Journal::open`] removes a leftover temp file. After a failed write or
//! sync the journal refuses further work ([`JournalError::Poisoned`]): what
//! the kernel kept is unknown, and reopening recovers the truth from the file.
//!
//! One process at a time: the caller holds the state directory
//! ([`crate::statedir::StateDir`]) that contains the journal.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The largest record [`Journal::append`] accepts.
pub const MAX_RECORD_LEN: usize = 1 << 30;

const MAGIC: [u8; 8] = *b"CBTJRNL\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 8;
/// Appends are gathered up to this size before a write(2).
const WRITE_BUF: usize = 256 << 10;
/// The torn-tail search checks candidate frames up to this size anywhere.
const SCAN_SMALL_FRAME: usize = 64 << 10;
/// The torn-tail search hashes at most this many bytes, then calls it damage.
const SCAN_BUDGET: usize = 1 << 30;
/// New files are private to the agent.
const FILE_MODE: u32 = 0o600;

/// Errors of the persistence layer (journal, state directory, atomic writes).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not a journal, or its header is damaged. The file is left untouched.
    #[error("{path}: not a usable journal ({reason}); left untouched")]
    BadHeader { path: PathBuf, reason: String },
    /// A journal written by a newer (or unknown) format. Left untouched.
    #[error("{path}: journal format version {version} is not supported (this build reads {VERSION}); left untouched")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("record of {len} bytes exceeds the journal's limit of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    /// An earlier write or sync failed; what reached the disk is unknown.
    #[error("{path}: an earlier write or sync failed; reopen the journal to recover")]
    Poisoned { path: PathBuf },
    /// Another live process holds the state directory.
    #[error("state directory {dir} is in use by {}", holder(.pid))]
    InUse { dir: PathBuf, pid: Option<u32> },
}

fn holder(pid: &Option<u32>) -> String {
    pid.map_or_else(|| "another process".to_string(), |pid| format!("pid {pid}"))
}

pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`Journal::open`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every intact record, in order.
    pub records: Vec<Vec<u8>>,
    /// Bytes of an incomplete last frame that were cut off: a crash during an
    /// append, never acknowledged by [`Journal::sync`] (or damage confined to
    /// the last frame, which looks the same: see the module doc).
    pub torn_tail_bytes: u64,
    /// A bad frame with written data after it: records may have been lost.
    pub damage: Option<Damage>,
}

/// Real damage: everything from `offset` on was cut off the journal.
#[derive(Debug)]
pub struct Damage {
    /// Where the first bad frame starts (the journal's new length).
    pub offset: u64,
    pub reason: String,
    /// The whole file as it was found, for forensics.
    pub preserved_copy: PathBuf,
}

/// The per-file checksum seed (see the module doc).
#[derive(Debug, Clone, Copy)]
struct Seal {
    /// crc32c state after the salt.
    seed: u32,
    /// The crc of an empty record, to check zero-length candidates for free.
    empty_crc: u32,
}

impl Seal {
    fn from_salt(salt: &[u8; 8]) -> Seal {
        let seed = crc32c::crc32c(salt);
        Seal {
            seed,
            empty_crc: crc32c::crc32c_append(seed, &0u32.to_le_bytes()),
        }
    }

    /// A new random salt whose empty-record crc is not zero, so an all-zero
    /// frame is never valid.
    fn generate() -> ([u8; 8], Seal) {
        use std::hash::{BuildHasher, RandomState};
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let state = RandomState::new();
        for attempt in 0u32.. {
            let salt = state.hash_one((nanos, std::process::id(), attempt)).to_le_bytes();
            let seal = Seal::from_salt(&salt);
            if seal.empty_crc != 0 {
                return (salt, seal);
            }
        }
        unreachable!("some salt has a non-zero empty crc")
    }

    fn crc(&self, payload: &[u8]) -> u32 {
        if payload.is_empty() {
            return self.empty_crc;
        }
        let len = (payload.len() as u32).to_le_bytes();
        crc32c::crc32c_append(crc32c::crc32c_append(self.seed, &len), payload)
    }

    fn frame_header(&self, payload: &[u8]) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0; FRAME_HEADER_LEN];
        h[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[4..].copy_from_slice(&self.crc(payload).to_le_bytes());
        h
    }
}

fn encode_header(salt: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(salt);
    let crc = crc32c::crc32c(&h[..20]);
    h[20..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn read_header(path: &Path, file: &File, file_len: u64) -> Result<Seal, JournalError> {
    let bad = |reason: String| JournalError::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    let mut h = [0; HEADER_LEN];
    let n = (file_len as usize).min(HEADER_LEN);
    file.read_exact_at(&mut h[..n], 0)
        .map_err(io_err("reading the header", path))?;
    if n < MAGIC.len() || h[..8] != MAGIC {
        return Err(bad(format!("it does not start with the journal magic {MAGIC:?}")));
    }
    if n < 12 {
        return Err(bad(format!(
            "{file_len} bytes, shorter than the {HEADER_LEN}-byte header"
        )));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(JournalError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    if n < HEADER_LEN {
        return Err(bad(format!(
            "{file_len} bytes, shorter than the {HEADER_LEN}-byte header"
        )));
    }
    if crc32c::crc32c(&h[..20]).to_le_bytes() != h[20..] {
        return Err(bad("header checksum mismatch".to_string()));
    }
    Ok(Seal::from_salt(h[12..20].try_into().expect("8 bytes")))
}

fn check_len(record: &[u8]) -> Result<(), JournalError> {
    if record.len() > MAX_RECORD_LEN {
        return Err(JournalError::RecordTooLarge {
            len: record.len(),
            max: MAX_RECORD_LEN,
        });
    }
    Ok(())
}

/// An open journal. See the module doc for the format and the guarantees.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// Positioned at `written`.
    file: File,
    seal: Seal,
    /// Bytes handed to the kernel (the file's length).
    written: u64,
    /// Whole frames not yet written.
    buf: Vec<u8>,
    poisoned: bool,
}

impl Journal {
    /// Opens the journal at `path`, or creates it (header written to a temp
    /// file, fsynced, renamed into place, directory fsynced).
    ///
    /// A file with a wrong magic, an unknown version or a damaged header is an
    /// error and is never modified. A torn tail is cut off; damage is copied
    /// aside and cut off (see the module doc); if the copy cannot be made,
    /// this fails and cuts nothing. A leftover temp file of an interrupted
    /// [`Journal::rewrite`] is removed. Everything returned is durable (the
    /// file and its directory are fsynced first).
    pub fn open(path: &Path) -> Result<(Journal, Recovered), JournalError> {
        remove_if_present(&temp_path(path))?;
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Self::recover(path, file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(io_err("opening", path)(e)),
        }
    }

    fn create(path: &Path) -> Result<(Journal, Recovered), JournalError> {
        let (salt, seal) = Seal::generate();
        let file = write_temp(path, |w| w.write_all(&encode_header(&salt)))?;
        rename_temp(path)?;
        sync_parent(path)?;
        let journal = Journal::new(path, file, seal, HEADER_LEN as u64);
        Ok((journal, Recovered::default()))
    }

    fn new(path: &Path, file: File, seal: Seal, written: u64) -> Journal {
        Journal {
            path: path.to_path_buf(),
            file,
            seal,
            written,
            buf: Vec::new(),
            poisoned: false,
        }
    }

    fn recover(path: &Path, mut file: File) -> Result<(Journal, Recovered), JournalError> {
        let file_len = file.metadata().map_err(io_err("stat", path))?.len();
        let seal = read_header(path, &file, file_len)?;
        let (records, end) = read_frames(path, &file, seal, file_len)?;
        let mut recovered = Recovered {
            records,
            ..Recovered::default()
        };
        match judge_tail(path, &file, seal, end, file_len)? {
            Tail::Clean => {}
            Tail::Torn => recovered.torn_tail_bytes = file_len - end,
            Tail::Damaged(reason) => {
                let preserved_copy = preserve_damaged(path)?;
                recovered.damage = Some(Damage {
                    offset: end,
                    reason,
                    preserved_copy,
                });
            }
        }
        if end < file_len {
            file.set_len(end).map_err(io_err("truncating", path))?;
        }
        // What is returned must be durable: a killed predecessor's appends, or
        // the rename of its rewrite, may still be only in memory.
        file.sync_all().map_err(io_err("fsync", path))?;
        sync_parent(path)?;
        file.seek(SeekFrom::Start(end)).map_err(io_err("seeking", path))?;
        Ok((Journal::new(path, file, seal, end), recovered))
    }

    /// Appends one record. Buffered: durable only after [`Journal::sync`].
    pub fn append(&mut self, record: &[u8]) -> Result<(), JournalError> {
        self.check_usable()?;
        check_len(record)?;
        let frame_len = FRAME_HEADER_LEN + record.len();
        if self.buf.len() + frame_len > WRITE_BUF {
            self.flush()?;
        }
        self.buf.extend_from_slice(&self.seal.frame_header(record));
        if frame_len > WRITE_BUF {
            // Too big to gather: write the header, then the payload in place.
            self.flush()?;
            self.write_out(record)
        } else {
            self.buf.extend_from_slice(record);
            Ok(())
        }
    }

    /// Makes every appended record durable (write + `fdatasync`).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.check_usable()?;
        self.flush()?;
        let result = self.file.sync_data().map_err(io_err("fdatasync", &self.path));
        self.poisoned = result.is_err();
        result
    }

    /// Atomically replaces the whole journal with `records` (compaction):
    /// temp file in the same directory, fsync, rename over the journal, fsync
    /// the directory; appends then continue in the new file. A crash at any
    /// point leaves the old journal or the new one. Appended records not in
    /// `records` are dropped, synced or not.
    ///
    /// If it fails before the rename (e.g. a record over the limit, a full
    /// disk), the old journal is untouched and stays usable.
    pub fn rewrite<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> Result<(), JournalError> {
        self.check_usable()?;
        let (salt, seal) = Seal::generate();
        let mut len = HEADER_LEN as u64;
        let mut too_large = None;
        let file = write_temp(&self.path, |w| {
            w.write_all(&encode_header(&salt))?;
            for record in records {
                if let Err(e) = check_len(record) {
                    too_large = Some(e);
                    return Err(io::Error::other("record too large"));
                }
                w.write_all(&seal.frame_header(record))?;
                w.write_all(record)?;
                len += (FRAME_HEADER_LEN + record.len()) as u64;
            }
            Ok(())
        });
        let file = match (file, too_large) {
            (_, Some(e)) => return Err(e),
            (file, None) => file?,
        };
        rename_temp(&self.path)?;
        // The new file is the journal from here on.
        self.file = file;
        self.seal = seal;
        self.written = len;
        self.buf.clear();
        let result = sync_parent(&self.path);
        self.poisoned = result.is_err();
        result
    }

    /// The journal's length in bytes, header and buffered appends included.
    pub fn len_bytes(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    fn check_usable(&self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), JournalError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.write_out(&buf);
        self.buf = buf;
        self.buf.clear();
        result
    }

    fn write_out(&mut self, bytes: &[u8]) -> Result<(), JournalError> {
        match self.file.write_all(bytes) {
            Ok(()) => {
                self.written += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of it may be in the file: only a reopen knows.
                self.poisoned = true;
                Err(io_err("appending", &self.path)(e))
            }
        }
    }
}

impl Drop for Journal {
    /// Hands buffered records to the kernel (not durable: that is `sync`).
    fn drop(&mut self) {
        if !self.poisoned {
            let _ = self.flush();
        }
    }
}

/// Reads intact frames from the header on. Returns them and where the first
/// frame that is not intact starts (or the file's end).
fn read_frames(path: &Path, file: &File, seal: Seal, file_len: u64) -> Result<(Vec<Vec<u8>>, u64), JournalError> {
    let mut reader = BufReader::with_capacity(WRITE_BUF, file);
    reader
        .seek(SeekFrom::Start(HEADER_LEN as u64))
        .map_err(io_err("seeking", path))?;
    let mut records = Vec::new();
    let mut pos = HEADER_LEN as u64;
    while file_len - pos >= FRAME_HEADER_LEN as u64 {
        let mut h = [0; FRAME_HEADER_LEN];
        reader.read_exact(&mut h).map_err(io_err("reading", path))?;
        let (len, crc) = parse_frame_header(&h);
        let end = pos + (FRAME_HEADER_LEN + len) as u64;
        if len > MAX_RECORD_LEN || end > file_len {
            break;
        }
        let mut payload = vec![0; len];
        reader.read_exact(&mut payload).map_err(io_err("reading", path))?;
        if seal.crc(&payload) != crc {
            break;
        }
        records.push(payload);
        pos = end;
    }
    Ok((records, pos))
}

fn parse_frame_header(h: &[u8]) -> (usize, u32) {
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    (len as usize, crc)
}

enum Tail {
    Clean,
    Torn,
    Damaged(String),
}

/// Judges the bytes from `pos` (the first frame that is not intact) to the
/// end of the file, by the rules in the module doc.
fn judge_tail(path: &Path, file: &File, seal: Seal, pos: u64, file_len: u64) -> Result<Tail, JournalError> {
    let rest = file_len - pos;
    if rest == 0 {
        return Ok(Tail::Clean);
    }
    if rest < FRAME_HEADER_LEN as u64 {
        return Ok(Tail::Torn);
    }
    let mut h = [0; FRAME_HEADER_LEN];
    file.read_exact_at(&mut h, pos).map_err(io_err("reading", path))?;
    let (len, _) = parse_frame_header(&h);
    if len > MAX_RECORD_LEN {
        return Ok(Tail::Damaged(format!(
            "the frame at offset {pos} declares {len} bytes, over the {MAX_RECORD_LEN}-byte limit"
        )));
    }
    let end = pos + (FRAME_HEADER_LEN + len) as u64;
    let what = if end <= file_len {
        if let Some(at) = first_nonzero(path, file, end, file_len)? {
            return Ok(Tail::Damaged(format!(
                "the frame at offset {pos} ({len} bytes) fails its checksum, and data follows \
                 (a non-zero byte at offset {at}, file length {file_len})"
            )));
        }
        "fails its checksum"
    } else {
        "runs past the end of the file"
    };
    // Looks torn: make sure nothing intact follows.
    let mut suffix = vec![0; rest as usize];
    file.read_exact_at(&mut suffix, pos).map_err(io_err("reading", path))?;
    Ok(match find_intact_frame(&suffix, seal) {
        Search::NotFound => Tail::Torn,
        Search::Found(at) => Tail::Damaged(format!(
            "the frame at offset {pos} ({len} bytes) {what}, but an intact frame follows at offset {}",
            pos + at as u64
        )),
        Search::GaveUp => Tail::Damaged(format!(
            "the frame at offset {pos} ({len} bytes) {what}, and the {rest} bytes after it could \
             not be searched for intact frames within {SCAN_BUDGET} bytes of hashing"
        )),
    })
}

/// The offset of the first non-zero byte in `[from, to)`.
fn first_nonzero(path: &Path, file: &File, from: u64, to: u64) -> Result<Option<u64>, JournalError> {
    let mut buf = vec![0; WRITE_BUF];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at).map_err(io_err("reading", path))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

enum Search {
    Found(usize),
    NotFound,
    GaveUp,
}

/// Looks for an intact frame at any offset after the first byte of `buf`
/// (see the module doc for which candidates are checked).
fn find_intact_frame(buf: &[u8], seal: Seal) -> Search {
    let zeros_from = buf.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut budget = SCAN_BUDGET;
    for at in 1..buf.len().saturating_sub(FRAME_HEADER_LEN - 1) {
        let (len, crc) = parse_frame_header(&buf[at..at + FRAME_HEADER_LEN]);
        let start = at + FRAME_HEADER_LEN;
        if len > buf.len() - start {
            continue;
        }
        let end = start + len;
        if len > SCAN_SMALL_FRAME && end < zeros_from {
            continue;
        }
        if len > budget {
            return Search::GaveUp;
        }
        budget -= len;
        if seal.crc(&buf[start..end]) == crc {
            return Search::Found(at);
        }
    }
    Search::NotFound
}

/// Copies the damaged file aside (`<name>.damaged-<unix-secs>[.N]`), fsynced.
fn preserve_damaged(path: &Path) -> Result<PathBuf, JournalError> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = path.file_name().unwrap_or_default();
    for n in 0u32.. {
        let mut copy_name = name.to_os_string();
        copy_name.push(format!(".damaged-{secs}"));
        if n > 0 {
            copy_name.push(format!(".{n}"));
        }
        let copy = path.with_file_name(copy_name);
        let mut out = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&copy)
        {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("creating a copy of the damaged journal", &copy)(e)),
        };
        let result = File::open(path)
            .and_then(|mut src| io::copy(&mut src, &mut out))
            .and_then(|_| out.sync_all())
            .map_err(io_err("copying the damaged journal", &copy))
            .and_then(|()| sync_parent(&copy));
        if result.is_err() {
            let _ = fs::remove_file(&copy);
        }
        return result.map(|()| copy);
    }
    unreachable!("a free name exists")
}

/// Replaces `path` with `bytes` atomically: a crash leaves the old content or
/// the new one. Writes `.<name>.tmp` beside it, fsyncs it, renames it over
/// `path`, fsyncs the directory. One writer per path at a time.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    write_temp(path, |w| w.write_all(bytes))?;
    rename_temp(path)?;
    sync_parent(path)
}

/// The temp file a replacement of `path` is written to.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes [`temp_path`]`(path)` with `fill` and fsyncs it. On failure the
/// temp file is removed.
fn write_temp(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> Result<File, JournalError> {
    let tmp = temp_path(path);
    let result = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .and_then(|file| {
            let mut w = BufWriter::with_capacity(WRITE_BUF, file);
            fill(&mut w)?;
            let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()?;
            Ok(file)
        })
        .map_err(io_err("writing", &tmp));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames the temp file of `path` over it. On failure the temp file is
/// removed. The rename is durable only after [`sync_parent`].
fn rename_temp(path: &Path) -> Result<(), JournalError> {
    let tmp = temp_path(path);
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("renaming a new version into place", path)(e)
    })
}

/// fsyncs the directory holding `path`, making a rename or a new name durable.
pub(crate) fn sync_parent(path: &Path) -> Result<(), JournalError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync", dir))
}

pub(crate) fn remove_if_present(path: &Path) -> Result<(), JournalError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory, removed on drop. On tmpfs when there is one: the
    /// logic is the same, and the many fsyncs stay cheap.
    pub(crate) struct Scratch(pub PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Scratch {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("cbt-test-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch(dir)
        }

        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn open(path: &Path) -> (Journal, Recovered) {
        Journal::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    }

    /// Records of assorted sizes, no two alike, none containing zero bytes.
    fn sample_records() -> Vec<Vec<u8>> {
        [0usize, 1, 5, 8, 9, 40, 200]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (1 + (i * 31 + j * 7) % 255) as u8).collect())
            .collect()
    }

    /// A journal holding `records`, synced. Returns its bytes and where each
    /// frame starts (plus the end).
    fn build(path: &Path, records: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
        let (mut j, rec) = open(path);
        assert!(rec.records.is_empty());
        let mut starts = vec![j.len_bytes()];
        for r in records {
            j.append(r).unwrap();
            starts.push(j.len_bytes());
        }
        j.sync().unwrap();
        drop(j);
        let bytes = fs::read(path).unwrap();
        assert_eq!(bytes.len() as u64, *starts.last().unwrap());
        (bytes, starts)
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip() {
        let dir = Scratch::new("journal-round-trip");
        let path = dir.path("journal");
        let records = sample_records();
        let (bytes, _) = build(&path, &records);
        assert_eq!(&bytes[..8], b"CBTJRNL\0");

        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, records);
        assert_eq!(rec.torn_tail_bytes, 0);
        assert!(rec.damage.is_none());
        // Big records bypass the buffer; unsynced ones are flushed on drop.
        let big = vec![7u8; WRITE_BUF + 3];
        j.append(&big).unwrap();
        j.append(b"after big").unwrap();
        let len = j.len_bytes();
        drop(j);
        assert_eq!(fs::metadata(&path).unwrap().len(), len);
        let (_, rec) = open(&path);
        let mut expected = records.clone();
        expected.push(big);
        expected.push(b"after big".to_vec());
        assert_eq!(rec.records, expected);
        assert_eq!(file_names(&dir.0), ["journal"]);
    }

    #[test]
    fn truncation_at_every_offset_recovers_the_complete_prefix() {
        let dir = Scratch::new("journal-truncate");
        let records = sample_records();
        let (bytes, starts) = build(&dir.path("original"), &records);
        let path = dir.path("journal");
        for cut in 0..=bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            if cut < HEADER_LEN {
                // Only a file we never wrote (creation is atomic) is this short.
                let err = Journal::open(&path).expect_err("a cut header must not open");
                assert!(matches!(err, JournalError::BadHeader { .. }), "cut {cut}: {err}");
                assert_eq!(fs::read(&path).unwrap(), &bytes[..cut], "cut {cut}: file changed");
                continue;
            }
            let complete = starts.iter().skip(1).filter(|&&end| end <= cut as u64).count();
            let boundary = starts[complete];
            let (mut j, rec) = open(&path);
            assert_eq!(rec.records, records[..complete], "cut {cut}");
            assert_eq!(rec.torn_tail_bytes, cut as u64 - boundary, "cut {cut}");
            assert!(rec.damage.is_none(), "cut {cut}: {:?}", rec.damage);
            assert_eq!(fs::metadata(&path).unwrap().len(), boundary, "cut {cut}");
            j.append(b"next").unwrap();
            j.sync().unwrap();
            drop(j);
            let (_, rec) = open(&path);
            let mut expected = records[..complete].to_vec();
            expected.push(b"next".to_vec());
            assert_eq!(rec.records, expected, "cut {cut}: append after the cut");
            assert_eq!(rec.torn_tail_bytes, 0);
        }
    }

    #[test]
    fn a_flipped_byte_never_returns_altered_records() {
        let dir = Scratch::new("journal-flip");
        let records = sample_records();
        let (bytes, starts) = build(&dir.path("original"), &records);
        let last = records.len() - 1;
        let path = dir.path("journal");
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] ^= mask;
                fs::write(&path, &damaged).unwrap();
                let at = format!("byte {i} ^ {mask:#04x}");
                if i < HEADER_LEN {
                    let err = Journal::open(&path).expect_err(&at);
                    assert!(
                        matches!(
                            err,
                            JournalError::BadHeader { .. } | JournalError::UnsupportedVersion { .. }
                        ),
                        "{at}: {err}"
                    );
                    assert_eq!(fs::read(&path).unwrap(), damaged, "{at}: file changed");
                    continue;
                }
                let k = starts.iter().skip(1).position(|&end| end > i as u64).unwrap();
                let (j, rec) = open(&path);
                drop(j);
                assert_eq!(rec.records, records[..k], "{at}");
                assert_eq!(fs::metadata(&path).unwrap().len(), starts[k], "{at}");
                match &rec.damage {
                    Some(d) => {
                        assert_eq!(d.offset, starts[k], "{at}");
                        assert_eq!(rec.torn_tail_bytes, 0, "{at}");
                        assert_eq!(fs::read(&d.preserved_copy).unwrap(), damaged, "{at}");
                        fs::remove_file(&d.preserved_copy).unwrap();
                    }
                    // Only the last frame's damage can pass for a torn tail.
                    None => {
                        assert_eq!(k, last, "{at}: damage reported as a torn tail");
                        assert_eq!(rec.torn_tail_bytes, bytes.len() as u64 - starts[k], "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_length_pointing_past_the_end_mid_file_is_damage() {
        let dir = Scratch::new("journal-long-len");
        let path = dir.path("journal");
        // Frames bigger than the search's small-frame limit: found because
        // the last one ends at the end of the file.
        let records = vec![vec![3u8; 100_000], vec![4u8; 100_000], vec![5u8; 70_000]];
        let (mut bytes, starts) = build(&path, &records);
        let at = starts[1] as usize;
        bytes[at..at + 4].copy_from_slice(&200_000u32.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..1]);
        let damage = rec.damage.expect("damage");
        assert_eq!(damage.offset, starts[1]);
        assert!(damage.reason.contains("intact frame follows"), "{}", damage.reason);
    }

    #[test]
    fn a_big_record_cut_short_is_a_torn_tail() {
        let dir = Scratch::new("journal-big-torn");
        let path = dir.path("journal");
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let records = vec![b"first".to_vec(), big];
        let (bytes, starts) = build(&path, &records);
        for cut in [starts[1] + 9, starts[1] + 1_000_000, bytes.len() as u64 - 1] {
            fs::write(&path, &bytes[..cut as usize]).unwrap();
            let (_, rec) = open(&path);
            assert_eq!(rec.records, records[..1], "cut {cut}");
            assert_eq!(rec.torn_tail_bytes, cut - starts[1], "cut {cut}");
            assert!(rec.damage.is_none(), "cut {cut}: {:?}", rec.damage);
        }
    }

    #[test]
    fn zero_filled_tails_are_torn_and_zeroed_frames_mid_file_are_damage() {
        let dir = Scratch::new("journal-zeros");
        let path = dir.path("journal");
        let records = sample_records();
        let (bytes, starts) = build(&dir.path("original"), &records);

        // The filesystem extended the file with zeroes after the last frame.
        for zeros in [1usize, 7, 8, 4096] {
            let mut z = bytes.clone();
            z.resize(bytes.len() + zeros, 0);
            fs::write(&path, &z).unwrap();
            let (_, rec) = open(&path);
            assert_eq!(rec.records, records, "{zeros} zeroes");
            assert_eq!(rec.torn_tail_bytes, zeros as u64);
            assert!(rec.damage.is_none());
        }

        // The last frame half written, then zeroes.
        let last = starts[starts.len() - 2] as usize;
        let mut z = bytes[..last + 8 + 100].to_vec();
        z.resize(bytes.len() + 4096, 0);
        fs::write(&path, &z).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..records.len() - 1]);
        assert_eq!(rec.torn_tail_bytes, (z.len() - last) as u64);
        assert!(rec.damage.is_none());

        // A complete frame failing its checksum, then garbage holding no frame.
        let mut z = bytes.clone();
        z.extend_from_slice(&4u32.to_le_bytes());
        z.extend_from_slice(&[0xee; 4 + 4 + 64]);
        fs::write(&path, &z).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records);
        let damage = rec.damage.expect("damage");
        assert_eq!(damage.offset, bytes.len() as u64);
        assert!(damage.reason.contains("data follows"), "{}", damage.reason);

        // A zeroed frame with intact frames after it.
        let mut z = bytes.clone();
        z[starts[3] as usize..starts[4] as usize].fill(0);
        fs::write(&path, &z).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..3]);
        assert_eq!(rec.damage.expect("damage").offset, starts[3]);
    }

    #[test]
    fn wrong_magic_or_version_is_an_error_and_never_overwritten() {
        let dir = Scratch::new("journal-magic");
        let path = dir.path("journal");
        for content in [b"not a journal at all, just text".to_vec(), Vec::new()] {
            fs::write(&path, &content).unwrap();
            let err = Journal::open(&path).expect_err("not a journal");
            assert!(matches!(err, JournalError::BadHeader { .. }), "{err}");
            assert!(err.to_string().contains("left untouched"), "{err}");
            assert_eq!(fs::read(&path).unwrap(), content);
        }
        let (mut bytes, _) = build(&dir.path("original"), &sample_records());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = Journal::open(&path).expect_err("future version");
        assert!(
            matches!(err, JournalError::UnsupportedVersion { version: 2, .. }),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn rewrite_replaces_the_content_and_appends_continue() {
        let dir = Scratch::new("journal-rewrite");
        let path = dir.path("journal");
        let (mut j, _) = open(&path);
        for r in [&b"a"[..], b"b", b"c"] {
            j.append(r).unwrap();
        }
        j.sync().unwrap();
        j.append(b"unsynced, dropped by the rewrite").unwrap();
        j.rewrite([&b"x"[..], b"yy"]).unwrap();
        j.append(b"z").unwrap();
        j.sync().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), j.len_bytes());
        drop(j);
        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, [&b"x"[..], b"yy", b"z"]);
        j.rewrite(std::iter::empty()).unwrap();
        drop(j);
        let (_, rec) = open(&path);
        assert!(rec.records.is_empty());
        assert_eq!(file_names(&dir.0), ["journal"]);
    }

    #[test]
    fn a_crash_during_rewrite_leaves_the_old_journal() {
        let dir = Scratch::new("journal-rewrite-crash");
        let path = dir.path("journal");
        let records = sample_records();
        build(&path, &records);
        let tmp = temp_path(&path);

        // Killed while writing the temp file.
        fs::write(&tmp, b"CBTJRNL\0 half a header").unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records);
        assert!(!tmp.exists());

        // The temp file complete and fsynced, the rename never happened.
        let (salt, seal) = Seal::generate();
        write_temp(&path, |w| {
            w.write_all(&encode_header(&salt))?;
            w.write_all(&seal.frame_header(b"new"))?;
            w.write_all(b"new")
        })
        .unwrap();
        assert!(tmp.exists());
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records);
        assert!(rec.damage.is_none() && rec.torn_tail_bytes == 0);
        assert_eq!(file_names(&dir.0), ["journal"]);

        // A failed rewrite (a record over the limit) keeps the old journal usable.
        let (mut j, _) = open(&path);
        let huge = vec![0u8; MAX_RECORD_LEN + 1]; // zeroed pages, never touched
        let err = j.rewrite([&b"fine"[..], &huge]).expect_err("too large");
        assert!(matches!(err, JournalError::RecordTooLarge { .. }), "{err}");
        drop(huge);
        assert!(!tmp.exists());
        j.append(b"still appending").unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, rec) = open(&path);
        let mut expected = records.clone();
        expected.push(b"still appending".to_vec());
        assert_eq!(rec.records, expected);
    }

    #[test]
    fn appends_continue_after_damage_is_cut_off() {
        let dir = Scratch::new("journal-after-damage");
        let path = dir.path("journal");
        let records = sample_records();
        let (mut bytes, starts) = build(&path, &records);
        bytes[starts[2] as usize + 8] ^= 0x10; // payload of record 2
        fs::write(&path, &bytes).unwrap();
        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, records[..2]);
        let damage = rec.damage.expect("damage");
        assert_eq!(damage.offset, starts[2]);
        assert!(damage.reason.contains("checksum"), "{}", damage.reason);
        let copy_name = damage
            .preserved_copy
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(copy_name.starts_with("journal.damaged-"), "{copy_name}");
        assert_eq!(fs::read(&damage.preserved_copy).unwrap(), bytes);
        j.append(b"after damage").unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, rec) = open(&path);
        assert_eq!(rec.records, [&records[0][..], &records[1][..], &b"after damage"[..]]);
        assert!(rec.damage.is_none());
    }

    #[test]
    fn oversized_records_and_failed_writes_are_clear_errors() {
        let dir = Scratch::new("journal-errors");
        let path = dir.path("journal");
        let (mut j, _) = open(&path);
        let huge = vec![0u8; MAX_RECORD_LEN + 1];
        let err = j.append(&huge).expect_err("too large");
        assert!(matches!(err, JournalError::RecordTooLarge { len, .. } if len == huge.len()));
        drop(huge);
        j.append(b"kept").unwrap();
        j.sync().unwrap();

        // A write that fails poisons the journal; a reopen sees what was synced.
        j.file = File::open(&path).unwrap(); // read-only: writes fail
        j.append(b"lost").unwrap();
        let err = j.sync().expect_err("write to a read-only descriptor");
        assert!(matches!(&err, JournalError::Io { op: "appending", .. }), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(matches!(j.append(b"x"), Err(JournalError::Poisoned { .. })));
        assert!(matches!(j.sync(), Err(JournalError::Poisoned { .. })));
        drop(j);
        let (_, rec) = open(&path);
        assert_eq!(rec.records, [b"kept"]);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let dir = Scratch::new("write-atomic");
        let path = dir.path("state");
        fs::write(temp_path(&path), b"leftover of a crash").unwrap();
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(file_names(&dir.0), ["state"]);
        let err = write_atomic(&dir.path("missing/state"), b"x").expect_err("no such dir");
        assert!(err.to_string().contains("missing/.state.tmp"), "{err}");
    }
}
