//! Where volumes and their snapshot images live: an xfs filesystem with
//! reflink on a loop device over a sparse file in /dev/shm, and loop-device
//! volumes over sparse files inside it.
//!
//! A snapshot image is a FICLONE (`cp --reflink=always`) of a volume's
//! backing file. On xfs the clone takes the source's IOLOCK and MMAPLOCK
//! exclusively, waits for direct I/O in progress and flushes dirty pages
//! first, so the image is the file's contents at one instant: every write
//! that completed at the volume's block layer before that instant is in it,
//! none that started after. (A write in flight at that instant may or may
//! not be; that is what a real snapshot does too, and why the agent is told
//! before and after.) `tests/accuracy_harness.rs` checks this for real.
//!
//! The frozen-copy variant holds writes in flight across a cut on purpose:
//! while the scratch filesystem is frozen (`fsfreeze -f`), a write to a
//! volume is accepted by the volume's block layer (the agent sees it
//! submitted) but the loop driver cannot write it to the backing file, so
//! the bio stays in flight until the filesystem is thawed. Reading the
//! backing file still works, so a plain copy taken while frozen is a
//! snapshot that does not contain the held writes. Reads of the *volume*
//! block while frozen (they queue behind the held writes in the loop
//! worker), so nothing may read the volume device while frozen.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::{
        fs::{FileExt, OpenOptionsExt},
        io::AsRawFd,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{require_root, scratch_dir, sh, LOOP_ALLOCATION};

use super::workload::Rng;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A name unique on this machine: `cbtacc-<pid>-<n>-<tag>`.
pub fn unique_name(tag: &str) -> String {
    format!("cbtacc-{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command line; returns whether it succeeded (output discarded).
fn try_sh(cmdline: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("{cmdline} >/dev/null 2>&1")).status().map(|s| s.success()).unwrap_or(false)
}

/// Attaches a loop device (`losetup -f --show OPTIONS FILE`).
pub fn attach_loop(file: &Path, options: &str) -> String {
    let _allocating = LOOP_ALLOCATION.lock().unwrap_or_else(|e| e.into_inner());
    sh(&format!("losetup -f --show {options} {}", file.display())).trim().to_string()
}

/// Detaches a loop device, retrying while it is briefly busy.
pub fn detach_loop(dev: &str) {
    for _ in 0..50 {
        if try_sh(&format!("losetup -d {dev}")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("warning: could not detach {dev}");
}

fn unmount(dir: &Path) {
    for _ in 0..50 {
        if try_sh(&format!("umount {}", dir.display())) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("warning: {} stayed busy, unmounting lazily", dir.display());
    try_sh(&format!("umount -l {}", dir.display()));
}

struct ScratchInner {
    backing: PathBuf,
    dev: Option<String>,
    mnt: Option<PathBuf>,
}

impl Drop for ScratchInner {
    fn drop(&mut self) {
        if let Some(mnt) = self.mnt.take() {
            // Never leave a frozen filesystem behind (a no-op otherwise).
            try_sh(&format!("fsfreeze -u {}", mnt.display()));
            unmount(&mnt);
            let _ = std::fs::remove_dir(&mnt);
        }
        if let Some(dev) = self.dev.take() {
            detach_loop(&dev);
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// An xfs filesystem (reflink=1, online discard so freed blocks go back to
/// tmpfs) on a loop device over a sparse file in /dev/shm, mounted under a
/// unique directory in /tmp. Clones share it; it is unmounted, detached and
/// removed when the last clone (and every [`Volume`] in it) is dropped.
#[derive(Clone)]
pub struct ScratchFs(Arc<ScratchInner>);

impl ScratchFs {
    pub fn new(tag: &str, size_gib: u64) -> Self {
        require_root();
        let name = unique_name(tag);
        let mut inner = ScratchInner { backing: scratch_dir().join(format!("{name}.xfs")), dev: None, mnt: None };
        File::create(&inner.backing)
            .and_then(|f| f.set_len(size_gib << 30))
            .unwrap_or_else(|e| panic!("creating {}: {e}", inner.backing.display()));
        let dev = attach_loop(&inner.backing, "");
        inner.dev = Some(dev.clone());
        sh(&format!("mkfs.xfs -q -f -K -m reflink=1 -b size=4096 {dev}"));
        let mnt = PathBuf::from(format!("/tmp/{name}"));
        std::fs::create_dir_all(&mnt).expect("creating mount point");
        sh(&format!("mount -o discard {dev} {}", mnt.display()));
        inner.mnt = Some(mnt);
        Self(Arc::new(inner))
    }

    pub fn mnt(&self) -> &Path {
        self.0.mnt.as_deref().expect("mounted")
    }

    /// The loop device the filesystem is on.
    pub fn device(&self) -> &str {
        self.0.dev.as_deref().expect("attached")
    }

    /// A unique path inside the filesystem.
    pub fn unique_path(&self, tag: &str) -> PathBuf {
        self.mnt().join(unique_name(tag))
    }

    /// Freezes the filesystem (`fsfreeze -f`) until the guard is thawed or
    /// dropped. While frozen, writes to volumes in it stay in flight.
    pub fn freeze(&self) -> Frozen {
        sh(&format!("fsfreeze -f {}", self.mnt().display()));
        Frozen { fs: self.clone(), since: Instant::now(), thawed: false }
    }

    /// Like [`Self::freeze`], by the FIFREEZE ioctl itself: no process to
    /// start, so a test watching a write in progress freezes within
    /// microseconds of deciding to, not milliseconds.
    pub fn freeze_now(&self) -> Frozen {
        const FIFREEZE: libc::c_ulong = 0xc004_5877;
        let dir = File::open(self.mnt()).unwrap_or_else(|e| panic!("{}: {e}", self.mnt().display()));
        // SAFETY: an ioctl on a descriptor open for the call; FIFREEZE reads
        // no argument.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) };
        assert_eq!(rc, 0, "FIFREEZE {}: {}", self.mnt().display(), io::Error::last_os_error());
        Frozen { fs: self.clone(), since: Instant::now(), thawed: false }
    }
}

/// Proof that the scratch filesystem is frozen; thaws on drop.
pub struct Frozen {
    fs: ScratchFs,
    pub since: Instant,
    thawed: bool,
}

impl Frozen {
    /// Thaws now; returns the instant just before the thaw started.
    pub fn thaw(mut self) -> Instant {
        let at = Instant::now();
        sh(&format!("fsfreeze -u {}", self.fs.mnt().display()));
        self.thawed = true;
        at
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.thawed {
            try_sh(&format!("fsfreeze -u {}", self.fs.mnt().display()));
        }
    }
}

/// A named volume: a loop device over a sparse file in a [`ScratchFs`]
/// (loop `--direct-io=on` optionally). Detached and removed on drop.
pub struct Volume {
    pub name: String,
    /// `/dev/loopN`.
    pub dev: String,
    pub backing: PathBuf,
    pub size: u64,
    pub direct_io: bool,
    fs: ScratchFs,
    attached: bool,
}

impl Volume {
    pub fn new(fs: &ScratchFs, name: &str, size_mib: u64, direct_io: bool) -> Self {
        Self::with_losetup(fs, name, size_mib, if direct_io { "--direct-io=on" } else { "" })
    }

    /// A volume attached with these `losetup` options (e.g. `--sizelimit`):
    /// the backing file is `size_mib`, the device may be smaller.
    pub fn with_losetup(fs: &ScratchFs, name: &str, size_mib: u64, options: &str) -> Self {
        let direct_io = options.contains("--direct-io=on");
        let backing = fs.unique_path(&format!("{name}.vol"));
        let size = size_mib << 20;
        File::create(&backing).and_then(|f| f.set_len(size)).expect("creating a volume's backing file");
        let dev = attach_loop(&backing, options);
        let v = Self { name: name.to_string(), dev, backing, size, direct_io, fs: fs.clone(), attached: true };
        if direct_io {
            let dio = std::fs::read_to_string(format!("/sys/block/{}/loop/dio", v.sysfs_name())).unwrap_or_default();
            assert_eq!(dio.trim(), "1", "{} did not switch to direct I/O", v.dev);
        }
        v
    }

    pub fn fs(&self) -> &ScratchFs {
        &self.fs
    }

    /// `loopN`.
    pub fn sysfs_name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    /// `(reads, writes)` in flight (`/sys/block/<dev>/inflight`).
    pub fn inflight(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/sys/block/{}/inflight", self.sysfs_name())).expect("inflight");
        let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().expect("inflight number")).collect();
        (v[0], v[1])
    }

    /// The device opened for O_DIRECT reads and writes.
    pub fn open_direct(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.dev)
            .unwrap_or_else(|e| panic!("opening {} O_DIRECT: {e}", self.dev))
    }

    /// The device opened for buffered reads and writes (its page cache).
    pub fn open_buffered(&self) -> File {
        OpenOptions::new().read(true).write(true).open(&self.dev).unwrap_or_else(|e| panic!("opening {}: {e}", self.dev))
    }

    /// Detaches the loop device now (the backing file stays until drop).
    pub fn detach(&mut self) {
        if self.attached {
            detach_loop(&self.dev);
            self.attached = false;
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        self.detach();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// An immutable snapshot image (a file); removed on drop.
pub struct Image {
    pub path: PathBuf,
    pub len: u64,
}

impl Image {
    /// Takes ownership of an existing file.
    pub fn adopt(path: PathBuf) -> Self {
        let len = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).len();
        Self { path, len }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const FICLONE: libc::c_ulong = 0x4004_9409;

/// `cp --reflink=always SRC DST` as one ioctl: fails rather than copying.
pub fn reflink(src: &Path, dst: &Path) -> io::Result<()> {
    let s = File::open(src)?;
    let d = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        drop(d);
        let _ = std::fs::remove_file(dst);
        return Err(e);
    }
    Ok(())
}

/// A point-in-time snapshot image of a volume: a reflink clone of its
/// backing file, inside the same scratch filesystem.
pub fn snapshot_reflink(vol: &Volume, tag: &str) -> Image {
    let dst = vol.fs.unique_path(&format!("{}-{tag}.img", vol.name));
    reflink(&vol.backing, &dst).unwrap_or_else(|e| panic!("FICLONE {} → {}: {e}", vol.backing.display(), dst.display()));
    Image::adopt(dst)
}

/// A point-in-time image of a block device (while nothing writes to it):
/// its bytes read with O_DIRECT, so neither page cache can hand back bytes
/// from before a re-map. Unlike a copy of a loop device's backing file, it
/// is what the device shows (its offset, its size).
pub fn device_image(dev: &str, dst: PathBuf) -> Image {
    use std::io::{Seek, SeekFrom};
    let mut src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("opening {dev} O_DIRECT: {e}"));
    let len = src.seek(SeekFrom::End(0)).expect("device size");
    let out = File::create(&dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
    out.set_len(len).expect("sizing the image");
    let mut buf = AlignedBuf::new(1 << 20);
    let mut off = 0;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off).unwrap_or_else(|e| panic!("reading {dev} at {off}: {e}"));
        // Zeros stay holes: images of mostly empty volumes stay cheap.
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], off).expect("writing the image");
        }
        off += n as u64;
    }
    Image::adopt(dst)
}

/// [`device_image`] of a volume, into its scratch filesystem.
pub fn snapshot_device(vol: &Volume, tag: &str) -> Image {
    device_image(&vol.dev, vol.fs.unique_path(&format!("{}-{tag}.img", vol.name)))
}

/// A snapshot image taken by a plain (sparse) copy of the backing file
/// while the scratch filesystem is frozen, into /dev/shm (outside the
/// frozen filesystem, which cannot be written).
pub fn snapshot_frozen_copy(vol: &Volume, _frozen: &Frozen, tag: &str) -> Image {
    let dst = scratch_dir().join(unique_name(&format!("{}-{tag}.img", vol.name)));
    sparse_copy(&vol.backing, &dst).unwrap_or_else(|e| panic!("copying {} → {}: {e}", vol.backing.display(), dst.display()));
    Image::adopt(dst)
}

/// Data segments `[start, end)` of a file (SEEK_DATA / SEEK_HOLE); the
/// whole file if the filesystem cannot tell.
pub fn data_segments(f: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: plain syscall on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return Ok(vec![(0, len)]),
                _ => return Err(e),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        if end > data as u64 {
            out.push((data as u64, end));
        }
        pos = hole;
    }
    Ok(out)
}

/// Copies a file, keeping holes (and skipping all-zero blocks) so a copy
/// of a sparse volume stays small.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let s = File::open(src)?;
    let len = s.metadata()?.len();
    let d = OpenOptions::new().write(true).create_new(true).open(dst)?;
    d.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_segments(&s)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                d.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Copies `src` to `dst` (a new file): a reflink when both are in the same
/// xfs filesystem, a sparse copy otherwise.
pub fn copy_file(src: &Path, dst: &Path) {
    if reflink(src, dst).is_err() {
        sparse_copy(src, dst).unwrap_or_else(|e| panic!("copying {} → {}: {e}", src.display(), dst.display()));
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        assert!(len > 0);
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, len }
    }

    pub fn random(len: usize, rng: &mut Rng) -> Self {
        let mut b = Self::new(len);
        rng.fill(&mut b);
        b
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

/// One O_DIRECT write of random bytes at `offset` (512-byte aligned).
pub fn write_direct(f: &File, offset: u64, len: usize, rng: &mut Rng) {
    let buf = AlignedBuf::random(len, rng);
    f.write_all_at(&buf, offset).unwrap_or_else(|e| panic!("O_DIRECT write of {len} at {offset}: {e}"));
}

/// Writes that a frozen scratch filesystem holds in flight: each is an
/// O_DIRECT write of random bytes on a thread of its own, submitted to the
/// volume's block layer and stuck in the loop driver until the thaw.
/// A writer thread and when its write completed.
type HeldWriter = (JoinHandle<()>, Arc<Mutex<Option<Instant>>>);

pub struct HeldWrites {
    pub ranges: Vec<(u64, u64)>,
    threads: Vec<HeldWriter>,
}

impl HeldWrites {
    /// Starts one write per `(offset, len)` (offsets and lengths multiples
    /// of 512; keep them apart so the block layer cannot merge them) and
    /// returns once the volume shows all of them in flight and none has
    /// completed: proof they are held. Panics otherwise.
    pub fn start(vol: &Volume, _frozen: &Frozen, ranges: &[(u64, u64)], rng: &mut Rng) -> Self {
        let (_, before) = vol.inflight();
        let mut threads = Vec::new();
        for &(offset, len) in ranges {
            let f = vol.open_direct();
            let buf = AlignedBuf::random(len as usize, rng);
            let done = Arc::new(Mutex::new(None));
            let d = Arc::clone(&done);
            let t = std::thread::spawn(move || {
                f.write_all_at(&buf, offset).unwrap_or_else(|e| panic!("held write at {offset}: {e}"));
                *d.lock().unwrap() = Some(Instant::now());
            });
            threads.push((t, done));
        }
        let held = Self { ranges: ranges.to_vec(), threads };
        let want = before + ranges.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, w) = vol.inflight();
            if w >= want {
                break;
            }
            assert!(Instant::now() < deadline, "{}: only {w} writes in flight, wanted {want}: the freeze does not hold writes", vol.dev);
            std::thread::sleep(Duration::from_millis(5));
        }
        // Give them a moment to (wrongly) complete, then check none did.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(held.completed(), 0, "{}: a write completed while the scratch filesystem was frozen", vol.dev);
        held
    }

    /// How many have completed so far.
    pub fn completed(&self) -> usize {
        self.threads.iter().filter(|(_, d)| d.lock().unwrap().is_some()).count()
    }

    /// Waits for every write; asserts each completed after `thawed_at`.
    pub fn join_after(self, thawed_at: Instant) {
        for (t, done) in self.threads {
            t.join().expect("held write thread panicked");
            let at = done.lock().unwrap().expect("completion time");
            assert!(at >= thawed_at, "a held write completed {:?} before the thaw", thawed_at - at);
        }
    }
}
