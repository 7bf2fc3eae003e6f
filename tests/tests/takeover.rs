//! A capture pinned in bpffs outlives its agent: the next one takes it over
//! from the last durable checkpoint, re-reading what the dead agent had
//! consumed but not sealed, and what was written while no agent ran.
//! Truth: the sectors each test wrote itself.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use cbt_agent::{
    capture::{CaptureOptions, PinDir},
    changes::GapScope,
    devices::DeviceKey,
    tracker::{Checkpoint, Continuity, Seal, Tracker, TrackerOptions},
};
use cbt_tests::{require_root, sh, LoopDevice, RoaringTreemap};

const G: u64 = 4096;

/// A pin directory of this test's own, released (programs detached) on drop.
struct Pins(PinDir);

impl Pins {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self(PinDir::new(PathBuf::from(format!("/sys/fs/bpf/cbt-tests/takeover-{tag}-{}-{n}", std::process::id()))))
    }

    fn options(&self) -> TrackerOptions {
        TrackerOptions {
            capture: CaptureOptions { pins: Some(self.0.clone()), ..Default::default() },
            granularity: G,
            ..Default::default()
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = self.0.release();
    }
}

fn write_direct(dev: &LoopDevice, offset: u64, len: u64) {
    sh(&format!(
        "dd if=/dev/urandom of={} bs={len} count=1 seek={} oflag=direct,seek_bytes conv=notrunc status=none",
        dev.path, offset
    ));
}

fn chunks_of(offset: u64, len: u64) -> RoaringTreemap {
    (offset / G..(offset + len).div_ceil(G)).collect()
}

fn sealed(seal: &Seal, key: DeviceKey) -> RoaringTreemap {
    seal.changes.iter().filter(|t| t.key == key).map(|t| t.chunks.clone()).fold(RoaringTreemap::new(), |a, b| a | b)
}

/// `ios` 4 KiB O_DIRECT random writes by fio: with `ios` in the tens of
/// thousands, far more events than a CPU's ring holds (8192).
fn burst(dev: &LoopDevice, ios: u32, iodepth: u32) -> Command {
    let mut fio = Command::new("fio");
    fio.args(["--name=burst", "--direct=1", "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--norandommap", "--randrepeat=0"])
        .arg(format!("--filename={}", dev.path))
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--number_ios={ios}"))
        .stdout(Stdio::null());
    fio
}

fn start(pins: &Pins, checkpoint: Option<&Checkpoint>) -> (Tracker, Continuity) {
    Tracker::take_over(&pins.options(), checkpoint).expect("starting the tracker")
}

#[test]
fn a_pinned_capture_is_taken_over_without_losing_a_write() {
    require_root();
    let dev = LoopDevice::new("takeover", 64);
    let key = dev.key();
    let pins = Pins::new("basic");
    let (mut first, continuity) = start(&pins, None);
    assert_eq!(continuity, Continuity::Fresh { why: None });

    write_direct(&dev, 1 << 20, 8192);
    let seal = first.seal().unwrap();
    assert!(sealed(&seal, key).is_superset(&chunks_of(1 << 20, 8192)));
    let checkpoint = seal.checkpoint.expect("a pinned capture checkpoints every seal");

    // Drained by the first agent but never sealed: only the rings still
    // hold it when that agent dies.
    write_direct(&dev, 8 << 20, 4096);
    first.poll();
    drop(first);
    // Written while no agent runs.
    write_direct(&dev, 20 << 20, 65536);
    write_direct(&dev, 33 << 20, 512);

    let (mut second, continuity) = start(&pins, Some(&checkpoint));
    assert_eq!(continuity, Continuity::Resumed { from_ns: checkpoint.cut_ns });
    let seal = second.seal().unwrap();
    let got = sealed(&seal, key);
    for (offset, len) in [(8 << 20, 4096), (20 << 20, 65536), (33 << 20, 512)] {
        assert!(got.is_superset(&chunks_of(offset, len)), "write at {offset} (+{len}) lost across the take-over");
    }
    let gaps = second.new_gaps();
    assert!(
        gaps.iter().all(|g| g.scope != GapScope::AllDevices && g.scope != GapScope::Device(key)),
        "a take-over with nothing lost records no gap: {gaps:?}"
    );

    // A checkpoint is only good for the capture it describes: released,
    // the next start is a new capture (and says why).
    let checkpoint = seal.checkpoint.expect("checkpoint");
    drop(second);
    assert!(pins.0.release().unwrap());
    let (_third, continuity) = start(&pins, Some(&checkpoint));
    assert!(matches!(continuity, Continuity::Fresh { why: Some(ref why) } if why.contains("nothing pinned")), "{continuity:?}");
}

#[test]
fn releasing_the_pins_detaches_the_programs() {
    require_root();
    let pins = Pins::new("release");
    let (tracker, _) = start(&pins, None);
    drop(tracker);
    let program = pins.0.path().join("prog_bio_queue_btf");
    let shown: serde_json::Value =
        serde_json::from_str(&sh(&format!("bpftool -j prog show pinned {}", program.display()))).unwrap();
    let id = shown["id"].as_u64().expect("program id");
    let loaded = |id: u64| Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]).output().unwrap().status.success();
    assert!(loaded(id), "the program stays loaded (and attached) after the agent is gone");
    pins.0.release().unwrap();
    // The kernel frees a detached program asynchronously (RCU).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while loaded(id) {
        assert!(std::time::Instant::now() < deadline, "program {id} still loaded after release");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn writes_overflowing_the_rings_while_no_agent_runs_are_a_gap() {
    require_root();
    let dev = LoopDevice::new("takeover-ovf", 256);
    let pins = Pins::new("overflow");
    let (mut first, _) = start(&pins, None);
    let checkpoint = first.seal().unwrap().checkpoint.expect("checkpoint");
    drop(first);
    // Far more events than a CPU's ring holds (8192), with nobody draining.
    let status = burst(&dev, 40_000, 32).status().expect("running fio");
    assert!(status.success());
    let (mut second, continuity) = start(&pins, Some(&checkpoint));
    assert_eq!(continuity, Continuity::Resumed { from_ns: checkpoint.cut_ns }, "nothing was consumed past the checkpoint: it can be taken over");
    let gaps = second.new_gaps();
    assert!(
        gaps.iter().any(|g| g.scope == GapScope::AllDevices && g.from_ns <= checkpoint.cut_ns && g.reason.contains("overflow")),
        "the dropped events must be a gap from the checkpoint on: {gaps:?}"
    );
    assert!(second.loss().dropped_events > 0);
}

#[test]
fn rings_consumed_past_their_size_after_the_checkpoint_refuse_the_take_over() {
    require_root();
    let dev = LoopDevice::new("takeover-lap", 256);
    let pins = Pins::new("lap");
    let (mut first, _) = start(&pins, None);
    let checkpoint = first.seal().unwrap().checkpoint.expect("checkpoint");
    // The first agent drains a burst larger than a ring, then dies before
    // sealing it: the slots it read have been written over since.
    let mut fio = burst(&dev, 40_000, 16).spawn().expect("running fio");
    while fio.try_wait().unwrap().is_none() {
        first.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    first.poll();
    assert_eq!(first.loss().dropped_events, 0, "the first agent kept up");
    drop(first);
    let (_second, continuity) = start(&pins, Some(&checkpoint));
    assert!(
        matches!(continuity, Continuity::Fresh { why: Some(ref why) } if why.contains("more than it holds")),
        "{continuity:?}"
    );
}
