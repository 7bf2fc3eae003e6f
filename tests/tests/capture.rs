//! Capture on real loop devices: every op type, both hook flavors, chunk
//! boundaries, partitions, device reuse, and loss that must become a gap.
//! Truth is what each test wrote (or an image comparison), never the tracker.

use std::time::Duration;

use cbt_agent::{
    capture::Flavor,
    changes::GapScope,
    tracker::{Tracker, TrackerOptions},
};
use cbt_common::EventKind;
use cbt_tests::*;

/// Writes `count` 512-byte sectors of random data at `sector`, O_DIRECT.
fn direct_write(dev: &str, sector: u64, count: u64) {
    sh(&format!("dd if=/dev/urandom of={dev} bs=512 seek={sector} count={count} oflag=direct status=none"));
}

fn kinds_seen(h: &Harness, dev: &LoopDevice) -> [u64; cbt_agent::changes::EVENT_KINDS] {
    h.settled().changes().device(&dev.key()).map(|d| d.events).unwrap_or_default()
}

/// Each op that changes content, issued alone, is captured with exactly its
/// range (a loop device passes bios through unmerged with other writers).
fn each_op_type(flavor: Flavor) {
    let h = Harness::with_flavor(flavor, 4096);
    let dev = LoopDevice::new(&format!("ops-{flavor:?}"), 64);
    let g = 4096;
    let mut expected = RoaringTreemap::new();

    direct_write(&dev.path, 8, 8); // O_DIRECT 4 KiB at 4 KiB
    expected |= chunks(4096, 4096, g);
    sh(&format!("dd if=/dev/urandom of={} bs=4096 seek=100 count=3 conv=fsync,notrunc status=none", dev.path));
    expected |= chunks(100 * 4096, 3 * 4096, g);
    sh(&format!("blkdiscard -o {} -l {} {}", 8 << 20, 1 << 20, dev.path));
    expected |= chunks(8 << 20, 1 << 20, g);
    sh(&format!("blkdiscard -z -o {} -l {} {}", 16 << 20, 65536, dev.path));
    expected |= chunks(16 << 20, 65536, g);
    // fallocate's zero range: the kernel may issue write-zeroes or fall back
    // to writing zero pages; either way the range changed.
    sh(&format!("fallocate -z -o {} -l {} {}", 20 << 20, 8192, dev.path));
    expected |= chunks(20 << 20, 8192, g);

    let captured = h.changed(dev.key());
    assert_superset(&format!("ops ({flavor:?})"), &captured, &expected);
    assert_eq!(captured, expected, "a lone loop device should be captured exactly");
    let kinds = kinds_seen(&h, &dev);
    assert!(kinds[EventKind::Write as usize] >= 2, "writes: {kinds:?}");
    assert!(kinds[EventKind::Discard as usize] >= 1, "discards: {kinds:?}");
    assert!(kinds[EventKind::WriteZeroes as usize] >= 1, "write-zeroes: {kinds:?}");
    assert!(h.gaps_for(dev.key()).is_empty(), "{:?}", h.gaps_for(dev.key()));
    h.assert_no_loss();
}

#[test]
fn each_op_type_btf() {
    each_op_type(Flavor::Btf);
}

#[test]
fn each_op_type_classic_tracepoints() {
    each_op_type(Flavor::Classic);
}

/// Writes that straddle chunk boundaries mark every chunk they touch, at
/// several granularities, and nothing else.
#[test]
fn straddling_writes_at_several_granularities() {
    // (sector, sectors): 1 KiB across the first 4 KiB boundary, one sector
    // at the end of a 64 KiB chunk, 9 KiB across a 64 KiB boundary, one
    // sector exactly on a boundary.
    let writes = [(7u64, 2u64), (127, 1), (250, 18), (1024, 1)];
    for g in [512u64, 4096, 65536] {
        let h = Harness::with_flavor(Flavor::Btf, g);
        let dev = LoopDevice::new(&format!("straddle-{g}"), 16);
        let mut expected = RoaringTreemap::new();
        for (sector, count) in writes {
            direct_write(&dev.path, sector, count);
            expected |= chunks(sector * 512, count * 512, g);
        }
        let captured = h.changed(dev.key());
        assert_superset(&format!("straddling @ {g}"), &captured, &expected);
        assert_eq!(captured, expected, "granularity {g}");
        h.assert_no_loss();
    }
}

/// A partition's writes land on the whole disk at absolute offsets.
#[test]
fn partition_writes_map_to_the_whole_disk() {
    let dev = LoopDevice::with_options("parts", 64, "-P");
    sh(&format!("printf 'label: dos\\nstart=2048, size=20480\\nstart=24576\\n' | sfdisk -q {}", dev.path));
    // This kernel has no partition-table parsers; partx reads the table in
    // user space and declares the partitions with BLKPG, which works anyway.
    sh(&format!("partx -a {}", dev.path));
    let part = format!("{}p2", dev.path);
    let mut waited = 0;
    while !std::path::Path::new(&part).exists() {
        assert!(waited < 50, "{part} did not appear");
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    let start_sector: u64 =
        sh(&format!("cat /sys/block/{0}/{0}p2/start", dev.name())).trim().parse().expect("partition start");
    let h = Harness::start();
    direct_write(&part, 24, 8); // 4 KiB at 12 KiB into p2
    direct_write(&format!("{}p1", dev.path), 0, 1);
    let mut expected = chunks((start_sector + 24) * 512, 4096, 4096);
    expected |= chunks(2048 * 512, 512, 4096);
    let captured = h.changed(dev.key());
    assert_superset("partitions", &captured, &expected);
    assert_eq!(captured, expected);
    h.assert_no_loss();
}

/// A loop number detached and attached to another file is another device
/// instance: it never inherits the old record, in either flavor.
fn reused_number(flavor: Flavor) {
    let h = Harness::with_flavor(flavor, 4096);
    let mut first = LoopDevice::new(&format!("reuse-a-{flavor:?}"), 16);
    let old = first.key();
    direct_write(&first.path, 40, 8); // chunk 5
    assert_eq!(h.changed(old), chunks(5 * 4096, 4096, 4096));
    // Attach another file to the same number, with no other test of this
    // process allocating a loop device in between.
    let file = scratch_dir().join(format!("reuse-b-{flavor:?}-{}.img", std::process::id()));
    std::fs::File::create(&file).unwrap().set_len(16 << 20).unwrap();
    {
        let _allocating = LOOP_ALLOCATION.lock().unwrap_or_else(|e| e.into_inner());
        first.detach();
        sh(&format!("losetup {} {}", first.path, file.display()));
    }
    let new = cbt_agent::devices::Disk::by_name(first.name()).unwrap().key;
    direct_write(&first.path, 72, 8); // chunk 9
    let settled_new = h.changed(new);
    sh(&format!("losetup -d {}", first.path));
    let _ = std::fs::remove_file(&file);

    assert_eq!(new.dev, old.dev, "the same device number was reused");
    assert_ne!(new.diskseq, old.diskseq, "a new instance has a new diskseq");
    assert_eq!(h.changed(old), chunks(5 * 4096, 4096, 4096), "old instance unchanged");
    assert!(settled_new.contains(9), "new instance has its write: {settled_new:?}");
    assert!(!settled_new.contains(5), "new instance must not inherit the old record");
    h.assert_no_loss();
}

#[test]
fn reused_device_number_is_a_new_instance_btf() {
    reused_number(Flavor::Btf);
}

#[test]
fn reused_device_number_is_a_new_instance_classic() {
    reused_number(Flavor::Classic);
}

/// Writes made the instant a device appears (before the agent has looked
/// at it) are captured: mkfs right after attach, checked against images.
#[test]
fn capture_starts_when_the_device_appears() {
    let h = Harness::start();
    let dev = LoopDevice::new("appear", 128);
    let before = dev.image("before"); // all zeroes: the file is new and sparse
    sh(&format!("mkfs.ext4 -q -F {}", dev.path));
    let after = dev.image("after");
    let truth = image_diff(&before, &after, 4096);
    assert!(!truth.is_empty());
    assert_superset("mkfs right after attach", &h.changed(dev.key()), &truth);
    h.assert_no_loss();
    let _ = (std::fs::remove_file(before), std::fs::remove_file(after));
}

/// Events the kernel could not publish (rings full because nobody drained)
/// are counted and become a gap over all devices, covering the writes.
#[test]
fn ring_overflow_becomes_a_gap() {
    require_root();
    let dev = LoopDevice::new("overflow", 64);
    let mut tracker = Tracker::start(&TrackerOptions::default()).expect("tracker");
    let before = cbt_agent::tracker::monotonic_ns();
    // 4 × 16384 slots of rings across 2 CPUs; 80k bios cannot all fit.
    sh(&format!(
        "fio --name=flood --filename={} --rw=randwrite --bs=512 --direct=1 --ioengine=io_uring --iodepth=16 \
         --number_ios=80000 --norandommap --size=64m --output=/dev/null",
        dev.path
    ));
    let after = cbt_agent::tracker::monotonic_ns();
    tracker.poll();
    let loss = tracker.loss().clone();
    assert!(loss.dropped_events > 0, "80k bios without a drain must overflow: {loss:?}");
    let gaps = tracker.changes().gaps();
    let gap = gaps
        .iter()
        .find(|g| g.scope == GapScope::AllDevices && g.reason.contains("overflow"))
        .unwrap_or_else(|| panic!("no overflow gap: {gaps:?}"));
    assert!(gap.from_ns <= before && gap.to_ns >= after, "gap {gap:?} must cover the writes [{before}, {after}]");
    assert!(gap.covers(dev.key()));
}

/// If captured events never reach the record, the kernel's own counters
/// disagree with what was captured and the device gets a gap.
#[test]
fn witness_catches_events_lost_after_capture() {
    require_root();
    let dev = LoopDevice::new("witness", 64);
    let mut tracker = Tracker::start(&TrackerOptions::default()).expect("tracker");
    direct_write(&dev.path, 0, 8);
    // Two samples with nothing moving in between: the witness commits.
    tracker.check().unwrap();
    tracker.check().unwrap();
    let committed = tracker.changes().device(&dev.key()).and_then(|d| d.witness.committed_offset);
    assert!(committed.is_some(), "an idle device must give the witness a reference");
    assert!(tracker.changes().gaps().iter().all(|g| !g.covers(dev.key())), "no loss yet");

    direct_write(&dev.path, 800, 64);
    let lost = tracker.lose_pending_events();
    assert!(lost > 0);
    tracker.check().unwrap();
    assert!(tracker.loss().witness_alarms >= 1, "{:?}", tracker.loss());
    let gaps: Vec<_> = tracker.changes().gaps().iter().filter(|g| g.covers(dev.key())).cloned().collect();
    assert!(
        gaps.iter().any(|g| g.scope == GapScope::Device(dev.key()) && g.reason.contains("more changed sectors")),
        "{gaps:?}"
    );
}

/// The barrier seals use where membarrier is refused (nohz_full kernels):
/// the real syscalls, so a wrong attribute layout fails here.
#[test]
fn seals_can_wait_through_a_map_of_maps_update() {
    require_root();
    let barrier = cbt_agent::capture::ProgramBarrier::map_update().expect("creating the map-of-maps barrier");
    for _ in 0..20 {
        barrier.wait().expect("a map-of-maps update");
    }
}

/// The liveness canary passes while the programs see its writes, and
/// turns every check where they did not into a gap for every device.
#[test]
fn the_canary_proves_the_programs_see_writes() {
    let fs = cbt_tests::accuracy::ScratchFs::new("canary", 1);
    let h = Harness::start();
    let canary = cbt_agent::canary::Canary::in_dir(fs.mnt()).expect("a canary on the scratch filesystem");
    let started = h.settled().canary().map(|(_, ok)| ok);
    assert_eq!(started, None);
    h.settled().set_canary(canary);
    let first = h.settled().canary().expect("set").1;
    std::thread::sleep(Duration::from_millis(300));
    let (_, passed) = h.settled().canary().expect("set");
    assert!(passed > first, "the canary's writes were seen");
    assert!(h.gaps().is_empty(), "{:?}", h.gaps());

    // Looked for on a disk it does not write to: as if unseen.
    let idle = LoopDevice::new("canary-idle", 8);
    let blind = cbt_agent::canary::Canary::in_dir(fs.mnt())
        .expect("canary")
        .misdirected(cbt_agent::devices::Disk::by_name(idle.name()).expect("idle loop device"));
    h.settled().set_canary(blind);
    std::thread::sleep(Duration::from_millis(300));
    let gaps = h.gaps();
    assert!(
        gaps.iter().any(|g| g.scope == GapScope::AllDevices && g.reason.contains("did not see the agent's own write")),
        "{gaps:?}"
    );
}
