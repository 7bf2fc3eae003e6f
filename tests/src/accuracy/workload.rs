//! Workloads that run while snapshots are taken: fio, buffered writes left
//! dirty for later writeback, discard / write-zeroes mixed with writes,
//! file churn on a filesystem, and small helpers (seeded RNG, mounts).

use std::{
    fs::{File, OpenOptions},
    os::unix::{fs::FileExt, io::AsRawFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::sh;

use super::scratch::{unique_name, AlignedBuf, Volume};

/// Deterministic, seeded choices and content (fastrand's wyrand).
#[derive(Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// Seeded from `$CBT_SEED` if set, else from the clock; the seed is
    /// printed so a failing run can be repeated.
    pub fn from_env(tag: &str) -> Self {
        let seed = std::env::var("CBT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        });
        eprintln!("{tag}: seed {seed} (set CBT_SEED={seed} to repeat)");
        Self::new(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// An independent stream (for another thread).
    pub fn fork(&mut self) -> Self {
        Self(self.0.fork())
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "empty range {lo}..{hi}");
        self.0.u64(lo..hi)
    }

    /// A multiple of `align` in `[lo, hi)`.
    pub fn aligned(&mut self, lo: u64, hi: u64, align: u64) -> u64 {
        self.range(lo.div_ceil(align), hi.div_ceil(align)) * align
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.0.u64(..100) < percent
    }

    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_micros(self.range(lo.as_micros() as u64, hi.as_micros() as u64 + 1))
    }

    /// Random bytes (never an all-zero 512-byte sector in practice).
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// A thread running a workload until stopped; stopping re-raises its panic.
pub struct Workload {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Workload {
    pub fn spawn(name: &str, f: impl FnOnce(&AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || f(&s)).expect("spawning a workload");
        Self { name: name.to_string(), stop, thread: Some(thread) }
    }

    /// Whether the thread has ended (e.g. by panicking).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the workload and waits for it; panics if it panicked.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join() {
                panic!("workload {} failed: {}", self.name, panic_text(&e));
            }
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Sleeps up to `d`, waking early when `stop` is set.
pub fn nap(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// A fio process (`--thread`, so one pid), stopped with SIGINT.
pub struct Fio {
    child: Option<Child>,
    pub output: PathBuf,
    cmdline: String,
}

impl Fio {
    /// Starts `fio --thread --output-format=json --output=F <args>`.
    pub fn start(args: &str) -> Self {
        let output = crate::scratch_dir().join(unique_name("fio.json"));
        let cmdline = format!("fio --thread --output-format=json --output={} {args}", output.display());
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {cmdline}"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting fio");
        Self { child: Some(child), output, cmdline }
    }

    /// Starts fio and checks it is still running after a moment (a bad
    /// option makes it exit at once).
    pub fn start_checked(args: &str) -> Self {
        let mut f = Self::start(args);
        std::thread::sleep(Duration::from_millis(300));
        if !f.is_running() {
            let st = f.child.take().unwrap().wait().expect("fio status");
            panic!("`{}` ended at once ({st}); see its stderr above", f.cmdline);
        }
        f
    }

    /// Runs fio to completion; panics if it or a job failed. Returns the
    /// report.
    pub fn run(args: &str) -> serde_json::Value {
        let mut f = Self::start(args);
        let status = f.child.take().unwrap().wait().expect("waiting for fio");
        assert!(status.success(), "`{}` failed: {status}", f.cmdline);
        f.report()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Freezes fio (SIGSTOP): its I/O in flight completes, no new I/O
    /// starts, so the device goes still.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused fio go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
        }
    }

    /// Interrupts fio (SIGINT: it finishes cleanly) and waits.
    pub fn stop(mut self) -> serde_json::Value {
        self.interrupt();
        self.report()
    }

    fn interrupt(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let end = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > end {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The JSON report (after fio ended); panics on a job error.
    pub fn report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let json = &text[text.find('{').unwrap_or_else(|| panic!("no JSON report from `{}`:\n{text}", self.cmdline))..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{text}"));
        for job in v["jobs"].as_array().expect("jobs") {
            assert_eq!(job["error"].as_u64(), Some(0), "fio job failed: {job}");
        }
        v
    }

    /// Total write I/Os in a report.
    pub fn write_ios(report: &serde_json::Value) -> u64 {
        report["jobs"].as_array().expect("jobs").iter().map(|j| j["write"]["total_ios"].as_u64().unwrap_or(0)).sum()
    }
}

impl Drop for Fio {
    fn drop(&mut self) {
        self.interrupt();
        let _ = std::fs::remove_file(&self.output);
    }
}

/// fio arguments for rate-limited random O_DIRECT writes of any multiple
/// of 512 bytes up to 64 KiB at 512-byte alignment (so most writes cover
/// partial 4 KiB blocks or straddle block boundaries), on
/// `[offset, offset + size)` of a device, until interrupted.
pub fn fio_random_job(name: &str, dev: &str, offset: u64, size: u64, rate: &str, seed: u64) -> String {
    format!(
        "--name={name} --filename={dev} --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
         --bsrange=512-64k --blockalign=512 --norandommap --randrepeat=0 --randseed={seed} \
         --offset={offset} --size={size} --rate={rate} --time_based --runtime=3600",
        seed = seed >> 16 // fio parses the seed as a signed number
    )
}

/// Writes `count` blocks of `len` random bytes with O_DIRECT at distinct
/// random `len`-aligned offsets in `[start, end)`; returns them.
pub fn write_markers(vol: &Volume, start: u64, end: u64, count: usize, len: u64, rng: &mut Rng) -> Vec<(u64, u64)> {
    let f = vol.open_direct();
    let mut out: Vec<(u64, u64)> = Vec::new();
    while out.len() < count {
        let o = rng.aligned(start, end - len + 1, len);
        if out.iter().any(|&(x, _)| x == o) {
            continue;
        }
        let buf = AlignedBuf::random(len as usize, rng);
        f.write_all_at(&buf, o).unwrap_or_else(|e| panic!("marker write at {o}: {e}"));
        out.push((o, len));
    }
    out
}

/// Buffered writes to a volume's block device (its page cache), left dirty
/// for writeback later: any byte offset and length (1 B – 64 KiB), writes
/// through a shared mapping of the device, and random partial flushes
/// (`sync_file_range`, `msync`) of its own region only, so what the kernel
/// writes back and when is up to it. Never `fsync`s the whole device.
pub fn buffered_writer(vol: &Volume, start: u64, end: u64, mut rng: Rng) -> Workload {
    let f = vol.open_buffered();
    Workload::spawn(&format!("buffered-{}", vol.name), move |stop| {
        const WIN: u64 = 1 << 20;
        let mut map: Option<(u64, *mut u8)> = None;
        while !stop.load(Ordering::Relaxed) {
            match rng.range(0, 100) {
                0..=59 => {
                    let len = rng.range(1, 65536);
                    let o = rng.range(start, end - len);
                    f.write_all_at(&rng.bytes(len as usize), o).expect("buffered write");
                }
                60..=74 => {
                    let o = rng.aligned(start, end - WIN, 4096);
                    let len = rng.aligned(4096, WIN, 4096);
                    // SAFETY: plain syscall on an open descriptor.
                    let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), o as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
                    assert_eq!(rc, 0, "sync_file_range: {}", std::io::Error::last_os_error());
                }
                75..=92 => {
                    let (base, p) = *map.get_or_insert_with(|| map_window(&f, rng.aligned(start, end - WIN, WIN)));
                    let n = rng.range(1, 8192) as usize;
                    let at = rng.range(0, WIN - n as u64) as usize;
                    let data = rng.bytes(n);
                    // SAFETY: [at, at + n) lies inside the WIN-byte mapping.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(at), n) };
                    let _ = base;
                }
                _ => {
                    if let Some((_, p)) = map.take() {
                        // SAFETY: p maps WIN bytes; MS_ASYNC starts writeback
                        // sometimes, unmapping leaves the pages dirty otherwise.
                        unsafe {
                            if rng.chance(50) {
                                libc::msync(p.cast(), WIN as usize, libc::MS_ASYNC);
                            }
                            libc::munmap(p.cast(), WIN as usize);
                        }
                    }
                }
            }
            nap(stop, Duration::from_millis(rng.range(5, 30)));
        }
        if let Some((_, p)) = map.take() {
            // SAFETY: as above.
            unsafe { libc::munmap(p.cast(), WIN as usize) };
        }
    })
}

fn map_window(f: &File, offset: u64) -> (u64, *mut u8) {
    // SAFETY: a fresh shared mapping of 1 MiB of an open block device.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 1 << 20, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), offset as i64) };
    assert!(p != libc::MAP_FAILED, "mmap of the device: {}", std::io::Error::last_os_error());
    (offset, p.cast())
}

const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// `BLKDISCARD` (what `blkdiscard` does) or `BLKZEROOUT` (`blkdiscard -z`).
pub fn discard(f: &File, offset: u64, len: u64, zeroout: bool) {
    let range = [offset, len];
    // SAFETY: the ioctl reads two u64 from `range`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), if zeroout { BLKZEROOUT } else { BLKDISCARD } as _, range.as_ptr()) };
    assert_eq!(rc, 0, "{} {offset}+{len}: {}", if zeroout { "BLKZEROOUT" } else { "BLKDISCARD" }, std::io::Error::last_os_error());
}

/// O_DIRECT writes mixed with discards and write-zeroes (512-byte aligned,
/// up to 1 MiB) on `[start, end)` of a volume.
pub fn discard_mixer(vol: &Volume, start: u64, end: u64, mut rng: Rng) -> Workload {
    let f = vol.open_direct();
    Workload::spawn(&format!("discard-{}", vol.name), move |stop| {
        while !stop.load(Ordering::Relaxed) {
            let p = rng.range(0, 100);
            if p < 50 {
                let len = rng.aligned(512, 128 << 10, 512);
                let o = rng.aligned(start, end - len, 512);
                let buf = AlignedBuf::random(len as usize, &mut rng);
                f.write_all_at(&buf, o).expect("O_DIRECT write");
            } else {
                let len = rng.aligned(512, 1 << 20, 512);
                let o = rng.aligned(start, end - len, 512);
                discard(&f, o, len, p >= 75);
            }
            nap(stop, Duration::from_millis(rng.range(5, 25)));
        }
    })
}

/// Filesystems the churn runs on.
#[derive(Clone, Copy, Debug)]
pub enum FsKind {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }

    pub fn mkfs(self, dev: &str) {
        sh(&match self {
            FsKind::Ext4 => format!("mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 {dev}"),
            FsKind::Xfs => format!("mkfs.xfs -q -f -b size=4096 {dev}"),
            FsKind::Btrfs => format!("mkfs.btrfs -q -f {dev}"),
        });
    }

    /// Online discard, so deleting and punching send discards down.
    pub fn mount_options(self) -> &'static str {
        match self {
            FsKind::Ext4 | FsKind::Xfs => "discard",
            FsKind::Btrfs => "discard=sync",
        }
    }
}

/// A mounted filesystem; unmounted (and the directory removed) on drop.
pub struct Mount {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(dev: &str, options: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/{}", unique_name("mnt")));
        std::fs::create_dir_all(&dir).expect("mount point");
        sh(&format!("mount -o {options} {dev} {}", dir.display()));
        Self { dir, mounted: true }
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            sh(&format!("umount {}", self.dir.display()));
            self.mounted = false;
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            for _ in 0..50 {
                if Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success()) {
                    self.mounted = false;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.mounted {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What [`file_churn`] did.
#[derive(Default, Debug, Clone)]
pub struct ChurnStats {
    pub ops: u64,
    pub created: u64,
    pub deleted: u64,
    pub trims: u64,
    pub enospc: u64,
}

fn nospace(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// File churn in `dir` until stopped: create, append, overwrite at any
/// offset, delete, rename, truncate, punch holes, fsync, sync, mkdir and
/// `fstrim`, keeping the data under `budget` bytes. Out-of-space errors are
/// counted, any other error fails the workload.
pub fn file_churn(dir: &Path, budget: u64, mut rng: Rng) -> (Workload, Arc<std::sync::Mutex<ChurnStats>>) {
    let stats = Arc::new(std::sync::Mutex::new(ChurnStats::default()));
    let (dir, st) = (dir.to_path_buf(), Arc::clone(&stats));
    let w = Workload::spawn("churn", move |stop| {
        let mut files: Vec<(PathBuf, u64)> = Vec::new();
        let mut total = 0u64;
        let mut n = 0u64;
        let mut subdir = dir.clone();
        while !stop.load(Ordering::Relaxed) {
            let mut s = st.lock().unwrap();
            s.ops += 1;
            let p = rng.range(0, 100);
            let pick = |rng: &mut Rng, files: &Vec<(PathBuf, u64)>| (!files.is_empty()).then(|| rng.range(0, files.len() as u64) as usize);
            let res: std::io::Result<()> = (|| {
                if total > budget || (p < 10 && !files.is_empty()) {
                    // delete
                    let i = pick(&mut rng, &files).unwrap();
                    let (path, len) = files.swap_remove(i);
                    std::fs::remove_file(&path)?;
                    total -= len;
                    s.deleted += 1;
                } else if p < 35 || files.is_empty() {
                    n += 1;
                    let path = subdir.join(format!("f{n}"));
                    let len = rng.range(1, 1 << 20);
                    let mut f = File::create(&path)?;
                    files.push((path, 0));
                    use std::io::Write;
                    f.write_all(&rng.bytes(len as usize))?;
                    if rng.chance(30) {
                        f.sync_all()?;
                    }
                    files.last_mut().unwrap().1 = len;
                    total += len;
                    s.created += 1;
                } else if p < 50 {
                    let i = pick(&mut rng, &files).unwrap();
                    let len = rng.range(1, 256 << 10);
                    let f = OpenOptions::new().append(true).open(&files[i].0)?;
                    use std::io::Write;
                    (&f).write_all(&rng.bytes(len as usize))?;
                    files[i].1 += len;
                    total += len;
                } else if p < 68 {
                    let i = pick(&mut rng, &files).unwrap();
                    let len = rng.range(1, 128 << 10);
                    let at = rng.range(0, files[i].1.max(1));
                    let f = OpenOptions::new().write(true).open(&files[i].0)?;
                    f.write_all_at(&rng.bytes(len as usize), at)?;
                    if at + len > files[i].1 {
                        total += at + len - files[i].1;
                        files[i].1 = at + len;
                    }
                    if rng.chance(20) {
                        f.sync_data()?;
                    }
                } else if p < 73 {
                    let i = pick(&mut rng, &files).unwrap();
                    n += 1;
                    let to = subdir.join(format!("r{n}"));
                    std::fs::rename(&files[i].0, &to)?;
                    files[i].0 = to;
                } else if p < 78 {
                    let i = pick(&mut rng, &files).unwrap();
                    let len = rng.range(0, files[i].1 * 2 + 4096);
                    OpenOptions::new().write(true).open(&files[i].0)?.set_len(len)?;
                    total = total - files[i].1 + len;
                    files[i].1 = len;
                } else if p < 85 {
                    let i = pick(&mut rng, &files).unwrap();
                    let off = rng.range(0, files[i].1.max(1));
                    let len = rng.range(1, 512 << 10);
                    let f = OpenOptions::new().write(true).open(&files[i].0)?;
                    // SAFETY: plain syscall on an open descriptor.
                    let rc = unsafe {
                        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, len as i64)
                    };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if p < 92 {
                    let i = pick(&mut rng, &files).unwrap();
                    File::open(&files[i].0)?.sync_all()?;
                } else if p < 95 {
                    // SAFETY: no preconditions.
                    unsafe { libc::syncfs(File::open(&dir)?.as_raw_fd()) };
                } else if p < 97 {
                    n += 1;
                    subdir = dir.join(format!("d{n}"));
                    std::fs::create_dir_all(&subdir)?;
                } else {
                    let out = Command::new("fstrim").arg(&dir).output()?;
                    assert!(out.status.success(), "fstrim {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
                    s.trims += 1;
                }
                Ok(())
            })();
            match res {
                Ok(()) => {}
                Err(e) if nospace(&e) => {
                    s.enospc += 1;
                    // Make room: delete half the files.
                    for _ in 0..files.len() / 2 {
                        let (path, len) = files.swap_remove(0);
                        let _ = std::fs::remove_file(&path);
                        total -= len;
                    }
                }
                Err(e) => panic!("churn op {p} in {}: {e}", dir.display()),
            }
            drop(s);
            nap(stop, Duration::from_millis(rng.range(1, 8)));
        }
    });
    (w, stats)
}
