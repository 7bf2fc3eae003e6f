//! Faults injected while a workload runs and snapshots are taken. Every
//! pair must end in a superset or FAILED_PRECONDITION (exit 3) — never a
//! short list — and the agent must keep serving pairs that do not touch
//! the fault. Writes made while the agent cannot see them go to a region
//! the workload never touches, so a list that forgot them is caught.
//!
//! With `CBT_ACCURACY_BACKEND=oracle` the fault hooks are no-ops (the
//! flows, workloads and checks still run).

use std::time::{Duration, Instant};

use cbt_tests::{
    accuracy::{
        check_pair, fio_random_job, flip_middle, pairs, truncate_half, write_markers, AccuracyLog, Answer, Cbt, ClockJump,
        Expect, Fio, Outcome, Rng, ScratchFs, Snap, Volume,
    },
    require_root,
};

const MIB: u64 = 1 << 20;

/// A snapshot committed at least this long before a kill -9 must survive
/// it (the agent's segment interval is 2 s by default): its pairs must
/// still answer a list. One committed later may also answer exit 3 or 4.
const DURABLE_AFTER: Duration = Duration::from_secs(3);

/// After a restart or SIGCONT, the first snapshot whose pairs must answer a
/// list is taken at least this late, so its cut window (which the agent may
/// widen by a margin) cannot touch the fault's gap.
const SETTLE: Duration = Duration::from_secs(2);

fn sleep_between(rng: &mut Rng, lo_ms: u64, hi_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.range(lo_ms, hi_ms)));
}

/// Checks one pair and prints a one-line verdict.
fn judge(cbt: &Cbt, snaps: &[Snap], i: usize, j: usize, expect: Expect, log: &mut AccuracyLog) -> Outcome {
    let restore = j == i + 1;
    let o = check_pair(cbt, &snaps[i], &snaps[j], expect, restore, log);
    eprintln!("pair {} → {} ({expect:?}): {o:?}", snaps[i].handle, snaps[j].handle);
    o
}

/// kill -9 at random points of a workload with snapshots (once at a random
/// moment 0–5 s after the last commit, once between `snapshot begin` and
/// `snapshot commit`), then a restart on the same state dir. Pairs within
/// one life of the agent answer lists (those committed shortly before a
/// kill may refuse); pairs spanning a kill answer a superset (including
/// what was written while it was down) or exit 3; the abandoned snapshot
/// (begun, never committed) never answers a list.
#[test]
fn agent_kill9_and_restart() {
    require_root();
    let mut rng = Rng::from_env("kill9");
    let fs = ScratchFs::new("kill9", 2);
    let vol = Volume::new(&fs, "kill9", 256, true);
    let down = vol.size - 16 * MIB;
    let mut cbt = Cbt::start(&[&vol]);
    let fio = Fio::start_checked(&fio_random_job("kill9", &vol.dev, 0, down, "4m", rng.u64()));
    let mut snaps: Vec<Snap> = Vec::new();
    let mut life: Vec<usize> = Vec::new();
    let mut kills: Vec<Instant> = Vec::new();
    let take = |cbt: &Cbt, rng: &mut Rng, snaps: &mut Vec<Snap>, life: &mut Vec<usize>, epoch: usize| {
        sleep_between(rng, 300, 1200);
        let n = snaps.len();
        snaps.push(cbt.snapshot(&vol, &format!("kill9-{n}")));
        life.push(epoch);
    };
    // Two snapshots surely durable by the kill, two maybe not.
    for k in 0..4 {
        if k == 2 {
            std::thread::sleep(DURABLE_AFTER);
        }
        take(&cbt, &mut rng, &mut snaps, &mut life, 0);
    }

    // Kill 1: at a random moment after the last commit, fio still writing.
    sleep_between(&mut rng, 0, 5000);
    kills.push(Instant::now());
    if let Some(a) = cbt.agent_mut() {
        a.kill9();
    }
    let lost1 = write_markers(&vol, down, down + 8 * MIB, 32, 4096, &mut rng);
    sleep_between(&mut rng, 500, 1500);
    // A restarted agent answers only once it has seen the device with
    // nothing pending from before it attached: let the device be still.
    fio.pause();
    if let Some(a) = cbt.agent_mut() {
        a.restart();
    }
    std::thread::sleep(SETTLE);
    fio.resume();
    for _ in 0..3 {
        take(&cbt, &mut rng, &mut snaps, &mut life, 1);
    }

    // Kill 2: between begin and commit (the snapshot is abandoned).
    sleep_between(&mut rng, 0, 1500);
    let abandoned = "kill9-abandoned".to_string();
    if let Some(c) = cbt.ctl() {
        c.begin(&vol.name);
    }
    sleep_between(&mut rng, 0, 100);
    kills.push(Instant::now());
    if let Some(a) = cbt.agent_mut() {
        a.kill9();
    }
    let lost2 = write_markers(&vol, down + 8 * MIB, vol.size, 32, 4096, &mut rng);
    sleep_between(&mut rng, 200, 1000);
    fio.pause();
    if let Some(a) = cbt.agent_mut() {
        a.restart();
    }
    std::thread::sleep(SETTLE);
    fio.resume();
    for _ in 0..3 {
        take(&cbt, &mut rng, &mut snaps, &mut life, 2);
    }
    fio.stop();
    eprintln!("kill9: {} + {} marker blocks written while the agent was down", lost1.len(), lost2.len());

    let mut log = AccuracyLog::new("fault-kill9");
    let n = snaps.len();
    let mut chosen = pairs(n, &mut rng);
    chosen.extend([(0, 3), (1, 5), (4, 6), (2, 8), (3, 4), (6, 7), (0, n - 1)]);
    chosen.sort_unstable();
    chosen.dedup();
    let mut summary = Vec::new();
    for (i, j) in chosen {
        let expect = if life[i] != life[j] {
            Expect::ListOrFallback
        } else if life[i] < kills.len() && kills[life[i]].saturating_duration_since(snaps[j].taken) < DURABLE_AFTER {
            Expect::ListOrFallbackOrNotFound
        } else {
            Expect::List
        };
        summary.push(format!("{i}→{j} {expect:?} {:?}", judge(&cbt, &snaps, i, j, expect, &mut log)));
    }
    let last = snaps.last().unwrap();
    match cbt.delta_handles(&abandoned, &last.handle) {
        Answer::List(_) => panic!("a snapshot begun but never committed answered a list"),
        other => eprintln!("abandoned snapshot: {}", other.kind()),
    }
    eprintln!("kill9 outcomes: {}", summary.join("; "));
    log.finish();
    cbt.assert_healthy();
}

/// The agent pins its capture: a SIGTERM stop and a kill -9 while writes
/// go on (and more land while it is down) are taken over by the next agent,
/// so every pair spanning them answers a superset list — never exit 3. Once
/// the pins are released (`cbt-agent release`), the downtime is a gap again.
#[test]
fn restarts_take_over_the_pinned_capture() {
    require_root();
    let mut rng = Rng::from_env("takeover");
    let fs = ScratchFs::new("takeover", 2);
    let vol = Volume::new(&fs, "takeover", 256, true);
    let down = vol.size - 32 * MIB;
    let mut cbt = Cbt::start(&[&vol]);
    // Light enough that what is written between the last seal and the
    // restart fits in the rings (8192 events per CPU).
    let fio = Fio::start_checked(&fio_random_job("takeover", &vol.dev, 0, down, "1m", rng.u64()));
    let mut snaps: Vec<Snap> = Vec::new();
    let take = |cbt: &Cbt, rng: &mut Rng, snaps: &mut Vec<Snap>| {
        sleep_between(rng, 300, 900);
        let n = snaps.len();
        snaps.push(cbt.snapshot(&vol, &format!("takeover-{n}")));
    };
    let mut region = down;
    let mut markers = |rng: &mut Rng| {
        let written = write_markers(&vol, region, region + 8 * MIB, 16, 4096, rng);
        region += 8 * MIB;
        written
    };
    take(&cbt, &mut rng, &mut snaps);
    take(&cbt, &mut rng, &mut snaps);
    // 1: clean stop and start, writes going on throughout.
    if let Some(a) = cbt.agent_mut() {
        a.terminate();
    }
    markers(&mut rng);
    if let Some(a) = cbt.agent_mut() {
        a.restart();
    }
    take(&cbt, &mut rng, &mut snaps);
    // 2: kill -9 some time after the last seal.
    sleep_between(&mut rng, 0, 3000);
    if let Some(a) = cbt.agent_mut() {
        a.kill9();
    }
    markers(&mut rng);
    sleep_between(&mut rng, 200, 1000);
    if let Some(a) = cbt.agent_mut() {
        a.restart();
    }
    take(&cbt, &mut rng, &mut snaps);
    take(&cbt, &mut rng, &mut snaps);
    // 3: released while stopped: a new capture, and a gap.
    if let Some(a) = cbt.agent_mut() {
        a.terminate();
        a.release();
    }
    markers(&mut rng);
    if let Some(a) = cbt.agent_mut() {
        a.restart();
    }
    take(&cbt, &mut rng, &mut snaps);
    fio.stop();

    let mut log = AccuracyLog::new("fault-restart-takeover");
    for (i, j) in [(0, 1), (1, 2), (2, 3), (1, 3), (0, 4), (3, 4)] {
        judge(&cbt, &snaps, i, j, Expect::List, &mut log);
    }
    let released = judge(&cbt, &snaps, 4, 5, Expect::ListOrFallback, &mut log);
    if cbt.is_agent() {
        assert_eq!(released, Outcome::FellBack, "after release the restart is a new capture: the downtime is a gap");
    }
    log.finish();
    cbt.assert_healthy();
}

/// The agent is stopped (SIGSTOP) while a burst of O_DIRECT writes (far
/// more events than its per-CPU rings hold) runs, then marker writes land
/// in a region the burst never touched; after SIGCONT, a pair spanning the
/// stop answers exit 3 or a superset that includes the markers. A pair
/// taken after the agent caught up answers a list.
#[test]
fn ring_overflow_while_agent_stopped() {
    require_root();
    let mut rng = Rng::from_env("overflow");
    let fs = ScratchFs::new("overflow", 2);
    let vol = Volume::new(&fs, "overflow", 512, true);
    let half = vol.size / 2;
    let mut cbt = Cbt::start(&[&vol]);
    let mut snaps = vec![cbt.snapshot(&vol, "ovf-0")];
    write_markers(&vol, 0, half, 8, 4096, &mut rng);
    snaps.push(cbt.snapshot(&vol, "ovf-1"));
    std::thread::sleep(DURABLE_AFTER);

    if let Some(a) = cbt.agent_mut() {
        a.sigstop();
    }
    let stopped = Instant::now();
    // One ring of 8192 events per CPU: the burst must be several times that.
    let target = 4 * 8192 * std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(2);
    let report = Fio::run(&format!(
        "--name=burst --filename={} --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite --bs=4k \
         --offset=0 --size={half} --norandommap --randrepeat=0 --time_based --runtime=3",
        vol.dev
    ));
    let ios = Fio::write_ios(&report);
    let markers = write_markers(&vol, half, vol.size, 256, 4096, &mut rng);
    if let Some(a) = cbt.agent_mut() {
        a.sigcont();
    }
    eprintln!("overflow: agent stopped {:.1?}; burst of {ios} writes, then {} marker writes", stopped.elapsed(), markers.len());
    assert!(ios >= target, "the burst made only {ios} writes (wanted {target}): too few to overflow the rings");
    std::thread::sleep(SETTLE);
    snaps.push(cbt.snapshot(&vol, "ovf-2"));
    write_markers(&vol, 0, half, 16, 4096, &mut rng);
    sleep_between(&mut rng, 300, 800);
    snaps.push(cbt.snapshot(&vol, "ovf-3"));
    if let Some(c) = cbt.ctl() {
        if let Ok(st) = c.status() {
            eprintln!("overflow: status gaps: {}", st["gaps"]);
        }
    }

    let mut log = AccuracyLog::new("fault-ring-overflow");
    let spanning = judge(&cbt, &snaps, 1, 2, Expect::ListOrFallback, &mut log);
    if cbt.is_agent() && matches!(spanning, Outcome::Listed(..)) {
        eprintln!("NOTE: the pair spanning the stop answered a (superset) list: the rings did not overflow, or the agent knew what was lost");
    }
    judge(&cbt, &snaps, 0, 2, Expect::ListOrFallback, &mut log);
    judge(&cbt, &snaps, 0, 3, Expect::ListOrFallback, &mut log);
    judge(&cbt, &snaps, 0, 1, Expect::List, &mut log);
    judge(&cbt, &snaps, 2, 3, Expect::List, &mut log);
    log.finish();
    cbt.assert_healthy();
}

/// The wall clock jumps forward by an hour between base and target, and
/// back (restored) before the next snapshot. Writes right after each jump
/// go to a region nothing else writes. Every pair: a superset or exit 3.
#[test]
fn wall_clock_jump() {
    require_root();
    let mut rng = Rng::from_env("clock");
    let fs = ScratchFs::new("clock", 2);
    let vol = Volume::new(&fs, "clock", 256, true);
    let quiet = vol.size - 16 * MIB;
    let mut cbt = Cbt::start(&[&vol]);
    let fio = Fio::start_checked(&fio_random_job("clock", &vol.dev, 0, quiet, "4m", rng.u64()));
    let mut snaps = vec![cbt.snapshot(&vol, "clock-0")];
    sleep_between(&mut rng, 500, 1200);
    snaps.push(cbt.snapshot(&vol, "clock-1"));
    {
        let jump = ClockJump::shift(3600);
        write_markers(&vol, quiet, quiet + 4 * MIB, 16, 4096, &mut rng);
        sleep_between(&mut rng, 300, 800);
        snaps.push(cbt.snapshot(&vol, "clock-2-ahead"));
        write_markers(&vol, quiet + 4 * MIB, quiet + 8 * MIB, 16, 4096, &mut rng);
        jump.restore();
    }
    write_markers(&vol, quiet + 8 * MIB, quiet + 12 * MIB, 16, 4096, &mut rng);
    sleep_between(&mut rng, 300, 800);
    snaps.push(cbt.snapshot(&vol, "clock-3-back"));
    sleep_between(&mut rng, 500, 1200);
    snaps.push(cbt.snapshot(&vol, "clock-4"));
    fio.stop();

    let mut log = AccuracyLog::new("fault-clock-jump");
    for (i, j) in [(0, 1), (1, 2), (2, 3), (3, 4), (1, 3), (0, 4), (2, 4)] {
        judge(&cbt, &snaps, i, j, Expect::ListOrFallback, &mut log);
    }
    if log.fallbacks > 0 {
        eprintln!("NOTE: {} clock-jump pairs fell back to a full backup", log.fallbacks);
    }
    log.finish();
    cbt.assert_healthy();
}

/// The agent is stopped cleanly (SIGTERM), writes land while it is down,
/// the largest file in its state dir is damaged (bytes inverted in the
/// middle; the second time, cut to half), and it is restarted: it must
/// start and serve, must not panic, pairs touching the damage or the
/// downtime answer a superset, exit 3 or exit 4 (records lost) — never a
/// short list — and pairs after the restart answer lists.
#[test]
fn damaged_state_file() {
    require_root();
    let mut rng = Rng::from_env("damage");
    let fs = ScratchFs::new("damage", 2);
    let vol = Volume::new(&fs, "damage", 256, true);
    let quiet = vol.size - 16 * MIB;
    let mut cbt = Cbt::start(&[&vol]);
    let fio = Fio::start_checked(&fio_random_job("damage", &vol.dev, 0, quiet, "4m", rng.u64()));
    let mut snaps: Vec<Snap> = Vec::new();
    for i in 0..3 {
        sleep_between(&mut rng, 300, 1000);
        snaps.push(cbt.snapshot(&vol, &format!("dmg-{i}")));
    }
    std::thread::sleep(DURABLE_AFTER);

    let mut log = AccuracyLog::new("fault-damaged-state");
    let lenient = Expect::ListOrFallbackOrNotFound;
    let mut outcomes = Vec::new();
    // Before any damage, everything answers.
    for (i, j) in [(0, 1), (1, 2)] {
        outcomes.push(format!("{i}→{j} {:?}", judge(&cbt, &snaps, i, j, Expect::List, &mut log)));
    }
    for round in 0..2u64 {
        if let Some(a) = cbt.agent_mut() {
            let st = a.terminate();
            assert!(st.success(), "the agent exited {st} on SIGTERM\n{}", a.log_tail(30));
        }
        let lo = quiet + round * 8 * MIB;
        write_markers(&vol, lo, lo + 8 * MIB, 32, 4096, &mut rng);
        if let Some(a) = cbt.agent_mut() {
            let (file, len) = a.largest_state_file().unwrap_or_else(|| panic!("nothing in the state dir {}", a.state_dir.display()));
            if round == 0 {
                let (at, n) = flip_middle(&file, 64);
                eprintln!("damage: inverted {n} bytes at {at} of {} ({len} bytes)", file.display());
            } else {
                let half = truncate_half(&file);
                eprintln!("damage: cut {} from {len} to {half} bytes", file.display());
            }
            fio.pause();
            a.restart();
            a.assert_healthy();
        }
        std::thread::sleep(SETTLE);
        fio.resume();
        let before = snaps.len() - 1;
        for k in 0..2 {
            sleep_between(&mut rng, 300, 1000);
            let n = snaps.len();
            snaps.push(cbt.snapshot(&vol, &format!("dmg-{n}-r{round}-{k}")));
        }
        let (a, b) = (snaps.len() - 2, snaps.len() - 1);
        // Now, before the next damage can take them: the agent serves
        // pairs after the restart, and the pair spanning damage and
        // downtime is a superset (with the markers) or a refusal.
        for (i, j, expect) in [(a, b, Expect::List), (before, a, lenient), (before - 1, b, lenient)] {
            outcomes.push(format!("{i}→{j} {:?}", judge(&cbt, &snaps, i, j, expect, &mut log)));
        }
    }
    fio.stop();

    // After both damages, old pairs and spans of everything: never a
    // short list.
    for (i, j) in [(0, 1), (1, 2), (0, 2), (1, 4), (3, 4), (3, 6), (0, 6)] {
        outcomes.push(format!("{i}→{j} {:?}", judge(&cbt, &snaps, i, j, lenient, &mut log)));
    }
    eprintln!("damaged-state outcomes: {}", outcomes.join("; "));
    log.finish();
    cbt.assert_healthy();
}
