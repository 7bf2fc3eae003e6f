//! Other programs attaching to and detaching from the same tracepoints (a
//! second agent during a rolling upgrade, an operator's bpftrace) must not
//! cost the tracker a single event. Each attach or detach rewrites the
//! tracepoint's probe array; a lost event there would be silent, so the
//! check is exact: captured sectors == the kernel's completed sectors ==
//! what fio wrote, while another tracker churns every 100 ms.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use cbt_agent::tracker::{Tracker, TrackerOptions};
use cbt_tests::{require_root, sh, Harness, LoopDevice};

#[test]
fn attach_and_detach_of_other_programs_loses_nothing() {
    require_root();
    let dev = LoopDevice::new("coexist", 256);
    let harness = Harness::start();
    let key = dev.key();

    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, cycles) = (Arc::clone(&stop), Arc::clone(&cycles));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let other = Tracker::start(&TrackerOptions::default()).expect("second tracker");
                std::thread::sleep(Duration::from_millis(50));
                drop(other);
                cycles.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let json = sh(&format!(
        "fio --output-format=json --filename={} --direct=1 --ioengine=io_uring --time_based --runtime=15 \
         --name=w --rw=randwrite --bsrange=512-65536 --blockalign=512 --iodepth=16 --numjobs=2 --size=256m",
        dev.path
    ));
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("churn thread");
    let cycles = cycles.load(Ordering::Relaxed);
    assert!(cycles >= 20, "the other tracker attached and detached only {cycles} times");

    let report: serde_json::Value = serde_json::from_str(&json[json.find('{').expect("fio JSON")..]).expect("fio JSON");
    let fio_sectors: u64 =
        report["jobs"].as_array().expect("jobs").iter().map(|j| j["write"]["io_bytes"].as_u64().unwrap()).sum::<u64>() / 512;

    // Two checks: the witness needs two idle samples to commit.
    drop(harness.settled());
    let accounting = harness.accounting(key);
    let (captured, kernel, gaps) = (accounting.captured_sectors, accounting.kernel_sectors(), accounting.gaps);
    eprintln!("coexistence: {cycles} attach/detach cycles; fio {fio_sectors} sectors, kernel {kernel}, captured {captured}; loss {:?}; gaps {gaps:?}", accounting.loss);
    assert_eq!(captured, kernel, "captured vs kernel-completed sectors");
    assert_eq!(captured, fio_sectors, "captured vs fio's bytes written");
    assert!(gaps.is_empty(), "{gaps:#?}");
    harness.assert_no_loss();
}
