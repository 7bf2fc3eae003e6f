//! A minute of fio against a tracked 1 GiB loop device, three jobs at once:
//!
//! - `stress`: 4 KiB random writes, io_uring, queue depth 32, two processes;
//! - `straddle`: random reads and writes of any multiple of 512 bytes up to
//!   64 KiB at 512-byte alignment, so most writes cover partial chunks or
//!   straddle 4 KiB chunk boundaries;
//! - `slow`: a rate-limited writer of 512 B – 16 KiB on a region of its own.
//!
//! A minute of the first two writes every chunk of the area they share many
//! times over, so there the image comparison cannot catch a lost write.
//! Lost writes are caught by exact accounting instead: the sectors captured
//! for the device must equal, to the sector, both the kernel's count of
//! completed change sectors and fio's count of bytes written. The slow job
//! covers only part of its region, so there the image comparison
//! (captured ⊇ chunks that differ from the all-zero start) does bite.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use cbt_agent::devices::Disk;
use cbt_tests::{assert_superset, chunks, image_diff, require_root, sh, Harness, LoopDevice};

const GRANULARITY: u64 = 4096;
const DEVICE_MIB: u64 = 1024;
/// `stress` and `straddle` run on `[0, HEAVY_MIB)`, `slow` on the rest.
const HEAVY_MIB: u64 = 768;
const RUNTIME_S: u64 = 60;
/// The slow job's write rate. fio turns `rate_iops` into bytes with the
/// *smallest* block size (512 B here), so it is given in bytes: about 300
/// writes a second at the mean size, which leaves part of the region
/// untouched after a minute.
const SLOW_RATE: &str = "2400k";

#[test]
fn fio_stress_is_captured_exactly() {
    require_root();
    let found = Command::new("sh").arg("-c").arg("command -v fio >/dev/null").status().map(|s| s.success());
    assert!(matches!(found, Ok(true)), "fio is not installed (run `cargo xtask setup`)");
    let started = Instant::now();

    let dev = LoopDevice::new("stress", DEVICE_MIB);
    // The fresh device: a new sparse backing file, all zeros.
    let image_a = dev.image("A");
    let json_out = dev.backing.with_extension("fio.json");
    let mut cleanup = RemoveOnSuccess(vec![image_a.clone(), json_out.clone()]);

    let harness = Harness::start();
    let key = dev.key();
    let events_before = harness.settled().loss().events;

    let slow_offset = HEAVY_MIB << 20;
    let slow_len = (DEVICE_MIB - HEAVY_MIB) << 20;
    let cmd = format!(
        "fio --output-format=json --output={json} --filename={dev} --direct=1 --ioengine=io_uring \
         --time_based --runtime={RUNTIME_S} --randrepeat=0 --group_reporting \
         --name=stress --rw=randwrite --bs=4k --iodepth=32 --numjobs=2 --size={HEAVY_MIB}m \
         --name=straddle --rw=randrw --bsrange=512-65536 --blockalign=512 --iodepth=16 --size={HEAVY_MIB}m \
         --name=slow --rw=randwrite --bsrange=512-16384 --blockalign=512 --iodepth=1 \
         --offset={slow_offset} --size={slow_len} --rate={SLOW_RATE}",
        json = json_out.display(),
        dev = dev.path,
    );
    let t0 = Instant::now();
    sh(&cmd);
    let fio_time = t0.elapsed();
    let fio_write_bytes = fio_write_bytes(&std::fs::read_to_string(&json_out).expect("reading fio's JSON report"));

    let image_b = dev.image("B");
    cleanup.0.push(image_b.clone());

    // Everything the tracker and the kernel say, printed before any check.
    let truth = image_diff(&image_a, &image_b, GRANULARITY);
    let captured = harness.changed(key);
    let accounting = harness.accounting(key);
    let (captured_sectors, base, committed, gaps) =
        (accounting.captured_sectors, accounting.baseline, accounting.committed_offset, &accounting.gaps);
    let now = Disk::by_name(dev.name()).expect("loop device in sysfs").counters().expect("counters of this instance");
    let kernel = accounting.kernel_sectors();
    let kernel_now = now.changed_sectors() - base.changed_sectors();
    let events: u64 = accounting.events_by_kind.iter().sum();
    let secs = fio_time.as_secs_f64();
    let total_chunks = (DEVICE_MIB << 20) / GRANULARITY;
    eprintln!("stress: fio ran {secs:.1} s and wrote {fio_write_bytes} bytes ({} sectors)", fio_write_bytes / 512);
    eprintln!("stress: {accounting}");
    eprintln!(
        "stress: {events} events for the device ({:.0}/s), {} for all devices while fio ran; kernel counts {kernel_now} now (in flight {})",
        events as f64 / secs,
        accounting.loss.events - events_before,
        now.in_flight
    );
    eprintln!(
        "stress: {} of {total_chunks} chunks differ from the zero image ({:.1}%); {} gaps for the device",
        truth.len(),
        100.0 * truth.len() as f64 / total_chunks as f64,
        gaps.len()
    );

    // 1. captured ⊇ truth, on the whole device and on the slow region.
    let ratio = assert_superset("stress (whole device)", &captured, &truth);
    let slow_region = chunks(slow_offset, slow_len, GRANULARITY);
    let slow_truth = &truth & &slow_region;
    assert!(
        slow_truth.len() > 1000 && slow_truth.len() < slow_region.len() * 9 / 10,
        "the slow job should cover part of its region; it covered {} of {} chunks",
        slow_truth.len(),
        slow_region.len()
    );
    let slow_ratio = assert_superset("stress (slow region)", &(&captured & &slow_region), &slow_truth);
    eprintln!("stress: over-report ratio {ratio:.3} (whole device), {slow_ratio:.3} (slow region)");
    let outside = &captured - &chunks(0, DEVICE_MIB << 20, GRANULARITY);
    assert!(
        outside.is_empty(),
        "captured chunks past the device's end: {:?}",
        outside.iter().take(10).collect::<Vec<_>>()
    );

    // 2. Nothing dropped, no recursion misses.
    harness.assert_no_loss();

    // 3. Exact accounting: fio has reaped every completion, so the kernel's
    //    completed change sectors since the baseline, the captured sectors
    //    and fio's bytes written must all agree.
    assert_eq!(now.in_flight, 0, "I/O in flight after fio: {now:?}");
    assert_eq!(kernel, kernel_now, "the device was written after fio ended: {:?} then {now:?}", accounting.last_kernel);
    assert_eq!(
        captured_sectors, kernel,
        "captured sectors differ from the kernel's completed change sectors since the baseline"
    );
    assert_eq!(captured_sectors * 512, fio_write_bytes, "captured sectors differ from the bytes fio wrote");
    assert_eq!(committed, Some(0), "witness committed offset after fio");

    // 4. No gap for the device (a witness alarm is recorded as one).
    assert!(gaps.is_empty(), "{} tracking gaps for {key}: {gaps:#?}", gaps.len());

    let total = started.elapsed();
    eprintln!("stress: whole test {total:.1?} (fio {secs:.1} s)");
    assert!(total < Duration::from_secs(120), "the stress test took {total:?}");
}

/// Sum of `write.io_bytes` over fio's JSON report; fails on a job error.
fn fio_write_bytes(report: &str) -> u64 {
    let json = &report[report.find('{').unwrap_or_else(|| panic!("no JSON in fio's report:\n{report}"))..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{report}"));
    let jobs = report["jobs"].as_array().unwrap_or_else(|| panic!("no jobs in fio's report:\n{report}"));
    for job in jobs {
        assert_eq!(job["error"].as_u64(), Some(0), "fio job failed: {job}");
    }
    jobs.iter().map(|j| j["write"]["io_bytes"].as_u64().expect("write.io_bytes in fio's report")).sum()
}

/// Removes the files unless the test failed (images are kept for inspection).
struct RemoveOnSuccess(Vec<std::path::PathBuf>);

impl Drop for RemoveOnSuccess {
    fn drop(&mut self) {
        for p in &self.0 {
            if std::thread::panicking() {
                eprintln!("kept for inspection: {}", p.display());
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
