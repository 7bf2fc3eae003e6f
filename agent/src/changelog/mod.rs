//! The change log: per device instance, time-stamped segments of changed
//! chunks, the gaps where the record cannot be trusted, and the snapshot cut
//! windows; persisted crash-safely and answering allocated / delta queries.
//!
//! Time is one *timeline* (ns) across agent restarts and reboots:
//! `CLOCK_MONOTONIC + base`, where a new boot gets a base that puts its
//! stamps after every stamp already recorded. Wall-clock jumps do not move
//! it. Device instances are keyed by boot as well, since `diskseq` restarts
//! with the kernel.
//!
//! Second stage of the data path: it takes [`Seal`]s, settle reports and
//! gaps from the tracker and hands [`ChunkMap`]s to the query service.

mod record;
mod segment;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

pub use segment::Segment;

use self::record::{Record, RecordError, SegmentRecord};
use crate::{
    changes::{Gap, GapScope},
    devices::DeviceKey,
    journal::{Journal, JournalEnd, JournalError, Tail},
    query::{ChunkMap, MetadataSource, QueryError},
    statedir,
    tracker::{monotonic_ns, Checkpoint, Continuity, Seal},
};

/// A point on the log's timeline, in ns.
pub type Stamp = u64;

/// A device instance across reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId {
    pub boot: u32,
    pub dev: u32,
    pub diskseq: u64,
}

impl InstanceId {
    pub fn key(&self) -> DeviceKey {
        DeviceKey { dev: self.dev, diskseq: self.diskseq }
    }
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@boot{}", self.key(), self.boot)
    }
}

/// Where a volume lay: its device instance and its extent on that disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub instance: InstanceId,
    /// Where the volume starts on the disk (partitions), and its size.
    pub offset_bytes: u64,
    pub capacity_bytes: u64,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {} B from byte {}", self.instance, self.capacity_bytes, self.offset_bytes)
    }
}

/// A snapshot's cut window from `snapshot begin` until the commit that
/// closes it (or an abort, or expiry): its own identity the whole time
/// (contract §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenCut {
    pub id: u64,
    pub volume: String,
    pub lo: Stamp,
    /// Where the volume was at begin; `None` only for a cut an older agent
    /// began, which can never be committed.
    pub placement: Option<Placement>,
    /// A commit naming no cut took its place (see
    /// [`ChangeLog::commit_snapshot`]): only a commit naming it closes it.
    pub taken: bool,
}

/// A registered snapshot and its cut window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub handle: String,
    pub volume: String,
    pub instance: InstanceId,
    /// No later than the earliest moment the cut could have happened.
    pub lo: Stamp,
    /// No earlier than the moment the snapshot was known to exist.
    pub hi: Stamp,
    /// Where the volume starts on the disk (partitions), and its size.
    pub offset_bytes: u64,
    pub capacity_bytes: u64,
    pub committed_unix_ns: u64,
    /// The cut its commit named, or took when it named none (absent in
    /// older journals).
    #[serde(default)]
    pub cut_id: Option<u64>,
}

/// Damage found in the journal: records after it may be lost, so every
/// handle the log does not know may be one it lost (FAILED_PRECONDITION,
/// never "unknown"). Kept for good: only a new state directory clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamageInfo {
    /// When it was found, on the timeline.
    pub detected: Stamp,
    pub reason: String,
    /// Where the damaged file was kept, if it was.
    pub copy: Option<String>,
}

/// A gap as the log keeps it: on the timeline, per instance or for all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapInfo {
    pub instance: Option<InstanceId>,
    pub from: Stamp,
    pub to: Stamp,
    pub reason: String,
}

impl GapInfo {
    fn hits(&self, instance: InstanceId, lo: Stamp, hi: Stamp) -> bool {
        self.instance.is_none_or(|i| i == instance) && self.from <= hi && self.to >= lo
    }
}

#[derive(Debug)]
struct InstanceLog {
    name: String,
    tracked_since: Stamp,
    /// Ascending by start.
    segments: Vec<Segment>,
    /// The latest moment every captured change was seen completed.
    settled_at: Option<Stamp>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("state in {dir} was recorded at a granularity of {recorded} B, not {configured} B: keep the old setting or start from an empty state directory")]
    Granularity { dir: PathBuf, recorded: u64, configured: u64 },
    #[error("reading the boot id: {0}")]
    BootId(std::io::Error),
    #[error("volume {0:?} has no snapshot begun: call `snapshot begin` first")]
    NoCutBegun(String),
    #[error("cut {cut} is not open: {detail}")]
    CutNotOpen { cut: u64, detail: String },
    #[error("cut {cut} was begun for volume {begun:?}, not {volume:?}")]
    CutOfAnotherVolume { cut: u64, begun: String, volume: String },
    #[error(
        "a cut of volume {0:?} expired uncommitted, so a commit that names no cut may be that cut's and its window \
         unknown: name the cut `snapshot begin` returned (--cut), or, once no client holds a cut of it, abort them all \
         (`snapshot abort {0} --all`)"
    )]
    CutsExpired(String),
    #[error(
        "cut {cut} of volume {volume:?} began with the volume on {begun}, but it is now on {now}: the snapshot's \
         device is unknown, take a full backup (and abort the cut)"
    )]
    PlacementChanged { cut: u64, volume: String, begun: Placement, now: Placement },
    #[error("cut {0} was begun by an older agent that did not record the volume's device: begin again")]
    PlacementUnknown(u64),
    #[error(
        "volume {volume:?} already has {open} untaken open cuts: commit or abort them (`snapshot cuts` lists them)"
    )]
    TooManyCuts { volume: String, open: usize },
    #[error("drawing a cut id: {0}")]
    CutId(getrandom::Error),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("snapshot {0:?} is not known")]
    UnknownSnapshot(String),
    #[error("instance {0} has never been seen by the tracker")]
    UnknownInstance(InstanceId),
    #[error("sealing failed: {0}")]
    Sealing(String),
    #[error("no seal covers the snapshot window yet (cut {cut} < hi {hi})")]
    NotSealed { cut: Stamp, hi: Stamp },
}

/// What opening the state found.
#[derive(Debug, Default, Serialize)]
pub struct OpenReport {
    pub records: usize,
    pub previous_run_clean: Option<bool>,
    /// An append cut short by a crash (not after a clean stop: that is damage).
    pub torn_tail_bytes: u64,
    /// Damage found now, if any: every window up to now is a gap, and every
    /// unknown handle answers FAILED_PRECONDITION from now on.
    pub damage: Option<String>,
    /// Where the damaged journal was kept.
    pub damage_copy: Option<PathBuf>,
    /// The journal was in this older format and has been rewritten.
    pub converted_from_version: Option<u32>,
    pub new_boot: bool,
}

/// Sizes, for status and benchmarks.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LogStats {
    pub instances: usize,
    pub segments: usize,
    pub segment_chunks: u64,
    pub segment_bytes: u64,
    pub journal_bytes: u64,
    pub snapshots: usize,
    pub gaps: usize,
    pub compactions: u64,
}

pub struct ChangeLog {
    journal: Journal,
    granularity: u64,
    boot_id: String,
    boot: u32,
    base: u64,
    instances: BTreeMap<InstanceId, InstanceLog>,
    gaps: Vec<GapInfo>,
    /// Damage ever found in the journal (see [`DamageInfo`]).
    damage: Vec<DamageInfo>,
    snapshots: BTreeMap<String, SnapshotInfo>,
    /// Open cut windows by id. Ids are random, so one never names another
    /// cut, even after the journal lost the records of earlier ones.
    cuts: BTreeMap<u64, OpenCut>,
    /// Volumes with a cut that expired uncommitted (see `CutsExpired`).
    expired_cuts: BTreeSet<String>,
    /// How long a cut may stay open.
    cut_ttl: Stamp,
    /// Start of the open segment: the previous seal's cut.
    last_cut: Stamp,
    /// The latest durable seal's capture checkpoint.
    checkpoint: Option<Box<Checkpoint>>,
    /// Set by [`Self::load`], acted on by [`Self::begin_run`].
    recovery: Option<Recovery>,
    /// Journal size after the last compaction (or open).
    compacted_bytes: u64,
    seals_since_compaction: u64,
    compactions: u64,
}

const JOURNAL: &str = "changelog.journal";
/// Compact once the journal has grown this much past its compacted size.
const COMPACT_SLACK_BYTES: u64 = 64 << 20;
/// ... or once this many seals added segments: each seal's scattered
/// chunks cost about 8 B per 64 Ki-chunk container until merged (5.3 B per
/// chunk against 2.0 B compacted, bench/results/query.md), and a delta
/// unites every segment in its window.
const COMPACT_AFTER_SEALS: u64 = 128;
/// A cut not committed within this long is abandoned: a begin whose client
/// went away must not hold its window open, and refuse commits that name no
/// cut, forever. Far longer than any backend takes to cut (the commit comes
/// as soon as the snapshot exists). Agent uptime: the timeline does not
/// count time the agent was down.
pub const CUT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Untaken open cuts per volume: a client retrying begin in a loop is
/// refused before it grows the log without bound.
pub const MAX_OPEN_CUTS: usize = 64;
/// Taken cuts kept per volume for clients that may still commit them by
/// id (the oldest goes first). Every commit naming no cut leaves one, most
/// often its own.
pub const MAX_TAKEN_CUTS: usize = 64;
/// A rewrite splits the state's segments into seal records of about this
/// many bytes of chunk sets: a record is read whole (bounded memory), and
/// far under the journal's limit.
const STATE_RECORD_CHUNK_BYTES: usize = 8 << 20;

fn boot_id() -> Result<String, LogError> {
    crate::devices::boot_id().map_err(LogError::BootId)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// What replaying the journal found that the run's start must act on.
#[derive(Debug)]
struct Recovery {
    /// The previous run's last durable seal (or its start).
    last_durable: Option<Stamp>,
    /// The latest stamp any record shows.
    latest: Stamp,
    clean: Option<bool>,
    damage: Option<String>,
}

impl ChangeLog {
    /// Opens (or creates) the log in `dir`, replays it and begins a run
    /// with a new capture attached at `capture_started` (see
    /// [`Self::begin_run`]).
    pub fn open(dir: &Path, granularity: u64, capture_started: u64) -> Result<(Self, OpenReport), LogError> {
        let (mut log, report) = Self::load(dir, granularity)?;
        log.begin_run(capture_started, &Continuity::Fresh { why: None })?;
        Ok((log, report))
    }

    /// Opens (or creates) the log in `dir` and replays it. Nothing is
    /// recorded until [`Self::begin_run`], which must come before any
    /// other change. The caller holds `dir` (see [`statedir::StateDir`]):
    /// the run marker there says how the previous run ended.
    ///
    /// Damage (a bad or missing record, a torn tail or any other end than
    /// the one a clean stop pinned, an undecodable record) is recorded
    /// before anything else changes: a [`DamageInfo`], a gap for every
    /// device from the start of the timeline to now, the damaged file kept
    /// aside (bounded), and the journal rewritten with the state that
    /// survived. A torn tail after a crash is only cut off (by the rewrite).
    pub fn load(dir: &Path, granularity: u64) -> Result<(Self, OpenReport), LogError> {
        let marker = statedir::read_marker_in(dir);
        let (journal, recovered) = Journal::open(&dir.join(JOURNAL))?;
        let mut report = OpenReport {
            records: recovered.records.len(),
            converted_from_version: recovered.old_version,
            ..Default::default()
        };
        let mut damage = match &recovered.tail {
            Tail::Clean => None,
            Tail::Torn { bytes } => {
                report.torn_tail_bytes = *bytes;
                None
            }
            Tail::Damaged(d) => Some((d.offset, format!("at byte {}: {}", d.offset, d.reason))),
        };
        if damage.is_none() {
            damage = marker.as_ref().and_then(|m| judge_end(m, &recovered));
        }
        let mut log = Self {
            journal,
            granularity,
            boot_id: boot_id()?,
            boot: 0,
            base: 0,
            instances: BTreeMap::new(),
            gaps: Vec::new(),
            damage: Vec::new(),
            snapshots: BTreeMap::new(),
            cuts: BTreeMap::new(),
            expired_cuts: BTreeSet::new(),
            cut_ttl: CUT_TTL.as_nanos() as Stamp,
            last_cut: 0,
            checkpoint: None,
            recovery: None,
            compacted_bytes: 0,
            seals_since_compaction: 0,
            compactions: 0,
        };
        let mut previous: Option<(String, u32, u64)> = None;
        let mut last_durable: Option<Stamp> = None;
        let mut latest: Stamp = 0;
        let mut clean = None;
        for (index, bytes) in recovered.records.iter().enumerate() {
            let record = match Record::decode(bytes) {
                Ok(r) => r,
                Err(e) => {
                    // Checksummed but undecodable: written by a newer or
                    // broken version. Stop here, like at damage.
                    damage.get_or_insert((recovered.end.bytes, format!("record {index}: {e}")));
                    break;
                }
            };
            if let Record::Run { boot_id, boot, base, started, granularity: recorded, .. } = &record {
                if *recorded != granularity {
                    return Err(LogError::Granularity { dir: dir.into(), recorded: *recorded, configured: granularity });
                }
                previous = Some((boot_id.clone(), *boot, *base));
                last_durable = Some(*started);
                clean = Some(false);
            }
            if let Record::Seal { cut, .. } = &record {
                last_durable = Some(*cut);
            }
            // Clean only if the run's last word was its stop record.
            if clean.is_some() {
                clean = Some(matches!(record, Record::Stop { .. }));
            }
            latest = latest.max(record_stamp(&record));
            if let Err(e) = log.replay(record) {
                // Checksummed, decodable, and still inconsistent (a seal of
                // an instance never recorded): what follows cannot be trusted.
                damage.get_or_insert((recovered.end.bytes, format!("record {index}: {e}")));
                break;
            }
        }
        report.previous_run_clean = clean;
        let mono = monotonic_ns();
        (log.boot, log.base) = match &previous {
            Some((id, boot, base)) if *id == log.boot_id => (*boot, *base),
            Some((_, boot, _)) => {
                report.new_boot = true;
                (boot + 1, (latest + 1).saturating_sub(mono))
            }
            None => (0, 0),
        };
        if let Some((offset, reason)) = &damage {
            let copy = if recovered.created { Ok(None) } else { log.journal.preserve(*offset) };
            let (copy, copy_note) = match copy {
                Ok(Some(path)) => (Some(path), String::new()),
                Ok(None) if recovered.created => (None, String::new()),
                Ok(None) => (None, " (no copy kept: enough copies of earlier damage are there)".to_string()),
                Err(e) => (None, format!(" (no copy kept: {e})")),
            };
            let reason = format!("{reason}{copy_note}");
            let now = log.now();
            // Every record after the damage is lost, and a lost gap may
            // reach back before any record that survived: no window up to
            // now can be proven.
            log.gaps.push(GapInfo {
                instance: None,
                from: 0,
                to: now,
                reason: format!("state journal damaged ({reason}): records after it are lost"),
            });
            log.damage.push(DamageInfo {
                detected: now,
                reason: reason.clone(),
                copy: copy.as_ref().map(|p| p.display().to_string()),
            });
            report.damage = Some(reason);
            report.damage_copy = copy;
        }
        if report.damage.is_some() || report.new_boot {
            // Records after the damage may be lost, and the capture of
            // another boot is gone.
            log.checkpoint = None;
        }
        if damage.is_some() || recovered.tail != Tail::Clean || recovered.old_version.is_some() {
            // What was found is recorded for good before anything is
            // appended (and the torn tail or old format is gone).
            let records = log.state_records()?;
            log.journal.rewrite(records.iter().map(Vec::as_slice))?;
            if marker.as_ref().is_some_and(|m| m.clean) {
                // The clean stop's pin names the file just replaced.
                statedir::mark_dirty_in(dir, b"journal rewritten at load")?;
            }
        }
        log.recovery = Some(Recovery { last_durable, latest, clean, damage: report.damage.clone() });
        Ok((log, report))
    }

    /// What the run marker should say at a clean stop: the journal's end,
    /// so the next [`Self::load`] can tell it reads that very file, whole.
    /// Call after [`Self::stop`], with nothing appended since.
    pub fn clean_stop_marker(&self) -> String {
        format!("stopped; {}", self.journal.end())
    }

    /// Where the previous run's last durable seal left the capture, if a
    /// new agent may try to take it over.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_deref()
    }

    /// Records the start of a run. With a new capture (attached at
    /// `capture_started`, `CLOCK_MONOTONIC`), everything between the
    /// previous run's last durable seal and now becomes a gap for all
    /// devices (nothing was capturing), as does anything after damage in
    /// the journal; and no device is covered again until it is proven to
    /// have nothing from before pending. A resumed capture never stopped:
    /// the next segment simply starts at the checkpoint's cut.
    pub fn begin_run(&mut self, capture_started: u64, continuity: &Continuity) -> Result<(), LogError> {
        let Some(recovery) = self.recovery.take() else { return Ok(()) };
        let now = self.now();
        let resumed = matches!(continuity, Continuity::Resumed { .. });
        if !resumed {
            self.last_cut = self.stamp(capture_started);
        }
        // `started` is where the run's coverage in the log begins: a later
        // restart without take-over gaps from there. Taken over, that is
        // the checkpoint's cut, not now: what was re-read from the rings is
        // only in memory until the next seal.
        self.append(&Record::Run {
            boot_id: self.boot_id.clone(),
            boot: self.boot,
            base: self.base,
            started: if resumed { self.last_cut } else { now },
            granularity: self.granularity,
            pid: std::process::id(),
        })?;
        if let (Some(since), false) = (recovery.last_durable, resumed) {
            let reason = match (&recovery.damage, recovery.clean, continuity) {
                (Some(damage), _, _) => format!("state journal damaged ({damage}): records after it are lost"),
                (None, _, Continuity::Fresh { why: Some(why) }) => format!("capture restarted ({why})"),
                (None, Some(true), _) => "agent was not running".to_string(),
                _ => "agent stopped without a clean shutdown".to_string(),
            };
            // After damage, even the last intact seal may be followed by
            // lost gaps: the gap starts at the latest stamp seen, or
            // earlier, at the last durable seal.
            self.add_gap(GapInfo { instance: None, from: since.min(recovery.latest), to: now, reason })?;
            // Writes submitted while no agent watched may still be in
            // flight and land later: no device of this boot is covered
            // again until it is seen with nothing pending.
            let current: Vec<InstanceId> = self.instances.keys().filter(|i| i.boot == self.boot).copied().collect();
            for instance in current {
                self.open_gap(instance, self.last_cut)?;
            }
        }
        self.journal.sync()?;
        self.compacted_bytes = self.journal.len_bytes();
        Ok(())
    }

    fn replay(&mut self, record: Record) -> Result<(), LogError> {
        match record {
            Record::Run { .. } | Record::Stop { .. } => {}
            Record::Instance { id, name, tracked_since } => {
                self.instances.entry(id).or_insert(InstanceLog { name, tracked_since, segments: Vec::new(), settled_at: None });
            }
            Record::Seal { cut, segments, checkpoint } => {
                self.checkpoint = checkpoint;
                for s in segments {
                    let chunks = record::decode_chunks(&s.chunks)?;
                    let log = self.instances.get_mut(&s.instance).ok_or(LogError::UnknownInstance(s.instance))?;
                    log.segments.push(Segment { start: s.start, end: s.end, settled_by: s.settled_by, chunks });
                }
                self.last_cut = cut;
            }
            Record::Settled { instance, at } => {
                self.settle_instance(instance, at);
            }
            Record::Gap { instance, from, to, reason } => self.gaps.push(GapInfo { instance, from, to, reason }),
            Record::GapClosed { instance, at } => self.close_gaps(instance, at),
            Record::CutBegun { volume, cut_id, lo, placement, taken } => {
                if placement.is_none() {
                    // An older agent: its next begin replaced a volume's cut.
                    self.cuts.retain(|_, c| c.volume != volume || c.placement.is_some());
                }
                self.cuts.insert(cut_id, OpenCut { id: cut_id, volume, lo, placement, taken });
            }
            Record::Committed { snapshot, closes, takes } => self.apply_commit(snapshot, closes, takes),
            Record::CutAbandoned { volume, cut_id, expired, .. } => {
                self.cuts.remove(&cut_id);
                if expired {
                    self.expired_cuts.insert(volume);
                }
            }
            Record::CutsCleared { volume, .. } => {
                self.cuts.retain(|_, c| c.volume != volume);
                self.expired_cuts.remove(&volume);
            }
            Record::Snapshot(info) => {
                if info.cut_id.is_none() {
                    // An older agent's commit: it closed the volume's cut.
                    self.cuts.retain(|_, c| c.volume != info.volume || c.lo != info.lo);
                }
                self.snapshots.insert(info.handle.clone(), info);
            }
            Record::SnapshotDeleted { handle } => {
                self.snapshots.remove(&handle);
            }
            Record::Damage { detected, reason, copy } => self.damage.push(DamageInfo { detected, reason, copy }),
        }
        Ok(())
    }

    fn append(&mut self, record: &Record) -> Result<(), LogError> {
        self.journal.append(&record.encode()?)?;
        Ok(())
    }

    /// Now on the timeline.
    pub fn now(&self) -> Stamp {
        self.stamp(monotonic_ns())
    }

    /// A `CLOCK_MONOTONIC` reading of this boot on the timeline.
    pub fn stamp(&self, monotonic: u64) -> Stamp {
        monotonic + self.base
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn instance_id(&self, key: DeviceKey) -> InstanceId {
        InstanceId { boot: self.boot, dev: key.dev, diskseq: key.diskseq }
    }

    /// A volume found on `key` now, at `offset_bytes`, `capacity_bytes` long.
    pub fn placement(&self, key: DeviceKey, offset_bytes: u64, capacity_bytes: u64) -> Placement {
        Placement { instance: self.instance_id(key), offset_bytes, capacity_bytes }
    }

    /// Returns whether a sealed segment changed.
    fn settle_instance(&mut self, instance: InstanceId, at: Stamp) -> bool {
        let Some(log) = self.instances.get_mut(&instance) else { return false };
        let mut changed = false;
        for seg in log.segments.iter_mut().filter(|s| s.settled_by.is_none() && s.end <= at) {
            seg.settled_by = Some(at);
            changed = true;
        }
        log.settled_at = Some(at);
        changed
    }

    /// Every change captured on `key` had completed at `at_monotonic`.
    /// Not synced: losing it costs precision only.
    pub fn settle(&mut self, key: DeviceKey, at_monotonic: u64) -> Result<(), LogError> {
        let instance = self.instance_id(key);
        if !self.instances.contains_key(&instance) {
            return Ok(());
        }
        let at = self.stamp(at_monotonic);
        // Only what changes a sealed segment is worth a record: the open
        // segment's settle state matters only within this run.
        if self.settle_instance(instance, at) {
            self.append(&Record::Settled { instance, at })?;
        }
        Ok(())
    }

    /// Records a gap from the tracker; durable before this returns, since a
    /// gap may reach back before the last seal.
    pub fn record_gap(&mut self, gap: &Gap) -> Result<(), LogError> {
        let instance = match gap.scope {
            GapScope::AllDevices => None,
            GapScope::Device(key) => Some(self.instance_id(key)),
        };
        let info = GapInfo { instance, from: self.stamp(gap.from_ns), to: self.stamp(gap.to_ns), reason: gap.reason.clone() };
        self.add_gap(info)?;
        self.journal.sync()?;
        Ok(())
    }

    /// A gap for `instance` from `from` until it is proven covered again.
    fn open_gap(&mut self, instance: InstanceId, from: Stamp) -> Result<(), LogError> {
        let reason = "writes from before capture began may still have been in flight".to_string();
        self.add_gap(GapInfo { instance: Some(instance), from, to: Stamp::MAX, reason })
    }

    fn close_gaps(&mut self, instance: InstanceId, at: Stamp) {
        for gap in self.gaps.iter_mut().filter(|g| g.instance == Some(instance) && g.to == Stamp::MAX) {
            gap.to = at.max(gap.from);
        }
    }

    fn add_gap(&mut self, info: GapInfo) -> Result<(), LogError> {
        self.append(&Record::Gap { instance: info.instance, from: info.from, to: info.to, reason: info.reason.clone() })?;
        self.gaps.push(info);
        Ok(())
    }

    /// Turns a tracker seal into segments and makes it durable.
    pub fn apply_seal(&mut self, seal: Seal) -> Result<(), LogError> {
        // Here too, not only at begin and commit: an abandoned cut must
        // expire even when no client calls again.
        self.expire_cuts()?;
        let cut = self.stamp(seal.cut_ns);
        let end = self.stamp(seal.end_ns);
        let start = self.last_cut;
        let mut segments = Vec::new();
        for taken in seal.changes {
            let instance = self.instance_id(taken.key);
            if !self.instances.contains_key(&instance) {
                let name = taken.name.clone().unwrap_or_default();
                let tracked_since = self.stamp(taken.first_seen_ns);
                self.append(&Record::Instance { id: instance, name: name.clone(), tracked_since })?;
                self.instances.insert(instance, InstanceLog { name, tracked_since, segments: Vec::new(), settled_at: None });
                if taken.proven_ns.is_none_or(|p| p > taken.first_seen_ns) {
                    self.open_gap(instance, tracked_since)?;
                }
            }
            if let Some(proven) = taken.proven_ns {
                let at = self.stamp(proven);
                if self.gaps.iter().any(|g| g.instance == Some(instance) && g.to == Stamp::MAX) {
                    self.append(&Record::GapClosed { instance, at })?;
                    self.close_gaps(instance, at);
                }
            }
            if taken.chunks.is_empty() {
                continue;
            }
            let log = self.instances.get_mut(&instance).expect("inserted above");
            let last_change = taken.last_change_ns + self.base;
            // Its life ends with it if it carries every write still in
            // flight into the next one; else when every change in it was
            // seen completed.
            let settled_by = if taken.carries_in_flight {
                Some(end)
            } else {
                log.settled_at.filter(|&at| at >= last_change)
            };
            let seg = Segment { start, end, settled_by, chunks: taken.chunks };
            segments.push(SegmentRecord {
                instance,
                start,
                end,
                settled_by,
                chunks: record::encode_chunks(&seg.chunks),
            });
            log.segments.push(seg);
        }
        let segments_empty = segments.is_empty();
        let checkpoint = seal.checkpoint.map(Box::new);
        self.append(&Record::Seal { cut, segments, checkpoint: checkpoint.clone() })?;
        self.checkpoint = checkpoint;
        self.journal.sync()?;
        self.last_cut = cut;
        if !segments_empty {
            self.seals_since_compaction += 1;
        }
        if self.journal.len_bytes() > self.compacted_bytes + COMPACT_SLACK_BYTES
            || self.seals_since_compaction >= COMPACT_AFTER_SEALS
        {
            self.compact()?;
        }
        Ok(())
    }

    /// Opens a snapshot's cut window for `volume`, which is at `placement`
    /// now: call before the backend cuts. Returns the cut's id; other cuts
    /// of the volume stay open as they were.
    pub fn begin_cut(&mut self, volume: &str, placement: Placement) -> Result<u64, LogError> {
        self.expire_cuts()?;
        let open = self.cuts.values().filter(|c| c.volume == volume && !c.taken).count();
        if open >= MAX_OPEN_CUTS {
            return Err(LogError::TooManyCuts { volume: volume.to_string(), open });
        }
        let id = loop {
            // 53 bits: exact in every JSON reader.
            let id = getrandom::u64().map_err(LogError::CutId)? & ((1 << 53) - 1);
            if id != 0 && !self.cuts.contains_key(&id) {
                break id;
            }
        };
        let lo = self.now();
        let placement = Some(placement);
        self.append(&Record::CutBegun { volume: volume.to_string(), cut_id: id, lo, placement, taken: false })?;
        self.journal.sync()?;
        self.cuts.insert(id, OpenCut { id, volume: volume.to_string(), lo, placement, taken: false });
        Ok(id)
    }

    /// The open cuts, earliest first.
    pub fn open_cuts(&self) -> Vec<&OpenCut> {
        let mut cuts: Vec<&OpenCut> = self.cuts.values().collect();
        cuts.sort_by_key(|c| (c.lo, c.id));
        cuts
    }

    /// Registers the snapshot `handle` of `volume`, found at `placement` now;
    /// `hi` is when the snapshot was known to exist. A seal at or after `hi`
    /// must have been applied first. A refusal changes nothing (a retried
    /// commit must find its cut again).
    ///
    /// With `cut`, the window is that cut's and the cut closes. Without, the
    /// window starts at the volume's EARLIEST untaken cut and the LATEST
    /// untaken cut is *taken*: it stops counting here, though a client
    /// naming it may still commit it (and then, its place already gone, it
    /// takes the latest untaken cut in turn). Whatever order clients begin
    /// and commit in (retried begins, overlapping snapshots, some naming
    /// their cut), each that names none gets a window opened no later than
    /// its own begin: for every moment t, the untaken cuts begun by t are
    /// never fewer than the clients begun by t still to commit
    /// (docs/changelog.md has the argument). Only an expiry removes an
    /// untaken cut while its client may still come, so a volume with such
    /// an expiry refuses commits that name no cut.
    pub fn commit_snapshot(
        &mut self,
        volume: &str,
        cut: Option<u64>,
        handle: &str,
        placement: Placement,
        hi: Stamp,
    ) -> Result<SnapshotInfo, LogError> {
        if self.snapshots.contains_key(handle) {
            return Err(LogError::SnapshotExists(handle.to_string()));
        }
        self.expire_cuts()?;
        let untaken: Vec<&OpenCut> = self.open_cuts().into_iter().filter(|c| c.volume == volume && !c.taken).collect();
        // The cuts whose placement must be the volume's now, the window's
        // start, and what the commit closes and takes.
        let (checked, lo, closes, takes) = match cut {
            Some(id) => {
                let Some(c) = self.cuts.get(&id) else {
                    let detail = match self.snapshots.values().find(|s| s.cut_id == Some(id)) {
                        Some(s) => format!("it was committed as snapshot {:?}", truncate(&s.handle, 64)),
                        None => "it was aborted or expired, or never begun here".to_string(),
                    };
                    return Err(LogError::CutNotOpen { cut: id, detail });
                };
                if c.volume != volume {
                    return Err(LogError::CutOfAnotherVolume {
                        cut: id,
                        begun: c.volume.clone(),
                        volume: volume.to_string(),
                    });
                }
                let takes = if c.taken { untaken.last().map(|l| l.id) } else { None };
                (vec![c], c.lo, Some(id), takes)
            }
            None => {
                let (Some(&earliest), Some(&latest)) = (untaken.first(), untaken.last()) else {
                    return Err(LogError::NoCutBegun(volume.to_string()));
                };
                if self.expired_cuts.contains(volume) {
                    return Err(LogError::CutsExpired(volume.to_string()));
                }
                (vec![earliest, latest], earliest.lo, None, Some(latest.id))
            }
        };
        // The same instance at both ends: a diskseq never comes back, so it
        // held the volume throughout.
        for c in checked {
            match c.placement {
                None => return Err(LogError::PlacementUnknown(c.id)),
                Some(begun) if begun != placement => {
                    return Err(LogError::PlacementChanged {
                        cut: c.id,
                        volume: volume.to_string(),
                        begun,
                        now: placement,
                    })
                }
                Some(_) => {}
            }
        }
        if self.last_cut < hi {
            return Err(LogError::NotSealed { cut: self.last_cut, hi });
        }
        if !self.instances.contains_key(&placement.instance) {
            return Err(LogError::UnknownInstance(placement.instance));
        }
        let info = SnapshotInfo {
            handle: handle.to_string(),
            volume: volume.to_string(),
            instance: placement.instance,
            lo,
            hi,
            offset_bytes: placement.offset_bytes,
            capacity_bytes: placement.capacity_bytes,
            committed_unix_ns: unix_ns(),
            cut_id: closes.or(takes),
        };
        self.append(&Record::Committed { snapshot: info.clone(), closes, takes })?;
        self.journal.sync()?;
        self.apply_commit(info.clone(), closes, takes);
        Ok(info)
    }

    fn apply_commit(&mut self, info: SnapshotInfo, closes: Option<u64>, takes: Option<u64>) {
        if let Some(id) = closes {
            self.cuts.remove(&id);
        }
        if let Some(cut) = takes.and_then(|id| self.cuts.get_mut(&id)) {
            cut.taken = true;
        }
        // Replayed alike, so no record of its own.
        let taken = self.open_cuts().into_iter().filter(|c| c.volume == info.volume && c.taken).map(|c| c.id);
        let taken: Vec<u64> = taken.collect();
        for id in &taken[..taken.len().saturating_sub(MAX_TAKEN_CUTS)] {
            self.cuts.remove(id);
        }
        self.snapshots.insert(info.handle.clone(), info);
    }

    /// Closes open cuts of `volume` without a snapshot: `cut`, or all of
    /// them (which also lets commits that name no cut through again after
    /// an expiry: the caller says no client still holds one). Returns the
    /// ids closed.
    pub fn abort_cuts(&mut self, volume: &str, cut: Option<u64>) -> Result<Vec<u64>, LogError> {
        let at = self.now();
        match cut {
            Some(id) => {
                let c = self.cuts.get(&id).ok_or_else(|| LogError::CutNotOpen {
                    cut: id,
                    detail: "it was committed, aborted or expired, or never begun here".into(),
                })?;
                if c.volume != volume {
                    return Err(LogError::CutOfAnotherVolume {
                        cut: id,
                        begun: c.volume.clone(),
                        volume: volume.to_string(),
                    });
                }
                let reason = "aborted".to_string();
                self.append(&Record::CutAbandoned {
                    volume: volume.to_string(),
                    cut_id: id,
                    at,
                    reason,
                    expired: false,
                })?;
                self.journal.sync()?;
                self.cuts.remove(&id);
                Ok(vec![id])
            }
            None => {
                self.append(&Record::CutsCleared { volume: volume.to_string(), at })?;
                self.journal.sync()?;
                let ids: Vec<u64> = self.open_cuts().iter().filter(|c| c.volume == volume).map(|c| c.id).collect();
                self.cuts.retain(|_, c| c.volume != volume);
                self.expired_cuts.remove(volume);
                Ok(ids)
            }
        }
    }

    /// Abandons the cuts open longer than the TTL.
    fn expire_cuts(&mut self) -> Result<(), LogError> {
        let now = self.now();
        let stale: Vec<u64> =
            self.cuts.values().filter(|c| now.saturating_sub(c.lo) > self.cut_ttl).map(|c| c.id).collect();
        for &id in &stale {
            let volume = self.cuts[&id].volume.clone();
            let reason = format!("not committed within {} s", self.cut_ttl / 1_000_000_000);
            tracing::warn!(cut = id, volume, "snapshot cut {reason}: abandoned");
            // A taken cut's client, if it ever commits, must name it: no
            // commit naming none can be its.
            let expired = !self.cuts[&id].taken;
            self.append(&Record::CutAbandoned { volume: volume.clone(), cut_id: id, at: now, reason, expired })?;
            self.cuts.remove(&id);
            if expired {
                self.expired_cuts.insert(volume);
            }
        }
        if !stale.is_empty() {
            self.journal.sync()?;
        }
        Ok(())
    }

    pub fn delete_snapshot(&mut self, handle: &str) -> Result<(), LogError> {
        if self.snapshots.remove(handle).is_none() {
            return Err(LogError::UnknownSnapshot(handle.to_string()));
        }
        self.append(&Record::SnapshotDeleted { handle: handle.to_string() })?;
        self.journal.sync()?;
        Ok(())
    }

    pub fn snapshots(&self) -> impl Iterator<Item = &SnapshotInfo> {
        self.snapshots.values()
    }

    pub fn gaps(&self) -> &[GapInfo] {
        &self.gaps
    }

    /// The final seal was applied: the next start knows this run ended
    /// cleanly (its downtime is still a gap).
    pub fn stop(&mut self) -> Result<(), LogError> {
        let at = self.now();
        self.append(&Record::Stop { at })?;
        self.journal.sync()?;
        Ok(())
    }

    /// Damage ever found in the journal.
    pub fn damage(&self) -> &[DamageInfo] {
        &self.damage
    }

    /// A handle the log does not know is unknown (NOT_FOUND) only if no
    /// record can have been lost; after damage it may be one of those.
    fn snapshot(&self, handle: &str) -> Result<&SnapshotInfo, QueryError> {
        self.snapshots.get(handle).ok_or_else(|| match self.damage.first() {
            None => QueryError::NotFound(handle.to_string()),
            Some(d) => QueryError::FailedPrecondition(format!(
                "snapshot {handle:?} is not known, and records of this tracker's state were lost to damage ({})",
                d.reason
            )),
        })
    }

    /// Every chunk that may differ between `base` and `target`, in the
    /// target volume's own chunk numbering (contract §1, §5, §6).
    pub fn delta(&self, base: &str, target: &str) -> Result<ChunkMap, QueryError> {
        let (b, t) = (self.snapshot(base)?, self.snapshot(target)?);
        if base == target {
            let empty = Arc::new(RoaringTreemap::new());
            return Ok(ChunkMap { capacity_bytes: t.capacity_bytes, granularity: self.granularity, chunks: empty });
        }
        if b.volume != t.volume {
            return Err(QueryError::InvalidArgument(format!(
                "base {base:?} is of volume {:?}, target {target:?} of volume {:?}",
                b.volume, t.volume
            )));
        }
        if b.lo > t.hi {
            return Err(QueryError::InvalidArgument(format!("base {base:?} was taken after target {target:?}")));
        }
        if b.instance != t.instance || b.offset_bytes != t.offset_bytes {
            return Err(QueryError::FailedPrecondition(format!(
                "volume {:?} was a different device ({} vs {}) at the two snapshots",
                t.volume, b.instance, t.instance
            )));
        }
        let log = self
            .instances
            .get(&t.instance)
            .ok_or_else(|| QueryError::FailedPrecondition(format!("no record of device {}", t.instance)))?;
        // Overlapping windows may have been cut in either order: the
        // changes between the cuts lie within the union of the windows.
        let (lo, hi) = (b.lo.min(t.lo), b.hi.max(t.hi));
        if log.tracked_since > lo {
            return Err(QueryError::FailedPrecondition(format!(
                "tracking of device {} began after base snapshot {base:?} was cut",
                t.instance
            )));
        }
        if let Some(gap) = self.gaps.iter().find(|g| g.hits(t.instance, lo, hi)) {
            return Err(QueryError::FailedPrecondition(format!("tracking gap between the snapshots: {}", gap.reason)));
        }
        let disk_chunks = segment::union(log.segments.iter().filter(|s| s.overlaps(lo, hi)).map(|s| &s.chunks));
        let mut chunks = to_volume_chunks(disk_chunks, t.offset_bytes, t.capacity_bytes, self.granularity);
        // A grown volume: everything past the base's end is new.
        if t.capacity_bytes > b.capacity_bytes {
            chunks.insert_range(b.capacity_bytes / self.granularity..t.capacity_bytes.div_ceil(self.granularity));
        }
        Ok(ChunkMap { capacity_bytes: t.capacity_bytes, granularity: self.granularity, chunks: Arc::new(chunks) })
    }

    /// Every chunk of `handle` that may be non-zero. Without a baseline of
    /// what the device held when tracking began, that is all of it.
    pub fn allocated(&self, handle: &str) -> Result<ChunkMap, QueryError> {
        let s = self.snapshot(handle)?;
        let mut chunks = RoaringTreemap::new();
        chunks.insert_range(0..s.capacity_bytes.div_ceil(self.granularity));
        Ok(ChunkMap { capacity_bytes: s.capacity_bytes, granularity: self.granularity, chunks: Arc::new(chunks) })
    }

    /// Merges segments no live snapshot window can tell apart and rewrites
    /// the journal with only the current state (atomic replace).
    pub fn compact(&mut self) -> Result<(), LogError> {
        let mut cuts_by_instance: HashMap<InstanceId, Vec<(Stamp, Stamp)>> = HashMap::new();
        for s in self.snapshots.values() {
            cuts_by_instance.entry(s.instance).or_default().push((s.lo, s.hi));
        }
        for cut in self.cuts.values() {
            // A snapshot being cut: its window starts at lo and its hi will
            // be later than anything recorded now.
            let window = (cut.lo, Stamp::MAX);
            match cut.placement {
                Some(p) => cuts_by_instance.entry(p.instance).or_default().push(window),
                None => {
                    for id in self.instances.keys() {
                        cuts_by_instance.entry(*id).or_default().push(window);
                    }
                }
            }
        }
        for (id, log) in self.instances.iter_mut() {
            let cuts = cuts_by_instance.remove(id).unwrap_or_default();
            log.segments = segment::compact(std::mem::take(&mut log.segments), &cuts);
        }
        let records = self.state_records()?;
        self.journal.rewrite(records.iter().map(Vec::as_slice))?;
        self.compacted_bytes = self.journal.len_bytes();
        self.seals_since_compaction = 0;
        self.compactions += 1;
        Ok(())
    }

    /// The current state as records, in replay order.
    fn state_records(&self) -> Result<Vec<Vec<u8>>, LogError> {
        self.state_records_in(STATE_RECORD_CHUNK_BYTES)
    }

    /// [`Self::state_records`] with seal records of about `record_bytes`
    /// of chunk sets.
    fn state_records_in(&self, record_bytes: usize) -> Result<Vec<Vec<u8>>, LogError> {
        let mut out = Vec::new();
        let mut push = |r: Record| -> Result<(), LogError> {
            out.push(r.encode()?);
            Ok(())
        };
        push(Record::Run {
            boot_id: self.boot_id.clone(),
            boot: self.boot,
            base: self.base,
            started: self.last_cut,
            granularity: self.granularity,
            pid: std::process::id(),
        })?;
        for (id, log) in &self.instances {
            push(Record::Instance { id: *id, name: log.name.clone(), tracked_since: log.tracked_since })?;
        }
        // Seal records of bounded size, all at the same cut; the last one
        // carries the checkpoint (replay keeps the last).
        let mut segments = Vec::new();
        let mut batch_bytes = 0;
        for (id, log) in &self.instances {
            for s in &log.segments {
                for chunks in encode_bounded(&s.chunks, record_bytes) {
                    if batch_bytes + chunks.len() > record_bytes && !segments.is_empty() {
                        push(Record::Seal {
                            cut: self.last_cut,
                            segments: std::mem::take(&mut segments),
                            checkpoint: None,
                        })?;
                        batch_bytes = 0;
                    }
                    batch_bytes += chunks.len();
                    segments.push(SegmentRecord {
                        instance: *id,
                        start: s.start,
                        end: s.end,
                        settled_by: s.settled_by,
                        chunks,
                    });
                }
            }
        }
        push(Record::Seal { cut: self.last_cut, segments, checkpoint: self.checkpoint.clone() })?;
        for log in self.instances.iter().filter_map(|(id, l)| l.settled_at.map(|at| (id, at))) {
            push(Record::Settled { instance: *log.0, at: log.1 })?;
        }
        for g in &self.gaps {
            push(Record::Gap { instance: g.instance, from: g.from, to: g.to, reason: g.reason.clone() })?;
        }
        // Snapshots before cuts: an older agent's snapshot closes a cut on
        // replay, which must not be one of these.
        for s in self.snapshots.values() {
            push(Record::Snapshot(s.clone()))?;
        }
        for c in self.cuts.values() {
            let (volume, cut_id, lo, placement, taken) = (c.volume.clone(), c.id, c.lo, c.placement, c.taken);
            push(Record::CutBegun { volume, cut_id, lo, placement, taken })?;
        }
        for volume in &self.expired_cuts {
            let (at, reason) = (self.last_cut, "expired".to_string());
            push(Record::CutAbandoned { volume: volume.clone(), cut_id: 0, at, reason, expired: true })?;
        }
        for d in &self.damage {
            push(Record::Damage { detected: d.detected, reason: d.reason.clone(), copy: d.copy.clone() })?;
        }
        Ok(out)
    }

    pub fn stats(&self) -> LogStats {
        let segments = self.instances.values().flat_map(|l| &l.segments);
        LogStats {
            instances: self.instances.len(),
            segments: segments.clone().count(),
            segment_chunks: segments.clone().map(|s| s.chunks.len()).sum(),
            segment_bytes: segments.map(|s| s.chunks.serialized_size() as u64).sum(),
            journal_bytes: self.journal.len_bytes(),
            snapshots: self.snapshots.len(),
            gaps: self.gaps.len(),
            compactions: self.compactions,
        }
    }
}

#[cfg(test)]
mod tests;

/// The change log shared by the recorder, the admin API and the queries.
pub type SharedLog = Arc<Mutex<ChangeLog>>;

pub fn lock(log: &SharedLog) -> MutexGuard<'_, ChangeLog> {
    // Every operation changes memory only after its journal write succeeded,
    // so a panic elsewhere leaves a consistent log behind the poison.
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// The query service's view of the log; not ready until the log is loaded
/// (the CSI socket must answer Probe long before a big journal is replayed).
#[derive(Default)]
pub struct LogQueries {
    log: OnceLock<SharedLog>,
}

impl LogQueries {
    /// The log is loaded: queries are answered from now on.
    pub fn loaded(&self, log: SharedLog) {
        let _ = self.log.set(log);
    }

    fn with<T>(&self, f: impl FnOnce(&ChangeLog) -> Result<T, QueryError>) -> Result<T, QueryError> {
        let log = self.log.get().ok_or_else(|| QueryError::Unavailable("the change log is still loading".into()))?;
        f(&lock(log))
    }
}

impl MetadataSource for LogQueries {
    fn allocated(&self, snapshot_id: &str) -> Result<ChunkMap, QueryError> {
        self.with(|log| log.allocated(snapshot_id))
    }

    fn delta(&self, base_snapshot_id: &str, target_snapshot_id: &str) -> Result<ChunkMap, QueryError> {
        self.with(|log| log.delta(base_snapshot_id, target_snapshot_id))
    }

    fn ready(&self) -> bool {
        self.log.get().is_some()
    }
}

/// The latest stamp a record proves the log reached.
fn record_stamp(record: &Record) -> Stamp {
    match record {
        Record::Run { started, .. } => *started,
        Record::Instance { tracked_since, .. } => *tracked_since,
        Record::Seal { cut, segments, .. } => segments.iter().map(|s| s.end).fold(*cut, Stamp::max),
        Record::Settled { at, .. } | Record::Stop { at } => *at,
        Record::Gap { from, .. } => *from,
        Record::GapClosed { at, .. } => *at,
        Record::CutBegun { lo, .. } => *lo,
        Record::CutAbandoned { at, .. } | Record::CutsCleared { at, .. } => *at,
        Record::Snapshot(s) | Record::Committed { snapshot: s, .. } => s.hi,
        Record::SnapshotDeleted { .. } => 0,
        Record::Damage { detected, .. } => *detected,
    }
}

/// Whether the journal `recovered` is the one the previous run left, as its
/// run marker says; if not, the damage (offset for the kept copy, reason).
fn judge_end(marker: &statedir::Marker, recovered: &crate::journal::Recovered) -> Option<(u64, String)> {
    let found = recovered.end;
    if recovered.created {
        // The marker is written only after the journal exists.
        return Some((0, "the journal is missing, though a previous run left its run marker".to_string()));
    }
    if !marker.clean {
        // A crash: an append may have been cut short; nothing pins the end.
        return None;
    }
    if let Tail::Torn { bytes } = recovered.tail {
        return Some((
            found.bytes,
            format!(
                "{bytes} bytes of a torn append follow byte {}, but the previous run stopped cleanly after its \
                 last append",
                found.bytes
            ),
        ));
    }
    // A marker of an older version says only "stopped".
    let pinned: JournalEnd = String::from_utf8_lossy(&marker.info).parse().ok()?;
    (pinned != found).then(|| {
        (
            found.bytes.min(pinned.bytes),
            format!(
                "the previous run stopped cleanly leaving {pinned}, but the {found} was found: records are missing \
                 or the file was replaced"
            ),
        )
    })
}

/// `chunks` serialized, in pieces of at most about `max_bytes` (split by
/// chunk ranges; one piece unless the set is that big).
fn encode_bounded(chunks: &RoaringTreemap, max_bytes: usize) -> Vec<Vec<u8>> {
    match (chunks.min(), chunks.max()) {
        (Some(min), Some(max)) if min < max && chunks.serialized_size() > max_bytes => {
            let mid = min + (max - min) / 2;
            let mut low = chunks.clone();
            low.remove_range(mid + 1..);
            let mut high = chunks.clone();
            high.remove_range(..=mid);
            let mut out = encode_bounded(&low, max_bytes);
            out.extend(encode_bounded(&high, max_bytes));
            out
        }
        _ => vec![record::encode_chunks(chunks)],
    }
}

/// At most `max` characters of `s`, for messages that echo client input.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Disk chunks → chunks of a volume that starts `offset` bytes into the disk
/// (a partition) and is `capacity` bytes long. A disk chunk straddling a
/// volume chunk boundary marks both.
fn to_volume_chunks(disk: RoaringTreemap, offset: u64, capacity: u64, granularity: u64) -> RoaringTreemap {
    if offset == 0 {
        let mut out = disk;
        out.remove_range(capacity.div_ceil(granularity)..);
        return out;
    }
    let first = offset / granularity;
    let last = (offset + capacity).div_ceil(granularity);
    let mut out = RoaringTreemap::new();
    for chunk in disk.iter().skip_while(|&c| c < first).take_while(|&c| c < last) {
        let start = (chunk * granularity).saturating_sub(offset);
        let end = ((chunk + 1) * granularity - offset).min(capacity);
        if end > start {
            out.insert_range(start / granularity..end.div_ceil(granularity));
        }
    }
    out
}
