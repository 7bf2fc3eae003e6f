//! The state-directory fuzzer (issue 8, "make the suite find these itself").
//!
//! Builds a real state directory through the library, the calls the
//! recorder and the admin API make (no kernel needed), records the answers
//! of every delta between its snapshots, stops cleanly, and then damages
//! copies of it in every way a disk, a filesystem or an operator can: bit
//! flips, truncation at every frame boundary and inside every frame, a
//! record dropped, duplicated, two records swapped, zero and garbage tails,
//! a 40 GiB sparse tail, a deleted journal, a damaged run marker. Each
//! damaged copy is opened as the agent opens it, under the clean marker the
//! stop left and under a dirty one (a crash), and must give one of:
//!
//! - the same answers (nothing was lost, or what was lost is a torn tail of
//!   a crash: its snapshots are NOT_FOUND, never answered differently);
//! - a refusal: FAILED_PRECONDITION for every pair once damage is detected,
//!   including handles the damage may have taken (never "unknown");
//! - a clear error for a file that is not this journal at all.
//!
//! Never a list shorter than the undamaged answer, never a panic. After a
//! clean stop every change to the journal must be detected as damage.
//!
//! Deterministic: the seed is printed, `CBT_FUZZ_SEED` replays another.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::FileExt,
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    time::{Duration, Instant},
};

use cbt_agent::{
    changelog::{ChangeLog, LogError},
    changes::{Gap, GapScope, TakenChanges},
    devices::DeviceKey,
    journal::JournalError,
    query::QueryError,
    statedir::StateDir,
    tracker::{monotonic_ns, Seal},
};
use roaring::RoaringTreemap;

const G: u64 = 4096;
const CAPACITY: u64 = 1 << 30;
const JOURNAL: &str = "changelog.journal";
const MARKER: &str = "run-marker";
const DEFAULT_SEED: u64 = 0x00c0_ffee_cb7f_0220;
/// At most this many records are each dropped, duplicated and swapped.
const MAX_PICKED: usize = 40;
/// A handle no snapshot ever had.
const NEVER: &str = "never-existed";

type Answer = Result<Vec<u64>, QueryError>;

fn seed() -> u64 {
    let seed = std::env::var("CBT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    println!("state fuzzer seed {seed} (replay with CBT_FUZZ_SEED={seed})");
    seed
}

/// A scratch directory on tmpfs when there is one (cheap fsyncs, sparse
/// files), removed on drop.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix("cbt-state-fuzz-");
    if shm.is_dir() { b.tempdir_in(shm) } else { b.tempdir() }.expect("scratch dir")
}

struct Device {
    key: DeviceKey,
    volume: &'static str,
}

const DEVICES: [Device; 2] = [
    Device { key: DeviceKey { dev: 7 << 20 | 1, diskseq: 11 }, volume: "vol-a" },
    Device { key: DeviceKey { dev: 7 << 20 | 2, diskseq: 12 }, volume: "vol-b" },
];

/// The agent's calls, as the recorder and the admin API make them.
struct Builder<'a> {
    log: ChangeLog,
    started: u64,
    rng: &'a mut fastrand::Rng,
    snapshots: Vec<(String, &'static str)>,
}

impl Builder<'_> {
    /// One seal: random chunks on each device (`in_window` on all of them
    /// when given).
    fn seal(&mut self, in_window: Option<u64>) {
        let cut_ns = monotonic_ns();
        let changes = DEVICES
            .iter()
            .map(|d| {
                let mut chunks = RoaringTreemap::new();
                if let Some(c) = in_window {
                    chunks.insert(c);
                }
                for _ in 0..self.rng.usize(0..4) {
                    let start = self.rng.u64(0..CAPACITY / G - 64);
                    chunks.insert_range(start..start + self.rng.u64(1..64));
                }
                TakenChanges {
                    key: d.key,
                    name: Some(d.volume.into()),
                    first_seen_ns: self.started,
                    last_change_ns: cut_ns,
                    chunks,
                    proven_ns: Some(self.started),
                    carries_in_flight: self.rng.bool(),
                }
            })
            .collect();
        self.log.apply_seal(Seal { cut_ns, end_ns: monotonic_ns(), changes, checkpoint: None }).expect("seal");
    }

    fn settle(&mut self) {
        for d in &DEVICES {
            self.log.settle(d.key, monotonic_ns()).expect("settle");
        }
    }

    /// begin, a seal inside the window, hi, a seal, commit.
    fn snapshot(&mut self, device: &Device) {
        let handle = format!("snap-{}", self.snapshots.len());
        let placement = self.log.placement(device.key, 0, CAPACITY);
        let cut = self.log.begin_cut(device.volume, placement).expect("begin");
        let in_window = self.rng.u64(0..CAPACITY / G);
        self.seal(Some(in_window));
        let hi = self.log.now();
        self.seal(None);
        self.log.commit_snapshot(device.volume, Some(cut), &handle, placement, hi).expect("commit");
        self.snapshots.push((handle, device.volume));
    }
}

/// The undamaged state directory and what it answers.
#[derive(Clone)]
struct Built {
    journal: Vec<u8>,
    clean_marker: Vec<u8>,
    dirty_marker: Vec<u8>,
    /// (base, target) → answer; every ordered pair of one volume's snapshots.
    truth: BTreeMap<(String, String), Answer>,
}

fn delta(log: &ChangeLog, base: &str, target: &str) -> Answer {
    log.delta(base, target).map(|m| m.chunks.iter().collect())
}

fn answers(log: &ChangeLog, pairs: impl Iterator<Item = (String, String)>) -> BTreeMap<(String, String), Answer> {
    pairs
        .map(|(b, t)| {
            let answer = delta(log, &b, &t);
            ((b, t), answer)
        })
        .collect()
}

fn build(rng: &mut fastrand::Rng) -> Built {
    let dir = scratch();
    let state = StateDir::open(dir.path()).expect("state dir");
    let started = monotonic_ns();
    let (log, _) = ChangeLog::open(dir.path(), G, started).expect("open");
    state.mark_dirty(b"running").expect("marker");
    let mut b = Builder { log, started, rng, snapshots: Vec::new() };
    b.seal(None); // registers the devices
    b.settle();
    for round in 0..14 {
        for _ in 0..b.rng.usize(0..3) {
            b.seal(None);
            if b.rng.bool() {
                b.settle();
            }
        }
        let device = &DEVICES[b.rng.usize(0..DEVICES.len())];
        b.snapshot(device);
        if round == 5 {
            // A compacted prefix, then appended frames.
            b.log.compact().expect("compact");
        }
        if round == 8 {
            let now = monotonic_ns();
            let gap =
                Gap { scope: GapScope::Device(DEVICES[1].key), from_ns: now - 1, to_ns: now, reason: "fuzz".into() };
            b.log.record_gap(&gap).expect("gap");
        }
    }
    let deleted = b.snapshots.remove(3);
    b.log.delete_snapshot(&deleted.0).expect("delete");
    b.seal(None);
    b.settle();

    let mut pairs = Vec::new();
    for (i, (base, vb)) in b.snapshots.iter().enumerate() {
        for (target, vt) in &b.snapshots[i + 1..] {
            if vb == vt {
                pairs.push((base.clone(), target.clone()));
            }
        }
    }
    pairs.push((b.snapshots[0].0.clone(), NEVER.to_string()));
    let truth = answers(&b.log, pairs.into_iter());
    let lists = truth.values().filter(|a| a.as_ref().is_ok_and(|l| !l.is_empty())).count();
    let refused = truth.values().filter(|a| matches!(a, Err(QueryError::FailedPrecondition(_)))).count();
    assert!(lists >= 10 && refused >= 1, "a state worth damaging: {lists} lists, {refused} refusals: {truth:?}");

    b.log.stop().expect("stop");
    let marker = b.log.clean_stop_marker();
    drop(b);
    state.mark_clean(marker.as_bytes()).expect("clean marker");
    let clean_marker = fs::read(dir.path().join(MARKER)).unwrap();
    state.mark_dirty(b"running").expect("marker");
    let dirty_marker = fs::read(dir.path().join(MARKER)).unwrap();
    drop(state);
    Built { journal: fs::read(dir.path().join(JOURNAL)).unwrap(), clean_marker, dirty_marker, truth }
}

/// Where each frame starts, and the end (both journal formats).
fn frame_starts(journal: &[u8]) -> Vec<usize> {
    let header = match u32::from_le_bytes(journal[8..12].try_into().unwrap()) {
        1 => 8,
        _ => 20,
    };
    let mut starts = vec![24];
    let mut at = 24;
    while at < journal.len() {
        at += header + u32::from_le_bytes(journal[at..at + 4].try_into().unwrap()) as usize;
        starts.push(at);
    }
    assert_eq!(at, journal.len(), "the undamaged journal ends at a frame boundary");
    starts
}

/// The journal with its frames in `order` (indices into `starts`).
fn reframe(journal: &[u8], starts: &[usize], order: impl IntoIterator<Item = usize>) -> Vec<u8> {
    let mut out = journal[..starts[0]].to_vec();
    for k in order {
        out.extend_from_slice(&journal[starts[k]..starts[k + 1]]);
    }
    out
}

enum Journal {
    Bytes(Vec<u8>),
    /// The undamaged journal extended (sparse) to this length.
    SparseTail(u64),
    Missing,
}

struct Case {
    what: String,
    journal: Journal,
    /// A prefix of the undamaged bytes: under a dirty marker this is what
    /// a crash can leave (a torn append), and may answer as one.
    crash_image: bool,
}

#[derive(Default)]
struct Tally {
    cases: usize,
    damage: usize,
    identical: usize,
    refused_open: usize,
    crash_images: usize,
    slowest: Duration,
}

/// Opens a damaged copy as the agent does, queries it, stops cleanly, and
/// opens it once more. Returns an error message for any forbidden outcome.
fn check(built: &Built, case: &Case, clean: bool, tally: &mut Tally) -> Result<(), String> {
    let dir = scratch();
    let journal = dir.path().join(JOURNAL);
    match &case.journal {
        Journal::Bytes(b) => fs::write(&journal, b).unwrap(),
        Journal::SparseTail(len) => {
            fs::write(&journal, &built.journal).unwrap();
            fs::OpenOptions::new().write(true).open(&journal).unwrap().set_len(*len).unwrap();
        }
        Journal::Missing => {}
    }
    let marker = if clean { &built.clean_marker } else { &built.dirty_marker };
    fs::write(dir.path().join(MARKER), marker).unwrap();
    let modified = match &case.journal {
        Journal::Bytes(b) => *b != built.journal,
        _ => true,
    };
    let pairs = || built.truth.keys().cloned();

    let started = Instant::now();
    let first = catch_unwind(AssertUnwindSafe(|| -> Result<_, LogError> {
        let state = StateDir::open(dir.path()).expect("state dir");
        let (mut log, report) = ChangeLog::open(dir.path(), G, monotonic_ns())?;
        state.mark_dirty(b"running").expect("marker");
        let got = answers(&log, pairs());
        log.stop().expect("stop");
        state.mark_clean(log.clean_stop_marker().as_bytes()).expect("marker");
        Ok((report, got))
    }))
    .map_err(|_| "panicked opening the damaged state".to_string())?;
    tally.slowest = tally.slowest.max(started.elapsed());
    tally.cases += 1;
    let (report, got) = match first {
        Ok(r) => r,
        Err(LogError::Journal(e @ (JournalError::BadHeader { .. } | JournalError::UnsupportedVersion { .. }))) => {
            // Not this journal any more (its magic or version changed): a
            // clear refusal to start, the file left as it was.
            tally.refused_open += 1;
            return match (&case.journal, e.to_string().contains("left untouched")) {
                (Journal::Bytes(b), true) if fs::read(&journal).unwrap() == *b => Ok(()),
                _ => Err(format!("refused ({e}) but changed the file")),
            };
        }
        Err(e) => return Err(format!("open failed: {e}")),
    };
    if let Some(d) = &report.damage {
        tally.damage += 1;
        // A damaged copy is bounded (the 40 GiB tail is not kept whole).
        for entry in fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            let len = entry.metadata().unwrap().len();
            if entry.file_name().to_string_lossy().contains(".damaged-")
                && len > built.journal.len() as u64 + (80 << 20)
            {
                return Err(format!("the copy of the damaged journal is {len} bytes"));
            }
        }
        for (pair, answer) in &got {
            if !matches!(answer, Err(QueryError::FailedPrecondition(_))) {
                return Err(format!("damage detected ({d}), but {pair:?} answered {answer:?}"));
            }
        }
    } else {
        if clean && modified {
            return Err("the journal changed after a clean stop, and no damage was detected".into());
        }
        for (pair, answer) in &got {
            let truth = &built.truth[pair];
            let fine = match (truth, answer) {
                (_, a) if a == truth => true,
                // A snapshot recorded in the lost tail of a crash.
                (_, Err(QueryError::NotFound(_))) => case.crash_image,
                // The crash image lost the gap record too: it answers as
                // the log did before that gap was recorded.
                (Err(QueryError::FailedPrecondition(_)), Ok(_)) => case.crash_image,
                _ => false,
            };
            if !fine {
                return Err(format!("{pair:?} answered {answer:?} where the undamaged state answered {truth:?}"));
            }
            if let (Ok(t), Ok(a)) = (truth, answer) {
                if t.iter().any(|c| a.binary_search(c).is_err()) {
                    return Err(format!("{pair:?} answered a list missing chunks: {a:?} for {t:?}"));
                }
            }
        }
        if got == built.truth {
            tally.identical += 1;
        } else {
            tally.crash_images += 1;
        }
    }

    // The damage was recorded for good: a second start sees no new damage
    // and answers as the first did.
    let (again, report2) = {
        let state = StateDir::open(dir.path()).expect("state dir");
        let (log, report) = ChangeLog::open(dir.path(), G, monotonic_ns()).map_err(|e| format!("second open: {e}"))?;
        drop(state);
        (answers(&log, pairs()), report)
    };
    if let Some(d) = report2.damage {
        return Err(format!("a second start found damage again: {d}"));
    }
    if again != got {
        return Err(format!("a second start answers differently: {again:?} vs {got:?}"));
    }
    Ok(())
}

fn cases(built: &Built, rng: &mut fastrand::Rng) -> Vec<Case> {
    let j = &built.journal;
    let starts = frame_starts(j);
    let frames = starts.len() - 1;
    let mut out = Vec::new();
    let mut bytes =
        |what: String, b: Vec<u8>, crash_image: bool| out.push(Case { what, journal: Journal::Bytes(b), crash_image });
    bytes("undamaged".into(), j.clone(), false);
    for (k, &at) in starts.iter().enumerate() {
        bytes(format!("cut at frame boundary {k}"), j[..at].to_vec(), true);
        if k < frames {
            let mid = rng.usize(at + 1..starts[k + 1]);
            bytes(format!("cut inside frame {k} at {mid}"), j[..mid].to_vec(), true);
        }
    }
    for cut in [0, 5, 12, 23] {
        bytes(format!("cut inside the header at {cut}"), j[..cut].to_vec(), false);
    }
    // Records to drop, duplicate and swap: all of them in a small journal,
    // else the first, the last and a random sample (bounded run time).
    let mut picked: Vec<usize> = (0..frames).collect();
    if frames > MAX_PICKED {
        rng.shuffle(&mut picked[1..frames - 1]);
        picked.truncate(MAX_PICKED - 1);
        picked.push(frames - 1);
        picked.sort_unstable();
    }
    for k in picked {
        bytes(format!("frame {k} dropped"), reframe(j, &starts, (0..frames).filter(|&i| i != k)), false);
        bytes(
            format!("frame {k} duplicated"),
            reframe(j, &starts, (0..frames).flat_map(|i| vec![i; 1 + usize::from(i == k)])),
            false,
        );
        let other = rng.usize(0..frames);
        if other != k {
            let order = (0..frames).map(|i| {
                if i == k {
                    other
                } else if i == other {
                    k
                } else {
                    i
                }
            });
            bytes(format!("frames {k} and {other} swapped"), reframe(j, &starts, order), false);
        }
    }
    for _ in 0..80 {
        let at = rng.usize(0..j.len());
        let mask = rng.u8(1..);
        let mut b = j.clone();
        b[at] ^= mask;
        bytes(format!("byte {at} ^ {mask:#04x}"), b, false);
    }
    for n in [1, 19, 4096, 100_000] {
        let mut b = j.clone();
        b.resize(j.len() + n, 0);
        bytes(format!("{n} zero bytes appended"), b, false);
        let mut b = j.clone();
        b.extend((0..n).map(|_| rng.u8(..)));
        bytes(format!("{n} garbage bytes appended"), b, false);
    }
    out.push(Case {
        what: "40 GiB sparse zero tail".into(),
        journal: Journal::SparseTail(j.len() as u64 + (40 << 30)),
        crash_image: false,
    });
    out.push(Case { what: "journal deleted".into(), journal: Journal::Missing, crash_image: false });
    out
}

#[test]
fn no_damaged_state_directory_answers_short() {
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let built = build(&mut rng);
    let cases = cases(&built, &mut rng);
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for case in &cases {
        for clean in [true, false] {
            if let Err(e) = check(&built, case, clean, &mut tally) {
                let marker = if clean { "clean" } else { "dirty" };
                failures.push(format!("{} (marker {marker}): {e}", case.what));
            }
        }
    }
    // The run marker damaged, the journal intact: it reads as dirty, and
    // nothing was lost.
    for _ in 0..20 {
        let mut damaged = built.clone();
        let at = rng.usize(0..damaged.clean_marker.len());
        damaged.clean_marker[at] ^= rng.u8(1..);
        let case = Case {
            what: format!("run marker byte {at} flipped"),
            journal: Journal::Bytes(built.journal.clone()),
            crash_image: false,
        };
        if let Err(e) = check(&damaged, &case, true, &mut tally) {
            failures.push(format!("{}: {e}", case.what));
        }
    }
    println!(
        "{} cases in {:.1?} (slowest open {:.1?}): {} with damage detected, {} identical, {} crash images, {} refused to open",
        tally.cases,
        started.elapsed(),
        tally.slowest,
        tally.damage,
        tally.identical,
        tally.crash_images,
        tally.refused_open
    );
    assert!(failures.is_empty(), "seed {seed}: {} failures:\n{}", failures.len(), failures.join("\n"));
}

const CHILD_ENV: &str = "CBT_FUZZ_HUGE_TAIL_CHILD";

/// The agent opening a state whose journal has a 40 GiB (sparse) tail, in a
/// child process so its peak memory can be measured alone.
#[test]
fn a_40_gib_tail_opens_in_bounded_memory_and_time() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let dir = Path::new(&dir);
        let started = Instant::now();
        let (log, report) = ChangeLog::open(dir, G, monotonic_ns()).expect("open");
        println!("opened in {:?}: damage {:?}", started.elapsed(), report.damage);
        assert!(report.damage.is_some());
        drop(log);
        return;
    }
    let mut rng = fastrand::Rng::with_seed(seed());
    let built = build(&mut rng);
    let dir = scratch();
    let journal = dir.path().join(JOURNAL);
    fs::write(&journal, &built.journal).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&journal).unwrap();
    file.set_len(built.journal.len() as u64 + (40 << 30)).unwrap();
    file.write_all_at(b"garbage", built.journal.len() as u64 + (20 << 30)).unwrap();
    drop(file);
    fs::write(dir.path().join(MARKER), &built.dirty_marker).unwrap();

    let started = Instant::now();
    // Reaped by wait4 below, which also reports its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_40_gib_tail_opens_in_bounded_memory_and_time", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .spawn()
        .expect("spawn the child");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into the two locals above.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let took = started.elapsed();
    assert_eq!(pid, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child failed: status {status:#x}");
    let peak_mib = usage.ru_maxrss as f64 / 1024.0;
    println!(
        "40 GiB sparse tail: child process (test harness + open + rewrite) took {took:.2?}, peak RSS {peak_mib:.1} MiB"
    );
    // Reading the tail would take minutes and 40 GiB; bounded, it takes
    // milliseconds and the process's own few MiB. Generous limits: no luck.
    assert!(peak_mib < 200.0, "peak RSS {peak_mib:.1} MiB");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let copies: Vec<u64> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert_eq!(copies.len(), 1, "one copy kept");
    assert!(copies[0] <= built.journal.len() as u64 + (80 << 20), "copy of {} bytes", copies[0]);
}
