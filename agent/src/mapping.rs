//! How each disk's sectors map onto storage, and whether that changed
//! between two looks (contract §6).
//!
//! A disk's content can change with no write to it: a loop device's offset
//! or backing file changed, its capacity shrunk (and regrown: the same size
//! at two snapshots, other bytes), a device-mapper table swapped for one
//! that points elsewhere, or the backing file written by another process.
//! None of these is a bio on the tracked device, so the capture cannot see
//! them; they keep the same `dev` and `diskseq`, so the device identity
//! cannot either. [`MappingWatch`] reads what can be read — capacity, loop
//! offset and backing file, the live device-mapper table resolved down to
//! the instances below, and for a loop device over a file the file's
//! timestamps while the loop device itself wrote nothing — at every check
//! and every seal, and [`judge`] turns any difference into a re-map: a gap
//! for that device and for every device stacked on it.
//!
//! Growth that keeps the old sectors in place is not a re-map: the change
//! log already reports `[capacity(B), capacity(T))` of a grown volume.
//!
//! What a look cannot see: a change undone before the next look (a shrink
//! and regrow, an offset changed and changed back, within one check
//! interval), writes to a lower device or the backing file while the
//! device above is busy, and anything that bypasses this node's block layer
//! (docs/capture.md, "What cbt cannot see").
//!
//! Partitions need no look of their own: changes are tracked per whole disk
//! in absolute sectors, and each snapshot records its volume's start and
//! size on the disk, so a partition that moved between two snapshots is
//! already refused by the change log, and one that moved and came back
//! still names the same disk sectors.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    os::unix::{
        fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::{self, DeviceKey, Disk};

/// A whole disk's mapping at one look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// 512-byte sectors (`/sys/block/X/size`).
    pub capacity: u64,
    pub layout: Layout,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// No driver cbt knows of re-maps this disk's sectors (a physical or
    /// virtual disk, NVMe, an unbound loop device).
    Direct,
    Loop(LoopMap),
    /// The live table, flattened through linear layers (see [`Piece`]).
    DeviceMapper(Vec<Piece>),
    /// The mapping could not be read: nothing about it can be proven.
    Unreadable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopMap {
    /// Bytes into the backing file where sector 0 lies.
    pub offset: u64,
    /// Caps the capacity (0: none). Its only effect on the content is the
    /// capacity, which is compared on its own.
    pub sizelimit: u64,
    /// As sysfs shows it (it follows renames).
    pub backing_file: String,
    /// `(st_dev, st_ino)` of the file the driver holds, if it could be read.
    pub backing_inode: Option<(u64, u64)>,
    /// The block device the loop device is over, if it is over one.
    pub backing_device: Option<Layer>,
}

/// A block device a mapping names, down to the disk instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Layer {
    /// `major << 20 | minor` of the node named (a disk or a partition).
    pub dev: u32,
    /// The whole disk holding it, if there is one now.
    pub disk: Option<DeviceKey>,
    /// Where the node begins on that disk (512-byte sectors): non-zero for
    /// a partition.
    pub start: u64,
}

/// A run of a device-mapper device's sectors, `len` long (512-byte
/// sectors), mapped one way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub len: u64,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Sector `s` of the piece is sector `offset + s` of `layer` (`linear`,
    /// and `snapshot-origin`, which reads and writes its origin in place).
    /// Linear layers over other device-mapper devices are resolved through,
    /// so an LVM origin that gains a snapshot-origin layer over its new
    /// `-real` device keeps the same pieces.
    Linear { layer: Layer, offset: u64 },
    /// Any other target: its type, a digest of its table line (the line
    /// itself is never kept: a crypt line holds its key), the devices it
    /// names, and where in the target this piece begins.
    Other { kind: String, digest: [u8; 16], layers: Vec<Layer>, from: u64 },
}

/// The kernel's completed-change counters at one moment (see
/// [`BackingLook`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Sectors written or discarded, completed.
    pub changed_sectors: u64,
    /// Writes (and discards) in flight.
    pub in_flight: u64,
}

/// A file's change stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub size: u64,
}

/// A loop device's backing file looked at between two readings of the
/// loop device's own counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingLook {
    pub before: Activity,
    pub file: FileStamp,
    pub after: Activity,
}

/// One look at one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub fingerprint: Fingerprint,
    /// Loop devices over a reachable file with I/O statistics on.
    pub backing: Option<BackingLook>,
}

/// How a disk's mapping changed between two looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Same,
    /// Only grew, every old sector in place: not a gap.
    Grew {
        from: u64,
        to: u64,
    },
    /// Content may have changed without a write: a gap.
    Remapped(String),
}

/// Compares two fingerprints of one disk instance (pure).
pub fn compare(old: &Fingerprint, new: &Fingerprint) -> Verdict {
    use Layout::*;
    let layout_kept = match (&old.layout, &new.layout) {
        (Unreadable(why), _) | (_, Unreadable(why)) => return Verdict::Remapped(format!("mapping unreadable: {why}")),
        (Direct, Direct) => Ok(()),
        (Loop(a), Loop(b)) => compare_loop(a, b),
        (DeviceMapper(a), DeviceMapper(b)) if a == b => Ok(()),
        (DeviceMapper(a), DeviceMapper(b)) if new.capacity > old.capacity && dm_prefix(a, b) => Ok(()),
        (DeviceMapper(_), DeviceMapper(_)) => Err("device-mapper table changed".to_string()),
        (a, b) => Err(format!("driver changed from {} to {}", kind(a), kind(b))),
    };
    if let Err(why) = layout_kept {
        return Verdict::Remapped(why);
    }
    match new.capacity.cmp(&old.capacity) {
        std::cmp::Ordering::Equal => Verdict::Same,
        std::cmp::Ordering::Greater => Verdict::Grew { from: old.capacity, to: new.capacity },
        std::cmp::Ordering::Less => {
            Verdict::Remapped(format!("capacity shrank from {} to {} sectors", old.capacity, new.capacity))
        }
    }
}

fn kind(layout: &Layout) -> &'static str {
    match layout {
        Layout::Direct => "none",
        Layout::Loop(_) => "loop",
        Layout::DeviceMapper(_) => "device-mapper",
        Layout::Unreadable(_) => "unknown",
    }
}

fn compare_loop(a: &LoopMap, b: &LoopMap) -> Result<(), String> {
    if a.offset != b.offset {
        return Err(format!("loop offset changed from {} to {}", a.offset, b.offset));
    }
    let same_file = match (a.backing_inode, b.backing_inode) {
        (Some(x), Some(y)) => x == y,
        // Without the driver's own answer, the path is all there is.
        _ => a.backing_file == b.backing_file,
    };
    if !same_file || a.backing_device != b.backing_device {
        return Err(format!("loop backing file changed from {:?} to {:?}", a.backing_file, b.backing_file));
    }
    Ok(())
}

/// `new` keeps every sector of `old` in place: `old`'s pieces begin `new`,
/// the last of them possibly longer (grown in place).
fn dm_prefix(old: &[Piece], new: &[Piece]) -> bool {
    let Some((last, head)) = old.split_last() else {
        return true;
    };
    new.len() >= old.len()
        && head == &new[..head.len()]
        && new[head.len()].target == last.target
        && new[head.len()].len >= last.len
}

/// The backing file changed while the loop device had nothing in flight
/// and completed nothing (pure). Only then is a change of the file's stamps
/// someone else's write: the loop device's own writes move them too.
///
/// A file that grew is taken as extended (a loop device is grown that way):
/// a write into its old part in the same interval is not seen.
pub fn backing_written(old: &BackingLook, new: &BackingLook) -> bool {
    let idle = old.before.in_flight == 0
        && new.after.in_flight == 0
        && old.before.changed_sectors == new.after.changed_sectors;
    idle && old.file != new.file && new.file.size <= old.file.size
}

/// Why two looks at one disk instance cannot be trusted to show the same
/// content (pure); `None` if they can.
pub fn judge(old: &Sample, new: &Sample) -> Option<String> {
    if let Verdict::Remapped(why) = compare(&old.fingerprint, &new.fingerprint) {
        return Some(why);
    }
    match (&old.backing, &new.backing) {
        (Some(a), Some(b)) if backing_written(a, b) => {
            Some("the loop device's backing file changed while the loop device wrote nothing".to_string())
        }
        _ => None,
    }
}

/// A re-map found by [`MappingWatch::observe`]: `key`'s content may have
/// changed without a write since `since_ns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remap {
    pub key: DeviceKey,
    pub since_ns: u64,
    pub reason: String,
}

/// The last look at every disk present, and what changed since.
#[derive(Debug, Default)]
pub struct MappingWatch {
    /// By instance: when its last look began, and what it saw.
    last: BTreeMap<DeviceKey, (u64, Sample)>,
    /// Taken over from a checkpoint that holds no looks: nothing is known
    /// of any mapping since this moment.
    unknown_since: Option<u64>,
    /// The kernel's own record of capacity changes, between looks.
    kernel_log: KernelLog,
    /// When the previous pass began.
    last_pass_ns: Option<u64>,
}

impl MappingWatch {
    /// Goes on from the looks a checkpoint cut at `cut_ns` kept (`None`: a
    /// checkpoint from before they were kept).
    pub fn resume(&mut self, samples: Option<&[(DeviceKey, Sample)]>, cut_ns: u64) {
        match samples {
            Some(samples) => {
                self.last = samples.iter().map(|(key, s)| (*key, (cut_ns, s.clone()))).collect();
                self.unknown_since = None;
            }
            None => self.unknown_since = Some(cut_ns),
        }
    }

    /// The last looks, for a checkpoint.
    pub fn samples(&self) -> Vec<(DeviceKey, Sample)> {
        self.last.iter().map(|(key, (_, s))| (*key, s.clone())).collect()
    }

    /// Looks at every disk in `disks` and compares with the previous look.
    /// `clock` reads CLOCK_MONOTONIC. A disk seen for the first time is
    /// only recorded: a re-map before that look came before any snapshot
    /// window opened on it, since `snapshot begin` seals (and a seal looks)
    /// before it stamps `lo`. A window whose `lo` is taken from elsewhere
    /// (earlier than the seal) must not reach before the disk's first look.
    pub fn observe(&mut self, disks: &[Disk], clock: impl Fn() -> u64) -> Vec<Remap> {
        let mut dm = DmReader::default();
        let mut seen = BTreeMap::new();
        let mut remaps = Vec::new();
        let pass_ns = clock();
        // Read first: a shrink logged before this read happened before the
        // looks below, so it lies within [previous look, this pass].
        let shrunk = self.kernel_log.shrinks();
        for disk in disks {
            let at = clock();
            let Some(sample) = look(disk, &mut dm) else {
                continue;
            };
            match self.last.get(&disk.key) {
                Some((since, old)) => {
                    if let Some(reason) = judge(old, &sample) {
                        remaps.push(Remap { key: disk.key, since_ns: *since, reason });
                    } else if let Some((from, to)) = shrunk.iter().find(|(name, _)| *name == disk.name).map(|(_, s)| s)
                    {
                        let reason = format!("capacity shrank from {from} to {to} sectors and grew back (kernel log)");
                        remaps.push(Remap { key: disk.key, since_ns: *since, reason });
                    }
                }
                None => {
                    if let Some(since) = self.unknown_since {
                        let reason = "its mapping is unknown since the checkpoint taken over".to_string();
                        remaps.push(Remap { key: disk.key, since_ns: since, reason });
                    }
                }
            }
            seen.insert(disk.key, (at, sample));
        }
        // An instance looked at before but not this time, although it is
        // still there (not listed, or its look failed): it was not proven.
        // Kept, so the next look is compared with the last one that was.
        for (key, (since, old)) in std::mem::take(&mut self.last) {
            if !seen.contains_key(&key) && devices::instance_of(key.dev).is_some_and(|d| d.key == key) {
                remaps.push(Remap { key, since_ns: since, reason: "its mapping could not be read".to_string() });
                seen.insert(key, (since, old));
            }
        }
        self.unknown_since = None;
        self.last_pass_ns = Some(pass_ns);
        let remaps = propagate(remaps, &seen);
        // Instances no longer present are forgotten: a device number that
        // comes back is another instance.
        self.last = seen;
        remaps
    }
}

/// `/dev/kmsg`, read from where it was opened on: `set_capacity_and_notify`
/// logs "NAME: detected capacity change from A to B" for a change of a live
/// disk's size, to and from zero included (the uevent leaves those out),
/// so a shrink undone between two looks may still show here. Best effort
/// only: the line is rate-limited (10 per 5 s for all disks together; the
/// rest become "callbacks suppressed"), device-mapper sets its size without
/// it (its table is compared instead), and the log may be unreadable or lap
/// this reader. Then the looks alone remain.
#[derive(Debug, Default)]
struct KernelLog {
    file: Option<File>,
    tried: bool,
    lapped: u64,
}

impl KernelLog {
    /// `(disk name, (from, to))` of every shrink logged since the last call.
    fn shrinks(&mut self) -> Vec<(String, (u64, u64))> {
        if !self.tried {
            self.tried = true;
            match File::options().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg") {
                Ok(f) => {
                    use std::io::Seek;
                    // Only what happens from now on: older shrinks are in the looks.
                    let mut f = f;
                    if let Err(e) = f.seek(std::io::SeekFrom::End(0)) {
                        tracing::warn!(error = %e, "cannot seek /dev/kmsg: capacity changes between looks go unseen");
                        return Vec::new();
                    }
                    self.file = Some(f);
                }
                Err(e) => tracing::warn!(error = %e, "cannot read /dev/kmsg: capacity changes between looks go unseen"),
            }
        }
        let Some(f) = &self.file else { return Vec::new() };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            use std::io::Read;
            match (&*f).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    if record.contains("set_capacity_and_notify: ") && record.contains("callbacks suppressed") {
                        tracing::warn!(
                            "the kernel suppressed capacity-change lines: a shrink undone between looks may go unseen"
                        );
                    }
                    out.extend(parse_capacity_change(&record));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    // Records overwritten before they were read: the next
                    // read goes on from the oldest one left.
                    self.lapped += 1;
                    tracing::warn!(
                        times = self.lapped,
                        "the kernel log lapped cbt's reader: capacity changes between looks may go unseen"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading /dev/kmsg failed: capacity changes between looks go unseen");
                    self.file = None;
                    break;
                }
            }
        }
        out
    }
}

/// A shrink in one `/dev/kmsg` record ("PRIO,SEQ,TS,FLAGS;MESSAGE\n ...").
fn parse_capacity_change(record: &str) -> Option<(String, (u64, u64))> {
    let message = record.split_once(';')?.1.lines().next()?;
    let (name, sizes) = message.split_once(": detected capacity change from ")?;
    let (from, to) = sizes.trim().split_once(" to ")?;
    let (from, to): (u64, u64) = (from.parse().ok()?, to.parse().ok()?);
    (to < from).then(|| (name.to_string(), (from, to)))
}

/// Whole disks a sample names below it.
fn lower_disks(sample: &Sample) -> BTreeSet<DeviceKey> {
    match &sample.fingerprint.layout {
        Layout::Loop(l) => l.backing_device.iter().filter_map(|l| l.disk).collect(),
        Layout::DeviceMapper(pieces) => pieces
            .iter()
            .flat_map(|p| match &p.target {
                Target::Linear { layer, .. } => vec![layer.disk],
                Target::Other { layers, .. } => layers.iter().map(|l| l.disk).collect(),
            })
            .flatten()
            .collect(),
        Layout::Direct | Layout::Unreadable(_) => BTreeSet::new(),
    }
}

/// A device stacked on a re-mapped one is re-mapped too, over the same
/// interval (transitively).
fn propagate(mut remaps: Vec<Remap>, samples: &BTreeMap<DeviceKey, (u64, Sample)>) -> Vec<Remap> {
    let mut uppers: HashMap<DeviceKey, Vec<DeviceKey>> = HashMap::new();
    for (key, (_, sample)) in samples {
        for lower in lower_disks(sample) {
            uppers.entry(lower).or_default().push(*key);
        }
    }
    let mut done: BTreeSet<DeviceKey> = remaps.iter().map(|r| r.key).collect();
    let mut i = 0;
    while i < remaps.len() {
        let (key, since) = (remaps[i].key, remaps[i].since_ns);
        for upper in uppers.get(&key).into_iter().flatten() {
            if done.insert(*upper) {
                let reason = format!("a device below it ({key}) may have changed: {}", remaps[i].reason);
                remaps.push(Remap { key: *upper, since_ns: since, reason });
            }
        }
        i += 1;
    }
    remaps
}

/// One look at `disk`; `None` if it is gone or was replaced meanwhile.
fn look(disk: &Disk, dm: &mut DmReader) -> Option<Sample> {
    let base = devices::sys_block(&disk.name);
    let is_loop = base.join("loop").is_dir();
    // For a loop device: its counters before and after everything else
    // (see `backing_written`).
    let before = if is_loop { activity(disk) } else { None };
    let capacity: Result<u64, _> = devices::parse(base.join("size"));
    let mut backing = None;
    let layout = if let Err(e) = &capacity {
        Layout::Unreadable(e.to_string())
    } else if is_loop {
        let (map, stamp) = look_loop(disk, &base.join("loop"));
        if let (Some(before), Some(file), true) = (before, stamp, iostats(&base)) {
            backing = activity(disk).map(|after| BackingLook { before, file, after });
        }
        map
    } else if base.join("dm").is_dir() {
        dm.flatten(disk.key.dev, 0).map(|p| Layout::DeviceMapper(normalize(p))).unwrap_or_else(Layout::Unreadable)
    } else {
        Layout::Direct
    };
    // Read across a detach or a number handed to another disk: not a look
    // at this instance.
    if Disk::by_name(&disk.name).ok()?.key != disk.key {
        return None;
    }
    Some(Sample { fingerprint: Fingerprint { capacity: capacity.unwrap_or(0), layout }, backing })
}

fn activity(disk: &Disk) -> Option<Activity> {
    disk.counters().map(|c| Activity { changed_sectors: c.changed_sectors(), in_flight: c.in_flight })
}

/// The kernel counts this queue's I/O (`queue/iostats`): without it the
/// counters stand still and prove nothing.
fn iostats(base: &Path) -> bool {
    devices::parse::<u8>(base.join("queue/iostats")).is_ok_and(|v| v == 1)
}

/// The loop mapping, and the backing file's stamps if the file reachable
/// by its path is the one the driver holds.
fn look_loop(disk: &Disk, dir: &Path) -> (Layout, Option<FileStamp>) {
    let (Ok(offset), Ok(sizelimit), Ok(backing_file)) = (
        devices::parse::<u64>(dir.join("offset")),
        devices::parse::<u64>(dir.join("sizelimit")),
        devices::read(dir.join("backing_file")),
    ) else {
        return (Layout::Unreadable(format!("{}: loop attributes", dir.display())), None);
    };
    let backing_file = backing_file.trim_end_matches('\n').to_string();
    let status = loop_status(disk);
    let by_path = std::fs::metadata(&backing_file).ok();
    let (backing_inode, backing_device) = match (&status, &by_path) {
        (Some(s), _) if s.lo_rdevice != 0 => (Some((s.lo_device, s.lo_inode)), Some(layer_of_dev_t(s.lo_rdevice))),
        (Some(s), _) => (Some((s.lo_device, s.lo_inode)), None),
        (None, Some(m)) if m.file_type().is_block_device() => (None, Some(layer_of_dev_t(m.rdev()))),
        (None, Some(m)) => (Some((m.dev(), m.ino())), None),
        (None, None) => (None, None),
    };
    if let Some(s) = &status {
        if s.lo_offset != offset {
            // Changed between the two reads: the next look sees it settled.
            return (Layout::Unreadable("loop offset changed while being read".into()), None);
        }
    }
    // The stamps are only the backing file's if the path leads to the file
    // the driver holds (not a file put in its place, not a device node).
    let stamp = by_path.filter(|m| m.is_file() && backing_inode == Some((m.dev(), m.ino()))).map(|m| FileStamp {
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        size: m.len(),
    });
    let map = LoopMap { offset, sizelimit, backing_file, backing_inode, backing_device };
    (Layout::Loop(map), stamp)
}

/// `struct loop_info64` (include/uapi/linux/loop.h), as `LOOP_GET_STATUS64`
/// fills it (and `LOOP_SET_STATUS64` takes it).
#[repr(C)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

pub const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// `LOOP_GET_STATUS64` on the device node, if `/dev/<name>` is this disk.
/// It tells which file the driver holds, wherever that file lives.
fn loop_status(disk: &Disk) -> Option<LoopInfo64> {
    let node = PathBuf::from("/dev").join(&disk.name);
    // O_RDONLY: closing a node opened for writing makes udev probe it.
    let file = File::options().read(true).custom_flags(libc::O_NONBLOCK).open(&node).ok()?;
    let rdev = file.metadata().ok()?.rdev();
    if !file.metadata().ok()?.file_type().is_block_device()
        || (libc::major(rdev), libc::minor(rdev)) != (disk.key.major(), disk.key.minor())
    {
        return None;
    }
    // SAFETY: all-zero is a valid loop_info64 (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call; the kernel writes at most
    // size_of::<loop_info64>() bytes into `info`, which is that struct.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info as *mut LoopInfo64) };
    (rc == 0).then_some(info)
}

/// The layer a userspace `dev_t` names.
fn layer_of_dev_t(rdev: u64) -> Layer {
    layer(libc::major(rdev), libc::minor(rdev))
}

/// The layer `major:minor` names now: its whole disk and its start there.
fn layer(major: u32, minor: u32) -> Layer {
    let dev = DeviceKey::from_major_minor(major, minor, 0).dev;
    let node = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let Ok(real) = std::fs::canonicalize(&node) else {
        return Layer { dev, disk: None, start: 0 };
    };
    let partition = real.join("partition").exists();
    let start = if partition { devices::parse(real.join("start")).unwrap_or(u64::MAX) } else { 0 };
    let disk_dir = if partition { real.parent().map(Path::to_path_buf) } else { Some(real) };
    let disk = disk_dir
        .as_deref()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| Disk::by_name(n).ok())
        .map(|d| d.key);
    Layer { dev, disk, start }
}

/// Merges neighbouring pieces that continue each other.
fn normalize(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        if let Some(last) = out.last_mut() {
            let continues = match (&last.target, &p.target) {
                (Target::Linear { layer: a, offset: x }, Target::Linear { layer: b, offset: y }) => {
                    a == b && x.checked_add(last.len) == Some(*y)
                }
                (
                    Target::Other { kind: k1, digest: d1, layers: l1, from: f1 },
                    Target::Other { kind: k2, digest: d2, layers: l2, from: f2 },
                ) => k1 == k2 && d1 == d2 && l1 == l2 && f1.checked_add(last.len) == Some(*f2),
                _ => false,
            };
            if continues {
                last.len += p.len;
                continue;
            }
        }
        out.push(p);
    }
    out
}

/// `[offset, offset + len)` of a flattened table.
fn slice(pieces: &[Piece], offset: u64, len: u64) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, offset.checked_add(len).ok_or("table range overflows")?);
    for p in pieces {
        let (p_start, p_end) = (pos, pos.saturating_add(p.len));
        pos = p_end;
        let (from, to) = (p_start.max(offset), p_end.min(end));
        if from >= to {
            continue;
        }
        let skip = from - p_start;
        let target = match &p.target {
            Target::Linear { layer, offset } => Target::Linear { layer: layer.clone(), offset: offset + skip },
            Target::Other { kind, digest, layers, from } => {
                Target::Other { kind: kind.clone(), digest: *digest, layers: layers.clone(), from: from + skip }
            }
        };
        out.push(Piece { len: to - from, target });
    }
    if pos < end {
        return Err(format!("a table maps {pos} sectors, {end} are used above it"));
    }
    Ok(out)
}

/// Parses `major:minor`.
fn dev_token(token: &str) -> Option<(u32, u32)> {
    let (a, b) = token.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Device-mapper layers resolved through: enough for any real stack.
const MAX_DEPTH: u32 = 16;

/// Reads live device-mapper tables through `/dev/mapper/control`, each
/// device's once per pass.
#[derive(Default)]
struct DmReader {
    control: Option<Result<File, String>>,
    tables: HashMap<u32, Result<Vec<RawTarget>, String>>,
}

/// One line of a live table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawTarget {
    len: u64,
    kind: String,
    params: String,
}

impl DmReader {
    fn table(&mut self, dev: u32) -> Result<Vec<RawTarget>, String> {
        if let Some(t) = self.tables.get(&dev) {
            return t.clone();
        }
        let control = self
            .control
            .get_or_insert_with(|| {
                File::options()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open("/dev/mapper/control")
                    .map_err(|e| format!("/dev/mapper/control: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let key = DeviceKey { dev, diskseq: 0 };
        let t = dm_table_status(control, key.major(), key.minor());
        self.tables.insert(dev, t.clone());
        t
    }

    /// The table of dm device `dev`, linear layers over other dm devices
    /// resolved through.
    fn flatten(&mut self, dev: u32, depth: u32) -> Result<Vec<Piece>, String> {
        if depth > MAX_DEPTH {
            return Err("device-mapper devices stacked too deep".into());
        }
        let mut pieces = Vec::new();
        for t in self.table(dev)? {
            let tokens: Vec<&str> = t.params.split_whitespace().collect();
            let linear = match (t.kind.as_str(), tokens.as_slice()) {
                ("linear", [dev, offset]) => dev_token(dev).zip(offset.parse::<u64>().ok()),
                ("snapshot-origin", [dev]) => dev_token(dev).map(|d| (d, 0)),
                _ => None,
            };
            match linear {
                Some(((major, minor), offset)) => {
                    let layer = layer(major, minor);
                    let below_is_dm = layer.start == 0
                        && Path::new(&format!("/sys/dev/block/{major}:{minor}/dm")).is_dir()
                        && !Path::new(&format!("/sys/dev/block/{major}:{minor}/partition")).exists();
                    if below_is_dm {
                        let below = self.flatten(layer.dev, depth + 1)?;
                        pieces.extend(slice(&below, offset, t.len)?);
                    } else {
                        pieces.push(Piece { len: t.len, target: Target::Linear { layer, offset } });
                    }
                }
                None => {
                    let digest = Sha256::digest(format!("{} {}", t.kind, t.params).as_bytes());
                    let layers = tokens.iter().filter_map(|t| dev_token(t)).map(|(a, b)| layer(a, b)).collect();
                    let mut d = [0u8; 16];
                    d.copy_from_slice(&digest[..16]);
                    pieces
                        .push(Piece { len: t.len, target: Target::Other { kind: t.kind, digest: d, layers, from: 0 } });
                }
            }
        }
        Ok(pieces)
    }
}

// struct dm_ioctl and struct dm_target_spec (include/uapi/linux/dm-ioctl.h).
const DM_IOCTL_SIZE: usize = 312;
const DM_SPEC_SIZE: usize = 40;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_TABLE_STATUS_CMD: u32 = 12;
/// `_IOWR(0xfd, DM_TABLE_STATUS_CMD, struct dm_ioctl)`.
const DM_TABLE_STATUS: u32 = (3 << 30) | ((DM_IOCTL_SIZE as u32) << 16) | (0xfd << 8) | DM_TABLE_STATUS_CMD;
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;

#[repr(C)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

const _: () = assert!(std::mem::size_of::<DmIoctl>() == DM_IOCTL_SIZE);

/// The kernel's `huge_encode_dev`, which `dm_ioctl.dev` is decoded with.
fn huge_encode_dev(major: u32, minor: u32) -> u64 {
    u64::from((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// `DM_TABLE_STATUS` with `DM_STATUS_TABLE_FLAG`: the live table of the dm
/// device `major:minor`, as `dmsetup table` prints it.
fn dm_table_status(control: &File, major: u32, minor: u32) -> Result<Vec<RawTarget>, String> {
    let mut size = 16 << 10;
    loop {
        // u64 words: the kernel aligns what it writes to 8 bytes.
        let mut buf = vec![0u64; size / 8];
        let header = DmIoctl {
            version: [4, 0, 0],
            data_size: size as u32,
            data_start: DM_IOCTL_SIZE as u32,
            target_count: 0,
            open_count: 0,
            flags: DM_STATUS_TABLE_FLAG,
            event_nr: 0,
            padding: 0,
            dev: huge_encode_dev(major, minor),
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        // SAFETY: `buf` is `size` >= DM_IOCTL_SIZE bytes, 8-byte aligned;
        // DmIoctl is repr(C) plain data of that size.
        unsafe { std::ptr::write(buf.as_mut_ptr().cast::<DmIoctl>(), header) };
        // SAFETY: the fd is open; the kernel reads and writes at most
        // `data_size` bytes of `buf`, which is that long.
        let rc = unsafe { libc::ioctl(control.as_raw_fd(), DM_TABLE_STATUS as _, buf.as_mut_ptr()) };
        if rc != 0 {
            return Err(format!("DM_TABLE_STATUS {major}:{minor}: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: u64 words viewed as the bytes they hold.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), size) };
        match parse_table_status(bytes)? {
            Some(table) => return Ok(table),
            None if size < 4 << 20 => size *= 4,
            None => return Err(format!("DM_TABLE_STATUS {major}:{minor}: table larger than 4 MiB")),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses what `DM_TABLE_STATUS` left in its buffer; `None` if the table
/// did not fit (ask again with more room).
fn parse_table_status(b: &[u8]) -> Result<Option<Vec<RawTarget>>, String> {
    let bad = |what: &str| format!("malformed DM_TABLE_STATUS answer: {what}");
    let flags = u32_at(b, 28).ok_or_else(|| bad("short header"))?;
    if flags & DM_BUFFER_FULL_FLAG != 0 {
        return Ok(None);
    }
    if flags & DM_ACTIVE_PRESENT_FLAG == 0 {
        // No live table (created, never resumed): maps nothing.
        return Ok(Some(Vec::new()));
    }
    let data_start = u32_at(b, 16).ok_or_else(|| bad("short header"))? as usize;
    let count = u32_at(b, 20).ok_or_else(|| bad("short header"))?;
    let data = b.get(data_start..).ok_or_else(|| bad("data start past the buffer"))?;
    let mut targets = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        let spec = data.get(at..at + DM_SPEC_SIZE).ok_or_else(|| bad("target past the buffer"))?;
        let len = u64_at(spec, 8).ok_or_else(|| bad("spec"))?;
        let next = u32_at(spec, 20).ok_or_else(|| bad("spec"))? as usize;
        let kind = cstr(&spec[24..40]);
        let params = cstr(data.get(at + DM_SPEC_SIZE..).ok_or_else(|| bad("params past the buffer"))?);
        targets.push(RawTarget { len, kind, params });
        // `next` is from the start of the data; the kernel only moves on.
        if i + 1 < count {
            if next <= at {
                return Err(bad("target offsets go backwards"));
            }
            at = next;
        }
    }
    Ok(Some(targets))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: DeviceKey = DeviceKey { dev: 7 << 20, diskseq: 3 };
    const OTHER: DeviceKey = DeviceKey { dev: 7 << 20 | 1, diskseq: 4 };

    fn layer_on(disk: DeviceKey) -> Layer {
        Layer { dev: disk.dev, disk: Some(disk), start: 0 }
    }

    fn lp(offset: u64, inode: u64) -> Layout {
        Layout::Loop(LoopMap {
            offset,
            sizelimit: 0,
            backing_file: "/srv/vol.img".into(),
            backing_inode: Some((2049, inode)),
            backing_device: None,
        })
    }

    fn fp(capacity: u64, layout: Layout) -> Fingerprint {
        Fingerprint { capacity, layout }
    }

    fn linear(len: u64, disk: DeviceKey, offset: u64) -> Piece {
        Piece { len, target: Target::Linear { layer: layer_on(disk), offset } }
    }

    fn remapped(v: Verdict) -> bool {
        matches!(v, Verdict::Remapped(_))
    }

    #[test]
    fn capacity_growth_is_not_a_gap_shrink_is() {
        assert_eq!(compare(&fp(100, Layout::Direct), &fp(100, Layout::Direct)), Verdict::Same);
        assert_eq!(compare(&fp(100, Layout::Direct), &fp(150, Layout::Direct)), Verdict::Grew { from: 100, to: 150 });
        assert!(remapped(compare(&fp(100, Layout::Direct), &fp(99, Layout::Direct))));
        assert!(remapped(compare(&fp(100, Layout::Direct), &fp(0, Layout::Direct))));
    }

    #[test]
    fn loop_offset_or_backing_file_change_is_a_remap() {
        assert_eq!(compare(&fp(100, lp(0, 12)), &fp(100, lp(0, 12))), Verdict::Same);
        assert!(remapped(compare(&fp(100, lp(0, 12)), &fp(100, lp(4096, 12)))), "same size, other sectors");
        assert!(remapped(compare(&fp(100, lp(0, 12)), &fp(100, lp(0, 13)))), "another file");
        assert_eq!(compare(&fp(100, lp(0, 12)), &fp(200, lp(0, 12))), Verdict::Grew { from: 100, to: 200 });
        assert!(remapped(compare(&fp(100, lp(0, 12)), &fp(200, lp(512, 12)))), "grown but shifted");
        // A rename is the same file.
        let mut renamed = lp(0, 12);
        if let Layout::Loop(l) = &mut renamed {
            l.backing_file = "/srv/moved.img".into();
        }
        assert_eq!(compare(&fp(100, lp(0, 12)), &fp(100, renamed.clone())), Verdict::Same);
        // Without the driver's answer only the path can be compared.
        let unknown = |path: &str| {
            Layout::Loop(LoopMap {
                offset: 0,
                sizelimit: 0,
                backing_file: path.into(),
                backing_inode: None,
                backing_device: None,
            })
        };
        assert!(remapped(compare(&fp(100, unknown("/a")), &fp(100, unknown("/b")))));
        assert_eq!(
            compare(&fp(100, unknown("/a")), &fp(100, lp(0, 12))),
            Verdict::Remapped("loop backing file changed from \"/a\" to \"/srv/vol.img\"".into())
        );
    }

    #[test]
    fn unreadable_or_other_driver_is_a_remap() {
        let unreadable = Layout::Unreadable("EACCES".into());
        assert!(remapped(compare(&fp(100, unreadable.clone()), &fp(100, unreadable.clone()))), "never proven");
        assert!(remapped(compare(&fp(100, Layout::Direct), &fp(100, unreadable))));
        assert!(remapped(compare(&fp(100, Layout::Direct), &fp(100, lp(0, 1)))));
    }

    #[test]
    fn dm_table_swaps_are_remaps_prefix_growth_is_not() {
        let old = vec![linear(100, DISK, 2048)];
        let dm = |pieces: Vec<Piece>| fp(pieces.iter().map(|p| p.len).sum(), Layout::DeviceMapper(pieces));
        assert_eq!(compare(&dm(old.clone()), &dm(old.clone())), Verdict::Same);
        // Pointed at other sectors of the same disk, same size.
        assert!(remapped(compare(&dm(old.clone()), &dm(vec![linear(100, DISK, 4096)]))));
        // Same numbers, another instance below (a loop device re-attached).
        assert!(remapped(compare(&dm(old.clone()), &dm(vec![linear(100, OTHER, 2048)]))));
        // Grown in place (lvextend onto contiguous extents)...
        assert_eq!(compare(&dm(old.clone()), &dm(vec![linear(300, DISK, 2048)])), Verdict::Grew { from: 100, to: 300 });
        // ... or onto another device.
        let appended = vec![linear(100, DISK, 2048), linear(50, OTHER, 0)];
        assert_eq!(compare(&dm(old.clone()), &dm(appended.clone())), Verdict::Grew { from: 100, to: 150 });
        // Grown, but the old part moved.
        assert!(remapped(compare(&dm(old.clone()), &dm(vec![linear(50, OTHER, 0), linear(100, DISK, 2048)]))));
        // Shrunk back.
        assert!(remapped(compare(&dm(appended), &dm(old.clone()))));
        // Another target over the same sectors.
        let other = Piece {
            len: 100,
            target: Target::Other { kind: "crypt".into(), digest: [1; 16], layers: vec![layer_on(DISK)], from: 0 },
        };
        assert!(remapped(compare(&dm(old), &dm(vec![other.clone()]))));
        let rekeyed = Piece {
            len: 100,
            target: Target::Other { kind: "crypt".into(), digest: [2; 16], layers: vec![layer_on(DISK)], from: 0 },
        };
        assert!(remapped(compare(&dm(vec![other.clone()]), &dm(vec![rekeyed]))));
        let longer = Piece { len: 300, ..other.clone() };
        assert_eq!(compare(&dm(vec![other]), &dm(vec![longer])), Verdict::Grew { from: 100, to: 300 });
    }

    #[test]
    fn flattening_helpers_keep_positions() {
        // Contiguous linear runs merge; a gap in the offsets does not.
        let merged = normalize(vec![linear(10, DISK, 0), linear(20, DISK, 10), linear(5, DISK, 100)]);
        assert_eq!(merged, vec![linear(30, DISK, 0), linear(5, DISK, 100)]);
        // A linear layer over part of another table.
        let below = vec![linear(10, DISK, 0), linear(20, OTHER, 500)];
        assert_eq!(slice(&below, 5, 10).unwrap(), vec![linear(5, DISK, 5), linear(5, OTHER, 500)]);
        assert!(slice(&below, 25, 10).is_err(), "past the end of the table below");
        // An LVM origin before and after gaining a snapshot-origin layer
        // over its `-real` device: the same pieces.
        let origin = normalize(vec![linear(100, DISK, 2048)]);
        let via_real = normalize(slice(&[linear(100, DISK, 2048)], 0, 100).unwrap());
        assert_eq!(origin, via_real);
    }

    fn look_at(changed: u64, in_flight: u64, mtime: i64, size: u64) -> BackingLook {
        let a = Activity { changed_sectors: changed, in_flight };
        BackingLook { before: a, file: FileStamp { mtime: (mtime, 0), ctime: (mtime, 0), size }, after: a }
    }

    #[test]
    fn backing_file_written_by_someone_else_is_seen_only_while_idle() {
        // Idle both times, the file changed: not the loop device's doing.
        assert!(backing_written(&look_at(100, 0, 1, 4096), &look_at(100, 0, 2, 4096)));
        // Truncated: smaller.
        assert!(backing_written(&look_at(100, 0, 1, 4096), &look_at(100, 0, 2, 2048)));
        // The loop device wrote: its own writes move the stamps.
        assert!(!backing_written(&look_at(100, 0, 1, 4096), &look_at(108, 0, 2, 4096)));
        assert!(!backing_written(&look_at(100, 1, 1, 4096), &look_at(100, 0, 2, 4096)));
        assert!(!backing_written(&look_at(100, 0, 1, 4096), &look_at(100, 1, 2, 4096)));
        // Extended (how a loop device is grown): taken as growth.
        assert!(!backing_written(&look_at(100, 0, 1, 4096), &look_at(100, 0, 2, 8192)));
        // Untouched.
        assert!(!backing_written(&look_at(100, 0, 1, 4096), &look_at(100, 0, 1, 4096)));
        let sample = |b| Sample { fingerprint: fp(8, lp(0, 1)), backing: Some(b) };
        assert!(judge(&sample(look_at(1, 0, 1, 9)), &sample(look_at(1, 0, 2, 9))).is_some());
        assert!(judge(&sample(look_at(1, 0, 1, 9)), &sample(look_at(1, 0, 1, 9))).is_none());
    }

    #[test]
    fn a_remap_below_reaches_every_device_above() {
        let dm0 = DeviceKey { dev: 253 << 20, diskseq: 10 };
        let dm1 = DeviceKey { dev: 253 << 20 | 1, diskseq: 11 };
        let sample = |layout| Sample { fingerprint: fp(100, layout), backing: None };
        let samples: BTreeMap<_, _> = [
            (DISK, (0, sample(lp(0, 1)))),
            (dm0, (0, sample(Layout::DeviceMapper(vec![linear(100, DISK, 0)])))),
            (
                dm1,
                (
                    0,
                    sample(Layout::DeviceMapper(vec![Piece {
                        len: 100,
                        target: Target::Other {
                            kind: "thin".into(),
                            digest: [0; 16],
                            layers: vec![layer_on(dm0)],
                            from: 0,
                        },
                    }])),
                ),
            ),
            (OTHER, (0, sample(Layout::Direct))),
        ]
        .into_iter()
        .collect();
        let found = propagate(vec![Remap { key: DISK, since_ns: 5, reason: "offset".into() }], &samples);
        let keys: Vec<_> = found.iter().map(|r| (r.key, r.since_ns)).collect();
        assert_eq!(keys, vec![(DISK, 5), (dm0, 5), (dm1, 5)]);
    }

    #[test]
    fn parses_a_table_status_answer() {
        // Two targets as the kernel lays them out after the header.
        let mut b = vec![0u8; DM_IOCTL_SIZE + 256];
        b[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes());
        b[20..24].copy_from_slice(&2u32.to_ne_bytes());
        b[28..32].copy_from_slice(&(DM_ACTIVE_PRESENT_FLAG | DM_STATUS_TABLE_FLAG).to_ne_bytes());
        let put_spec = |b: &mut Vec<u8>, at: usize, start: u64, len: u64, next: u32, kind: &str, params: &str| {
            let s = DM_IOCTL_SIZE + at;
            b[s..s + 8].copy_from_slice(&start.to_ne_bytes());
            b[s + 8..s + 16].copy_from_slice(&len.to_ne_bytes());
            b[s + 20..s + 24].copy_from_slice(&next.to_ne_bytes());
            b[s + 24..s + 24 + kind.len()].copy_from_slice(kind.as_bytes());
            b[s + 40..s + 40 + params.len()].copy_from_slice(params.as_bytes());
        };
        put_spec(&mut b, 0, 0, 2048, 56, "linear", "7:0 0");
        put_spec(&mut b, 56, 2048, 1024, 0, "striped", "2 128 7:1 0 7:2 0");
        let t = parse_table_status(&b).unwrap().unwrap();
        assert_eq!(
            t,
            vec![
                RawTarget { len: 2048, kind: "linear".into(), params: "7:0 0".into() },
                RawTarget { len: 1024, kind: "striped".into(), params: "2 128 7:1 0 7:2 0".into() },
            ]
        );
        // Did not fit: ask again.
        b[28..32].copy_from_slice(&(DM_ACTIVE_PRESENT_FLAG | DM_BUFFER_FULL_FLAG).to_ne_bytes());
        assert_eq!(parse_table_status(&b).unwrap(), None);
        // No live table.
        b[28..32].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_table_status(&b).unwrap(), Some(vec![]));
        // Garbage never panics.
        b[28..32].copy_from_slice(&DM_ACTIVE_PRESENT_FLAG.to_ne_bytes());
        b[20..24].copy_from_slice(&1000u32.to_ne_bytes());
        b[DM_IOCTL_SIZE + 20..DM_IOCTL_SIZE + 24].copy_from_slice(&0u32.to_ne_bytes());
        assert!(parse_table_status(&b).is_err());
        assert!(parse_table_status(&b[..10]).is_err());
    }

    #[test]
    fn reads_shrinks_from_kernel_log_records() {
        let rec = |m: &str| format!("6,1234,5678901,-;{m}\n SUBSYSTEM=block\n");
        assert_eq!(
            parse_capacity_change(&rec("loop3: detected capacity change from 32768 to 16384")),
            Some(("loop3".into(), (32768, 16384)))
        );
        assert_eq!(
            parse_capacity_change(&rec("vda: detected capacity change from 2048 to 0")),
            Some(("vda".into(), (2048, 0)))
        );
        assert_eq!(parse_capacity_change(&rec("loop3: detected capacity change from 0 to 32768")), None, "growth");
        assert_eq!(parse_capacity_change(&rec("EXT4-fs (loop3): mounted filesystem")), None);
        assert_eq!(parse_capacity_change("garbage"), None);
    }

    #[test]
    fn ioctl_numbers_match_the_headers() {
        // From <linux/dm-ioctl.h> and <linux/loop.h> on x86_64.
        assert_eq!(DM_TABLE_STATUS, 0xC138_FD0C);
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(huge_encode_dev(253, 3), 0xFD03);
        assert_eq!(huge_encode_dev(259, 300), (300 & 0xff) | (259 << 8) | ((300 & !0xff) << 12));
    }
}
