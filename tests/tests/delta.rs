//! End-to-end accuracy of `cbtctl delta` and `cbtctl allocated` against
//! snapshot images, each under a real workload running WHILE snapshots are
//! taken. For every consecutive pair (and some non-consecutive ones) the
//! answer must be a superset of the sectors whose bytes differ between the
//! two images, and base image + `cbtctl copy` must equal the target image
//! byte for byte. No faults here: every pair must answer a list.
//!
//! Truth never comes from the tracker: it is the byte comparison of the
//! images (see `cbt_tests::accuracy`). Set `CBT_ACCURACY_BACKEND=oracle`
//! to run these flows without the agent (checks the harness), and
//! `CBT_SEED` to repeat a run.

use std::{
    os::unix::{fs::FileExt, io::AsRawFd},
    time::{Duration, Instant},
};

use cbt_tests::{
    accuracy::{
        buffered_writer, check_allocated, check_answer, check_pair, copy_file, discard, discard_mixer, file_churn, fio_random_job, pairs,
        read_at, snapshot_frozen_copy, write_direct, write_markers, AccuracyLog,
        AgentOptions, Answer, Cbt, Expect, Fio, FsKind, HeldWrites, Image, Mount, Rng, ScratchFs, Snap, Truth, Volume, SECTOR,
    },
    require_root, sh,
};

const MIB: u64 = 1 << 20;

/// Checks the chosen pairs of one volume's snapshots (restore for the
/// consecutive ones) and writes the report line.
fn check_all(cbt: &Cbt, snaps: &[Snap], rng: &mut Rng, log: &mut AccuracyLog) {
    for (i, j) in pairs(snaps.len(), rng) {
        check_pair(cbt, &snaps[i], &snaps[j], Expect::List, j == i + 1 || (i == 0 && j == snaps.len() - 1), log);
    }
}

fn sleep_between(rng: &mut Rng, lo_ms: u64, hi_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.range(lo_ms, hi_ms)));
}

/// Random O_DIRECT writes (fio, 512 B – 64 KiB at 512 B alignment, so most
/// are not 4 KiB-aligned) on two volumes at once, one loop device in
/// direct-I/O mode and one buffered, snapshots every 0.3–1.5 s. Also
/// checks `--starting-offset`, paging with `--max-results`, an unknown
/// handle (NOT_FOUND), a deleted snapshot (never a short list) and
/// `allocated` on the last snapshots.
#[test]
fn odirect_random_writes() {
    require_root();
    let mut rng = Rng::from_env("odirect");
    let fs = ScratchFs::new("odirect", 3);
    let vols = [Volume::new(&fs, "odirect-dio", 256, true), Volume::new(&fs, "odirect-buf", 256, false)];
    let cbt = Cbt::start(&[&vols[0], &vols[1]]);
    let mut snaps: [Vec<Snap>; 2] = [Vec::new(), Vec::new()];
    for (k, v) in vols.iter().enumerate() {
        snaps[k].push(cbt.snapshot(v, &format!("{}-0", v.name)));
    }
    let jobs: Vec<String> = vols.iter().map(|v| fio_random_job(&v.name, &v.dev, 0, v.size, "6m", rng.u64())).collect();
    let fio = Fio::start_checked(&jobs.join(" "));
    for i in 1..=8 {
        sleep_between(&mut rng, 300, 1500);
        for (k, v) in vols.iter().enumerate() {
            snaps[k].push(cbt.snapshot(v, &format!("{}-{i}", v.name)));
        }
    }
    let ios = Fio::write_ios(&fio.stop());
    assert!(ios > 100, "fio wrote only {ios} times");
    for (k, v) in vols.iter().enumerate() {
        snaps[k].push(cbt.snapshot(v, &format!("{}-quiet", v.name)));
    }

    for (k, v) in vols.iter().enumerate() {
        let mut log = AccuracyLog::new(&format!("odirect-{}", if v.direct_io { "dio-loop" } else { "buffered-loop" }));
        check_all(&cbt, &snaps[k], &mut rng, &mut log);
        log.finish();
    }

    let (s, n) = (&snaps[0], snaps[0].len());
    let mut extra = AccuracyLog::new("odirect-options");
    // --starting-offset: everything that changed at or after it.
    let from = vols[0].size / 2 + 3 * 4096;
    let mut truth = Truth::between(&s[1].image.path, &s[n - 1].image.path);
    truth.sectors.remove_range(..from / SECTOR);
    let what = format!("delta {} → {} --starting-offset {from}", s[1].handle, s[n - 1].handle);
    check_answer(&what, cbt.delta_from(&s[1], &s[n - 1], Some(from)), &truth, Expect::List, &mut extra, || {});
    if let Answer::List(r) = cbt.delta_from(&s[1], &s[n - 1], Some(from)) {
        let first = r.list.first().map(|&(o, l)| o + l).unwrap_or(u64::MAX);
        assert!(first > from, "{what}: the first range ends at {first}, before the starting offset");
    }
    // Paging: --max-results 7, following pages from the last range's end.
    let truth = Truth::between(&s[0].image.path, &s[n - 1].image.path);
    let what = format!("delta {} → {} --max-results 7 (paged)", s[0].handle, s[n - 1].handle);
    check_answer(&what, cbt.delta_paged(&s[0], &s[n - 1], 7), &truth, Expect::List, &mut extra, || {});
    // An unknown handle, a volume mismatch.
    match cbt.delta_handles("no-such-snapshot", &s[n - 1].handle) {
        Answer::NotFound(_) => {}
        other => panic!("delta from an unknown snapshot: expected NOT_FOUND, got {other}"),
    }
    match cbt.delta(&s[1], &snaps[1][2]) {
        Answer::List(_) => panic!("delta between snapshots of two different volumes answered a list"),
        other => eprintln!("delta across volumes: {}", other.kind()),
    }
    // A deleted snapshot: a superset, a refusal or NOT_FOUND, never short.
    cbt.delete(&s[2]);
    let truth = Truth::between(&s[2].image.path, &s[3].image.path);
    check_answer("delta from a deleted snapshot", cbt.delta(&s[2], &s[3]), &truth, Expect::ListOrFallbackOrNotFound, &mut extra, || {});
    // Its neighbours still answer.
    check_pair(&cbt, &s[1], &s[3], Expect::List, true, &mut extra);
    extra.finish();

    let mut alloc = AccuracyLog::new("allocated-odirect");
    for volume_snaps in &snaps {
        check_allocated(&cbt, volume_snaps.last().unwrap(), true, &mut alloc);
    }
    alloc.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

/// Buffered writes to the volume's block device (its page cache) at any
/// byte offset, through a shared mapping too, flushed by the kernel or by
/// partial `sync_file_range` at random times: data written before a
/// snapshot reaches the block layer, and the image, only later. A marker
/// phase makes that explicit: markers written before snapshot A are not in
/// A (still dirty), are flushed, and must be in the delta to snapshot C.
#[test]
fn buffered_writes_with_delayed_writeback() {
    require_root();
    let mut rng = Rng::from_env("buffered");
    let fs = ScratchFs::new("buffered", 2);
    let vol = Volume::new(&fs, "buffered", 256, false);
    let marker_start = vol.size - 8 * MIB;
    let cbt = Cbt::start(&[&vol]);
    let mut snaps = vec![cbt.snapshot(&vol, "buf-0")];
    let writer = buffered_writer(&vol, 0, marker_start, rng.fork());
    for i in 1..=3 {
        sleep_between(&mut rng, 500, 1500);
        snaps.push(cbt.snapshot(&vol, &format!("buf-{i}")));
    }

    // Markers: buffered writes at unaligned offsets, left dirty. Each in a
    // slot of its own: an overlapping later marker would overwrite part of
    // an earlier one, which then could not be found whole in any image.
    let dev = vol.open_buffered();
    let mut markers = Vec::new();
    let slot = (vol.size - marker_start) / 16;
    for i in 0..16 {
        let len = rng.range(100, 9000);
        let off = rng.range(marker_start + i * slot, marker_start + (i + 1) * slot - len);
        let data = rng.bytes(len as usize);
        dev.write_all_at(&data, off).unwrap();
        markers.push((off, data));
    }
    let a = cbt.snapshot(&vol, "buf-markers-dirty");
    let flushed_early = markers.iter().filter(|(o, d)| read_at(&a.image.path, *o, d.len()) == *d).count();
    if flushed_early > 0 {
        eprintln!("NOTE: {flushed_early} of 16 markers were written back before snapshot A (a system-wide sync?)");
    }
    snaps.push(a);
    sleep_between(&mut rng, 300, 800);
    snaps.push(cbt.snapshot(&vol, "buf-markers-still-dirty"));
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe {
        libc::sync_file_range(
            dev.as_raw_fd(),
            marker_start as i64,
            8 << 20,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    assert_eq!(rc, 0);
    let c = cbt.snapshot(&vol, "buf-markers-flushed");
    for (o, d) in &markers {
        assert_eq!(read_at(&c.image.path, *o, d.len()), *d, "marker at {o} not in the image after its flush");
    }
    let n = snaps.len();
    snaps.push(c);
    if flushed_early == 0 {
        let t = Truth::between(&snaps[n - 1].image.path, &snaps[n].image.path);
        assert!(markers.iter().all(|(o, d)| t.contains_range(*o, d.len() as u64)), "the flush should make the markers part of the last pair's truth");
    }

    for i in 0..3 {
        sleep_between(&mut rng, 500, 1500);
        snaps.push(cbt.snapshot(&vol, &format!("buf-late-{i}")));
    }
    writer.stop();
    dev.sync_all().unwrap();
    snaps.push(cbt.snapshot(&vol, "buf-synced"));

    let mut log = AccuracyLog::new("buffered-writeback");
    check_all(&cbt, &snaps, &mut rng, &mut log);
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

/// mkfs, mount and file churn (create, append, overwrite, delete, rename,
/// truncate, punch, fsync, syncfs, fstrim, online discard) on the volume,
/// snapshots every 0.5–1.5 s while mounted, then after unmount.
fn fs_churn(kind: FsKind, direct_io: bool) {
    require_root();
    let name = kind.name();
    let mut rng = Rng::from_env(name);
    let fs = ScratchFs::new(name, 2);
    let vol = Volume::new(&fs, &format!("churn-{name}"), 384, direct_io);
    let cbt = Cbt::start(&[&vol]);
    let mut snaps = vec![cbt.snapshot(&vol, &format!("{name}-empty"))];
    kind.mkfs(&vol.dev);
    snaps.push(cbt.snapshot(&vol, &format!("{name}-mkfs")));
    let mut mount = Mount::new(&vol.dev, kind.mount_options());
    snaps.push(cbt.snapshot(&vol, &format!("{name}-mounted")));
    let (churn, stats) = file_churn(&mount.dir, 128 * MIB, rng.fork());
    for i in 0..8 {
        sleep_between(&mut rng, 500, 1500);
        snaps.push(cbt.snapshot(&vol, &format!("{name}-{i}")));
        assert!(!churn.is_finished(), "the churn stopped early");
    }
    churn.stop();
    snaps.push(cbt.snapshot(&vol, &format!("{name}-idle")));
    mount.unmount();
    snaps.push(cbt.snapshot(&vol, &format!("{name}-unmounted")));
    eprintln!("{name} churn: {:?}", stats.lock().unwrap());

    let mut log = AccuracyLog::new(&format!("fs-churn-{name}"));
    check_all(&cbt, &snaps, &mut rng, &mut log);
    log.finish();
    let mut alloc = AccuracyLog::new(&format!("allocated-{name}"));
    check_allocated(&cbt, snaps.last().unwrap(), true, &mut alloc);
    alloc.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

#[test]
fn fs_churn_ext4() {
    fs_churn(FsKind::Ext4, true);
}

#[test]
fn fs_churn_xfs() {
    fs_churn(FsKind::Xfs, false);
}

#[test]
fn fs_churn_btrfs() {
    fs_churn(FsKind::Btrfs, true);
}

/// Writes through partitions of the volume: a DOS table (declared with
/// partx: this kernel parses no tables itself) with ext4 churn on p1 and
/// fio O_DIRECT writes plus write-zeroes on p2. The volume is the whole
/// disk: its deltas must hold the partitions' writes at absolute offsets.
#[test]
fn partition_writes() {
    require_root();
    let mut rng = Rng::from_env("partitions");
    let fs = ScratchFs::new("partitions", 2);
    let vol = Volume::new(&fs, "partitioned", 320, true);
    let cbt = Cbt::start(&[&vol]);
    let mut snaps = vec![cbt.snapshot(&vol, "part-0")];
    sh(&format!("printf 'label: dos\\nstart=2048, size=409600\\nstart=411648\\n' | sfdisk -q {}", vol.dev));
    // sfdisk declares the partitions itself (BLKPG) when it can; else partx.
    let (p1, p2) = (format!("{}p1", vol.dev), format!("{}p2", vol.dev));
    for _ in 0..50 {
        if std::path::Path::new(&p2).exists() {
            break;
        }
        let _ = std::process::Command::new("partx").arg("-a").arg(&vol.dev).output();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::path::Path::new(&p2).exists(), "{p2} did not appear");
    snaps.push(cbt.snapshot(&vol, "part-table"));
    FsKind::Ext4.mkfs(&p1);
    let mut mount = Mount::new(&p1, "discard");
    snaps.push(cbt.snapshot(&vol, "part-mkfs"));
    let (churn, _) = file_churn(&mount.dir, 48 * MIB, rng.fork());
    let fio = Fio::start_checked(&fio_random_job("p2", &p2, 0, 100 * MIB, "3m", rng.u64()));
    let p2f = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
    for i in 0..5 {
        sleep_between(&mut rng, 500, 1500);
        discard(&p2f, rng.aligned(0, 100 * MIB, 512), rng.aligned(512, MIB, 512), true);
        snaps.push(cbt.snapshot(&vol, &format!("part-churn-{i}")));
    }
    fio.stop();
    churn.stop();
    mount.unmount();
    snaps.push(cbt.snapshot(&vol, "part-last"));
    let mut log = AccuracyLog::new("partitions");
    check_all(&cbt, &snaps, &mut rng, &mut log);
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

/// Discards and write-zeroes (ioctls, and the blkdiscard tool) over data
/// and over holes, mixed with O_DIRECT writes.
#[test]
fn discard_and_write_zeroes() {
    require_root();
    let mut rng = Rng::from_env("discard");
    let fs = ScratchFs::new("discard", 2);
    let vol = Volume::new(&fs, "discard", 256, true);
    let cbt = Cbt::start(&[&vol]);
    // Data over about 60% of the volume, so discards change content.
    let f = vol.open_direct();
    for i in 0..vol.size / MIB {
        if rng.chance(60) {
            write_direct(&f, i * MIB, MIB as usize, &mut rng);
        }
    }
    let mut snaps = vec![cbt.snapshot(&vol, "disc-0")];
    let mixer = discard_mixer(&vol, 0, vol.size, rng.fork());
    for i in 1..=8 {
        sleep_between(&mut rng, 500, 1500);
        if i % 3 == 0 {
            let (o, l) = (rng.aligned(0, vol.size - 2 * MIB, 512), rng.aligned(512, 2 * MIB, 512));
            sh(&format!("blkdiscard -o {o} -l {l} {}", vol.dev));
            let (o, l) = (rng.aligned(0, vol.size - 2 * MIB, 512), rng.aligned(512, 2 * MIB, 512));
            sh(&format!("blkdiscard -z -o {o} -l {l} {}", vol.dev));
        }
        snaps.push(cbt.snapshot(&vol, &format!("disc-{i}")));
    }
    mixer.stop();
    // One more: only a discard and a zeroing of known data.
    write_direct(&f, 10 * MIB, MIB as usize, &mut rng);
    write_direct(&f, 20 * MIB, MIB as usize, &mut rng);
    snaps.push(cbt.snapshot(&vol, "disc-known"));
    discard(&f, 10 * MIB + 512, 64 << 10, false);
    discard(&f, 20 * MIB + 1024, 3 * 512, true);
    snaps.push(cbt.snapshot(&vol, "disc-last"));
    let n = snaps.len();
    let t = Truth::between(&snaps[n - 2].image.path, &snaps[n - 1].image.path);
    assert!(t.contains_range(10 * MIB + 512, 64 << 10) && t.contains_range(20 * MIB + 1024, 1536), "discarded data should read as zeros");

    let mut log = AccuracyLog::new("discard-write-zeroes");
    check_all(&cbt, &snaps, &mut rng, &mut log);
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

/// Writes in flight across a cut: the scratch filesystem is frozen, so
/// O_DIRECT writes to the volumes are submitted to their block layer but
/// cannot complete; some are submitted well before `snapshot begin` (the
/// agent seals segments every second here, so their submission lies in a
/// segment that ends before the base's cut window opens, unless the
/// window's margin is more than `HOLD_BEFORE_CUT`), some between begin and
/// commit. The base image is a copy of the backing file taken while frozen
/// (without them); after the thaw they complete and the next snapshot has
/// them. The delta base → next must contain them: a tracker that files a
/// write only under the segment of its submission fails here.
const HOLD_BEFORE_CUT: Duration = Duration::from_secs(3);

#[test]
fn writes_in_flight_across_a_cut() {
    require_root();
    let mut rng = Rng::from_env("inflight");
    let fs = ScratchFs::new("inflight", 2);
    let vols = [Volume::new(&fs, "inflight-dio", 128, true), Volume::new(&fs, "inflight-buf", 128, false)];
    let options = AgentOptions { segment_interval: Some("1s".into()), ..AgentOptions::default() };
    let cbt = Cbt::start_with(&[&vols[0], &vols[1]], options);
    let mut log = AccuracyLog::new("in-flight-across-cut");
    let mut prev: Vec<Snap> = vols.iter().map(|v| cbt.snapshot(v, &format!("{}-0", v.name))).collect();
    for round in 1..=2 {
        // Some background data so the images are not trivial.
        for v in &vols {
            let f = v.open_direct();
            for _ in 0..8 {
                write_direct(&f, rng.aligned(0, v.size - (256 << 10), 512), rng.aligned(512, 256 << 10, 512) as usize, &mut rng);
            }
        }
        let frozen = fs.freeze();
        // Distinct 1 MiB slots, so no two held writes can merge.
        let mut slots: Vec<u64> = (0..128).collect();
        let mut ranges = |n: usize, rng: &mut Rng| -> Vec<(u64, u64)> {
            (0..n)
                .map(|_| {
                    let slot = slots.swap_remove(rng.range(0, slots.len() as u64) as usize);
                    (slot * MIB + rng.aligned(0, 512 << 10, 512), rng.aligned(512, 256 << 10, 512))
                })
                .collect()
        };
        let early: Vec<HeldWrites> = vols.iter().map(|v| HeldWrites::start(v, &frozen, &ranges(4, &mut rng), &mut rng)).collect();
        std::thread::sleep(HOLD_BEFORE_CUT);
        let mut bases = Vec::new();
        let mut held = Vec::new();
        for (v, early) in vols.iter().zip(early) {
            let mut late = None;
            let late_ranges = ranges(2, &mut rng);
            let base = cbt.snapshot_with(v, &format!("{}-{round}-base", v.name), || {
                late = Some(HeldWrites::start(v, &frozen, &late_ranges, &mut rng.fork()));
                snapshot_frozen_copy(v, &frozen, "base")
            });
            assert_eq!(early.completed(), 0, "held writes completed before the thaw");
            bases.push(base);
            held.push(early);
            held.push(late.unwrap());
        }
        let thawed = frozen.thaw();
        let all: Vec<(u64, u64)> = held.iter().flat_map(|h| h.ranges.clone()).collect();
        for h in held {
            h.join_after(thawed);
        }
        for (k, v) in vols.iter().enumerate() {
            let next = cbt.snapshot(v, &format!("{}-{round}-next", v.name));
            let truth = Truth::between(&bases[k].image.path, &next.image.path);
            let mine = &all[k * 6..k * 6 + 6];
            assert!(mine.iter().all(|&(o, l)| truth.contains_range(o, l)), "{}: the held writes must differ between base and next", v.name);
            check_pair(&cbt, &prev[k], &bases[k], Expect::List, true, &mut log);
            check_pair(&cbt, &bases[k], &next, Expect::List, true, &mut log);
            check_pair(&cbt, &prev[k], &next, Expect::List, false, &mut log);
            prev[k] = next;
        }
    }
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

/// A chain of increments (Ceph's diff_continuous): a mixed workload (fio
/// O_DIRECT random writes, buffered writes left for writeback, discards
/// and write-zeroes) runs while a snapshot is taken every 1–4 s; each
/// increment is applied with `cbtctl copy` to a running copy of the first
/// snapshot, and the running copy must equal that snapshot's image byte
/// for byte at every step. `CBT_CHAIN_INCREMENTS` overrides the count (30).
#[test]
fn chain_of_increments() {
    require_root();
    let increments: usize = std::env::var("CBT_CHAIN_INCREMENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let mut rng = Rng::from_env("chain");
    let fs = ScratchFs::new("chain", 3);
    let vol = Volume::new(&fs, "chain", 256, true);
    let cbt = Cbt::start(&[&vol]);
    let s0 = cbt.snapshot(&vol, "chain-0");
    let running = Image::adopt({
        let p = fs.unique_path("running.img");
        copy_file(&s0.image.path, &p);
        p
    });
    let fio = Fio::start_checked(&fio_random_job("chain", &vol.dev, 0, 160 * MIB, "2m", rng.u64()));
    let buffered = buffered_writer(&vol, 160 * MIB, 208 * MIB, rng.fork());
    let mixer = discard_mixer(&vol, 208 * MIB, vol.size, rng.fork());
    let mut log = AccuracyLog::new("chain");
    let mut kept: Vec<Snap> = Vec::new();
    let mut prev = s0;
    let started = Instant::now();
    for k in 1..=increments {
        let interval = rng.duration(Duration::from_secs(1), Duration::from_secs(4));
        let since = prev.taken.elapsed();
        if interval > since {
            std::thread::sleep(interval - since);
        }
        let snap = cbt.snapshot(&vol, &format!("chain-{k}"));
        let outcome = check_pair(&cbt, &prev, &snap, Expect::List, false, &mut log);
        cbt.copy(&prev, &snap, &running.path);
        cbt_tests::accuracy::assert_files_equal(&format!("chain step {k}: running copy vs {}", snap.handle), &running.path, &snap.image.path);
        eprintln!("chain step {k}/{increments} at {:.1?}: {outcome:?}, running copy == {} (byte for byte)", started.elapsed(), snap.handle);
        let old = std::mem::replace(&mut prev, snap);
        if k == 1 || k % 10 == 0 || kept.is_empty() {
            kept.push(old);
        }
    }
    fio.stop();
    buffered.stop();
    mixer.stop();
    kept.push(prev);
    // Longer spans across the chain.
    let n = kept.len();
    for (i, j) in [(0, n - 1), (0, n / 2), (n / 2, n - 1)] {
        if i < j {
            check_pair(&cbt, &kept[i], &kept[j], Expect::List, i == 0 && j == n - 1, &mut log);
        }
    }
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}

/// `allocated` covers every non-zero sector of the image: on a volume
/// that held data (an ext4 filesystem with files) before the agent
/// started, and on a fresh (all-zero) one. FAILED_PRECONDITION is allowed
/// (the agent may be unable to prove what was there before it started);
/// a short list never.
#[test]
fn allocated_covers_nonzero_blocks() {
    require_root();
    let mut rng = Rng::from_env("allocated");
    let fs = ScratchFs::new("allocated", 2);
    let pre = Volume::new(&fs, "alloc-preexisting", 320, false);
    let fresh = Volume::new(&fs, "alloc-fresh", 256, true);
    FsKind::Ext4.mkfs(&pre.dev);
    {
        let m = Mount::new(&pre.dev, "defaults");
        for i in 0..20 {
            let len = rng.range(1, 2 << 20) as usize;
            std::fs::write(m.dir.join(format!("old{i}")), rng.bytes(len)).unwrap();
        }
    }
    let cbt = Cbt::start(&[&pre, &fresh]);
    let mut log = AccuracyLog::new("allocated");
    for (i, v) in [&pre, &fresh].into_iter().enumerate() {
        write_markers(v, 0, v.size, 64, 4096, &mut rng);
        let s1 = cbt.snapshot(v, &format!("alloc-{i}-1"));
        let f = v.open_direct();
        for _ in 0..32 {
            write_direct(&f, rng.aligned(0, v.size - MIB, 512), rng.aligned(512, MIB, 512) as usize, &mut rng);
        }
        discard(&f, rng.aligned(0, v.size - MIB, 4096), MIB, false);
        let s2 = cbt.snapshot(v, &format!("alloc-{i}-2"));
        let a1 = check_allocated(&cbt, &s1, true, &mut log);
        let a2 = check_allocated(&cbt, &s2, true, &mut log);
        eprintln!("allocated on {}: {}", v.name, if a1 && a2 { "answered" } else { "fell back (allowed)" });
        check_pair(&cbt, &s1, &s2, Expect::List, true, &mut log);
    }
    log.finish();
    let mut cbt = cbt;
    cbt.assert_healthy();
}
