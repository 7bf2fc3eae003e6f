//! Real filesystems on a tracked loop device: ext4, xfs and btrfs, each
//! driven through a churn workload (create, append, overwrite, delete with
//! online discard, rename, mkdir, truncate, fallocate, hole punching, fsync
//! and sync).
//!
//! Truth is independent of the tracker: the device image taken (unmounted)
//! before tracking began is compared byte for byte with the image taken
//! after the final unmount. The tracker must report a superset of the
//! chunks that differ, with no gap and no loss, and the kernel's own I/O
//! counters must not exceed what was captured. On ext4 and xfs a second
//! view comes from the filesystem itself: every block `filefrag -v` maps
//! for data the workload wrote while tracked must lie in a captured chunk.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use cbt_tests::{accuracy::Rng, assert_superset, chunks, image_diff, require_root, sh, Harness, LoopDevice, RoaringTreemap};

/// Chunk size the tracker runs with (its default) and the truth is cut at.
const GRANULARITY: u64 = 4096;
/// Unit of the "logical blocks written while tracked" sets (the ext4 and
/// xfs block size, both forced or defaulted to 4 KiB below).
const FS_BLOCK: u64 = 4096;
const DEVICE_MIB: u64 = 512;
/// Concurrent workloads during the tracked churn.
const WRITERS: u64 = 2;

#[derive(Clone, Copy, Debug)]
enum Fs {
    Ext4,
    Xfs,
    Btrfs,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
            Fs::Btrfs => "btrfs",
        }
    }

    fn mkfs(self, dev: &str) -> String {
        match self {
            // Lazy init would zero inode tables and journal in the
            // background after mount: harmless (captured), but it writes
            // zeros over zeros and would only blur the over-report figure.
            Fs::Ext4 => format!("mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 {dev}"),
            Fs::Xfs => format!("mkfs.xfs -q -f -b size=4096 {dev}"),
            Fs::Btrfs => format!("mkfs.btrfs -q -f {dev}"),
        }
    }

    /// Online discard, so that deleting and punching send discards down.
    fn mount_options(self) -> &'static str {
        match self {
            Fs::Ext4 | Fs::Xfs => "discard",
            Fs::Btrfs => "discard=sync",
        }
    }

    fn tools(self) -> &'static [&'static str] {
        match self {
            Fs::Ext4 => &["mkfs.ext4", "filefrag", "fallocate", "mount", "umount"],
            Fs::Xfs => &["mkfs.xfs", "filefrag", "fallocate", "mount", "umount"],
            Fs::Btrfs => &["mkfs.btrfs", "fallocate", "mount", "umount"],
        }
    }

    /// Whether FIEMAP physical offsets are device byte offsets. On btrfs
    /// they are addresses in the filesystem's own logical space (mapped to
    /// the device through its chunk tree), so the view does not apply.
    fn fiemap_is_physical(self) -> bool {
        matches!(self, Fs::Ext4 | Fs::Xfs)
    }

    fn seed(self) -> u64 {
        match self {
            Fs::Ext4 => 0xe4e4_0001,
            Fs::Xfs => 0x0f5f_0002,
            Fs::Btrfs => 0xb7f5_0003,
        }
    }
}


/// A mounted filesystem on a fresh mount point; unmounted on drop.
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(dev: &LoopDevice, fs: Fs, tag: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/cbt-fs-{}-{tag}-{}", fs.name(), std::process::id()));
        fs::create_dir_all(&dir).expect("creating mount point");
        sh(&format!("mount -t {} -o {} {} {}", fs.name(), fs.mount_options(), dev.path, dir.display()));
        Self { dir, mounted: true }
    }

    fn unmount(&mut self) {
        sh(&format!("umount {}", self.dir.display()));
        self.mounted = false;
        let _ = fs::remove_dir(&self.dir);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount").arg(&self.dir).status().map(|s| s.success()).unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Image copies on tmpfs: removed when the test passes, kept (and named)
/// when it fails so an under-report can be examined.
#[derive(Default)]
struct Images(Vec<PathBuf>);

impl Images {
    fn keep(&mut self, path: PathBuf) -> PathBuf {
        self.0.push(path.clone());
        path
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        for p in &self.0 {
            if std::thread::panicking() {
                eprintln!("image kept for inspection: {}", p.display());
            } else {
                let _ = fs::remove_file(p);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    created: u64,
    bytes_written: u64,
    appended: u64,
    overwritten: u64,
    deleted: u64,
    renamed: u64,
    dirs: u64,
    truncated: u64,
    fallocated: u64,
    punched: u64,
    fsyncs: u64,
    syncs: u64,
}

/// The workload and what it did. Paths are relative to the mount point so
/// the same state carries over a remount on another mount point.
struct Workload {
    root: PathBuf,
    rng: Rng,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    next_id: u64,
    /// While tracked: logical `FS_BLOCK`s of each live file that received
    /// data through `write`. After a sync each such block that is still
    /// mapped (not a hole, not unwritten) is on disk where FIEMAP says,
    /// and was written there after tracking began.
    written: BTreeMap<PathBuf, RoaringTreemap>,
    tracking: bool,
    counts: Counts,
}

impl Workload {
    /// A workload confined to `root/base`, so several can run at once.
    fn new(root: PathBuf, base: &str, seed: u64) -> Self {
        Self {
            root,
            rng: Rng::new(seed),
            files: Vec::new(),
            dirs: vec![PathBuf::from(base)],
            next_id: 0,
            written: BTreeMap::new(),
            tracking: false,
            counts: Counts::default(),
        }
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn note_written(&mut self, rel: &Path, offset: u64, len: u64) {
        self.counts.bytes_written += len;
        if self.tracking && len > 0 {
            let set = self.written.entry(rel.to_path_buf()).or_default();
            set.insert_range(offset / FS_BLOCK..=(offset + len - 1) / FS_BLOCK);
        }
    }

    fn pick_file(&mut self) -> Option<PathBuf> {
        if self.files.is_empty() {
            return None;
        }
        let i = self.rng.range(0, self.files.len() as u64) as usize;
        Some(self.files[i].clone())
    }

    fn pick_dir(&mut self) -> PathBuf {
        let i = self.rng.range(0, self.dirs.len() as u64) as usize;
        self.dirs[i].clone()
    }

    fn size_of(&self, rel: &Path) -> u64 {
        fs::metadata(self.abs(rel)).expect("stat").len()
    }

    fn mkdir(&mut self) {
        let parent = self.pick_dir();
        self.next_id += 1;
        let rel = parent.join(format!("d{}", self.next_id));
        fs::create_dir(self.abs(&rel)).expect("mkdir");
        self.dirs.push(rel);
        self.counts.dirs += 1;
    }

    /// A new file of `size` bytes, written front to back in uneven pieces.
    fn create(&mut self, size: u64) -> PathBuf {
        let dir = self.pick_dir();
        self.next_id += 1;
        let rel = dir.join(format!("f{}.dat", self.next_id));
        let mut f = File::create(self.abs(&rel)).expect("create");
        let mut done = 0;
        while done < size {
            let piece = self.rng.range(1, 300_000).min(size - done);
            f.write_all(&self.rng.bytes(piece as usize)).expect("write");
            done += piece;
        }
        if self.rng.chance(15) {
            f.sync_all().expect("fsync");
            self.counts.fsyncs += 1;
        }
        drop(f);
        self.note_written(&rel, 0, size);
        self.files.push(rel.clone());
        self.counts.created += 1;
        rel
    }

    fn append(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        let size = self.size_of(&rel);
        let len = self.rng.range(1, 200_000);
        let mut f = OpenOptions::new().append(true).open(self.abs(&rel)).expect("open for append");
        f.write_all(&self.rng.bytes(len as usize)).expect("append");
        if self.rng.chance(20) {
            f.sync_data().expect("fdatasync");
            self.counts.fsyncs += 1;
        }
        self.note_written(&rel, size, len);
        self.counts.appended += 1;
    }

    /// Overwrites a range inside the file (plain buffered `pwrite`).
    fn overwrite(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        let size = self.size_of(&rel);
        if size < 2 {
            return;
        }
        let offset = self.rng.range(0, size - 1);
        let len = self.rng.range(1, (size - offset).min(150_000) + 1);
        let f = OpenOptions::new().write(true).open(self.abs(&rel)).expect("open for overwrite");
        f.write_all_at(&self.rng.bytes(len as usize), offset).expect("pwrite");
        self.note_written(&rel, offset, len);
        self.counts.overwritten += 1;
    }

    fn delete(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        fs::remove_file(self.abs(&rel)).expect("unlink");
        self.files.retain(|f| f != &rel);
        self.written.remove(&rel);
        self.counts.deleted += 1;
    }

    fn rename(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        let dir = self.pick_dir();
        self.next_id += 1;
        let to = dir.join(format!("r{}.dat", self.next_id));
        fs::rename(self.abs(&rel), self.abs(&to)).expect("rename");
        for f in self.files.iter_mut().filter(|f| **f == rel) {
            *f = to.clone();
        }
        if let Some(set) = self.written.remove(&rel) {
            self.written.insert(to, set);
        }
        self.counts.renamed += 1;
    }

    /// Shrinks (to an uneven size) or extends (leaving a hole).
    fn truncate(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        let size = self.size_of(&rel);
        let new =
            if size > 1 && self.rng.chance(70) { self.rng.range(0, size) } else { size + self.rng.range(1, 1 << 20) };
        OpenOptions::new().write(true).open(self.abs(&rel)).expect("open").set_len(new).expect("ftruncate");
        self.counts.truncated += 1;
    }

    /// `fallocate`: preallocates inside or past the end, with or without
    /// changing the size; sometimes writes into the new unwritten range.
    fn fallocate(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        let size = self.size_of(&rel);
        let offset = self.rng.range(0, size + (1 << 20));
        let len = self.rng.range(4096, 2 << 20);
        let keep = if self.rng.chance(50) { "-n " } else { "" };
        sh(&format!("fallocate {keep}-o {offset} -l {len} {}", self.abs(&rel).display()));
        self.counts.fallocated += 1;
        if self.rng.chance(50) {
            let at = offset + self.rng.range(0, len);
            let n = self.rng.range(1, 100_000);
            let f = OpenOptions::new().write(true).open(self.abs(&rel)).expect("open");
            f.write_all_at(&self.rng.bytes(n as usize), at).expect("pwrite into preallocation");
            self.note_written(&rel, at, n);
        }
    }

    /// `fallocate -p`: a hole with uneven edges (partial blocks are zeroed).
    fn punch(&mut self) {
        let Some(rel) = self.pick_file() else { return };
        let size = self.size_of(&rel);
        if size < 3 {
            return;
        }
        let offset = self.rng.range(0, size - 1);
        let len = self.rng.range(1, (size - offset).min(3 << 20) + 1);
        sh(&format!("fallocate -p -o {offset} -l {len} {}", self.abs(&rel).display()));
        self.counts.punched += 1;
    }

    fn sync(&mut self) {
        // syncfs of this filesystem only: parallel tests have their own.
        sh(&format!("sync -f {}", self.root.display()));
        self.counts.syncs += 1;
    }

    /// The untracked starting state.
    fn populate(&mut self) {
        fs::create_dir(self.abs(&self.dirs[0])).expect("mkdir base");
        for _ in 0..12 {
            self.mkdir();
        }
        for _ in 0..70 {
            let size = file_size(&mut self.rng);
            self.create(size);
        }
        // A few big files, so later punches and deletes free large extents.
        for _ in 0..2 {
            let size = self.rng.range(8 << 20, 16 << 20) + self.rng.range(1, 4096);
            self.create(size);
        }
        self.sync();
    }

    /// The tracked churn.
    fn churn(&mut self) {
        for round in 0..4 {
            for _ in 0..4 {
                self.mkdir();
            }
            for _ in 0..45 {
                let size = file_size(&mut self.rng);
                self.create(size);
            }
            for _ in 0..30 {
                self.append();
            }
            for _ in 0..30 {
                self.overwrite();
            }
            // Deleting what reached the disk is what sends discards.
            self.sync();
            for _ in 0..35 {
                self.delete();
            }
            for _ in 0..20 {
                self.rename();
            }
            for _ in 0..15 {
                self.truncate();
            }
            for _ in 0..15 {
                self.fallocate();
            }
            for _ in 0..20 {
                self.punch();
            }
            if round % 2 == 1 {
                sh("sync");
                self.counts.syncs += 1;
            } else {
                self.sync();
            }
            // Unsynced churn left for the unmount to flush.
            for _ in 0..10 {
                self.overwrite();
                self.append();
            }
        }
        // A big file made durable, then mostly punched and deleted.
        let size = (16 << 20) + 777;
        let big = self.create(size);
        self.sync();
        sh(&format!("fallocate -p -o 1000 -l {} {}", 10 << 20, self.abs(&big).display()));
        self.counts.punched += 1;
        self.sync();
        fs::remove_file(self.abs(&big)).expect("unlink big");
        self.files.retain(|f| f != &big);
        self.written.remove(&big);
        self.counts.deleted += 1;
        self.sync();
        for _ in 0..20 {
            let size = file_size(&mut self.rng);
            self.create(size);
        }
    }
}

/// Device chunks holding data the workload wrote while tracked, by the
/// filesystem's own account (FIEMAP through `filefrag -v`).
fn extent_chunks(workloads: &[Workload]) -> (RoaringTreemap, u64) {
    let mut out = RoaringTreemap::new();
    let mut blocks = 0u64;
    for (w, (rel, written)) in workloads.iter().flat_map(|w| w.written.iter().map(move |e| (w, e))) {
        if written.is_empty() {
            continue;
        }
        let path = w.abs(rel);
        let text = sh(&format!("filefrag -v {}", path.display()));
        let mut block_size = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("File size of ") {
                // "... is N (M blocks of B bytes)"
                let bs = rest
                    .rsplit_once(" of ")
                    .and_then(|(_, b)| b.trim_end_matches(" bytes)").trim().parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("unparsed filefrag header: {line}"));
                assert_eq!(bs, FS_BLOCK, "{}: filesystem block size {bs}", path.display());
                block_size = Some(bs);
                continue;
            }
            let parts: Vec<&str> = line.split(':').map(str::trim).collect();
            if parts.len() < 5 || parts[0].parse::<u64>().is_err() {
                continue;
            }
            let range = |s: &str| -> (u64, u64) {
                let (a, b) = s.split_once("..").unwrap_or_else(|| panic!("unparsed filefrag extent: {line}"));
                (a.trim().parse().unwrap(), b.trim().parse().unwrap())
            };
            let (l0, l1) = range(parts[1]);
            let (p0, _) = range(parts[2]);
            let flags = parts[parts.len() - 1];
            if flags.contains("unwritten")
                || flags.contains("unknown")
                || flags.contains("delalloc")
                || flags.contains("inline")
            {
                continue;
            }
            let bs = block_size.expect("extent before header");
            let mut extent = RoaringTreemap::new();
            extent.insert_range(l0..=l1);
            for lb in &(&extent & written) {
                let phys = p0 + (lb - l0);
                out |= chunks(phys * bs, bs, GRANULARITY);
                blocks += 1;
            }
        }
    }
    (out, blocks)
}

fn exercise(fs: Fs) {
    require_root();
    for tool in fs.tools() {
        let found =
            Command::new("sh").arg("-c").arg(format!("command -v {tool} >/dev/null")).status().map(|s| s.success());
        assert!(matches!(found, Ok(true)), "{}: `{tool}` is not installed (run `cargo xtask setup`)", fs.name());
    }
    let name = fs.name();
    let t_start = Instant::now();
    let dev = LoopDevice::new(&format!("fs-{name}"), DEVICE_MIB);
    sh(&fs.mkfs(&dev.path));
    let mut images = Images::default();

    // Untracked: the starting population, then image A of the unmounted device.
    let mut workloads = {
        let mut mnt = Mount::new(&dev, fs, "pre");
        let mut workloads: Vec<Workload> =
            (0..WRITERS).map(|i| Workload::new(mnt.dir.clone(), &format!("w{i}"), fs.seed() + i)).collect();
        for w in &mut workloads {
            w.populate();
        }
        mnt.unmount();
        workloads
    };
    let image_a = images.keep(dev.image("A"));
    for (i, w) in workloads.iter_mut().enumerate() {
        eprintln!("{name}: writer {i} populated {:?}", w.counts);
        w.counts = Counts::default();
    }

    // Tracked from here on.
    let harness = Harness::start();
    let key = dev.key();
    let t0 = Instant::now();
    let mut mnt = Mount::new(&dev, fs, "churn");
    // Concurrent writers, each in its own directory tree.
    std::thread::scope(|s| {
        for w in &mut workloads {
            w.root = mnt.dir.clone();
            w.tracking = true;
            s.spawn(move || {
                w.churn();
                w.sync();
            });
        }
    });
    let extents = fs.fiemap_is_physical().then(|| extent_chunks(&workloads));
    mnt.unmount();
    let churn_time = t0.elapsed();
    let image_b = images.keep(dev.image("B"));
    for (i, w) in workloads.iter().enumerate() {
        eprintln!("{name}: writer {i} churn {:?}", w.counts);
    }
    eprintln!("{name}: churn took {churn_time:.1?}");

    // Everything the tracker and the kernel say, printed before any check.
    let truth = image_diff(&image_a, &image_b, GRANULARITY);
    let captured = harness.changed(key);
    let accounting = harness.accounting(key);
    eprintln!("{name}: {accounting}");
    let (last, committed, gaps) = (accounting.last_kernel, accounting.committed_offset, &accounting.gaps);
    let surplus = accounting.captured_sectors as i64 - accounting.kernel_sectors() as i64;

    // 1. captured ⊇ truth.
    assert!(truth.len() > 1000, "{name}: the churn changed only {} chunks: the workload did not run", truth.len());
    let ratio = assert_superset(name, &captured, &truth);
    eprintln!("{name}: over-report ratio {ratio:.3} (truth {} chunks, captured {})", truth.len(), captured.len());
    let extra = &captured - &truth;
    let image = File::open(&image_b).expect("image B");
    let mut buf = vec![0u8; GRANULARITY as usize];
    let zero = extra
        .iter()
        .filter(|c| {
            image.read_exact_at(&mut buf, c * GRANULARITY).expect("reading image B");
            buf.iter().all(|&b| b == 0)
        })
        .count();
    eprintln!("{name}: of {} chunks captured but unchanged, {zero} are zero in both images", extra.len());

    // 2. The filesystem's own view: blocks it maps for data written while
    //    tracked were written while tracked, so they must be captured
    //    (whether or not their bytes happen to differ).
    if let Some((from_fs, blocks)) = extents {
        assert!(blocks > 100, "{name}: filefrag mapped only {blocks} written blocks");
        assert_superset(&format!("{name} filefrag view ({blocks} written blocks)"), &captured, &from_fs);
        let unchanged = (&from_fs - &truth).len();
        eprintln!("{name}: {unchanged} of {} filefrag chunks are not in the image diff", from_fs.len());
    }

    // 3. Nothing dropped, no recursion misses, no gap for the device.
    harness.assert_no_loss();
    assert!(gaps.is_empty(), "{name}: {} tracking gaps for {key}: {gaps:#?}", gaps.len());

    // 4. The kernel's witness: unmounted, nothing is in flight, so every
    //    change sector the kernel completed since the baseline was captured.
    assert_eq!(last.in_flight, 0, "{name}: I/O in flight after unmount: {last:?}");
    assert!(surplus >= 0, "{name}: the kernel completed {} more change sectors than were captured", -surplus);
    assert!(committed.is_some_and(|c| c >= 0), "{name}: witness committed offset {committed:?}");
    eprintln!("{name}: whole test {:.1?}", t_start.elapsed());
}

#[test]
fn ext4_churn_is_captured() {
    exercise(Fs::Ext4);
}

#[test]
fn xfs_churn_is_captured() {
    exercise(Fs::Xfs);
}

#[test]
fn btrfs_churn_is_captured() {
    exercise(Fs::Btrfs);
}

/// A file size: mostly small, sometimes large, now and then 4 KiB-aligned.
fn file_size(rng: &mut Rng) -> u64 {
    let size = match rng.range(0, 100) {
        0..=29 => rng.range(1, 8192),
        30..=69 => rng.range(8192, 256 << 10),
        70..=94 => rng.range(256 << 10, 2 << 20),
        _ => rng.range(2 << 20, 8 << 20),
    };
    if rng.chance(10) {
        size.div_ceil(4096) * 4096
    } else {
        size
    }
}
