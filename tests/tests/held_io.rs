//! Writes held across a snapshot's cut where the kernel's own figures do
//! not show them as one piece (issue 8, item 1). Every test here
//! compares point-in-time images byte for byte: a delta must cover every
//! sector whose bytes differ, whatever the tracker believed was in flight.
//!
//! - [`split_bio_held_across_a_cut`] (item 1): one O_DIRECT write, split by
//!   the loop device's queue limits into several requests that each
//!   complete whole, frozen half-way (`fsfreeze` of the scratch filesystem
//!   the loop device's backing file is in), so some requests of one bio
//!   have completed and the rest are held while a snapshot is cut. A
//!   tracker that counts operations per block counts a block holding a
//!   split point down once per request and forgets the held rest.
//!
//! Item 5's held bios (a suspended device-mapper device) cannot be made on
//! this project's machines, whose kernel has no device-mapper; the
//! accounting that keeps them is unit-tested in `changes`.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use cbt_tests::{
    accuracy::{
        restore_and_compare, sector_ranges, snapshot_frozen_copy, AccuracyLog, AgentOptions, AlignedBuf, Answer, Cbt,
        Coverage, Rng, ScratchFs, Snap, Truth, Volume, REPORT_BLOCK, SECTOR,
    },
    require_root, MaxSectorsKb,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The agent's --check-interval in these tests.
const CHECK_INTERVAL: Duration = Duration::from_millis(200);

fn options() -> AgentOptions {
    AgentOptions { check_interval: format!("{}ms", CHECK_INTERVAL.as_millis()), ..AgentOptions::default() }
}

/// `/sys/block/<name>/<file>`, trimmed.
fn sys_block(name: &str, file: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/{name}/{file}"))
        .unwrap_or_else(|e| panic!("/sys/block/{name}/{file}: {e}"))
        .trim()
        .to_string()
}

/// Sectors the kernel has completed writing to a device (stat field 7).
fn written_sectors(name: &str) -> u64 {
    sys_block(name, "stat").split_whitespace().nth(6).and_then(|s| s.parse().ok()).expect("write sectors in stat")
}

/// `(reads, writes)` the kernel counts in flight.
fn kernel_inflight(name: &str) -> (u64, u64) {
    let v: Vec<u64> = sys_block(name, "inflight").split_whitespace().map(|x| x.parse().expect("inflight number")).collect();
    (v[0], v[1])
}

/// The agent's record of one device in `cbtctl status --json`.
fn device_status(cbt: &Cbt, name: &str) -> Option<serde_json::Value> {
    let st = cbt.ctl()?.status().unwrap_or_else(|e| panic!("status: {e}"));
    st["capture"]["devices"].as_array()?.iter().find(|d| d["name"].as_str() == Some(name)).cloned()
}

/// Waits until the agent counts completions for `name`: from then on its
/// in-flight record (not a settle rule that carries everything) decides
/// what a seal carries, which is what these tests exercise.
fn wait_trusted(cbt: &Cbt, name: &str, timeout: Duration) {
    if !cbt.is_agent() {
        return;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let d = device_status(cbt, name);
        if d.as_ref().is_some_and(|d| d["completions_trusted"] == true) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} was not proven settled within {timeout:?}; its record: {d:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How one pair answered, against the images.
struct Verdict {
    what: String,
    truth: Truth,
    /// `None`: FAILED_PRECONDITION.
    reported_bytes: Option<u64>,
    missing: roaring::RoaringTreemap,
}

impl Verdict {
    fn missing_blocks(&self) -> u64 {
        Truth { sectors: self.missing.clone(), len: self.truth.len }.chunks(REPORT_BLOCK).len()
    }

    fn short(&self) -> bool {
        !self.missing.is_empty()
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let changed = self.truth.chunks(REPORT_BLOCK).len();
        match self.reported_bytes {
            None => write!(f, "{}: FAILED_PRECONDITION ({changed} 4 KiB blocks changed)", self.what),
            Some(r) if self.short() => {
                let first: Vec<String> = sector_ranges(&self.missing, 4).iter().map(|(s, e)| format!("[{s}, {e})")).collect();
                write!(
                    f,
                    "{}: UNDER-REPORTED {} of {changed} changed 4 KiB blocks ({} sectors; {r} bytes reported), first missing bytes {}",
                    self.what,
                    self.missing_blocks(),
                    self.missing.len(),
                    first.join(" ")
                )
            }
            Some(r) => write!(f, "{}: superset ({r} bytes reported, {changed} 4 KiB blocks changed)", self.what),
        }
    }
}

/// Asks `delta base target` and compares it with the images, without
/// panicking on a short list (the caller decides, after every round, so a
/// failing run reports all it found). `fallback_ok`: FAILED_PRECONDITION
/// is allowed; anything else but a list panics at once.
fn judge(cbt: &Cbt, base: &Snap, target: &Snap, fallback_ok: bool, log: &mut AccuracyLog) -> Verdict {
    let what = format!("delta {} → {}", base.handle, target.handle);
    let truth = Truth::between(&base.image.path, &target.image.path);
    let v = match cbt.delta(base, target) {
        Answer::List(r) => {
            if let Err(e) = r.validate(truth.len) {
                panic!("{what}: malformed answer: {e}");
            }
            let missing = &truth.sectors - &r.covered(SECTOR);
            if missing.is_empty() {
                log.add(Coverage { reported_bytes: r.bytes(), true_bytes: truth.report_bytes() });
            }
            Verdict { what, truth, reported_bytes: Some(r.bytes()), missing }
        }
        Answer::FailedPrecondition(_) if fallback_ok => {
            log.fallbacks += 1;
            Verdict { what, truth, reported_bytes: None, missing: roaring::RoaringTreemap::new() }
        }
        other => panic!("{what}: expected {}, got {other}", if fallback_ok { "a list or FAILED_PRECONDITION" } else { "a list" }),
    };
    eprintln!("{v}");
    v
}

/// One O_DIRECT write of random bytes on a thread of its own (it blocks
/// while the device holds it).
struct Writer {
    offset: u64,
    data: Vec<u8>,
    started: Instant,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Instant>>>,
}

impl Writer {
    fn start(dev: &str, offset: u64, len: u64, rng: &mut Rng) -> Self {
        let f =
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dev).unwrap_or_else(|e| panic!("opening {dev} O_DIRECT: {e}"));
        let buf = AlignedBuf::random(len as usize, rng);
        let data = buf.to_vec();
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            let r = f.write_all_at(&buf, offset);
            d.store(true, Ordering::SeqCst);
            r.map(|()| Instant::now())
        });
        Self { offset, data, started: Instant::now(), done, thread: Some(thread) }
    }

    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits for the write, which must succeed; returns how long it took.
    fn join(mut self) -> Duration {
        let r = self.thread.take().unwrap().join().expect("writer thread panicked");
        let finished = r.unwrap_or_else(|e| panic!("O_DIRECT write of {} at {}: {e}", self.len(), self.offset));
        finished - self.started
    }

    /// Whether an image holds each of its 4 KiB pages.
    fn landed_in(&self, image: &Path) -> Vec<bool> {
        let f = File::open(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        let mut got = vec![0u8; self.data.len()];
        f.read_exact_at(&mut got, self.offset).expect("reading the image");
        got.chunks(PAGE as usize).zip(self.data.chunks(PAGE as usize)).map(|(a, b)| a == b).collect()
    }
}

/// `queue/max_sectors_kb` of each caught round, in turn: requests of one,
/// three and fifteen pages (every block of the 64 KiB counting grid holds
/// split points), 252 KiB, 1000 KiB, and the loop default 1280 KiB (the
/// review's reproduction: requests are then bounded by the 128-segment
/// limit, 512 KiB, or ~1 MiB where the user buffer's pages happen to be
/// contiguous; the odd write offset keeps those split points off the
/// grid). The others are not multiples of 64 KiB.
const MAX_SECTORS_KB: [u64; 6] = [4, 1280, 12, 1000, 60, 252];

/// The write: 32 MiB (the review's reproduction) where requests are a few
/// pages, 128 MiB otherwise. A freeze takes hold only after an RCU grace
/// period (tens of ms on a busy machine), and 32 MiB in requests of 60 KiB
/// or more is often written in ~15 ms, before the freeze can hold any.
fn write_len(max_sectors_kb: u64) -> u64 {
    if max_sectors_kb < 32 {
        32 * MIB
    } else {
        128 * MIB
    }
}
/// Attempts allowed for the freeze to catch the write half-way, per round;
/// each freezes earlier than the one before (the freeze may take hold only
/// after the write has finished).
const ATTEMPTS: u32 = 8;

/// Item 1. A 32 or 128 MiB O_DIRECT write at an odd 4 KiB offset, split into
/// requests at sizes that put split points off the 64 KiB counting grid,
/// is frozen half-way: the scratch filesystem is frozen (FIFREEZE) once the
/// kernel has completed a random part of it, so requests before the freeze
/// completed and the rest of the same bios are held. Snapshot begin, a
/// copy of the backing file (without the held rest), commit; thaw; the
/// next snapshot. The delta base → next must cover every sector that
/// differs, each round (several rounds, different split sizes, offsets and
/// freeze points). On the code before 20d03c4 the block holding the
/// boundary between completed and held requests read "not in flight" and
/// was not carried past the seal.
#[test]
fn split_bio_held_across_a_cut() {
    require_root();
    let started = Instant::now();
    let mut rng = Rng::from_env("split-held");
    let fs = ScratchFs::new("splitheld", 2);
    let vol = Volume::new(&fs, "split-held", 192, false);
    let name = vol.sysfs_name().to_string();
    let cbt = Cbt::start_with(&[&vol], options());
    let mut log = AccuracyLog::new("held-split-bio");
    wait_trusted(&cbt, &name, Duration::from_secs(15));
    let mut prev = cbt.snapshot(&vol, "split-0");
    let mut verdicts: Vec<Verdict> = Vec::new();
    let mut rounds: Vec<String> = Vec::new();
    for (round, &kb) in MAX_SECTORS_KB.iter().enumerate() {
        let limit = MaxSectorsKb::set(&name, kb);
        let mut caught = false;
        for attempt in 0..ATTEMPTS {
            // Odd 4 KiB offsets: bio and split boundaries off the grid.
            let len = write_len(kb);
            let offset = (2 * rng.range(0, (vol.size - len) / (2 * PAGE)) + 1) * PAGE;
            let freeze_after = (rng.aligned(len / 16, len / 4, SECTOR) >> attempt).max(256 * KIB) / SECTOR;
            let before = written_sectors(&name);
            let w = Writer::start(&vol.dev, offset, len, &mut rng);
            let deadline = Instant::now() + Duration::from_secs(20);
            while written_sectors(&name) < before + freeze_after && !w.done() {
                assert!(Instant::now() < deadline, "{}: the write made no progress", vol.dev);
                std::thread::sleep(Duration::from_micros(50));
            }
            let (freeze_at, freezing) = (w.started.elapsed(), Instant::now());
            let frozen = fs.freeze_now();
            let freeze_took = freezing.elapsed();
            // A write that completed before the freeze returns at once.
            std::thread::sleep(Duration::from_millis(50));
            let held = !w.done() && kernel_inflight(&name).1 > 0;
            let tag = format!("split-{round}.{attempt}");
            if !held {
                frozen.thaw();
                let took = w.join();
                eprintln!(
                    "{tag}: the write ({kb} KiB requests) took {took:.1?}, the freeze began {freeze_at:.1?} in and took \
                     {freeze_took:.1?}: it completed before the freeze took hold; again"
                );
                let next = cbt.snapshot(&vol, &format!("{tag}-whole"));
                verdicts.push(judge(&cbt, &prev, &next, false, &mut log));
                prev = next;
                continue;
            }
            let base = cbt.snapshot_with(&vol, &format!("{tag}-base"), || snapshot_frozen_copy(&vol, &frozen, "base"));
            assert!(!w.done(), "{tag}: the held write completed while the filesystem was frozen");
            let in_base = w.landed_in(&base.image.path);
            let landed = in_base.iter().filter(|&&l| l).count();
            let prefix = in_base.iter().take_while(|&&l| l).count() as u64;
            let pages = in_base.len();
            frozen.thaw();
            let took = w.join();
            let next = cbt.snapshot(&vol, &format!("{tag}-next"));
            let boundary = offset + prefix * PAGE;
            let line = format!(
                "{tag}: max_sectors_kb {kb}, write at {offset} ({} KiB into its 64 KiB block), {landed} of {pages} pages landed \
                 before the cut ({prefix} leading; the first held page is {} KiB into its 64 KiB block); the freeze began \
                 {freeze_at:.1?} in and took {freeze_took:.1?}, the write {took:.1?}",
                offset % (64 * KIB) / KIB,
                boundary % (64 * KIB) / KIB
            );
            eprintln!("{line}");
            let into_base = judge(&cbt, &prev, &base, false, &mut log);
            let after = judge(&cbt, &base, &next, false, &mut log);
            let unchanged =
                (0..pages as u64).filter(|&p| !in_base[p as usize] && !after.truth.contains_range(offset + p * PAGE, PAGE)).count();
            assert_eq!(
                unchanged, 0,
                "{tag}: {unchanged} held pages of the write do not differ between base and next: the images are wrong"
            );
            if !into_base.short() && !after.short() {
                restore_and_compare(&cbt, &base, &next);
            }
            rounds.push(format!("{line}: {} missed", after.missing_blocks()));
            verdicts.push(into_base);
            verdicts.push(after);
            prev = next;
            caught = true;
            break;
        }
        drop(limit);
        assert!(caught, "round {round}: in {ATTEMPTS} attempts the freeze never caught the write ({kb} KiB requests) half-way");
    }
    eprintln!("split-held rounds:\n  {}", rounds.join("\n  "));
    let short: Vec<String> = verdicts.iter().filter(|v| v.short()).map(|v| v.to_string()).collect();
    let missed: u64 = verdicts.iter().map(Verdict::missing_blocks).sum();
    assert!(
        short.is_empty(),
        "{} of {} pairs UNDER-REPORTED, {missed} 4 KiB blocks in all:\n  {}",
        short.len(),
        verdicts.len(),
        short.join("\n  ")
    );
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
    eprintln!("split-held: {:.1?}", started.elapsed());
}
