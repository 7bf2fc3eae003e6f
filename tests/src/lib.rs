//! Shared pieces of the privileged tests. Every test here needs root, the
//! eBPF object and loop devices; without them it FAILS (CI runs as root).
//!
//! Truth is always computed independently of the tracker: from what the test
//! wrote, or by comparing device images byte for byte.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Duration,
};

use cbt_agent::{
    capture::{CaptureOptions, Flavor},
    changes::Gap,
    devices::{DeviceKey, Disk, KernelCounters},
    tracker::{LossCounters, Tracker, TrackerOptions},
};
pub use roaring::RoaringTreemap;

pub mod accuracy;
pub mod interop;
pub mod kernel_trace;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "privileged tests must run as root (cargo xtask test does)");
}

/// Runs a shell command line; panics with its output if it fails.
pub fn sh(cmdline: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmdline).output().expect("spawning sh");
    assert!(
        out.status.success(),
        "`{cmdline}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where backing files live: tmpfs, so images are cheap to copy and compare.
pub fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from("/dev/shm/cbt-tests");
    std::fs::create_dir_all(&dir).expect("creating scratch dir");
    dir
}

/// Held while a test allocates loop devices, so a test that frees a loop
/// number and takes it again cannot lose it to a test running in parallel.
pub static LOOP_ALLOCATION: Mutex<()> = Mutex::new(());

/// A loop device over a sparse backing file; detached and removed on drop.
pub struct LoopDevice {
    pub path: String,
    pub backing: PathBuf,
    attached: bool,
}

impl LoopDevice {
    pub fn new(tag: &str, size_mib: u64) -> Self {
        Self::with_options(tag, size_mib, "")
    }

    /// `options` go to losetup, e.g. `-P` to scan partitions.
    pub fn with_options(tag: &str, size_mib: u64, options: &str) -> Self {
        require_root();
        let backing = scratch_dir().join(format!("{tag}-{}.img", std::process::id()));
        let f = File::create(&backing).expect("creating backing file");
        f.set_len(size_mib << 20).expect("sizing backing file");
        let _allocating = LOOP_ALLOCATION.lock().unwrap_or_else(|e| e.into_inner());
        let path = sh(&format!("losetup -f --show {options} {}", backing.display())).trim().to_string();
        Self { path, backing, attached: true }
    }

    pub fn name(&self) -> &str {
        self.path.trim_start_matches("/dev/")
    }

    /// The current instance (dev + diskseq).
    pub fn key(&self) -> DeviceKey {
        Disk::by_name(self.name()).expect("loop device in sysfs").key
    }

    pub fn detach(&mut self) {
        if self.attached {
            sh(&format!("losetup -d {}", self.path));
            self.attached = false;
        }
    }

    /// Copies the backing file: a point-in-time image while nothing writes.
    pub fn image(&self, tag: &str) -> PathBuf {
        sh("sync");
        let out = self.backing.with_extension(format!("{tag}.img"));
        std::fs::copy(&self.backing, &out).expect("copying image");
        out
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Sets a loop device's `queue/max_sectors_kb` (the size at which the
/// block layer splits a bio into requests) and puts the old value back on
/// drop: a loop device keeps it across detach and attach, so the next user
/// of the same loop number would inherit it.
pub struct MaxSectorsKb {
    path: PathBuf,
    original: String,
}

impl MaxSectorsKb {
    pub fn set(dev_name: &str, kb: u64) -> Self {
        let path = PathBuf::from(format!("/sys/block/{dev_name}/queue/max_sectors_kb"));
        let original = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string();
        let guard = Self { path, original };
        guard.write(&kb.to_string());
        let now = std::fs::read_to_string(&guard.path).unwrap().trim().to_string();
        assert_eq!(now, kb.to_string(), "{dev_name}: max_sectors_kb {kb} was not taken as is");
        guard
    }

    fn write(&self, value: &str) {
        std::fs::write(&self.path, value).unwrap_or_else(|e| panic!("writing {value} to {}: {e}", self.path.display()));
    }
}

impl Drop for MaxSectorsKb {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.original) {
            eprintln!("warning: could not restore {} to {}: {e}", self.path.display(), self.original);
        }
    }
}

/// Moves a live loop device to another offset in its backing file
/// (`LOOP_SET_STATUS64`; losetup can only set one at attach). The device
/// keeps its number and its `diskseq`, and its size if a size limit holds
/// it: other bytes behind the same sectors, with no write to it.
pub fn loop_set_offset(dev: &str, offset: u64) {
    use cbt_agent::mapping::{LoopInfo64, LOOP_GET_STATUS64};
    const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
    use std::os::unix::io::AsRawFd;
    let f = File::open(dev).unwrap_or_else(|e| panic!("{dev}: {e}"));
    // SAFETY: all-zero is a valid loop_info64 (integers and byte arrays).
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open; the kernel fills exactly a loop_info64.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info as *mut LoopInfo64) };
    assert_eq!(rc, 0, "LOOP_GET_STATUS64 {dev}: {}", std::io::Error::last_os_error());
    info.lo_offset = offset;
    // SAFETY: as above; the kernel only reads the struct.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64 as _, &info as *const LoopInfo64) };
    assert_eq!(rc, 0, "LOOP_SET_STATUS64 {dev} offset {offset}: {}", std::io::Error::last_os_error());
}

/// A tracker running as the agent runs it: drained every 2 ms, checked
/// every 200 ms, on a thread of its own.
pub struct Harness {
    tracker: Arc<Mutex<Tracker>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn start() -> Self {
        Self::with(TrackerOptions::default())
    }

    pub fn with_flavor(flavor: Flavor, granularity: u64) -> Self {
        Self::with(TrackerOptions {
            capture: CaptureOptions { flavor: Some(flavor), ..Default::default() },
            granularity,
            ..Default::default()
        })
    }

    pub fn with(options: TrackerOptions) -> Self {
        require_root();
        let tracker = Arc::new(Mutex::new(Tracker::start(&options).expect("starting the tracker")));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tracker, stop) = (Arc::clone(&tracker), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(2));
                    let mut t = tracker.lock().expect("tracker lock");
                    t.poll();
                    n += 1;
                    if n.is_multiple_of(100) {
                        t.check().expect("tracker check");
                    }
                }
            })
        };
        Self { tracker, stop, thread: Some(thread) }
    }

    /// The tracker with everything published so far drained and checked.
    /// A write that returned before this call is in the result: the
    /// program publishes at submission, before the I/O can complete.
    pub fn settled(&self) -> MutexGuard<'_, Tracker> {
        let mut t = self.tracker.lock().expect("tracker lock");
        t.check().expect("tracker check");
        t
    }

    pub fn changed(&self, key: DeviceKey) -> RoaringTreemap {
        self.settled().changes().device(&key).map(|d| d.changed.clone()).unwrap_or_default()
    }

    pub fn gaps(&self) -> Vec<Gap> {
        self.settled().changes().gaps().to_vec()
    }

    pub fn gaps_for(&self, key: DeviceKey) -> Vec<Gap> {
        self.gaps().into_iter().filter(|g| g.covers(key)).collect()
    }

    /// What the tracker and the kernel's witness counters say about one
    /// device, after a drain and check.
    pub fn accounting(&self, key: DeviceKey) -> Accounting {
        let t = self.settled();
        let d = t.changes().device(&key).unwrap_or_else(|| panic!("no record for {key}"));
        Accounting {
            captured_sectors: d.captured_sectors,
            baseline: d.witness.baseline.unwrap_or_else(|| panic!("no witness baseline for {key}")),
            last_kernel: d.witness.last_kernel.unwrap_or_else(|| panic!("no witness sample for {key}")),
            committed_offset: d.witness.committed_offset,
            events_by_kind: d.events,
            loss: t.loss().clone(),
            gaps: t.changes().gaps().iter().filter(|g| g.covers(key)).cloned().collect(),
        }
    }

    /// Fails the test if anything was lost anywhere while it ran.
    pub fn assert_no_loss(&self) {
        let t = self.settled();
        let loss = t.loss();
        assert_eq!(loss.dropped_events, 0, "events dropped: {loss:?}");
        assert_eq!(loss.corrupt_rings, 0, "{loss:?}");
        assert_eq!(loss.unpublishable, 0, "{loss:?}");
        assert!(loss.recursion_misses.values().all(|&m| m == 0), "recursion misses: {loss:?}");
        assert!(loss.events > 0, "the tracker saw no events at all: {loss:?}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// See [`Harness::accounting`].
#[derive(Debug, Clone)]
pub struct Accounting {
    pub captured_sectors: u64,
    pub baseline: KernelCounters,
    pub last_kernel: KernelCounters,
    pub committed_offset: Option<i64>,
    pub events_by_kind: [u64; cbt_agent::changes::EVENT_KINDS],
    /// Tracker-wide (every device).
    pub loss: LossCounters,
    /// Gaps covering this device.
    pub gaps: Vec<Gap>,
}

impl Accounting {
    /// Sectors the kernel completed for changes since the baseline.
    pub fn kernel_sectors(&self) -> u64 {
        self.last_kernel.changed_sectors() - self.baseline.changed_sectors()
    }
}

/// Everything a failing test's reader needs, on two lines.
impl std::fmt::Display for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (base, last, loss) = (&self.baseline, &self.last_kernel, &self.loss);
        writeln!(
            f,
            "captured {} sectors, kernel counted {} (write {} + discard {}, in flight {}), committed offset {:?}; events by kind {:?}",
            self.captured_sectors,
            self.kernel_sectors(),
            last.write_sectors - base.write_sectors,
            last.discard_sectors - base.discard_sectors,
            last.in_flight,
            self.committed_offset,
            self.events_by_kind,
        )?;
        write!(
            f,
            "tracker (all devices): {} events, {} drains, max ring fill {}, dropped {}, recursion misses {:?}, witness alarms {}; {} gaps for the device",
            loss.events, loss.drains, loss.max_ring_fill, loss.dropped_events, loss.recursion_misses, loss.witness_alarms, self.gaps.len()
        )
    }
}

/// Chunks covering byte range `[offset, offset + len)`.
pub fn chunks(offset: u64, len: u64, granularity: u64) -> RoaringTreemap {
    let mut set = RoaringTreemap::new();
    if len > 0 {
        set.insert_range(offset / granularity..=(offset + len - 1) / granularity);
    }
    set
}

/// Chunks whose bytes differ between two images of the same size (the
/// independent truth). See [`accuracy::changed_chunks`] for images of
/// different sizes.
pub fn image_diff(a: &Path, b: &Path, granularity: u64) -> RoaringTreemap {
    let (la, lb) = (std::fs::metadata(a).expect("image a").len(), std::fs::metadata(b).expect("image b").len());
    assert_eq!(la, lb, "images differ in size");
    accuracy::changed_chunks(a, b, granularity)
}

/// Asserts `captured ⊇ truth` (the contract's first rule) and returns the
/// false-positive ratio `|captured| / |truth|` for reporting.
pub fn assert_superset(what: &str, captured: &RoaringTreemap, truth: &RoaringTreemap) -> f64 {
    let missing = truth - captured;
    assert!(
        missing.is_empty(),
        "{what}: UNDER-REPORTED {} of {} truly changed chunks, first: {:?}",
        missing.len(),
        truth.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    let ratio = if truth.is_empty() { 1.0 } else { captured.len() as f64 / truth.len() as f64 };
    eprintln!("{what}: {} changed chunks, {} reported, over-report ratio {ratio:.3}", truth.len(), captured.len());
    ratio
}
