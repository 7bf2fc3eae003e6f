//! The log's rules, checked against answers computed by hand from what each
//! test wrote, and its persistence against restarts and damage.

use super::*;
use crate::changes::TakenChanges;

const G: u64 = 4096;
const VOLUME: &str = "vol";
const CAPACITY: u64 = 1 << 30;

fn key() -> DeviceKey {
    DeviceKey { dev: 7 << 20 | 1, diskseq: 11 }
}

struct Fixture {
    dir: tempfile::TempDir,
    log: ChangeLog,
    started: u64,
    /// What the tracker says about the device being free of writes from
    /// before capture (see `DeviceChanges::proven_ns`).
    proven: Option<u64>,
    /// What each seal hands the log for a later agent to take over from.
    checkpoint: Option<Checkpoint>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let started = monotonic_ns();
        let (log, report) = ChangeLog::open(dir.path(), G, started).unwrap();
        assert!(report.previous_run_clean.is_none());
        let mut f = Self { dir, log, started, proven: Some(started), checkpoint: None };
        f.seal(&[]); // registers the device with no changes
        f
    }

    fn reopen(&mut self) -> OpenReport {
        let placeholder = tempfile::tempdir().unwrap();
        let (empty, _) = ChangeLog::open(placeholder.path(), G, monotonic_ns()).unwrap();
        drop(std::mem::replace(&mut self.log, empty));
        self.started = monotonic_ns();
        let (log, report) = ChangeLog::open(self.dir.path(), G, self.started).unwrap();
        self.log = log;
        // A fresh tracker proves each device again; most tests say at once.
        self.proven = Some(monotonic_ns());
        report
    }

    /// Seals `chunks` as written since the previous seal.
    fn seal(&mut self, chunks: &[u64]) {
        let cut_ns = monotonic_ns();
        let changes = vec![TakenChanges {
            key: key(),
            name: Some("loop1".into()),
            first_seen_ns: self.started,
            last_change_ns: cut_ns,
            chunks: chunks.iter().copied().collect(),
            proven_ns: self.proven,
            carries_in_flight: false,
        }];
        let checkpoint = self.checkpoint.clone().map(|c| Checkpoint { cut_ns, ..c });
        self.log.apply_seal(Seal { cut_ns, end_ns: monotonic_ns(), changes, checkpoint }).unwrap();
    }

    /// Reopens as an agent that took the capture over from the last
    /// checkpoint does.
    fn resume(&mut self) -> OpenReport {
        let placeholder = tempfile::tempdir().unwrap();
        let (empty, _) = ChangeLog::open(placeholder.path(), G, monotonic_ns()).unwrap();
        drop(std::mem::replace(&mut self.log, empty));
        let (mut log, report) = ChangeLog::load(self.dir.path(), G).unwrap();
        let from_ns = log.checkpoint().expect("a checkpoint to resume from").cut_ns;
        log.begin_run(monotonic_ns(), &Continuity::Resumed { from_ns }).unwrap();
        self.log = log;
        report
    }

    fn settle(&mut self) {
        self.log.settle(key(), monotonic_ns()).unwrap();
    }

    /// begin, (writes sealed by the snapshot's own seal), commit.
    fn snapshot(&mut self, handle: &str, in_window: &[u64]) {
        self.log.begin_cut(VOLUME).unwrap();
        self.seal(in_window);
        let hi = self.log.now();
        self.seal(&[]);
        self.log.commit_snapshot(VOLUME, handle, key(), 0, CAPACITY, hi).unwrap();
    }

    fn delta(&self, base: &str, target: &str) -> Result<Vec<u64>, QueryError> {
        self.log.delta(base, target).map(|m| m.chunks.iter().collect())
    }
}

#[test]
fn delta_is_the_writes_between_the_windows() {
    let mut f = Fixture::new();
    f.seal(&[1]);
    f.settle();
    f.snapshot("a", &[2]);
    f.seal(&[3]);
    f.settle();
    f.snapshot("b", &[4]);
    f.settle();
    f.seal(&[5]);
    f.settle();
    // Chunk 2 was written inside a's window: it may or may not be in a, so
    // it is in the delta. Chunk 1 was settled before a's window opened.
    assert_eq!(f.delta("a", "b").unwrap(), vec![2, 3, 4]);
    assert_eq!(f.delta("a", "a").unwrap(), Vec::<u64>::new());
    let allocated = f.log.allocated("a").unwrap();
    assert_eq!(allocated.chunks.len(), CAPACITY / G, "no baseline: the whole volume may be allocated");
}

#[test]
fn unsettled_writes_reach_into_later_windows() {
    let mut f = Fixture::new();
    // Written before a's window and never seen completed: it may still have
    // been in flight when a was cut and when b was.
    f.seal(&[9]);
    f.snapshot("a", &[]);
    f.snapshot("b", &[]);
    assert_eq!(f.delta("a", "b").unwrap(), vec![9]);
    // Once settled, it stays out of windows that begin afterwards.
    f.settle();
    f.snapshot("c", &[]);
    f.snapshot("d", &[]);
    assert_eq!(f.delta("c", "d").unwrap(), Vec::<u64>::new());
}

#[test]
fn refusals_carry_the_right_error() {
    let mut f = Fixture::new();
    f.snapshot("a", &[]);
    f.snapshot("b", &[]);
    assert!(matches!(f.delta("a", "nope"), Err(QueryError::NotFound(_))));
    assert!(matches!(f.delta("b", "a"), Err(QueryError::InvalidArgument(_))), "wrong order");
    f.log.begin_cut("other").unwrap();
    f.seal(&[]);
    let hi = f.log.now();
    f.seal(&[]);
    f.log.commit_snapshot("other", "o", key(), 0, CAPACITY, hi).unwrap();
    assert!(matches!(f.delta("a", "o"), Err(QueryError::InvalidArgument(_))), "another volume");
    assert!(matches!(f.log.commit_snapshot(VOLUME, "a", key(), 0, CAPACITY, hi), Err(LogError::SnapshotExists(_))));
    assert!(matches!(f.log.commit_snapshot(VOLUME, "z", key(), 0, CAPACITY, hi), Err(LogError::NoCutBegun(_))));
}

#[test]
fn a_gap_in_the_window_refuses_and_outside_it_does_not() {
    let mut f = Fixture::new();
    f.snapshot("a", &[]);
    let before = monotonic_ns();
    f.log
        .record_gap(&Gap { scope: GapScope::Device(key()), from_ns: before, to_ns: before + 1, reason: "test".into() })
        .unwrap();
    f.snapshot("b", &[1]);
    f.snapshot("c", &[2]);
    assert!(matches!(f.delta("a", "b"), Err(QueryError::FailedPrecondition(_))));
    assert!(matches!(f.delta("a", "c"), Err(QueryError::FailedPrecondition(_))));
    assert_eq!(f.delta("b", "c").unwrap(), vec![1, 2]);
    // Another device's gap does not matter; an all-device gap does.
    let other = DeviceKey { dev: 8 << 20, diskseq: 1 };
    let now = monotonic_ns();
    f.log.record_gap(&Gap { scope: GapScope::Device(other), from_ns: now, to_ns: now, reason: "x".into() }).unwrap();
    f.snapshot("d", &[]);
    assert!(f.delta("c", "d").is_ok());
    let now = monotonic_ns();
    f.log.record_gap(&Gap { scope: GapScope::AllDevices, from_ns: now, to_ns: now, reason: "y".into() }).unwrap();
    f.snapshot("e", &[]);
    assert!(matches!(f.delta("d", "e"), Err(QueryError::FailedPrecondition(_))));
}

#[test]
fn restart_keeps_answers_and_turns_downtime_into_a_gap() {
    let mut f = Fixture::new();
    f.snapshot("a", &[1]);
    f.seal(&[2]);
    f.snapshot("b", &[3]);
    let before = f.delta("a", "b").unwrap();
    let report = f.reopen();
    assert_eq!(report.previous_run_clean, Some(false));
    assert!(report.damage.is_none());
    assert_eq!(f.delta("a", "b").unwrap(), before, "pairs before the restart answer as before");
    f.snapshot("c", &[4]);
    let spanning = f.delta("b", "c");
    assert!(matches!(spanning, Err(QueryError::FailedPrecondition(ref m)) if m.contains("clean shutdown")), "{spanning:?}");
    f.log.stop().unwrap();
    f.snapshot("d", &[5]);
    let report = f.reopen();
    assert_eq!(report.previous_run_clean, Some(false), "a seal after the stop record means the run went on");
    f.log.stop().unwrap();
    assert_eq!(f.reopen().previous_run_clean, Some(true));
    // Writes from before the restart stay in every window until the device
    // is seen with all of them completed.
    f.settle();
    f.snapshot("e", &[]);
    f.snapshot("f", &[6]);
    assert_eq!(f.delta("e", "f").unwrap(), vec![6]);
    assert!(matches!(f.delta("d", "e"), Err(QueryError::FailedPrecondition(_))));
    let last_gap = f.log.gaps().iter().rev().find(|g| g.instance.is_none()).unwrap();
    assert!(last_gap.reason.contains("not running"), "a clean stop's downtime: {last_gap:?}");
}

#[test]
fn damage_is_reported_and_becomes_a_gap() {
    let mut f = Fixture::new();
    f.snapshot("a", &[1]);
    f.snapshot("b", &[2]);
    for i in 0..50 {
        f.seal(&[100 + i]);
    }
    f.snapshot("c", &[3]);
    let path = f.dir.path().join(JOURNAL);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() * 3 / 4;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let report = f.reopen();
    assert!(report.damage.is_some(), "{report:?}");
    // Whatever survived answers only with proof: a, b came before the damage.
    assert_eq!(f.delta("a", "b").unwrap(), vec![1, 2]);
    f.snapshot("d", &[4]);
    match f.delta("b", "d") {
        Err(QueryError::FailedPrecondition(m)) => assert!(m.contains("damaged"), "{m}"),
        other => panic!("a window over lost records must refuse, got {other:?}"),
    }
    // The damaged file was rewritten whole: the next open is clean of damage.
    assert!(f.reopen().damage.is_none());
}

#[test]
fn compaction_keeps_every_answer_and_shrinks_the_log() {
    let mut f = Fixture::new();
    for i in 0..20 {
        f.seal(&[i, 1000 + i]);
        if i % 3 == 0 {
            f.settle();
        }
    }
    f.snapshot("a", &[50]);
    for i in 0..20 {
        f.seal(&[200 + i]);
        f.settle();
    }
    f.snapshot("b", &[51]);
    f.seal(&[52]);
    f.snapshot("c", &[53]);
    let before = (f.delta("a", "b").unwrap(), f.delta("a", "c").unwrap(), f.delta("b", "c").unwrap());
    let segments_before = f.log.stats().segments;
    f.log.compact().unwrap();
    let after = (f.delta("a", "b").unwrap(), f.delta("a", "c").unwrap(), f.delta("b", "c").unwrap());
    assert_eq!(before, after);
    assert!(f.log.stats().segments < segments_before / 3, "{} -> {}", segments_before, f.log.stats().segments);
    f.reopen();
    let reopened = (f.delta("a", "b").unwrap(), f.delta("a", "c").unwrap(), f.delta("b", "c").unwrap());
    assert_eq!(before, reopened);
}

#[test]
fn a_partition_sees_its_own_chunks() {
    // Disk chunks 10..=12 (bytes 40960..53248) seen from a partition that
    // starts at byte 40960 + 512: volume bytes 0..12288-512.
    let disk: RoaringTreemap = [9, 10, 11, 12, 40].into_iter().collect();
    let v = to_volume_chunks(disk.clone(), 10 * G + 512, 20 * G, G);
    assert_eq!(v.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    // Aligned partitions shift exactly.
    let v = to_volume_chunks(disk.clone(), 10 * G, 20 * G, G);
    assert_eq!(v.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    // Whole disk: clamp to capacity.
    let v = to_volume_chunks(disk, 0, 12 * G, G);
    assert_eq!(v.iter().collect::<Vec<_>>(), vec![9, 10, 11]);
}

#[test]
fn many_seals_trigger_compaction() {
    let mut f = Fixture::new();
    f.snapshot("a", &[1]);
    for i in 0..COMPACT_AFTER_SEALS + 5 {
        f.seal(&[10 + i]);
    }
    f.snapshot("b", &[2]);
    let stats = f.log.stats();
    assert!(stats.compactions >= 1, "{stats:?}");
    assert!(stats.segments < 20, "{stats:?}");
    let delta = f.delta("a", "b").unwrap();
    assert!(delta.contains(&1) && delta.contains(&2) && delta.contains(&(10 + COMPACT_AFTER_SEALS + 4)));
}

#[test]
fn no_answer_until_nothing_from_before_capture_can_land() {
    let mut f = Fixture::new();
    // A second device, busy when capture began: not proven yet.
    let busy = DeviceKey { dev: 9 << 20, diskseq: 5 };
    let seal_busy = |f: &mut Fixture, proven: Option<u64>| {
        let cut_ns = monotonic_ns();
        let changes = vec![TakenChanges {
            key: busy,
            name: Some("busy".into()),
            first_seen_ns: f.started,
            last_change_ns: cut_ns,
            chunks: [7u64].into_iter().collect(),
            proven_ns: proven,
            carries_in_flight: true,
        }];
        f.log.apply_seal(Seal { cut_ns, end_ns: monotonic_ns(), changes, checkpoint: None }).unwrap();
    };
    let snapshot = |f: &mut Fixture, handle: &str| {
        f.log.begin_cut("busy").unwrap();
        seal_busy(f, None);
        let hi = f.log.now();
        seal_busy(f, None);
        f.log.commit_snapshot("busy", handle, busy, 0, CAPACITY, hi).unwrap();
    };
    seal_busy(&mut f, None);
    snapshot(&mut f, "x1");
    snapshot(&mut f, "x2");
    assert!(matches!(f.log.delta("x1", "x2"), Err(QueryError::FailedPrecondition(ref m)) if m.contains("before capture")));
    // Proven now: later pairs answer, earlier ones never will.
    seal_busy(&mut f, Some(monotonic_ns()));
    let proven_seal = |f: &mut Fixture, handle: &str| {
        f.log.begin_cut("busy").unwrap();
        seal_busy(f, Some(0));
        let hi = f.log.now();
        seal_busy(f, Some(0));
        f.log.commit_snapshot("busy", handle, busy, 0, CAPACITY, hi).unwrap();
    };
    proven_seal(&mut f, "x3");
    proven_seal(&mut f, "x4");
    assert_eq!(f.log.delta("x3", "x4").unwrap().chunks.iter().collect::<Vec<_>>(), vec![7]);
    assert!(f.log.delta("x2", "x4").is_err());
    // After a restart the device is unproven again until the tracker says so.
    f.reopen();
    f.proven = None;
    seal_busy(&mut f, None);
    snapshot(&mut f, "x5");
    snapshot(&mut f, "x6");
    assert!(f.log.delta("x5", "x6").is_err(), "writes from before the restart may still land");
}

fn sample_checkpoint() -> Checkpoint {
    Checkpoint {
        boot_id: crate::devices::boot_id().unwrap(),
        cut_ns: 0,
        capture: crate::capture::CaptureCheckpoint {
            identity: "object-config-programs".into(),
            rings_map_id: 42,
            tails: vec![10, 20, 30],
            dropped: vec![0, 1, 0],
            recursion_misses: [("bio_queue_btf".to_string(), 3)].into_iter().collect(),
            unpublishable: 0,
        },
        devices: Vec::new(),
        mappings: Some(vec![(
            crate::devices::DeviceKey { dev: 7 << 20, diskseq: 9 },
            crate::mapping::Sample {
                fingerprint: crate::mapping::Fingerprint { capacity: 2048, layout: crate::mapping::Layout::Direct },
                backing: None,
            },
        )]),
    }
}

#[test]
fn a_taken_over_capture_keeps_answering_across_the_restart() {
    let mut f = Fixture::new();
    f.checkpoint = Some(sample_checkpoint());
    f.snapshot("a", &[1]);
    f.seal(&[2]);
    let last = f.log.checkpoint().cloned().unwrap();
    // Killed: chunk 3 was only in memory; the new agent re-reads it from
    // the pinned rings and seals it after the restart.
    let report = f.resume();
    assert_eq!(report.previous_run_clean, Some(false));
    assert_eq!(f.log.checkpoint(), Some(&last), "the last durable seal's checkpoint is what a new agent gets");
    f.seal(&[3]);
    f.settle();
    f.snapshot("b", &[4]);
    f.settle();
    assert_eq!(f.delta("a", "b").unwrap(), vec![1, 2, 3, 4], "no gap: the capture never stopped");
    assert!(f.log.gaps().iter().all(|g| g.instance.is_some() || g.reason.contains("before capture")), "{:?}", f.log.gaps());
    // Compaction keeps the checkpoint; a fresh start records the downtime.
    f.log.compact().unwrap();
    let compacted = f.log.checkpoint().cloned();
    let (log, _) = ChangeLog::load(f.dir.path(), G).unwrap();
    assert_eq!(log.checkpoint().cloned(), compacted);
    drop(log);
    f.reopen();
    f.snapshot("c", &[5]);
    assert!(matches!(f.delta("b", "c"), Err(QueryError::FailedPrecondition(_))), "a new capture leaves a gap");
}

#[test]
fn no_checkpoint_is_offered_after_damage() {
    let mut f = Fixture::new();
    f.checkpoint = Some(sample_checkpoint());
    for i in 0..20 {
        f.seal(&[i]);
    }
    let path = f.dir.path().join(JOURNAL);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() * 3 / 4;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let (log, report) = ChangeLog::load(f.dir.path(), G).unwrap();
    assert!(report.damage.is_some(), "{report:?}");
    assert!(log.checkpoint().is_none(), "records after damage may be lost: no take-over");
}

#[test]
fn a_run_killed_before_its_first_seal_gaps_from_the_checkpoint_it_took_over() {
    let mut f = Fixture::new();
    f.checkpoint = Some(sample_checkpoint());
    f.seal(&[1]);
    let checkpoint_cut = f.log.stamp(f.log.checkpoint().unwrap().cut_ns);
    std::thread::sleep(std::time::Duration::from_millis(5));
    // Taken over, then killed before sealing what it re-read; the next
    // agent cannot take over (a new capture).
    f.resume();
    std::thread::sleep(std::time::Duration::from_millis(5));
    f.reopen();
    let downtime = f.log.gaps().iter().rev().find(|g| g.instance.is_none()).unwrap();
    assert!(
        downtime.from <= checkpoint_cut,
        "the gap must reach back to the checkpoint's cut ({checkpoint_cut}), not the resumed run's start: {downtime:?}"
    );
}
