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

    /// Where the test volume is: all of the test device.
    fn placement(&self) -> Placement {
        self.log.placement(key(), 0, CAPACITY)
    }

    fn begin(&mut self) -> u64 {
        self.log.begin_cut(VOLUME, self.placement()).unwrap()
    }

    /// A commit as the admin API makes it: hi, a seal, commit.
    fn commit(&mut self, handle: &str, cut: Option<u64>) -> Result<SnapshotInfo, LogError> {
        let hi = self.log.now();
        self.seal(&[]);
        self.log.commit_snapshot(VOLUME, cut, handle, self.placement(), hi)
    }

    /// begin, (writes sealed by the snapshot's own seal), commit.
    fn snapshot(&mut self, handle: &str, in_window: &[u64]) {
        let cut = self.begin();
        self.seal(in_window);
        self.commit(handle, Some(cut)).unwrap();
    }

    fn open_cuts(&self) -> Vec<OpenCut> {
        self.log.open_cuts().into_iter().cloned().collect()
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
    let other = f.log.begin_cut("other", f.placement()).unwrap();
    f.seal(&[]);
    let hi = f.log.now();
    f.seal(&[]);
    f.log.commit_snapshot("other", Some(other), "o", f.placement(), hi).unwrap();
    assert!(matches!(f.delta("a", "o"), Err(QueryError::InvalidArgument(_))), "another volume");
    assert!(matches!(f.commit("a", None), Err(LogError::SnapshotExists(_))));
    assert!(matches!(f.commit("z", None), Err(LogError::NoCutBegun(_))));
    match f.commit("z", Some(other)) {
        Err(LogError::CutNotOpen { detail, .. }) => assert!(detail.contains("\"o\""), "{detail}"),
        r => panic!("a committed cut named again: {r:?}"),
    }
    let theirs = f.log.begin_cut("other", f.placement()).unwrap();
    assert!(matches!(f.commit("z", Some(theirs)), Err(LogError::CutOfAnotherVolume { .. })), "another volume's cut");
    assert!(matches!(f.commit("z", Some(12345)), Err(LogError::CutNotOpen { .. })));
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
        let placement = f.log.placement(busy, 0, CAPACITY);
        let cut = f.log.begin_cut("busy", placement).unwrap();
        seal_busy(f, None);
        let hi = f.log.now();
        seal_busy(f, None);
        f.log.commit_snapshot("busy", Some(cut), handle, placement, hi).unwrap();
    };
    seal_busy(&mut f, None);
    snapshot(&mut f, "x1");
    snapshot(&mut f, "x2");
    assert!(matches!(f.log.delta("x1", "x2"), Err(QueryError::FailedPrecondition(ref m)) if m.contains("before capture")));
    // Proven now: later pairs answer, earlier ones never will.
    seal_busy(&mut f, Some(monotonic_ns()));
    let proven_seal = |f: &mut Fixture, handle: &str| {
        let placement = f.log.placement(busy, 0, CAPACITY);
        let cut = f.log.begin_cut("busy", placement).unwrap();
        seal_busy(f, Some(0));
        let hi = f.log.now();
        seal_busy(f, Some(0));
        f.log.commit_snapshot("busy", Some(cut), handle, placement, hi).unwrap();
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

/// The scenario: a begin retried after the cut must not move the
/// window's start past the writes made since.
#[test]
fn a_retried_begin_keeps_the_first_window() {
    for name_the_cut in [false, true] {
        let mut f = Fixture::new();
        f.settle();
        let first = f.begin();
        let first_lo = f.open_cuts()[0].lo;
        f.seal(&[]); // the backend cuts here
        f.seal(&[5]);
        f.settle();
        let retried = f.begin();
        assert_ne!(first, retried);
        let a = f.commit("a", name_the_cut.then_some(first)).unwrap();
        assert_eq!(a.lo, first_lo, "the window starts at the first begin");
        f.snapshot("b", &[]);
        assert_eq!(f.delta("a", "b").unwrap(), vec![5], "written after the cut, before the retried begin");
        // The other begin stays open until it is committed or aborted:
        // untaken (it will open the next window of a commit naming no cut)
        // or, when that commit took it, taken.
        let open: Vec<(u64, bool)> = f.open_cuts().iter().map(|c| (c.id, c.taken)).collect();
        let expected = if name_the_cut { vec![(retried, false)] } else { vec![(first, false), (retried, true)] };
        assert_eq!(open, expected);
        f.log.abort_cuts(VOLUME, None).unwrap();
        assert!(f.open_cuts().is_empty());
    }
}

/// Two snapshots of one volume cut at once, committed in either order:
/// each keeps its own window, and a delta between them covers every change
/// between the cuts whichever was cut first.
#[test]
fn overlapping_cuts_commit_in_either_order() {
    for first_begun_commits_first in [true, false] {
        let mut f = Fixture::new();
        f.seal(&[1]);
        f.settle();
        let c1 = f.begin();
        f.seal(&[2]);
        f.settle();
        let c2 = f.begin();
        f.seal(&[3]);
        f.settle();
        let (early, late) = if first_begun_commits_first { ((c1, "s1"), (c2, "s2")) } else { ((c2, "s2"), (c1, "s1")) };
        let one = f.commit(early.1, Some(early.0)).unwrap();
        f.seal(&[4]);
        f.settle();
        let two = f.commit(late.1, Some(late.0)).unwrap();
        assert_eq!((one.cut_id, two.cut_id), (Some(early.0), Some(late.0)));
        f.snapshot("end", &[9]);
        let (s1, s2) = (f.log.snapshot("s1").unwrap().clone(), f.log.snapshot("s2").unwrap().clone());
        assert!(s1.lo < s2.lo, "each cut keeps the lo of its own begin");
        // 1 was settled before either window; 2 only before s2's; 4 came
        // after the first commit, before the second: within the later
        // window, so possibly in either snapshot.
        assert_eq!(f.delta("s1", "end").unwrap(), vec![2, 3, 4, 9]);
        assert_eq!(f.delta("s2", "end").unwrap(), vec![3, 4, 9]);
        assert_eq!(f.delta("s1", "s2").unwrap(), vec![2, 3, 4], "whichever was cut first");
        assert!(f.open_cuts().is_empty());
    }
}

/// Clients that name no cut, interleaved at random with clients that do,
/// retried begins and abandoned ones: every commit's window opens no later
/// than that client's own begin.
#[test]
fn commits_without_a_cut_id_never_open_later_than_their_begin() {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut f = Fixture::new();
    // Client → (its latest begin's lo, names its cut?, cut id).
    let mut pending: Vec<(Stamp, bool, u64)> = Vec::new();
    // Cuts no client will commit, oldest first.
    let mut abandoned: Vec<u64> = Vec::new();
    let mut committed = 0;
    for step in 0..1000 {
        let begin = pending.len() < 8 && (pending.is_empty() || rng.bool());
        if begin {
            let cut = f.begin();
            let lo = f.open_cuts().iter().find(|c| c.id == cut).unwrap().lo;
            if rng.u8(..20) == 0 {
                // A retried begin: the client only learns the second id.
                abandoned.push(cut);
                let again = f.begin();
                let lo = f.open_cuts().iter().find(|c| c.id == again).unwrap().lo;
                pending.push((lo, rng.bool(), again));
            } else if rng.u8(..20) == 0 {
                abandoned.push(cut);
            } else {
                pending.push((lo, rng.bool(), cut));
            }
            // An operator aborts old abandoned cuts soon (a commit naming
            // no cut may have taken one already): few spare cuts, so a
            // wrong choice of cut shows.
            if abandoned.len() > 2 {
                let old = abandoned.remove(0);
                if f.open_cuts().iter().any(|c| c.id == old) {
                    f.log.abort_cuts(VOLUME, Some(old)).unwrap();
                }
            }
        } else {
            let (lo, named, cut) = pending.swap_remove(rng.usize(..pending.len()));
            let handle = format!("s{step}");
            let info =
                f.commit(&handle, named.then_some(cut)).unwrap_or_else(|e| panic!("seed {seed}, step {step}: {e}"));
            assert!(
                info.lo <= lo,
                "seed {seed}, step {step}: window opened at {} after the client's begin at {lo}",
                info.lo
            );
            committed += 1;
        }
    }
    assert!(committed > 300, "{committed}");
}

/// Every open cut, with its id, lo and placement, survives a restart and a
/// compaction; so do the snapshots naming the cuts they closed.
#[test]
fn replay_keeps_every_open_cut() {
    let mut f = Fixture::new();
    let c1 = f.begin();
    let c2 = f.begin();
    let partition = f.log.placement(key(), 1 << 20, CAPACITY / 2);
    let c3 = f.log.begin_cut("part", partition).unwrap();
    let c4 = f.begin();
    f.commit("s2", Some(c2)).unwrap();
    let before = f.open_cuts();
    assert_eq!(before.iter().map(|c| c.id).collect::<Vec<_>>(), vec![c1, c3, c4]);
    f.reopen();
    assert_eq!(f.open_cuts(), before, "restart");
    f.log.compact().unwrap();
    f.reopen();
    assert_eq!(f.open_cuts(), before, "compaction and restart");
    assert_eq!(f.log.snapshot("s2").unwrap().cut_id, Some(c2));
    // They commit as before the restart (the restart's downtime is a gap
    // for their deltas, which is another matter).
    let s1 = f.commit("s1", Some(c1)).unwrap();
    assert_eq!(s1.lo, before[0].lo);
    let hi = f.log.now();
    f.seal(&[]);
    assert!(f.log.commit_snapshot("part", Some(c3), "p", partition, hi).is_ok());
    assert_eq!(f.open_cuts().iter().map(|c| c.id).collect::<Vec<_>>(), vec![c4]);
}

/// A journal an older agent wrote (one cut per volume, replaced by the
/// next begin, snapshots without cut ids) still loads, answers as before,
/// and its leftover cut is refused rather than committed on a guessed
/// device.
#[test]
fn an_older_agents_cuts_load() {
    #[derive(Serialize)]
    enum OldRecord {
        CutBegun { volume: String, cut_id: u64, lo: Stamp },
        Snapshot(OldSnapshot),
    }
    #[derive(Serialize)]
    struct OldSnapshot {
        handle: String,
        volume: String,
        instance: InstanceId,
        lo: Stamp,
        hi: Stamp,
        offset_bytes: u64,
        capacity_bytes: u64,
        committed_unix_ns: u64,
    }
    let mut f = Fixture::new();
    f.settle();
    let write = |f: &mut Fixture, r: OldRecord| {
        let mut bytes = Vec::new();
        ciborium::into_writer(&r, &mut bytes).unwrap();
        f.log.journal.append(&bytes).unwrap();
        f.log.journal.sync().unwrap();
    };
    let instance = f.log.instance_id(key());
    let begun = |f: &Fixture, cut_id| OldRecord::CutBegun { volume: VOLUME.into(), cut_id, lo: f.log.now() };
    let r = begun(&f, 1);
    write(&mut f, r);
    let r = begun(&f, 2);
    let OldRecord::CutBegun { lo, .. } = r else { unreachable!() };
    write(&mut f, r);
    f.seal(&[]);
    let hi = f.log.now();
    f.seal(&[]);
    let old = OldSnapshot {
        handle: "old".into(),
        volume: VOLUME.into(),
        instance,
        lo,
        hi,
        offset_bytes: 0,
        capacity_bytes: CAPACITY,
        committed_unix_ns: 1,
    };
    write(&mut f, OldRecord::Snapshot(old));
    let r = begun(&f, 3);
    write(&mut f, r);
    f.log.stop().unwrap();
    f.reopen();
    let open = f.open_cuts();
    assert_eq!(open.iter().map(|c| (c.id, c.placement)).collect::<Vec<_>>(), vec![(3, None)], "{open:?}");
    assert_eq!(f.log.snapshot("old").unwrap().cut_id, None);
    assert!(matches!(f.commit("x", None), Err(LogError::PlacementUnknown(3))));
    f.log.abort_cuts(VOLUME, Some(3)).unwrap();
    f.settle();
    f.snapshot("new", &[7]);
    assert!(matches!(f.delta("old", "new"), Err(QueryError::FailedPrecondition(_))), "the restart is a gap");
}

/// Compaction may merge segments only where no open cut's lo falls
/// between them: each cut, committed after the compaction, answers as
/// precisely as without it.
#[test]
fn compaction_with_open_cuts_keeps_their_boundaries() {
    let mut f = Fixture::new();
    f.seal(&[1]);
    f.settle();
    let mut cuts = Vec::new();
    for base in [20, 30, 40] {
        cuts.push(f.begin());
        for i in 0..10 {
            f.seal(&[base + i]);
            f.settle();
        }
    }
    let segments = f.log.stats().segments;
    f.log.compact().unwrap();
    let compacted = f.log.stats().segments;
    assert!(compacted < segments / 4, "{segments} -> {compacted}: compaction merged nothing");
    // Committed in another order than begun.
    f.commit("s2", Some(cuts[1])).unwrap();
    f.commit("s3", Some(cuts[2])).unwrap();
    f.commit("s1", Some(cuts[0])).unwrap();
    f.snapshot("end", &[9]);
    let from = |first: u64| (first..50).chain([9]).collect::<Vec<u64>>();
    let expected = |from: Vec<u64>| {
        let mut v = from;
        v.sort();
        v
    };
    let answers =
        |f: &Fixture| [f.delta("s1", "end").unwrap(), f.delta("s2", "end").unwrap(), f.delta("s3", "end").unwrap()];
    assert_eq!(answers(&f), [expected(from(20)), expected(from(30)), expected(from(40))]);
    f.log.compact().unwrap();
    f.reopen();
    assert_eq!(answers(&f), [expected(from(20)), expected(from(30)), expected(from(40))], "compacted again, reopened");
}

/// Item 7: the volume's device and extent are fixed at begin; a commit
/// finding the volume on another instance, at another offset or with
/// another capacity is refused, and leaves the cut open.
#[test]
fn a_commit_elsewhere_than_the_begin_is_refused() {
    let mut f = Fixture::new();
    let cut = f.begin();
    let hi = f.log.now();
    f.seal(&[]);
    let reattached = DeviceKey { diskseq: key().diskseq + 1, ..key() };
    let elsewhere = [
        f.log.placement(reattached, 0, CAPACITY),
        f.log.placement(key(), 4096, CAPACITY),
        f.log.placement(key(), 0, CAPACITY + 4096),
        f.log.placement(key(), 0, CAPACITY - 4096),
    ];
    for placement in elsewhere {
        for named in [None, Some(cut)] {
            match f.log.commit_snapshot(VOLUME, named, "s", placement, hi) {
                Err(LogError::PlacementChanged { cut: c, begun, now, .. }) => {
                    assert_eq!((c, begun, now), (cut, f.placement(), placement));
                }
                r => panic!("committed on {placement} a cut begun on {}: {r:?}", f.placement()),
            }
        }
    }
    // Persisted with the cut.
    f.reopen();
    assert!(matches!(f.commit("s", Some(cut)).map(|_| ()), Ok(())));
    let cut = f.begin();
    f.reopen();
    let hi = f.log.now();
    f.seal(&[]);
    assert!(matches!(
        f.log.commit_snapshot(VOLUME, Some(cut), "t", f.log.placement(reattached, 0, CAPACITY), hi),
        Err(LogError::PlacementChanged { .. })
    ));
    assert_eq!(f.open_cuts().len(), 1);
}

/// A cut open longer than the TTL is abandoned; from then on a commit
/// naming no cut might be its client's, so it is refused until an operator
/// aborts the volume's cuts; commits naming their cut go on.
#[test]
fn an_expired_cut_refuses_commits_without_an_id() {
    let mut f = Fixture::new();
    let stale = f.begin();
    f.log.cut_ttl = 0;
    std::thread::sleep(std::time::Duration::from_millis(1));
    f.seal(&[]);
    f.log.cut_ttl = CUT_TTL.as_nanos() as Stamp;
    assert!(f.open_cuts().is_empty(), "expired at the seal");
    let cut = f.begin();
    assert!(matches!(f.commit("a", None), Err(LogError::CutsExpired(_))));
    assert!(matches!(f.commit("a", Some(stale)), Err(LogError::CutNotOpen { .. })));
    f.reopen();
    assert!(matches!(f.commit("a", None), Err(LogError::CutsExpired(_))), "after a restart");
    f.log.compact().unwrap();
    f.reopen();
    assert!(matches!(f.commit("a", None), Err(LogError::CutsExpired(_))), "after a compaction");
    f.commit("a", Some(cut)).unwrap();
    let left = f.begin();
    assert_eq!(f.log.abort_cuts(VOLUME, None).unwrap(), vec![left]);
    f.reopen();
    f.begin();
    f.commit("b", None).unwrap();
}

#[test]
fn open_cuts_per_volume_are_bounded() {
    let mut f = Fixture::new();
    // One client committing without ids leaves its own cut taken each time.
    for i in 0..MAX_TAKEN_CUTS + 10 {
        f.begin();
        f.commit(&format!("s{i}"), None).unwrap();
    }
    let open = f.open_cuts();
    assert_eq!(open.len(), MAX_TAKEN_CUTS);
    assert!(open.iter().all(|c| c.taken));
    let cuts: Vec<u64> = (0..MAX_OPEN_CUTS).map(|_| f.begin()).collect();
    assert!(matches!(f.log.begin_cut(VOLUME, f.placement()), Err(LogError::TooManyCuts { .. })));
    f.log.begin_cut("other", f.placement()).unwrap();
    f.log.abort_cuts(VOLUME, Some(cuts[7])).unwrap();
    f.begin();
    // Replay evicts alike.
    let before = f.open_cuts();
    f.reopen();
    assert_eq!(f.open_cuts(), before);
}

/// A commit naming no cut may take a cut another client will name: that
/// client still commits it, with its own window.
#[test]
fn a_taken_cut_still_commits_by_id() {
    let mut f = Fixture::new();
    f.settle();
    let unnamed = f.begin();
    let named = f.begin();
    let lo = |f: &Fixture, id| f.open_cuts().iter().find(|c| c.id == id).unwrap().lo;
    let (unnamed_lo, named_lo) = (lo(&f, unnamed), lo(&f, named));
    let a = f.commit("a", None).unwrap();
    assert_eq!((a.lo, a.cut_id), (unnamed_lo, Some(named)), "the earliest window, the latest cut taken");
    let b = f.commit("b", Some(named)).unwrap();
    assert_eq!(b.lo, named_lo);
    // Its place was gone: it took the latest untaken cut in turn.
    assert_eq!(f.open_cuts().iter().map(|c| (c.id, c.taken)).collect::<Vec<_>>(), vec![(unnamed, true)]);
    assert!(matches!(f.commit("c", None), Err(LogError::NoCutBegun(_))));
    f.reopen();
    assert_eq!(f.open_cuts().iter().map(|c| (c.id, c.taken)).collect::<Vec<_>>(), vec![(unnamed, true)]);
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
        .find(|&k| match Record::decode(&bytes[starts[k] + frame_header_len(&bytes)..starts[k + 1]]) {
            Ok(Record::Snapshot(s) | Record::Committed { snapshot: s, .. }) => s.handle == "c",
            _ => false,
        })
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
