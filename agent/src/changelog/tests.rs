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
    let damage = report.damage.expect("damage");
    let copy = report.damage_copy.expect("a copy of the damaged journal");
    assert_eq!(std::fs::read(&copy).unwrap(), bytes, "the copy is the file as found");
    // A lost record may have been a gap reaching back anywhere: nothing
    // from before the damage answers, not even a, b whose records survived.
    match f.delta("a", "b") {
        Err(QueryError::FailedPrecondition(m)) => assert!(m.contains("damaged"), "{m}"),
        other => panic!("a window before the damage must refuse, got {other:?}"),
    }
    // c's record came after the damage: lost, and so not "unknown".
    match f.delta("a", "c") {
        Err(QueryError::FailedPrecondition(m)) => {
            assert!(m.contains("lost to damage") && m.contains(&damage), "{m}")
        }
        other => panic!("a handle the damage may have taken must refuse, got {other:?}"),
    }
    // Snapshots after the damage answer again.
    f.settle();
    f.snapshot("d", &[4]);
    f.snapshot("e", &[5]);
    assert_eq!(f.delta("d", "e").unwrap(), vec![4, 5]);
    // The damage is recorded for good: compaction and restarts keep it.
    f.log.compact().unwrap();
    let report = f.reopen();
    assert!(report.damage.is_none(), "the journal was rewritten whole: {report:?}");
    assert!(matches!(f.delta("a", "c"), Err(QueryError::FailedPrecondition(_))));
    assert!(matches!(f.delta("d", "never"), Err(QueryError::FailedPrecondition(_))));
    assert_eq!(f.log.damage().len(), 1);
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

/// The frame header's length in the journal's format.
fn frame_header_len(bytes: &[u8]) -> usize {
    if bytes[8] == 1 {
        8
    } else {
        20
    }
}

/// Where each frame of the journal starts, and its end.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = vec![24];
    while *starts.last().unwrap() < bytes.len() {
        let at = *starts.last().unwrap();
        starts.push(at + frame_header_len(bytes) + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize);
    }
    starts
}

/// What the agent does at a clean stop: the stop record, then the run
/// marker pinning the journal's end.
fn stop_cleanly(f: &mut Fixture) {
    f.log.stop().unwrap();
    let marker = f.log.clean_stop_marker();
    crate::statedir::StateDir::open(f.dir.path()).unwrap().mark_clean(marker.as_bytes()).unwrap();
}

/// Issue 8, item 13: one whole, valid seal record removed used to load
/// without a word and answer `[]`.
#[test]
fn a_missing_record_refuses_instead_of_answering_short() {
    let mut f = Fixture::new();
    f.settle();
    f.snapshot("a", &[]);
    f.seal(&[5]);
    f.seal(&[6]);
    f.settle();
    f.snapshot("b", &[]);
    assert_eq!(f.delta("a", "b").unwrap(), vec![5, 6]);
    let path = f.dir.path().join(JOURNAL);
    let bytes = std::fs::read(&path).unwrap();
    let starts = frame_starts(&bytes);
    let sealed_5 = (0..starts.len() - 1)
        .find(|&k| match Record::decode(&bytes[starts[k] + frame_header_len(&bytes)..starts[k + 1]]) {
            Ok(Record::Seal { segments, .. }) => {
                segments.iter().any(|s| record::decode_chunks(&s.chunks).unwrap().contains(5))
            }
            _ => false,
        })
        .expect("the seal of chunk 5");
    let dropped = [&bytes[..starts[sealed_5]], &bytes[starts[sealed_5 + 1]..]].concat();
    std::fs::write(&path, dropped).unwrap();
    let report = f.reopen();
    assert!(report.damage.as_ref().is_some_and(|d| d.contains("missing, duplicated or out of order")), "{report:?}");
    assert!(matches!(f.delta("a", "b"), Err(QueryError::FailedPrecondition(_))), "{:?}", f.delta("a", "b"));
}

/// Issue 8, item 14: after a clean stop the journal's end is known; a
/// truncation (even at a frame boundary) or a tail is damage, and the
/// snapshots it took answer FAILED_PRECONDITION, not NOT_FOUND.
#[test]
fn a_truncation_after_a_clean_stop_is_damage() {
    let mut f = Fixture::new();
    f.settle();
    f.snapshot("a", &[1]);
    f.snapshot("b", &[2]);
    f.snapshot("c", &[3]);
    stop_cleanly(&mut f);
    let path = f.dir.path().join(JOURNAL);
    let bytes = std::fs::read(&path).unwrap();
    let starts = frame_starts(&bytes);
    let snapshot_c = (0..starts.len() - 1)
        .find(|&k| matches!(Record::decode(&bytes[starts[k] + frame_header_len(&bytes)..starts[k + 1]]), Ok(Record::Snapshot(s)) if s.handle == "c"))
        .unwrap();
    let pristine = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(f.dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), pristine.path().join(entry.file_name())).unwrap();
    }
    let damages: [(&str, Vec<u8>); 4] = [
        ("cut at c's record", bytes[..starts[snapshot_c]].to_vec()),
        ("cut inside the stop record", bytes[..bytes.len() - 3].to_vec()),
        ("zeroes after the stop record", [&bytes[..], &[0; 4096]].concat()),
        ("garbage after the stop record", [&bytes[..], b"garbage"].concat()),
    ];
    for (what, damaged) in damages {
        for entry in std::fs::read_dir(pristine.path()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), f.dir.path().join(entry.file_name())).unwrap();
        }
        std::fs::write(&path, &damaged).unwrap();
        let report = f.reopen();
        assert!(report.damage.is_some(), "{what}: {report:?}");
        for (base, target) in [("a", "b"), ("a", "c"), ("b", "c")] {
            let answer = f.delta(base, target);
            assert!(matches!(answer, Err(QueryError::FailedPrecondition(_))), "{what}: {base}..{target}: {answer:?}");
        }
    }
    // Without the clean stop the same torn append is a crash's: cut off,
    // nothing lost that was acknowledged.
    for entry in std::fs::read_dir(pristine.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), f.dir.path().join(entry.file_name())).unwrap();
    }
    std::fs::remove_file(f.dir.path().join("run-marker")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let report = f.reopen();
    assert!(report.damage.is_none(), "{report:?}");
    assert!(report.torn_tail_bytes > 0);
    assert_eq!(f.delta("a", "c").unwrap(), vec![1, 2, 3]);
}

#[test]
fn compaction_into_many_small_records_keeps_every_answer() {
    let mut f = Fixture::new();
    f.snapshot("a", &[1]);
    for i in 0..30 {
        f.seal(&[10 + i, 100_000 + 7 * i, 1 << 33 | i]);
        if i % 4 == 0 {
            f.settle();
        }
    }
    f.snapshot("b", &[2]);
    f.seal(&[3]);
    f.snapshot("c", &[4]);
    let before = (f.delta("a", "b").unwrap(), f.delta("b", "c").unwrap());
    let records = f.log.state_records_in(64).unwrap();
    let seals = records.iter().filter(|r| matches!(Record::decode(r), Ok(Record::Seal { .. }))).count();
    assert!(seals > 10, "{seals} seal records");
    f.log.journal.rewrite(records.iter().map(Vec::as_slice)).unwrap();
    f.reopen();
    assert_eq!((f.delta("a", "b").unwrap(), f.delta("b", "c").unwrap()), before);
}

#[test]
fn a_big_chunk_set_is_split_by_ranges() {
    let chunks: RoaringTreemap = (0..20_000u64).map(|i| i * 3).chain([1 << 40, 1 << 41]).collect();
    let pieces = encode_bounded(&chunks, 4096);
    assert!(pieces.len() > 4, "{} pieces", pieces.len());
    let mut union = RoaringTreemap::new();
    for p in &pieces {
        let piece = record::decode_chunks(p).unwrap();
        assert!(piece.is_disjoint(&union));
        union |= piece;
    }
    assert_eq!(union, chunks);
    assert_eq!(encode_bounded(&chunks, usize::MAX).len(), 1);
    assert_eq!(encode_bounded(&RoaringTreemap::new(), 1).len(), 1);
}

/// Version 1 journals (no sequence numbers) are read once, with what
/// that format can prove, and rewritten in the current format.
#[test]
fn a_version_1_journal_loads_and_is_converted() {
    let mut f = Fixture::new();
    f.settle();
    f.snapshot("a", &[1]);
    f.seal(&[2]);
    f.settle();
    f.snapshot("b", &[3]);
    let before = f.delta("a", "b").unwrap();
    f.log.stop().unwrap();
    let path = f.dir.path().join(JOURNAL);
    let (_, recovered) = Journal::open(&path).unwrap();
    std::fs::write(&path, crate::journal::tests::v1_journal(&recovered.records)).unwrap();
    let report = f.reopen();
    assert_eq!(report.converted_from_version, Some(1), "{report:?}");
    assert!(report.damage.is_none(), "{report:?}");
    assert_eq!(f.delta("a", "b").unwrap(), before);
    assert_eq!(f.reopen().converted_from_version, None);
    assert_eq!(f.delta("a", "b").unwrap(), before);
}
