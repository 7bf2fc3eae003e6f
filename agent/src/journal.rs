//! An append-only journal of opaque records: the crash-safe persistence
//! primitive of the change log (contract §7: "Persisted state survives
//! kill -9 and power loss at any instant: it is either the old or the new
//! version, never a torn mix, and a checksum catches a damaged file").
//!
//! # File format (version 2)
//!
//! All integers are little-endian.
//!
//! ```text
//! header (24 bytes):  magic "CBTJRNL\0" (8) | version u32 = 2 | salt (8) | crc32c(previous 20 bytes) u32
//! frame, repeated:    length u32 | seq u64 | payload crc u32 | header crc u32 | payload (length bytes)
//!                     payload crc = crc32c(salt ‖ payload)
//!                     header crc  = crc32c(salt ‖ length ‖ seq ‖ payload crc)
//! ```
//!
//! `seq` numbers the frames of one file 0, 1, 2, ...: a frame that is
//! missing, duplicated or out of order breaks the sequence, so the file
//! proves its own completeness up to its last frame (its *end*: salt, frame
//! count, length; see [`JournalEnd`]). The end itself can only be proven
//! from outside: the change log pins it in the state directory's run marker
//! at a clean stop.
//!
//! The salt is random, drawn whenever a file is written from scratch (on
//! creation and on every [`Journal::rewrite`]), so a frame left in a disk
//! block by another file, or by an older incarnation of this one, never
//! passes here. It is drawn so that an all-zero frame header is never valid.
//! The header crc makes a frame's length trustworthy before anything is
//! read or allocated for it; a payload is at most [`MAX_RECORD_LEN`] bytes.
//!
//! # Reading: torn tail or damage
//!
//! [`Journal::open`] streams frames from the header on while they are intact
//! (header crc, the expected seq, the payload complete and its crc correct),
//! holding one record at a time besides those returned. At the first frame
//! that is not, the rest of the file is judged ([`Tail`]):
//!
//! - **damage**: a valid frame header with the wrong seq (a record missing,
//!   duplicated or reordered); more than [`MAX_TORN_BYTES`] after the last
//!   intact frame (no interrupted append leaves that much: a huge zero or
//!   garbage tail is judged without reading it); a complete frame whose
//!   payload fails its crc with non-zero bytes after it; or an intact frame
//!   anywhere later in the file (checked at every offset: header crc first,
//!   then its payload).
//! - **torn tail** otherwise: an append cut short (fewer bytes than a frame
//!   header, a frame running past the end, zeroes a filesystem added after a
//!   power loss). Benign only if the previous run did not stop cleanly; the
//!   caller knows that, the journal does not.
//!
//! A file holding the magic (or a prefix of it) but a header cut short or
//! failing its checksum is damage at offset 0: creation is atomic, so only
//! damage leaves it so.
//!
//! Every record before the first bad frame is returned; no record whose bytes
//! changed is ever returned (up to crc32c's 2^-32 chance). Open never changes
//! the file: when the tail is not clean (or the file is of an older format),
//! appends are refused ([`JournalError::NeedsRewrite`]) until the caller has
//! recorded what it found and called [`Journal::rewrite`]; after damage it
//! first calls [`Journal::preserve`] to keep the damaged file for a human.
//!
//! Version 1 files (frames `length u32 | crc32c(salt ‖ length ‖ payload) u32 |
//! payload`, no sequence) are still read, so an upgrade keeps its history,
//! and are converted by the caller's rewrite. They cannot prove completeness;
//! any bytes after their last intact frame are reported as damage, since
//! the old format cannot tell a torn append from lost records.
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

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// The largest record [`Journal::append`] accepts. Records are read whole
/// into memory, and the agent runs under a few hundred MiB: the change log
/// splits what it rewrites into records well under this.
pub const MAX_RECORD_LEN: usize = 64 << 20;
/// The most bytes an interrupted append can leave after the last intact
/// frame: one record of the largest size plus the small records gathered
/// with it between two syncs, with room to spare. A longer tail is damage.
pub const MAX_TORN_BYTES: u64 = MAX_RECORD_LEN as u64 + (16 << 20);
/// A damaged file is kept up to this many bytes past the damage: what
/// follows is either more than any journal holds there (a huge tail) or
/// was already counted as damage.
const KEEP_AFTER_DAMAGE: u64 = MAX_TORN_BYTES;
/// At most this many damaged copies are kept beside a journal; after that
/// damage is still handled, but no further copy is made.
pub const MAX_DAMAGED_COPIES: usize = 4;

const MAGIC: [u8; 8] = *b"CBTJRNL\0";
const VERSION: u32 = 2;
const VERSION_1: u32 = 1;
const HEADER_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 20;
const V1_FRAME_HEADER_LEN: usize = 8;
/// Appends are gathered up to this size before a write(2).
const WRITE_BUF: usize = 256 << 10;
/// The search for intact frames reads the tail in blocks of this size.
const SCAN_BLOCK: usize = 1 << 20;
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
    #[error("{path}: journal format version {version} is not supported (this build reads {VERSION_1} and {VERSION}); left untouched")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("record of {len} bytes exceeds the journal's limit of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    /// An earlier write or sync failed; what reached the disk is unknown.
    #[error("{path}: an earlier write or sync failed; reopen the journal to recover")]
    Poisoned { path: PathBuf },
    /// Open found a torn tail, damage or an older format: nothing may be
    /// appended until the journal is rewritten.
    #[error("{path}: the journal must be rewritten before anything is appended (its tail was not clean or its format is old)")]
    NeedsRewrite { path: PathBuf },
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
#[derive(Debug)]
pub struct Recovered {
    /// Every intact record, in order.
    pub records: Vec<Vec<u8>>,
    /// What follows the last intact record.
    pub tail: Tail,
    /// The intact prefix: what the file would be had the tail never been.
    pub end: JournalEnd,
    /// The file's length as found.
    pub file_len: u64,
    /// There was no journal: open created an empty one.
    pub created: bool,
    /// The file is of this older format version (rewrite converts it).
    pub old_version: Option<u32>,
}

/// What follows the last intact frame (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Nothing: the file ends with an intact frame (or its header).
    Clean,
    /// An append cut short, `bytes` long.
    Torn { bytes: u64 },
    /// Bytes that were written may be lost.
    Damaged(Damage),
}

/// Real damage: nothing from `offset` on can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Where the first bad frame starts.
    pub offset: u64,
    pub reason: String,
}

/// Which journal, and how far: the salt names one incarnation of the file
/// (each rewrite draws a new one), `frames` and `bytes` its extent. Written
/// into the run marker at a clean stop, so the next start can tell that it
/// reads the very file that stop left, whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalEnd {
    pub salt: [u8; 8],
    pub frames: u64,
    pub bytes: u64,
}

impl fmt::Display for JournalEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "journal salt=")?;
        for b in self.salt {
            write!(f, "{b:02x}")?;
        }
        write!(f, " frames={} bytes={}", self.frames, self.bytes)
    }
}

impl FromStr for JournalEnd {
    type Err = String;

    /// Parses what [`JournalEnd`]'s `Display` wrote, anywhere in `s`.
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.split_once("journal salt=").ok_or("no journal end")?.1;
        let mut fields = rest.split_whitespace();
        let hex = fields.next().ok_or("no salt")?;
        if hex.len() != 16 {
            return Err(format!("salt {hex:?} is not 16 hex digits"));
        }
        let mut salt = [0; 8];
        for (i, b) in salt.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| format!("salt {hex:?}: {e}"))?;
        }
        let mut number = |name: &str| -> Result<u64, String> {
            let field = fields.next().ok_or(format!("no {name}"))?;
            let value = field
                .strip_prefix(name)
                .and_then(|f| f.strip_prefix('='))
                .ok_or(format!("{field:?} is not {name}"))?;
            value.parse().map_err(|e| format!("{name} {value:?}: {e}"))
        };
        Ok(JournalEnd {
            salt,
            frames: number("frames")?,
            bytes: number("bytes")?,
        })
    }
}

/// The per-file checksums (see the module doc).
#[derive(Debug, Clone, Copy)]
struct Sums {
    /// crc32c state after the salt.
    seed: u32,
}

/// A frame header whose own crc is correct.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    seq: u64,
    payload_crc: u32,
}

impl Sums {
    fn from_salt(salt: &[u8; 8]) -> Sums {
        Sums {
            seed: crc32c::crc32c(salt),
        }
    }

    /// A new random salt for which an all-zero frame header is not valid.
    fn generate() -> ([u8; 8], Sums) {
        use std::hash::{BuildHasher, RandomState};
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let state = RandomState::new();
        for attempt in 0u32.. {
            let salt = state.hash_one((nanos, std::process::id(), attempt)).to_le_bytes();
            let sums = Sums::from_salt(&salt);
            if sums.header_crc(&[0; 16]) != 0 {
                return (salt, sums);
            }
        }
        unreachable!("some salt has a non-zero crc of zeroes")
    }

    fn payload_crc(&self, payload: &[u8]) -> u32 {
        crc32c::crc32c_append(self.seed, payload)
    }

    fn header_crc(&self, first16: &[u8]) -> u32 {
        crc32c::crc32c_append(self.seed, first16)
    }

    fn frame_header(&self, seq: u64, payload: &[u8]) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0; FRAME_HEADER_LEN];
        h[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[4..12].copy_from_slice(&seq.to_le_bytes());
        h[12..16].copy_from_slice(&self.payload_crc(payload).to_le_bytes());
        let crc = self.header_crc(&h[..16]);
        h[16..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// The header at the start of `h`, if its crc is correct.
    fn parse(&self, h: &[u8]) -> Option<FrameHeader> {
        let h = &h[..FRAME_HEADER_LEN];
        (self.header_crc(&h[..16]) == u32_at(h, 16)).then(|| FrameHeader {
            len: u32_at(h, 0) as usize,
            seq: u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
            payload_crc: u32_at(h, 12),
        })
    }

    /// The checksum of a version 1 frame.
    fn v1_crc(&self, payload: &[u8]) -> u32 {
        let len = (payload.len() as u32).to_le_bytes();
        crc32c::crc32c_append(crc32c::crc32c_append(self.seed, &len), payload)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn encode_header(version: u32, salt: &[u8; 8]) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..20].copy_from_slice(salt);
    let crc = crc32c::crc32c(&h[..20]);
    h[20..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What the header says.
enum Header {
    Valid {
        version: u32,
        salt: [u8; 8],
    },
    /// The file is (a prefix of) a journal header that is cut short or fails
    /// its checksum: this journal, damaged, with nothing readable in it.
    Damaged(String),
}

fn read_header(path: &Path, file: &File, file_len: u64) -> Result<Header, JournalError> {
    let mut h = [0; HEADER_LEN];
    let n = file_len.min(HEADER_LEN as u64) as usize;
    file.read_exact_at(&mut h[..n], 0)
        .map_err(io_err("reading the header", path))?;
    let magic_len = n.min(MAGIC.len());
    if h[..magic_len] != MAGIC[..magic_len] {
        // Someone else's file: never touch it.
        return Err(JournalError::BadHeader {
            path: path.to_path_buf(),
            reason: format!("it does not start with the journal magic {MAGIC:?}"),
        });
    }
    // Creation is atomic: only damage leaves a journal this short.
    if n < HEADER_LEN {
        return Ok(Header::Damaged(format!(
            "the file is {file_len} bytes, shorter than the {HEADER_LEN}-byte journal header"
        )));
    }
    if crc32c::crc32c(&h[..20]) != u32_at(&h, 20) {
        return Ok(Header::Damaged("the journal header fails its checksum".to_string()));
    }
    let version = u32_at(&h, 8);
    if version != VERSION && version != VERSION_1 {
        return Err(JournalError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok(Header::Valid {
        version,
        salt: h[12..20].try_into().expect("8 bytes"),
    })
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
    salt: [u8; 8],
    sums: Sums,
    /// Bytes handed to the kernel (the file's length).
    written: u64,
    /// The seq of the next frame appended.
    next_seq: u64,
    /// Whole frames not yet written.
    buf: Vec<u8>,
    poisoned: bool,
    /// Open found a tail that is not clean or an old format.
    needs_rewrite: bool,
    /// A copy made by [`Journal::preserve`], to cut to this length once a
    /// rewrite has replaced the file it shares its data with.
    trim: Option<(PathBuf, u64)>,
}

impl Journal {
    /// Opens the journal at `path`, or creates it (header written to a temp
    /// file, fsynced, renamed into place, directory fsynced).
    ///
    /// A file that does not start with the journal magic, or whose intact
    /// header names an unknown version, is an error and is never modified. A
    /// header cut short or failing its checksum is damage at offset 0 (no
    /// records). Otherwise the file is read (see the
    /// module doc) but not changed: if its tail is not clean or its format
    /// is old, [`Journal::rewrite`] must come before any append. A leftover
    /// temp file of an interrupted rewrite is removed. Everything returned
    /// is durable (the file and its directory are fsynced first).
    pub fn open(path: &Path) -> Result<(Journal, Recovered), JournalError> {
        remove_if_present(&temp_path(path))?;
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Self::recover(path, file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(io_err("opening", path)(e)),
        }
    }

    fn create(path: &Path) -> Result<(Journal, Recovered), JournalError> {
        let (salt, sums) = Sums::generate();
        let file = write_temp(path, |w| w.write_all(&encode_header(VERSION, &salt)))?;
        rename_temp(path)?;
        sync_parent(path)?;
        let journal = Journal::new(path, file, salt, sums, HEADER_LEN as u64, 0);
        let recovered = Recovered {
            records: Vec::new(),
            tail: Tail::Clean,
            end: journal.end(),
            file_len: HEADER_LEN as u64,
            created: true,
            old_version: None,
        };
        Ok((journal, recovered))
    }

    fn new(path: &Path, file: File, salt: [u8; 8], sums: Sums, written: u64, next_seq: u64) -> Journal {
        Journal {
            path: path.to_path_buf(),
            file,
            salt,
            sums,
            written,
            next_seq,
            buf: Vec::new(),
            poisoned: false,
            needs_rewrite: false,
            trim: None,
        }
    }

    fn recover(path: &Path, mut file: File) -> Result<(Journal, Recovered), JournalError> {
        let file_len = file.metadata().map_err(io_err("stat", path))?.len();
        let (version, salt) = match read_header(path, &file, file_len)? {
            Header::Valid { version, salt } => (version, salt),
            Header::Damaged(reason) => {
                // Nothing to read; the caller keeps a copy and rewrites.
                let (salt, sums) = Sums::generate();
                let mut journal = Journal::new(path, file, salt, sums, HEADER_LEN as u64, 0);
                journal.needs_rewrite = true;
                let recovered = Recovered {
                    records: Vec::new(),
                    tail: Tail::Damaged(Damage { offset: 0, reason }),
                    end: journal.end(),
                    file_len,
                    created: false,
                    old_version: None,
                };
                return Ok((journal, recovered));
            }
        };
        let sums = Sums::from_salt(&salt);
        let (Prefix { records, end }, tail) = if version == VERSION_1 {
            read_v1(path, &file, sums, file_len)?
        } else {
            let (prefix, stop) = read_frames(path, &file, sums, file_len)?;
            let tail = judge_tail(path, &file, sums, prefix.end, file_len, stop)?;
            (prefix, tail)
        };
        let frames = records.len() as u64;
        // What is returned must be durable: a killed predecessor's appends, or
        // the rename of its rewrite, may still be only in memory.
        file.sync_all().map_err(io_err("fsync", path))?;
        sync_parent(path)?;
        file.seek(SeekFrom::Start(end)).map_err(io_err("seeking", path))?;
        let mut journal = Journal::new(path, file, salt, sums, end, frames);
        journal.needs_rewrite = tail != Tail::Clean || version != VERSION;
        let recovered = Recovered {
            records,
            tail,
            end: journal.end(),
            file_len,
            created: false,
            old_version: (version != VERSION).then_some(version),
        };
        Ok((journal, recovered))
    }

    /// Appends one record. Buffered: durable only after [`Journal::sync`].
    pub fn append(&mut self, record: &[u8]) -> Result<(), JournalError> {
        self.check_usable()?;
        self.check_appendable()?;
        check_len(record)?;
        let frame_len = FRAME_HEADER_LEN + record.len();
        if self.buf.len() + frame_len > WRITE_BUF {
            self.flush()?;
        }
        self.buf
            .extend_from_slice(&self.sums.frame_header(self.next_seq, record));
        self.next_seq += 1;
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
        self.check_appendable()?;
        self.flush()?;
        let result = self.file.sync_data().map_err(io_err("fdatasync", &self.path));
        self.poisoned = result.is_err();
        result
    }

    /// Keeps the file as [`Journal::open`] found it beside the journal, as
    /// `<name>.damaged-<unix-secs>[.N]`, for a human to look at: call it
    /// after damage, before the [`Journal::rewrite`] that replaces the file.
    /// The copy is a hard link (no data copied, holes stay holes), cut to
    /// `damage_offset` + [`MAX_TORN_BYTES`] once the rewrite has replaced
    /// the journal; where links are not supported, those bytes are copied.
    /// Returns `None` (and keeps nothing) once [`MAX_DAMAGED_COPIES`] are
    /// there already.
    pub fn preserve(&mut self, damage_offset: u64) -> Result<Option<PathBuf>, JournalError> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let prefix = format!("{name}.damaged-");
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut existing = 0;
        for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
            let entry = entry.map_err(io_err("listing", dir))?;
            existing += usize::from(entry.file_name().to_string_lossy().starts_with(&prefix));
        }
        if existing >= MAX_DAMAGED_COPIES {
            return Ok(None);
        }
        let keep = damage_offset.saturating_add(KEEP_AFTER_DAMAGE);
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        for n in 0u32.. {
            let suffix = if n == 0 { String::new() } else { format!(".{n}") };
            let copy = self.path.with_file_name(format!("{prefix}{secs}{suffix}"));
            match fs::hard_link(&self.path, &copy) {
                Ok(()) => {
                    sync_parent(&copy)?;
                    self.trim = Some((copy.clone(), keep));
                    return Ok(Some(copy));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(_) => return copy_prefix(&self.path, &copy, keep).map(Some),
            }
        }
        unreachable!("a free name exists")
    }

    /// Atomically replaces the whole journal with `records` (compaction,
    /// repair): temp file in the same directory, fsync, rename over the
    /// journal, fsync the directory; appends then continue in the new file,
    /// with a new salt and seq from 0. A crash at any point leaves the old
    /// journal or the new one. Appended records not in `records` are
    /// dropped, synced or not.
    ///
    /// If it fails before the rename (e.g. a record over the limit, a full
    /// disk), the old journal is untouched and stays usable.
    pub fn rewrite<'a>(&mut self, records: impl IntoIterator<Item = &'a [u8]>) -> Result<(), JournalError> {
        self.check_usable()?;
        let (salt, sums) = Sums::generate();
        let mut len = HEADER_LEN as u64;
        let mut seq = 0u64;
        let mut too_large = None;
        let file = write_temp(&self.path, |w| {
            w.write_all(&encode_header(VERSION, &salt))?;
            for record in records {
                if let Err(e) = check_len(record) {
                    too_large = Some(e);
                    return Err(io::Error::other("record too large"));
                }
                w.write_all(&sums.frame_header(seq, record))?;
                w.write_all(record)?;
                seq += 1;
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
        self.salt = salt;
        self.sums = sums;
        self.written = len;
        self.next_seq = seq;
        self.buf.clear();
        self.needs_rewrite = false;
        let result = sync_parent(&self.path);
        self.poisoned = result.is_err();
        result?;
        if let Some((copy, keep)) = self.trim.take() {
            // The copy alone holds the old data now: bound it. A failure
            // only leaves it bigger.
            let trimmed = OpenOptions::new().write(true).open(&copy).and_then(|f| {
                if f.metadata()?.len() > keep {
                    f.set_len(keep)?;
                    f.sync_all()?;
                }
                Ok(())
            });
            if let Err(e) = trimmed {
                tracing::warn!(copy = %copy.display(), "could not cut the damaged journal's copy to {keep} bytes: {e}");
            }
        }
        Ok(())
    }

    /// The journal's length in bytes, header and buffered appends included.
    pub fn len_bytes(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Where the journal ends, buffered appends included (see [`JournalEnd`]).
    pub fn end(&self) -> JournalEnd {
        JournalEnd {
            salt: self.salt,
            frames: self.next_seq,
            bytes: self.len_bytes(),
        }
    }

    fn check_usable(&self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn check_appendable(&self) -> Result<(), JournalError> {
        if self.needs_rewrite {
            return Err(JournalError::NeedsRewrite {
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

/// Why [`read_frames`] stopped.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// At the end of the file.
    End,
    /// Fewer bytes left than a frame header.
    Short,
    /// The frame header fails its crc.
    BadHeader,
    /// A valid frame header with another seq than the one due.
    Seq { found: u64, expected: u64 },
    /// A valid header declaring more than the limit (never written).
    TooLong { len: usize },
    /// The payload runs past the end of the file.
    PastEnd { len: usize },
    /// The payload fails its crc.
    BadPayload { len: usize },
}

/// The intact frames at the start of a file.
struct Prefix {
    records: Vec<Vec<u8>>,
    /// Where the first frame that is not intact starts (or the file's end).
    end: u64,
}

/// Reads intact frames from the header on, one record in memory at a time
/// beside those kept, and says why it stopped.
fn read_frames(path: &Path, file: &File, sums: Sums, file_len: u64) -> Result<(Prefix, Stop), JournalError> {
    let mut reader = BufReader::with_capacity(WRITE_BUF, file);
    reader
        .seek(SeekFrom::Start(HEADER_LEN as u64))
        .map_err(io_err("seeking", path))?;
    let mut records = Vec::new();
    let mut pos = HEADER_LEN as u64;
    let stop = loop {
        let rest = file_len - pos;
        if rest == 0 {
            break Stop::End;
        }
        if rest < FRAME_HEADER_LEN as u64 {
            break Stop::Short;
        }
        let mut h = [0; FRAME_HEADER_LEN];
        reader.read_exact(&mut h).map_err(io_err("reading", path))?;
        let Some(frame) = sums.parse(&h) else {
            break Stop::BadHeader;
        };
        let expected = records.len() as u64;
        if frame.seq != expected {
            break Stop::Seq {
                found: frame.seq,
                expected,
            };
        }
        if frame.len > MAX_RECORD_LEN {
            break Stop::TooLong { len: frame.len };
        }
        if (FRAME_HEADER_LEN + frame.len) as u64 > rest {
            break Stop::PastEnd { len: frame.len };
        }
        // The header's crc vouches for the length: this allocates only what
        // this journal wrote (and at most the limit).
        let mut payload = vec![0; frame.len];
        reader.read_exact(&mut payload).map_err(io_err("reading", path))?;
        if sums.payload_crc(&payload) != frame.payload_crc {
            break Stop::BadPayload { len: frame.len };
        }
        records.push(payload);
        pos += (FRAME_HEADER_LEN + frame.len) as u64;
    };
    Ok((Prefix { records, end: pos }, stop))
}

/// Judges the bytes from `pos` (the first frame that is not intact) to the
/// end of the file, by the rules in the module doc. Reads at most
/// [`MAX_TORN_BYTES`], a block at a time.
fn judge_tail(path: &Path, file: &File, sums: Sums, pos: u64, file_len: u64, stop: Stop) -> Result<Tail, JournalError> {
    let rest = file_len - pos;
    let damaged = |reason: String| Ok(Tail::Damaged(Damage { offset: pos, reason }));
    let what = match stop {
        Stop::End => return Ok(Tail::Clean),
        Stop::Seq { found, expected } => {
            return damaged(format!(
                "the frame at offset {pos} is record #{found} where #{expected} was due: \
                 records are missing, duplicated or out of order"
            ))
        }
        Stop::TooLong { len } => {
            return damaged(format!(
                "the frame at offset {pos} declares {len} bytes, over the {MAX_RECORD_LEN}-byte limit"
            ))
        }
        Stop::Short => "is shorter than a frame header".to_string(),
        Stop::BadHeader => "has a bad frame header".to_string(),
        Stop::PastEnd { len } => format!("({len} bytes) runs past the end of the file"),
        Stop::BadPayload { len } => format!("({len} bytes) fails its payload checksum"),
    };
    if rest > MAX_TORN_BYTES {
        return damaged(format!(
            "the frame at offset {pos} {what}, and {rest} bytes follow the last intact frame \
             (file length {file_len}): more than an interrupted append leaves ({MAX_TORN_BYTES})"
        ));
    }
    if let Stop::BadPayload { len } = stop {
        let end = pos + (FRAME_HEADER_LEN + len) as u64;
        if let Some(at) = first_nonzero(path, file, end, file_len)? {
            return damaged(format!(
                "the frame at offset {pos} {what}, and data follows \
                 (a non-zero byte at offset {at}, file length {file_len})"
            ));
        }
    }
    Ok(match find_intact_frame(path, file, sums, pos + 1, file_len)? {
        None => Tail::Torn { bytes: rest },
        Some((at, seq)) => Tail::Damaged(Damage {
            offset: pos,
            reason: format!(
                "the frame at offset {pos} {what}, but an intact frame (record #{seq}) follows at offset {at}"
            ),
        }),
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

/// The first intact frame (its offset and seq) starting in `[from, to)`:
/// valid header crc, payload inside the range with a valid crc. Every
/// offset is a candidate; all-zero headers (never valid) are skipped fast.
fn find_intact_frame(
    path: &Path,
    file: &File,
    sums: Sums,
    from: u64,
    to: u64,
) -> Result<Option<(u64, u64)>, JournalError> {
    let mut buf = vec![0; SCAN_BLOCK + FRAME_HEADER_LEN - 1];
    let mut base = from;
    while base + FRAME_HEADER_LEN as u64 <= to {
        let n = ((to - base) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], base)
            .map_err(io_err("reading", path))?;
        let starts = (n - FRAME_HEADER_LEN + 1).min(SCAN_BLOCK);
        let mut i = 0;
        while i < starts {
            // A header must hold a non-zero byte: jump to 19 bytes before the next one.
            let Some(nz) = buf[i..n].iter().position(|&b| b != 0) else {
                break;
            };
            if nz >= FRAME_HEADER_LEN {
                i += nz - (FRAME_HEADER_LEN - 1);
                continue;
            }
            let at = base + i as u64;
            if let Some(frame) = sums.parse(&buf[i..i + FRAME_HEADER_LEN]) {
                let payload_at = at + FRAME_HEADER_LEN as u64;
                if frame.len <= MAX_RECORD_LEN
                    && payload_at + frame.len as u64 <= to
                    && payload_crc_at(path, file, sums, payload_at, frame.len)? == frame.payload_crc
                {
                    return Ok(Some((at, frame.seq)));
                }
            }
            i += 1;
        }
        base += starts as u64;
    }
    Ok(None)
}

/// The payload crc of `len` bytes of `file` at `at`, read a block at a time.
fn payload_crc_at(path: &Path, file: &File, sums: Sums, at: u64, len: usize) -> Result<u32, JournalError> {
    let mut buf = vec![0; len.min(WRITE_BUF)];
    let mut crc = sums.seed;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len());
        file.read_exact_at(&mut buf[..n], at + done as u64)
            .map_err(io_err("reading", path))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n;
    }
    Ok(crc)
}

/// Reads a version 1 journal: intact frames, then anything else is damage
/// (see the module doc).
fn read_v1(path: &Path, file: &File, sums: Sums, file_len: u64) -> Result<(Prefix, Tail), JournalError> {
    let mut reader = BufReader::with_capacity(WRITE_BUF, file);
    reader
        .seek(SeekFrom::Start(HEADER_LEN as u64))
        .map_err(io_err("seeking", path))?;
    let mut records = Vec::new();
    let mut pos = HEADER_LEN as u64;
    while file_len - pos >= V1_FRAME_HEADER_LEN as u64 {
        let mut h = [0; V1_FRAME_HEADER_LEN];
        reader.read_exact(&mut h).map_err(io_err("reading", path))?;
        let (len, crc) = (u32_at(&h, 0) as usize, u32_at(&h, 4));
        let end = pos + (V1_FRAME_HEADER_LEN + len) as u64;
        if len > MAX_RECORD_LEN || end > file_len {
            break;
        }
        // Nothing vouches for the length before the payload is read: grow
        // the buffer only as bytes actually arrive (bounded by the limit).
        let mut payload = Vec::new();
        (&mut reader)
            .take(len as u64)
            .read_to_end(&mut payload)
            .map_err(io_err("reading", path))?;
        if payload.len() != len || sums.v1_crc(&payload) != crc {
            break;
        }
        records.push(payload);
        pos = end;
    }
    let tail = if pos == file_len {
        Tail::Clean
    } else {
        Tail::Damaged(Damage {
            offset: pos,
            reason: format!(
                "{} bytes follow the last intact frame of a version {VERSION_1} journal (file length {file_len}); \
                 that format cannot tell a torn append from lost records",
                file_len - pos
            ),
        })
    };
    Ok((Prefix { records, end: pos }, tail))
}

/// Copies the first `len` bytes of `path` to a new file `copy`, fsynced.
fn copy_prefix(path: &Path, copy: &Path, len: u64) -> Result<PathBuf, JournalError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(copy)
        .map_err(io_err("creating a copy of the damaged journal", copy))?;
    let result = File::open(path)
        .and_then(|src| io::copy(&mut src.take(len), &mut out))
        .and_then(|_| out.sync_all())
        .map_err(io_err("copying the damaged journal", copy))
        .and_then(|()| sync_parent(copy));
    if result.is_err() {
        let _ = fs::remove_file(copy);
    }
    result.map(|()| copy.to_path_buf())
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
    use std::time::Instant;

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

    fn damage(rec: &Recovered) -> &Damage {
        match &rec.tail {
            Tail::Damaged(d) => d,
            other => panic!("expected damage, found {other:?}"),
        }
    }

    /// The records as the caller rewrites them after open.
    fn slices(records: &[Vec<u8>]) -> impl Iterator<Item = &[u8]> {
        records.iter().map(Vec::as_slice)
    }

    #[test]
    fn round_trip() {
        let dir = Scratch::new("journal-round-trip");
        let path = dir.path("journal");
        let records = sample_records();
        let (bytes, _) = build(&path, &records);
        assert_eq!(&bytes[..8], b"CBTJRNL\0");
        assert_eq!(u32_at(&bytes, 8), VERSION);

        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, records);
        assert_eq!(rec.tail, Tail::Clean);
        assert!(!rec.created && rec.old_version.is_none());
        assert_eq!(rec.end, j.end());
        assert_eq!(rec.end.frames, records.len() as u64);
        assert_eq!(rec.end.bytes, bytes.len() as u64);
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
    fn the_end_round_trips_through_text() {
        let end = JournalEnd {
            salt: [0, 1, 0xab, 0xff, 7, 8, 9, 0x10],
            frames: 12,
            bytes: 3456,
        };
        let text = format!("stopped; {end}");
        assert_eq!(text, "stopped; journal salt=0001abff07080910 frames=12 bytes=3456");
        assert_eq!(text.parse::<JournalEnd>(), Ok(end));
        for bad in [
            "stopped",
            "journal salt=0001 frames=1 bytes=2",
            "journal salt=0001abff07080910 frames=x bytes=2",
        ] {
            assert!(bad.parse::<JournalEnd>().is_err(), "{bad}");
        }
    }

    #[test]
    fn truncation_at_every_offset_returns_the_complete_prefix_and_asks_for_a_rewrite() {
        let dir = Scratch::new("journal-truncate");
        let records = sample_records();
        let (bytes, starts) = build(&dir.path("original"), &records);
        let path = dir.path("journal");
        for cut in 0..=bytes.len() {
            fs::write(&path, &bytes[..cut]).unwrap();
            let (mut j, rec) = open(&path);
            assert_eq!(
                fs::read(&path).unwrap(),
                &bytes[..cut],
                "cut {cut}: open changed the file"
            );
            if cut < HEADER_LEN {
                // Only damage leaves a journal shorter than its header.
                assert!(rec.records.is_empty());
                assert_eq!(damage(&rec).offset, 0, "cut {cut}");
            } else {
                let complete = starts.iter().skip(1).filter(|&&end| end <= cut as u64).count();
                let boundary = starts[complete];
                assert_eq!(rec.records, records[..complete], "cut {cut}");
                assert_eq!(rec.end.frames, complete as u64);
                assert_eq!(rec.end.bytes, boundary);
                let expected = match cut as u64 - boundary {
                    0 => Tail::Clean,
                    bytes => Tail::Torn { bytes },
                };
                assert_eq!(rec.tail, expected, "cut {cut}");
            }
            if rec.tail != Tail::Clean {
                assert!(
                    matches!(j.append(b"x"), Err(JournalError::NeedsRewrite { .. })),
                    "cut {cut}"
                );
                j.rewrite(slices(&rec.records)).unwrap();
            }
            j.append(b"next").unwrap();
            j.sync().unwrap();
            drop(j);
            let (_, again) = open(&path);
            let mut expected = rec.records.clone();
            expected.push(b"next".to_vec());
            assert_eq!(again.records, expected, "cut {cut}: append after the cut");
            assert_eq!(again.tail, Tail::Clean);
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
                if i < MAGIC.len() {
                    let err = Journal::open(&path).expect_err(&at);
                    assert!(matches!(err, JournalError::BadHeader { .. }), "{at}: {err}");
                    assert_eq!(fs::read(&path).unwrap(), damaged, "{at}: file changed");
                    continue;
                }
                let (_, rec) = open(&path);
                assert_eq!(fs::read(&path).unwrap(), damaged, "{at}: file changed");
                if i < HEADER_LEN {
                    assert!(rec.records.is_empty(), "{at}");
                    assert_eq!(damage(&rec).offset, 0, "{at}");
                    continue;
                }
                let k = starts.iter().skip(1).position(|&end| end > i as u64).unwrap();
                assert_eq!(rec.records, records[..k], "{at}");
                match &rec.tail {
                    Tail::Damaged(d) => assert_eq!(d.offset, starts[k], "{at}"),
                    // Only the last frame's damage can pass for a torn tail.
                    Tail::Torn { bytes: torn } => {
                        assert_eq!(k, last, "{at}: damage reported as a torn tail");
                        assert_eq!(*torn, bytes.len() as u64 - starts[k], "{at}");
                    }
                    Tail::Clean => panic!("{at}: a changed frame read as clean"),
                }
            }
        }
    }

    /// The file with frame `k` removed, doubled, or swapped with `k + 1`.
    fn reframe(bytes: &[u8], starts: &[u64], order: &[usize]) -> Vec<u8> {
        let mut out = bytes[..HEADER_LEN].to_vec();
        for &k in order {
            out.extend_from_slice(&bytes[starts[k] as usize..starts[k + 1] as usize]);
        }
        out
    }

    #[test]
    fn a_missing_duplicated_or_reordered_frame_is_damage() {
        let dir = Scratch::new("journal-reorder");
        let records = sample_records();
        let (bytes, starts) = build(&dir.path("original"), &records);
        let path = dir.path("journal");
        let n = records.len();
        for k in 0..n {
            let all: Vec<usize> = (0..n).collect();
            let mut cases = vec![
                ("dropped", all.iter().copied().filter(|&i| i != k).collect::<Vec<_>>()),
                (
                    "duplicated",
                    all.iter()
                        .flat_map(|&i| if i == k { vec![i, i] } else { vec![i] })
                        .collect(),
                ),
            ];
            if k + 1 < n {
                let mut swapped = all.clone();
                swapped.swap(k, k + 1);
                cases.push(("swapped", swapped));
            }
            for (what, order) in cases {
                if what == "dropped" && k == n - 1 {
                    continue; // a clean shorter journal: only the run marker can tell
                }
                fs::write(&path, reframe(&bytes, &starts, &order)).unwrap();
                let (_, rec) = open(&path);
                let kept = order.iter().zip(0..).take_while(|&(&i, j)| i == j).count();
                assert_eq!(rec.records, records[..kept], "frame {k} {what}");
                let d = damage(&rec);
                assert_eq!(d.offset, starts[kept], "frame {k} {what}");
                assert!(
                    d.reason.contains("missing, duplicated or out of order"),
                    "frame {k} {what}: {}",
                    d.reason
                );
            }
        }
    }

    #[test]
    fn a_length_pointing_past_the_end_mid_file_is_damage() {
        let dir = Scratch::new("journal-long-len");
        let path = dir.path("journal");
        let records = vec![vec![3u8; 100_000], vec![4u8; 100_000], vec![5u8; 70_000]];
        let (mut bytes, starts) = build(&path, &records);
        let at = starts[1] as usize;
        bytes[at..at + 4].copy_from_slice(&200_000u32.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..1]);
        let d = damage(&rec);
        assert_eq!(d.offset, starts[1]);
        assert!(d.reason.contains("intact frame (record #2) follows"), "{}", d.reason);
    }

    #[test]
    fn an_intact_frame_far_behind_a_bad_one_is_found() {
        let dir = Scratch::new("journal-far");
        let path = dir.path("journal");
        // A big zero record (the search skips zeroes) and a small one past
        // the first scan block.
        let records = vec![b"first".to_vec(), vec![0u8; 3 * SCAN_BLOCK + 5], b"last".to_vec()];
        let (mut bytes, starts) = build(&path, &records);
        bytes[starts[1] as usize + 4] ^= 0x01; // the big frame's seq
        fs::write(&path, &bytes).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..1]);
        let d = damage(&rec);
        assert_eq!(d.offset, starts[1]);
        let expected = format!("intact frame (record #2) follows at offset {}", starts[2]);
        assert!(d.reason.contains(&expected), "{}", d.reason);
        // Without the last frame the same bytes are a torn append.
        fs::write(&path, &bytes[..starts[2] as usize]).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(
            rec.tail,
            Tail::Torn {
                bytes: starts[2] - starts[1]
            }
        );
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
            assert_eq!(rec.tail, Tail::Torn { bytes: cut - starts[1] }, "cut {cut}");
        }
    }

    #[test]
    fn zero_filled_tails_are_torn_and_zeroed_frames_mid_file_are_damage() {
        let dir = Scratch::new("journal-zeros");
        let path = dir.path("journal");
        let records = sample_records();
        let (bytes, starts) = build(&dir.path("original"), &records);

        // The filesystem extended the file with zeroes after the last frame.
        for zeros in [1usize, 7, 8, 20, 4096] {
            let mut z = bytes.clone();
            z.resize(bytes.len() + zeros, 0);
            fs::write(&path, &z).unwrap();
            let (_, rec) = open(&path);
            assert_eq!(rec.records, records, "{zeros} zeroes");
            assert_eq!(rec.tail, Tail::Torn { bytes: zeros as u64 });
        }

        // The last frame half written, then zeroes.
        let last = starts[starts.len() - 2] as usize;
        let mut z = bytes[..last + FRAME_HEADER_LEN + 100].to_vec();
        z.resize(bytes.len() + 4096, 0);
        fs::write(&path, &z).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..records.len() - 1]);
        assert_eq!(
            rec.tail,
            Tail::Torn {
                bytes: (z.len() - last) as u64
            }
        );

        // A complete frame failing its payload checksum, then garbage
        // holding no frame.
        let mut z = bytes.clone();
        let (_, sums) = {
            let salt: [u8; 8] = bytes[12..20].try_into().unwrap();
            (salt, Sums::from_salt(&salt))
        };
        z.extend_from_slice(&sums.frame_header(records.len() as u64, b"good"));
        z.extend_from_slice(b"bad!");
        z.extend_from_slice(&[0xee; 64]);
        fs::write(&path, &z).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records);
        let d = damage(&rec);
        assert_eq!(d.offset, bytes.len() as u64);
        assert!(d.reason.contains("data follows"), "{}", d.reason);

        // A zeroed frame with intact frames after it.
        let mut z = bytes.clone();
        z[starts[3] as usize..starts[4] as usize].fill(0);
        fs::write(&path, &z).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..3]);
        assert_eq!(damage(&rec).offset, starts[3]);
    }

    /// Issue 8, item 15: a 40 GiB (sparse) tail is judged from its length
    /// alone, and the copy kept of it is cut to a bounded size.
    #[test]
    fn a_huge_tail_is_damage_judged_without_reading_it() {
        let dir = Scratch::new("journal-huge-tail");
        let path = dir.path("journal");
        let records = sample_records();
        let (bytes, _) = build(&path, &records);
        let huge = bytes.len() as u64 + (40 << 30);
        for garbage in [false, true] {
            fs::write(&path, &bytes).unwrap();
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            if garbage {
                file.write_all_at(&[0x5a; 4096], bytes.len() as u64).unwrap();
            }
            file.set_len(huge).unwrap();
            drop(file);
            let started = Instant::now();
            let (mut j, rec) = open(&path);
            assert_eq!(rec.records, records);
            let d = damage(&rec).clone();
            assert_eq!(d.offset, bytes.len() as u64);
            assert!(
                d.reason.contains("more than an interrupted append leaves"),
                "{}",
                d.reason
            );
            let copy = j.preserve(d.offset).unwrap().expect("a copy");
            j.rewrite(slices(&rec.records)).unwrap();
            let took = started.elapsed();
            // Linear in the tail, this would read 40 GiB: minutes, not seconds.
            assert!(took.as_secs() < 20, "took {took:?}");
            assert_eq!(fs::metadata(&copy).unwrap().len(), d.offset + KEEP_AFTER_DAMAGE);
            let kept = fs::File::open(&copy).unwrap();
            let mut head = vec![0; bytes.len()];
            kept.read_exact_at(&mut head, 0).unwrap();
            assert_eq!(head, bytes, "the copy starts with the file as found");
            fs::remove_file(&copy).unwrap();
            drop(j);
            let (_, rec) = open(&path);
            assert_eq!((rec.records.len(), &rec.tail), (records.len(), &Tail::Clean));
            assert_eq!(fs::metadata(&path).unwrap().len(), bytes.len() as u64);
        }
    }

    #[test]
    fn an_unknown_version_is_refused_and_a_foreign_file_never_touched() {
        let dir = Scratch::new("journal-magic");
        let path = dir.path("journal");
        let content = b"not a journal at all, just text".to_vec();
        fs::write(&path, &content).unwrap();
        let err = Journal::open(&path).expect_err("not a journal");
        assert!(matches!(err, JournalError::BadHeader { .. }), "{err}");
        assert!(err.to_string().contains("left untouched"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), content);

        // A future version with an intact header.
        let (mut bytes, _) = build(&dir.path("original"), &sample_records());
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..20]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = Journal::open(&path).expect_err("future version");
        assert!(
            matches!(err, JournalError::UnsupportedVersion { version: 3, .. }),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), bytes);

        // An empty file: damage (creation never leaves one).
        fs::write(&path, b"").unwrap();
        let (_, rec) = open(&path);
        assert_eq!(damage(&rec).offset, 0);
    }

    /// A journal as version 1 wrote it.
    pub(crate) fn v1_journal(records: &[Vec<u8>]) -> Vec<u8> {
        let salt = *b"v1-salt!";
        let sums = Sums::from_salt(&salt);
        let mut out = encode_header(VERSION_1, &salt).to_vec();
        for r in records {
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(&sums.v1_crc(r).to_le_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    #[test]
    fn a_version_1_journal_is_read_and_converted_by_the_rewrite() {
        let dir = Scratch::new("journal-v1");
        let path = dir.path("journal");
        let records = sample_records();
        let bytes = v1_journal(&records);
        fs::write(&path, &bytes).unwrap();
        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, records);
        assert_eq!((rec.old_version, &rec.tail), (Some(1), &Tail::Clean));
        assert!(matches!(j.append(b"x"), Err(JournalError::NeedsRewrite { .. })));
        j.rewrite(slices(&rec.records)).unwrap();
        j.append(b"after").unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, rec) = open(&path);
        assert_eq!(rec.old_version, None);
        assert_eq!(rec.records.len(), records.len() + 1);

        // Anything after the last intact version 1 frame is damage.
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records[..records.len() - 1]);
        assert!(damage(&rec).reason.contains("version 1"), "{:?}", rec.tail);
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
        let before = j.end();
        j.append(b"unsynced, dropped by the rewrite").unwrap();
        j.rewrite([&b"x"[..], b"yy"]).unwrap();
        assert_ne!(j.end().salt, before.salt, "a rewrite is a new incarnation");
        j.append(b"z").unwrap();
        j.sync().unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), j.len_bytes());
        let end = j.end();
        drop(j);
        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, [&b"x"[..], b"yy", b"z"]);
        assert_eq!(rec.end, end);
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
        let (salt, sums) = Sums::generate();
        write_temp(&path, |w| {
            w.write_all(&encode_header(VERSION, &salt))?;
            w.write_all(&sums.frame_header(0, b"new"))?;
            w.write_all(b"new")
        })
        .unwrap();
        assert!(tmp.exists());
        let (_, rec) = open(&path);
        assert_eq!(rec.records, records);
        assert_eq!(rec.tail, Tail::Clean);
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
    fn damage_is_kept_aside_and_appends_continue_after_the_rewrite() {
        let dir = Scratch::new("journal-after-damage");
        let path = dir.path("journal");
        let records = sample_records();
        let (mut bytes, starts) = build(&path, &records);
        bytes[starts[2] as usize + FRAME_HEADER_LEN] ^= 0x10; // payload of record 2
        fs::write(&path, &bytes).unwrap();
        let (mut j, rec) = open(&path);
        assert_eq!(rec.records, records[..2]);
        let d = damage(&rec).clone();
        assert_eq!(d.offset, starts[2]);
        assert!(d.reason.contains("checksum"), "{}", d.reason);
        let copy = j.preserve(d.offset).unwrap().expect("a copy");
        let copy_name = copy.file_name().unwrap().to_string_lossy().into_owned();
        assert!(copy_name.starts_with("journal.damaged-"), "{copy_name}");
        j.rewrite(slices(&rec.records)).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), bytes, "the copy is the file as found");
        j.append(b"after damage").unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, rec) = open(&path);
        assert_eq!(rec.records, [&records[0][..], &records[1][..], &b"after damage"[..]]);
        assert_eq!(rec.tail, Tail::Clean);

        // Copies are bounded in number too.
        for _ in 0..MAX_DAMAGED_COPIES + 2 {
            fs::write(&path, &bytes).unwrap();
            let (mut j, rec) = open(&path);
            let kept = j.preserve(damage(&rec).offset).unwrap();
            j.rewrite(slices(&rec.records)).unwrap();
            let copies = file_names(&dir.0)
                .iter()
                .filter(|n| n.starts_with("journal.damaged-"))
                .count();
            assert!(copies <= MAX_DAMAGED_COPIES, "{copies} copies");
            if kept.is_none() {
                assert_eq!(copies, MAX_DAMAGED_COPIES);
            }
        }
        let copies = file_names(&dir.0)
            .iter()
            .filter(|n| n.starts_with("journal.damaged-"))
            .count();
        assert_eq!(copies, MAX_DAMAGED_COPIES);
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
