//! Checks of the accuracy harness itself, without the agent: the truth
//! (image diff), the superset assertion, range application and byte
//! comparison, the scratch filesystem and its point-in-time snapshot
//! images, the freeze that holds writes in flight, and the workloads.
//! If one of these is wrong, the delta tests prove nothing.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use cbt_tests::{
    accuracy::{
        apply_ranges, assert_delta_superset, assert_files_equal, buffered_writer, changed_chunks, compare_files, copy_file, discard,
        discard_mixer, file_churn, fio_random_job, nonzero_chunks, panic_text, snapshot_frozen_copy, snapshot_reflink, sparse_copy,
        unique_name, write_direct, AlignedBuf, Fio, FsKind, HeldWrites, Image, Mount, Ranges, Rng, ScratchFs, Truth, Volume, SECTOR,
    },
    require_root, scratch_dir, RoaringTreemap,
};

/// A file in /dev/shm removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Self {
        Self(scratch_dir().join(unique_name(tag)))
    }

    /// A sparse file of `len` bytes with `data` written at each offset.
    fn with(tag: &str, len: u64, writes: &[(u64, &[u8])]) -> Self {
        let t = Self::new(tag);
        let f = File::create(&t.0).unwrap();
        f.set_len(len).unwrap();
        for (o, d) in writes {
            f.write_all_at(d, *o).unwrap();
        }
        t
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Obviously-correct reference: whole files in memory, zero-extended.
fn naive_diff(a: &Path, b: &Path, g: u64) -> RoaringTreemap {
    let (mut x, mut y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let n = x.len().max(y.len());
    x.resize(n, 0);
    y.resize(n, 0);
    let mut set = RoaringTreemap::new();
    for (i, (p, q)) in x.chunks(g as usize).zip(y.chunks(g as usize)).enumerate() {
        if p != q {
            set.insert(i as u64);
        }
    }
    set
}

fn set(v: &[u64]) -> RoaringTreemap {
    v.iter().copied().collect()
}

fn expect_panic(what: &str, needle: &str, f: impl FnOnce()) {
    let r = catch_unwind(AssertUnwindSafe(f));
    let e = r.err().unwrap_or_else(|| panic!("{what}: expected a failure, it passed"));
    let text = panic_text(&e);
    assert!(text.contains(needle), "{what}: failed, but without {needle:?}: {text}");
    eprintln!("{what}: caught as expected: {:.300}", text);
}

#[test]
fn changed_chunks_on_crafted_images() {
    let mut rng = Rng::new(7);
    let base_data = rng.bytes(1 << 20);
    let len = (1 << 20) + 1000;
    let a = Tmp::with("a", len, &[(0, &base_data)]);
    let b = Tmp::new("b");
    std::fs::copy(&a.0, &b.0).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&b.0).unwrap();
    let flip = |off: u64| {
        let mut x = [0u8];
        f.read_exact_at(&mut x, off).unwrap();
        x[0] ^= 0x5a;
        f.write_all_at(&x, off).unwrap();
    };
    // first byte, last byte of chunk 0, a run straddling chunks 1|2, the
    // very last byte (partial last chunk), a byte in the zero tail.
    for off in [0, 4095, 8190, 8191, 8192, 8193, len - 1, (1 << 20) + 10] {
        flip(off);
    }
    let last = (len - 1) / 4096;
    assert_eq!(changed_chunks(&a.0, &b.0, 4096), set(&[0, 1, 2, 256, last]));
    assert_eq!(changed_chunks(&a.0, &b.0, 512), naive_diff(&a.0, &b.0, 512));
    assert_eq!(changed_chunks(&b.0, &a.0, 65536), naive_diff(&b.0, &a.0, 65536));
    assert!(changed_chunks(&a.0, &a.0, 4096).is_empty());

    // A hole and written zeros are the same bytes.
    let data = rng.bytes(4096);
    let sparse = Tmp::with("sparse", 1 << 20, &[(65536, &data)]);
    let dense = Tmp::with("dense", 1 << 20, &[(0, &vec![0u8; 1 << 20]), (65536, &data)]);
    assert!(changed_chunks(&sparse.0, &dense.0, 512).is_empty());
    assert_eq!(nonzero_chunks(&sparse.0, 4096), set(&[16]));
    assert_eq!(nonzero_chunks(&dense.0, 4096), set(&[16]));

    // Different sizes: the shorter reads as zero-extended.
    let short = Tmp::with("short", 65536, &[(0, &data)]);
    let zero_tail = Tmp::with("zt", 65536 + 8192, &[(0, &data)]);
    assert!(changed_chunks(&short.0, &zero_tail.0, 4096).is_empty(), "a zero tail is no change");
    let data_tail = Tmp::with("dt", 65536 + 8192, &[(0, &data), (65536 + 4096 + 100, b"x")]);
    assert_eq!(changed_chunks(&short.0, &data_tail.0, 4096), set(&[17]));
    assert_eq!(changed_chunks(&data_tail.0, &short.0, 4096), set(&[17]), "symmetric");
    // Truth::between uses the longer length.
    assert_eq!(Truth::between(&short.0, &data_tail.0).len, 65536 + 8192);

    // Random sparse files against the naive reference.
    for round in 0..25 {
        let len = rng.range(1, 6 << 20);
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for _ in 0..rng.range(0, 12) {
            let l = rng.range(1, 300_000);
            writes.push((rng.range(0, len), rng.bytes(l as usize)));
        }
        let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        let x = Tmp::with("rx", len, &refs);
        let y = Tmp::new("ry");
        std::fs::copy(&x.0, &y.0).unwrap();
        let fy = OpenOptions::new().write(true).open(&y.0).unwrap();
        for _ in 0..rng.range(0, 20) {
            let l = rng.range(1, 20_000);
            let d = if rng.chance(30) { vec![0u8; l as usize] } else { rng.bytes(l as usize) };
            fy.write_all_at(&d, rng.range(0, len + 50_000)).unwrap();
        }
        if rng.chance(20) {
            fy.set_len(rng.range(1, len + 100_000)).unwrap();
        }
        for g in [512, 4096, 65536] {
            assert_eq!(changed_chunks(&x.0, &y.0, g), naive_diff(&x.0, &y.0, g), "round {round}, granularity {g}");
        }
    }
}

#[test]
fn superset_assertion_and_restore_catch_a_missing_range() {
    let mut rng = Rng::new(11);
    let len = 4 << 20;
    let base = Tmp::with("base", len, &[(0, &rng.bytes(len as usize))]);
    let target = Tmp::new("target");
    std::fs::copy(&base.0, &target.0).unwrap();
    let f = OpenOptions::new().write(true).open(&target.0).unwrap();
    // One sector in chunk 3 (sector 3*8+5), 10 KiB straddling chunks 100..103, a byte at the end.
    f.write_all_at(&rng.bytes(512), (3 * 8 + 5) * 512).unwrap();
    f.write_all_at(&rng.bytes(10 << 10), 100 * 4096 + 1000).unwrap();
    f.write_all_at(b"!", len - 1).unwrap();
    drop(f);
    let truth = Truth::between(&base.0, &target.0);
    assert_eq!(truth.chunks(4096), set(&[3, 100, 101, 102, 1023]));

    // The exact 4 KiB answer passes; so does an exact sector answer.
    let exact = Ranges::from_chunks(&truth.chunks(4096), 4096, len);
    let c = assert_delta_superset("exact 4 KiB", &exact, &truth);
    assert_eq!(c.true_bytes, 5 * 4096);
    assert_eq!(c.reported_bytes, 5 * 4096);
    assert_delta_superset("exact sectors", &Ranges::from_chunks(&truth.sectors, SECTOR, len), &truth);
    // Everything passes too (over-reporting is allowed).
    let all = Ranges { metadata_type: "VARIABLE_LENGTH".into(), capacity: len, list: vec![(0, len)] };
    assert_eq!(assert_delta_superset("everything", &all, &truth).reported_bytes, len);

    // A missing chunk, a missing sector, a range one byte short: caught.
    let mut missing_chunk = exact.clone();
    missing_chunk.list.remove(0);
    expect_panic("missing chunk", "UNDER-REPORTED", || {
        assert_delta_superset("missing chunk", &missing_chunk, &truth);
    });
    // Sector precision: chunk 3 changed only in its sector 5, so a range
    // that stops one byte short of the chunk's end still covers it...
    let mut short_tail = exact.clone();
    short_tail.list[0].1 -= 1;
    assert_delta_superset("short tail", &short_tail, &truth);
    // ...but one byte short of the changed sector's end does not.
    let mut short = Ranges::from_chunks(&truth.sectors, SECTOR, len);
    assert_eq!(short.list[0], ((3 * 8 + 5) * 512, 512));
    short.list[0].1 -= 1;
    expect_panic("one byte short", "UNDER-REPORTED", || {
        assert_delta_superset("one byte short", &short, &truth);
    });
    let mut sectors = Ranges::from_chunks(&truth.sectors, SECTOR, len);
    sectors.list.pop();
    expect_panic("missing last sector", "UNDER-REPORTED", || {
        assert_delta_superset("missing last sector", &sectors, &truth);
    });
    // Malformed answers.
    let wrong_cap = Ranges { capacity: len + 4096, ..exact.clone() };
    expect_panic("capacity", "malformed", || {
        assert_delta_superset("capacity", &wrong_cap, &truth);
    });
    let mut unordered = exact.clone();
    unordered.list.reverse();
    expect_panic("order", "malformed", || {
        assert_delta_superset("order", &unordered, &truth);
    });
    let mut overlapping = exact.clone();
    overlapping.list[0].1 = overlapping.list[1].0 - overlapping.list[0].0 + 4096; // runs into the next
    expect_panic("overlap", "malformed", || {
        assert_delta_superset("overlap", &overlapping, &truth);
    });
    let past_end = Ranges { list: vec![(len - 4096, 8192)], ..exact.clone() };
    expect_panic("past the end", "malformed", || {
        assert_delta_superset("past the end", &past_end, &truth);
    });
    // Parsing cbtctl's JSON.
    let parsed = Ranges::parse(
        r#"{"block_metadata_type":"VARIABLE_LENGTH","volume_capacity_bytes":4194304,"block_metadata":[{"byte_offset":12288,"size_bytes":4096},{"byte_offset":409600,"size_bytes":12288},{"byte_offset":4190208,"size_bytes":4096}]}"#,
    )
    .unwrap();
    assert_delta_superset("parsed", &parsed, &truth);
    assert!(Ranges::parse("{}").is_err());
    assert!(Ranges::parse("not json").is_err());

    // Restore: base + exact ranges == target; base + ranges minus one != target.
    let out = Tmp::new("out");
    std::fs::copy(&base.0, &out.0).unwrap();
    apply_ranges(&exact, &target.0, &out.0);
    assert_files_equal("restore with the exact delta", &out.0, &target.0);
    let out2 = Tmp::new("out2");
    std::fs::copy(&base.0, &out2.0).unwrap();
    apply_ranges(&missing_chunk, &target.0, &out2.0);
    let e = compare_files(&out2.0, &target.0).expect_err("a missing range must make the restore differ");
    eprintln!("restore with a missing range: {e}");
    expect_panic("restore mismatch", "RESTORE MISMATCH", || assert_files_equal("missing range", &out2.0, &target.0));
}

/// One block of the point-in-time check: pass, index in that pass's
/// permutation, block number, then random filler.
fn stamp(buf: &mut [u8], pass: u64, index: u64, block: u64) {
    buf[0..8].copy_from_slice(&pass.to_le_bytes());
    buf[8..16].copy_from_slice(&index.to_le_bytes());
    buf[16..24].copy_from_slice(&block.to_le_bytes());
}

/// Whether an image is one state the writer went through: the blocks
/// stamped with the latest pass K are exactly the first m blocks of pass
/// K's permutation, and every other block carries pass K-1 (or is still
/// zero when K = 1). Returns (K, m) or why not.
fn consistent_state(image: &Path, perms: &[Vec<u32>]) -> Result<(u64, usize), String> {
    let data = std::fs::read(image).unwrap();
    let n = data.len() / 4096;
    let stamps: Vec<(u64, u64)> = (0..n)
        .map(|b| {
            let blk = &data[b * 4096..b * 4096 + 24];
            let pass = u64::from_le_bytes(blk[0..8].try_into().unwrap());
            let block = u64::from_le_bytes(blk[16..24].try_into().unwrap());
            (pass, if pass == 0 { b as u64 } else { block })
        })
        .collect();
    for (b, &(_, block)) in stamps.iter().enumerate() {
        if block != b as u64 {
            return Err(format!("block {b} holds block {block}'s data"));
        }
    }
    let k = stamps.iter().map(|s| s.0).max().unwrap();
    if k == 0 {
        return Ok((0, 0));
    }
    let perm = &perms[k as usize - 1];
    let latest: Vec<usize> = (0..n).filter(|&b| stamps[b].0 == k).collect();
    let m = latest.len();
    let mut prefix: Vec<usize> = perm[..m].iter().map(|&b| b as usize).collect();
    prefix.sort_unstable();
    if prefix != latest {
        let missing = prefix.iter().filter(|b| stamps[**b].0 != k).count();
        return Err(format!("pass {k}: {m} blocks carry it but they are not the first {m} written ({missing} of those lack it)"));
    }
    if let Some(b) = (0..n).find(|&b| stamps[b].0 != k && stamps[b].0 != k - 1) {
        return Err(format!("block {b} carries pass {} while the image is at pass {k}", stamps[b].0));
    }
    Ok((k, m))
}

/// Writes passes over every block in a random order (O_DIRECT, one at a
/// time) while snapshot images are taken; every reflink image must be a
/// state the volume really went through. A plain copy taken the same way
/// must not be (else the check could not tell).
#[test]
fn reflink_snapshots_are_point_in_time() {
    require_root();
    let fs = ScratchFs::new("pit", 1);
    for direct_io in [true, false] {
        let vol = Volume::new(&fs, if direct_io { "pit-dio" } else { "pit-buf" }, 32, direct_io);
        let blocks = vol.size / 4096;
        let perms: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (perms, stop, f) = (Arc::clone(&perms), Arc::clone(&stop), vol.open_direct());
            let mut rng = Rng::new(99 + direct_io as u64);
            std::thread::spawn(move || {
                let mut buf = AlignedBuf::random(4096, &mut rng);
                let mut pass = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    pass += 1;
                    let mut perm: Vec<u32> = (0..blocks as u32).collect();
                    for i in (1..perm.len()).rev() {
                        perm.swap(i, rng.range(0, i as u64 + 1) as usize);
                    }
                    perms.lock().unwrap().push(perm.clone());
                    for (i, &b) in perm.iter().enumerate() {
                        stamp(&mut buf, pass, i as u64, b as u64);
                        f.write_all_at(&buf, b as u64 * 4096).unwrap();
                    }
                }
                pass
            })
        };
        let mut rng = Rng::new(5);
        let mut states = Vec::new();
        for i in 0..12 {
            std::thread::sleep(Duration::from_millis(rng.range(30, 150)));
            let img = snapshot_reflink(&vol, &format!("pit{i}"));
            let p = perms.lock().unwrap().clone();
            states.push(consistent_state(&img.path, &p).unwrap_or_else(|e| panic!("reflink image {i} (dio {direct_io}) is torn: {e}")));
        }
        // A plain copy while writing: must look torn at least once.
        let mut torn = 0;
        for i in 0..8 {
            std::thread::sleep(Duration::from_millis(rng.range(30, 100)));
            let dst = scratch_dir().join(unique_name(&format!("plain{i}")));
            sparse_copy(&vol.backing, &dst).unwrap();
            let img = Image::adopt(dst);
            let p = perms.lock().unwrap().clone();
            if let Err(e) = consistent_state(&img.path, &p) {
                torn += 1;
                if torn == 1 {
                    eprintln!("plain copy (dio {direct_io}) torn as expected: {e}");
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let passes = writer.join().unwrap();
        eprintln!("dio {direct_io}: {passes} passes of {blocks} blocks; reflink images at (pass, prefix) {states:?}; {torn}/8 plain copies torn");
        assert!(states.iter().any(|&(_, m)| m > 0 && (m as u64) < blocks), "no image caught a pass in progress: {states:?}");
        assert!(torn > 0, "no plain copy was torn: the consistency check has no teeth");
    }
}

/// While the scratch filesystem is frozen, O_DIRECT writes to a volume
/// stay in flight (submitted, not completed) until the thaw, and a copy of
/// the backing file taken meanwhile does not contain them.
#[test]
fn frozen_filesystem_holds_direct_writes_in_flight() {
    require_root();
    let fs = ScratchFs::new("freeze", 1);
    let mut rng = Rng::new(3);
    let vols = [Volume::new(&fs, "held-dio", 64, true), Volume::new(&fs, "held-buf", 64, false)];
    for v in &vols {
        // Data in the first half (allocated blocks); the second half stays a hole.
        let f = v.open_direct();
        for i in 0..32 {
            write_direct(&f, i << 20, 1 << 20, &mut rng);
        }
    }
    let before: Vec<Image> = vols.iter().map(|v| snapshot_reflink(v, "before")).collect();
    let frozen = fs.freeze();
    // Allocated and hole, 4 KiB-unaligned and aligned, apart from each other.
    let ranges = [(3 << 20, 65536), ((10 << 20) + 512, 7168), (40 << 20, 65536), ((50 << 20) + 1536, 512)];
    let held: Vec<HeldWrites> = vols.iter().map(|v| HeldWrites::start(v, &frozen, &ranges, &mut rng)).collect();
    let copies: Vec<Image> = vols.iter().map(|v| snapshot_frozen_copy(v, &frozen, "frozen")).collect();
    std::thread::sleep(Duration::from_millis(300));
    for (h, v) in held.iter().zip(&vols) {
        assert_eq!(h.completed(), 0, "{}: a held write completed while frozen", v.name);
        assert_eq!(v.inflight().1, ranges.len() as u64, "{}: writes in flight", v.name);
    }
    let frozen_for = frozen.since.elapsed();
    let thawed = frozen.thaw();
    for h in held {
        h.join_after(thawed);
    }
    for ((v, b), c) in vols.iter().zip(&before).zip(&copies) {
        assert_files_equal(&format!("{}: frozen copy vs before", v.name), &c.path, &b.path);
        let after = snapshot_reflink(v, "after");
        let truth = Truth::between(&c.path, &after.path);
        let mut expected = RoaringTreemap::new();
        for &(o, l) in &ranges {
            expected.insert_range(o / SECTOR..(o + l) / SECTOR);
        }
        assert_eq!(truth.sectors, expected, "{}: the held writes, and only they, land after the thaw", v.name);
    }
    eprintln!("held 4 writes on each of 2 volumes for {frozen_for:?}; all completed after the thaw");
}

/// Reflink images of a volume differ exactly where the volume was written,
/// discarded or zeroed; the scratch filesystem and loops are cleaned up.
#[test]
fn scratch_images_differ_exactly_by_writes() {
    require_root();
    let mut rng = Rng::new(21);
    let (mnt, scratch_loop, vol_loop);
    {
        let fs = ScratchFs::new("exact", 1);
        let vol = Volume::new(&fs, "exact", 64, true);
        (mnt, scratch_loop, vol_loop) = (fs.mnt().to_path_buf(), fs.device().to_string(), vol.dev.clone());
        let f = vol.open_direct();
        write_direct(&f, 0, 8 << 20, &mut rng);
        f.sync_all().unwrap();
        let used_before = sh_used(fs.mnt());
        let a = snapshot_reflink(&vol, "a");
        let mut expected = RoaringTreemap::new();
        // 512 B-aligned writes that are not 4 KiB-aligned, one straddling.
        for (o, l) in [(512u64, 1024u64), (4096 * 9 - 512, 1024), ((20 << 20) + 1536, 3072)] {
            write_direct(&f, o, l as usize, &mut rng);
            expected.insert_range(o / 512..(o + l) / 512);
        }
        discard(&f, 2 << 20, 1 << 20, false); // data → zeros
        expected.insert_range((2 << 20) / 512..(3 << 20) / 512);
        discard(&f, 4 << 20, 512, true); // one zeroed sector
        expected.insert((4 << 20) / 512);
        discard(&f, 30 << 20, 1 << 20, true); // zeros over a hole: no change
        let b = snapshot_reflink(&vol, "b");
        let truth = Truth::between(&a.path, &b.path);
        assert_eq!(truth.sectors, expected);
        // Reflink images share blocks: the scratch fs holds about one copy.
        let used = sh_used(fs.mnt()) - used_before;
        assert!(used < 2 << 20, "reflink images should share blocks; {used} more bytes used by 2 images of 8 MiB of data");
        let out = Image::adopt({
            let p = fs.unique_path("out");
            copy_file(&a.path, &p);
            p
        });
        apply_ranges(&Ranges::from_chunks(&truth.chunks(4096), 4096, vol.size), &b.path, &out.path);
        assert_files_equal("restore", &out.path, &b.path);
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(mnt.to_str().unwrap()), "{} still mounted", mnt.display());
    let loops = cbt_tests::sh("losetup -a");
    for dev in [&scratch_loop, &vol_loop] {
        assert!(!loops.lines().any(|l| l.starts_with(&format!("{dev}:")) && l.contains("cbtacc-")), "{dev} still attached: {loops}");
    }
}

fn sh_used(dir: &Path) -> u64 {
    let out = cbt_tests::sh(&format!("df -B1 --output=used {} | tail -1", dir.display()));
    out.trim().parse().unwrap()
}

/// Each workload changes a real but partial set of blocks in a few
/// seconds, so a superset check against its truth has something to bite.
#[test]
fn workloads_change_part_of_a_volume() {
    require_root();
    let fs = ScratchFs::new("wl", 2);
    let mut rng = Rng::new(77);
    let check = |name: &str, vol: &Volume, before: &Image, max_percent: f64| {
        let after = snapshot_reflink(vol, "after");
        let truth = Truth::between(&before.path, &after.path);
        let pct = 100.0 * truth.report_bytes() as f64 / vol.size as f64;
        eprintln!("workload {name}: {} sectors, {:.2}% of the volume changed", truth.sectors.len(), pct);
        assert!(!truth.is_empty() && pct < max_percent, "workload {name} changed {pct:.2}%");
    };
    let secs = Duration::from_secs(3);

    let v = Volume::new(&fs, "wl-fio", 128, true);
    let before = snapshot_reflink(&v, "before");
    let fio = Fio::start_checked(&fio_random_job("wl", &v.dev, 0, v.size, "4m", 1));
    std::thread::sleep(secs);
    assert!(Fio::write_ios(&fio.stop()) > 100);
    check("fio", &v, &before, 30.0);

    let v = Volume::new(&fs, "wl-buf", 128, false);
    let before = snapshot_reflink(&v, "before");
    let w = buffered_writer(&v, 0, v.size, rng.fork());
    std::thread::sleep(secs);
    w.stop();
    v.open_buffered().sync_all().unwrap();
    check("buffered", &v, &before, 30.0);

    let v = Volume::new(&fs, "wl-disc", 128, true);
    let f = v.open_direct();
    for i in 0..64 {
        write_direct(&f, i << 20, 1 << 20, &mut rng);
    }
    let before = snapshot_reflink(&v, "before");
    let w = discard_mixer(&v, 0, v.size, rng.fork());
    std::thread::sleep(secs);
    w.stop();
    let after = snapshot_reflink(&v, "after");
    let truth = Truth::between(&before.path, &after.path);
    let zeroed = changed_zeroed(&before.path, &after.path);
    eprintln!("workload discard: {} sectors changed, {zeroed} of them to zeros", truth.sectors.len());
    assert!(zeroed > 0, "discards and write-zeroes changed nothing");
    check("discard", &v, &before, 60.0);

    for kind in [FsKind::Ext4, FsKind::Xfs, FsKind::Btrfs] {
        let v = Volume::new(&fs, &format!("wl-{}", kind.name()), 320, kind.name() != "xfs");
        kind.mkfs(&v.dev);
        let mut m = Mount::new(&v.dev, kind.mount_options());
        let before = snapshot_reflink(&v, "before");
        let (w, stats) = file_churn(&m.dir, 64 << 20, rng.fork());
        std::thread::sleep(secs);
        assert!(!w.is_finished(), "churn ended early");
        w.stop();
        m.unmount();
        eprintln!("churn on {}: {:?}", kind.name(), stats.lock().unwrap());
        check(kind.name(), &v, &before, 60.0);
    }
}

/// Sectors non-zero in `a` and all-zero in `b`.
fn changed_zeroed(a: &Path, b: &Path) -> u64 {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.chunks(512).zip(y.chunks(512)).filter(|(p, q)| p.iter().any(|&c| c != 0) && q.iter().all(|&c| c == 0)).count() as u64
}

/// The harness reads images fast enough for the chain test.
#[test]
fn image_diff_speed() {
    require_root();
    let fs = ScratchFs::new("speed", 1);
    let v = Volume::new(&fs, "speed", 256, false);
    let mut rng = Rng::new(1);
    let f = v.open_direct();
    for i in 0..128 {
        write_direct(&f, i * (2 << 20), 1 << 20, &mut rng);
    }
    let a = snapshot_reflink(&v, "a");
    write_direct(&f, 5 << 20, 4096, &mut rng);
    let b = snapshot_reflink(&v, "b");
    let t = Instant::now();
    let truth = Truth::between(&a.path, &b.path);
    let took = t.elapsed();
    eprintln!("diff of two 256 MiB images (half data): {took:?}");
    assert_eq!(truth.chunks(4096).len(), 1);
    assert!(took < Duration::from_secs(5));
}
