//! The in-flight accounting against what the kernel really emits: each test
//! records a real workload on a loop device with tracefs and replays the
//! recording through the agent's accounting under many drain schedules
//! (see cbt_tests::kernel_trace). A block truly in flight that the
//! accounting does not count would be dropped from the carry at a seal:
//! a write in flight across a cut missing from the next delta.

use cbt_tests::{
    kernel_trace::{replay_as_drained, Recording, TraceEvent, Traced},
    sh, LoopDevice, MaxSectorsKb,
};

/// Replays under this many drain schedules, from a printed seed.
const SCHEDULES: usize = 40;

fn record(dev: &LoopDevice, workload: impl FnOnce()) -> Vec<TraceEvent> {
    let rdev =
        std::fs::read_to_string(format!("/sys/block/{}/dev", dev.name())).expect("dev number");
    let (major, minor) = rdev.trim().split_once(':').expect("major:minor");
    let recording = Recording::start(dev.name(), major.parse().unwrap(), minor.parse().unwrap());
    workload();
    sh("sync");
    // Let the last completions be recorded.
    std::thread::sleep(std::time::Duration::from_millis(100));
    recording.finish()
}

fn replay_all(name: &str, events: &[TraceEvent]) {
    let count = |f: fn(&Traced) -> bool| events.iter().filter(|e| f(&e.what)).count();
    let submitted = count(|w| matches!(w, Traced::Submitted { .. }));
    let completed = count(|w| matches!(w, Traced::Completed { .. }));
    let splits = count(|w| matches!(w, Traced::Split));
    assert!(
        submitted > 0 && completed > 0,
        "{name}: nothing recorded ({submitted} submissions, {completed} completions)"
    );
    let seed = std::env::var("CBT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{name}: {submitted} submissions, {completed} completions, {splits} splits; seed {seed} (CBT_SEED)");
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..SCHEDULES {
        replay_as_drained(events, &mut rng);
    }
}

/// Large O_DIRECT writes split into requests at points that are not on
/// the 64 KiB counting grid: the review's case (one 2 MiB bio becoming
/// requests of 1048 and 1024 sectors).
#[test]
fn split_bios_complete_as_several_requests() {
    let dev = LoopDevice::new("replay-split", 256);
    // An odd request size moves every split point off the counting grid.
    let _limit = MaxSectorsKb::set(dev.name(), 84);
    let events = record(&dev, || {
        for (i, offset_kib) in [4u64, 12, 68, 1024 + 4, 4096 + 36].into_iter().enumerate() {
            sh(&format!(
                "dd if=/dev/urandom of={} bs=2M count=2 oflag=direct,seek_bytes seek={} status=none",
                dev.path,
                (offset_kib << 10) + ((i as u64) << 23)
            ));
        }
        // Overlapping writes in flight together, across split points.
        sh(&format!(
            "fio --name=overlap --filename={} --direct=1 --ioengine=io_uring --iodepth=16 --rw=randwrite \
             --bsrange=4k-1m --size=8m --offset=0 --io_size=64m --numjobs=2 --group_reporting --output=/dev/null",
            dev.path
        ));
    });
    assert!(
        events.iter().any(|e| e.what == Traced::Split),
        "the workload must split bios"
    );
    replay_all("split", &events);
}

/// Small random writes that the queue merges into larger requests, from
/// two CPUs, completing out of order.
#[test]
fn merged_writes_and_discards() {
    let dev = LoopDevice::new("replay-merge", 256);
    let events = record(&dev, || {
        sh(&format!(
            "fio --name=merge --filename={} --ioengine=libaio --direct=1 --iodepth=32 --rw=randwrite \
             --bs=4k --size=32m --io_size=48m --numjobs=2 --group_reporting --output=/dev/null",
            dev.path
        ));
        // Buffered writes left for writeback, which merges them.
        sh(&format!(
            "dd if=/dev/urandom of={} bs=64k count=200 seek=100 status=none",
            dev.path
        ));
        sh(&format!("blkdiscard -o 1048576 -l 4194304 {}", dev.path));
        sh(&format!("blkdiscard -z -o 8388608 -l 1048576 {}", dev.path));
    });
    replay_all("merge", &events);
}
