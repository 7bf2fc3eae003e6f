//! The independent truth (byte comparison of snapshot images), the parsed
//! answer of `cbtctl delta|allocated -o json`, the superset assertion, the
//! range application and the accuracy report.
//!
//! Truth is kept at 512-byte sectors, the unit of every block-layer write:
//! a delta passes only if every sector whose bytes differ lies entirely
//! inside a reported range, so a tracker may report at any granularity.
//! Reported figures use 4 KiB blocks (`REPORT_BLOCK`), the tracker's chunk.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::{fs::FileExt, io::AsRawFd},
    path::{Path, PathBuf},
};

use roaring::RoaringTreemap;

use super::scratch::data_segments;

pub const SECTOR: u64 = 512;
/// The unit of true and reported bytes in the accuracy report.
pub const REPORT_BLOCK: u64 = 4096;
const WINDOW: u64 = 4 << 20;

/// Reads `buf.len()` bytes at `offset`, zeros past the end of the file.
fn read_padded(f: &File, len: u64, offset: u64, buf: &mut [u8]) {
    let avail = len.saturating_sub(offset).min(buf.len() as u64) as usize;
    f.read_exact_at(&mut buf[..avail], offset).unwrap_or_else(|e| panic!("reading at {offset}: {e}"));
    buf[avail..].fill(0);
}

fn drop_cache(f: &File) {
    // SAFETY: advisory syscall on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Union of sorted-or-not `[start, end)` ranges, widened to `align`.
fn union_aligned(mut v: Vec<(u64, u64)>, align: u64) -> Vec<(u64, u64)> {
    for r in &mut v {
        r.0 = r.0 / align * align;
        r.1 = r.1.div_ceil(align) * align;
    }
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Chunks of `granularity` bytes (a power of two, at most 4 MiB) whose
/// bytes differ between two files. Files of different sizes compare as if
/// the shorter were extended with zeros to the longer's size: a chunk past
/// the shorter file's end counts as changed iff it holds a non-zero byte
/// in the longer file (a grown volume reads zeros there unless written; a
/// shrunk one has lost whatever was there, which only matters if it was
/// not zero). A partial last chunk counts like a whole one. Regions that
/// are holes in both files are skipped (they read as zeros in both).
pub fn changed_chunks(a: &Path, b: &Path, granularity: u64) -> RoaringTreemap {
    assert!(granularity.is_power_of_two() && granularity <= WINDOW, "granularity {granularity}");
    let fa = File::open(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let fb = File::open(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let mut segs = data_segments(&fa).expect("SEEK_DATA");
    segs.extend(data_segments(&fb).expect("SEEK_DATA"));
    let segs = union_aligned(segs, granularity);
    let len = la.max(lb);
    let mut diff = RoaringTreemap::new();
    let (mut ba, mut bb) = (vec![0u8; WINDOW as usize], vec![0u8; WINDOW as usize]);
    for (start, end) in segs {
        let end = end.min(len.div_ceil(granularity) * granularity);
        let mut off = start;
        while off < end {
            let n = (end - off).min(WINDOW) as usize;
            read_padded(&fa, la, off, &mut ba[..n]);
            read_padded(&fb, lb, off, &mut bb[..n]);
            if ba[..n] != bb[..n] {
                let g = granularity as usize;
                for (i, (ca, cb)) in ba[..n].chunks(g).zip(bb[..n].chunks(g)).enumerate() {
                    if ca != cb {
                        diff.insert(off / granularity + i as u64);
                    }
                }
            }
            off += n as u64;
        }
    }
    drop_cache(&fa);
    drop_cache(&fb);
    diff
}

/// Chunks of a file holding a non-zero byte.
pub fn nonzero_chunks(image: &Path, granularity: u64) -> RoaringTreemap {
    let empty = crate::scratch_dir().join(super::scratch::unique_name("empty"));
    File::create(&empty).expect("empty file");
    let set = changed_chunks(image, &empty, granularity);
    let _ = std::fs::remove_file(&empty);
    set
}

/// The sectors whose bytes differ between two snapshot images.
#[derive(Clone, Debug)]
pub struct Truth {
    pub sectors: RoaringTreemap,
    /// Size of the compared images (the longer one).
    pub len: u64,
}

impl Truth {
    pub fn between(base: &Path, target: &Path) -> Self {
        let len = std::fs::metadata(base).unwrap().len().max(std::fs::metadata(target).unwrap().len());
        Self { sectors: changed_chunks(base, target, SECTOR), len }
    }

    /// Non-zero sectors of one image (the truth for `allocated`).
    pub fn nonzero(image: &Path) -> Self {
        Self { sectors: nonzero_chunks(image, SECTOR), len: std::fs::metadata(image).unwrap().len() }
    }

    /// The same set at a coarser granularity (a multiple of 512).
    pub fn chunks(&self, granularity: u64) -> RoaringTreemap {
        assert!(granularity.is_multiple_of(SECTOR));
        let per = granularity / SECTOR;
        let mut out = RoaringTreemap::new();
        for s in self.sectors.iter() {
            out.insert(s / per);
        }
        out
    }

    /// Bytes of the 4 KiB blocks that changed (the report's `true_bytes`).
    pub fn report_bytes(&self) -> u64 {
        self.chunks(REPORT_BLOCK).len() * REPORT_BLOCK
    }

    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty()
    }

    /// Whether every byte of `[offset, offset + len)` is in a changed sector.
    pub fn contains_range(&self, offset: u64, len: u64) -> bool {
        (offset / SECTOR..(offset + len).div_ceil(SECTOR)).all(|s| self.sectors.contains(s))
    }
}

/// One answer of `cbtctl delta|allocated -o json`.
#[derive(Clone, Debug)]
pub struct Ranges {
    pub metadata_type: String,
    pub capacity: u64,
    /// `(byte_offset, size_bytes)` as listed.
    pub list: Vec<(u64, u64)>,
}

impl Ranges {
    /// Parses `{"block_metadata_type":..,"volume_capacity_bytes":N,
    /// "block_metadata":[{"byte_offset":N,"size_bytes":N},...]}`.
    pub fn parse(json: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(json.trim()).map_err(|e| format!("not one JSON object ({e}): {json:.400}"))?;
        let metadata_type = v["block_metadata_type"].as_str().ok_or("no block_metadata_type")?.to_string();
        let capacity = v["volume_capacity_bytes"].as_u64().ok_or("no volume_capacity_bytes")?;
        let list = match &v["block_metadata"] {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|b| match (b["byte_offset"].as_u64(), b["size_bytes"].as_u64()) {
                    (Some(o), Some(s)) => Ok((o, s)),
                    _ => Err(format!("bad block_metadata entry {b}")),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(format!("block_metadata is not a list: {other:.200}")),
        };
        Ok(Self { metadata_type, capacity, list })
    }

    /// Ranges covering a set of chunks (for the oracle and unit checks).
    pub fn from_chunks(set: &RoaringTreemap, granularity: u64, capacity: u64) -> Self {
        let mut list: Vec<(u64, u64)> = Vec::new();
        for c in set.iter() {
            let (o, e) = (c * granularity, ((c + 1) * granularity).min(capacity));
            match list.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += e - o,
                _ => list.push((o, e - o)),
            }
        }
        Self { metadata_type: "VARIABLE_LENGTH".into(), capacity, list }
    }

    /// Sorted, coalesced `[start, end)`.
    pub fn merged(&self) -> Vec<(u64, u64)> {
        union_aligned(self.list.iter().map(|&(o, s)| (o, o + s)).collect(), 1)
    }

    /// Bytes in the union of the ranges.
    pub fn bytes(&self) -> u64 {
        self.merged().iter().map(|(s, e)| e - s).sum()
    }

    /// Units (of `unit` bytes) lying entirely inside the union.
    pub fn covered(&self, unit: u64) -> RoaringTreemap {
        let mut set = RoaringTreemap::new();
        for (s, e) in self.merged() {
            let (first, end) = (s.div_ceil(unit), e / unit);
            if end > first {
                set.insert_range(first..end);
            }
        }
        set
    }

    /// The CSI stream rules that do not concern the superset: constant
    /// capacity equal to the volume's size, a known type, `size_bytes` > 0,
    /// tuples in strictly ascending `byte_offset` order that never overlap
    /// (touching is allowed), none past the volume's end.
    pub fn validate(&self, volume_len: u64) -> Result<(), String> {
        if self.capacity != volume_len {
            return Err(format!("volume_capacity_bytes {} but the volume has {volume_len} bytes", self.capacity));
        }
        if self.metadata_type != "VARIABLE_LENGTH" && self.metadata_type != "FIXED_LENGTH" {
            return Err(format!("block_metadata_type {:?}", self.metadata_type));
        }
        let mut prev_end = 0u64;
        for (i, &(o, s)) in self.list.iter().enumerate() {
            if s == 0 {
                return Err(format!("entry {i} has size_bytes 0"));
            }
            if self.metadata_type == "FIXED_LENGTH" && s != self.list[0].1 {
                return Err(format!("FIXED_LENGTH entry {i} has size {s}, the first has {}", self.list[0].1));
            }
            if o.checked_add(s).is_none_or(|e| e > volume_len) {
                return Err(format!("entry {i} ({o}+{s}) goes past the volume's end ({volume_len})"));
            }
            if i > 0 && o < prev_end {
                return Err(format!("entry {i} at {o} is out of order or overlaps the previous one (which ends at {prev_end})"));
            }
            prev_end = o + s;
        }
        Ok(())
    }
}

/// Byte ranges (`[start, end)`) of a sector set, coalesced.
pub fn sector_ranges(set: &RoaringTreemap, max: usize) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in set.iter() {
        if let Some(last) = out.last_mut() {
            if last.1 == s * SECTOR {
                last.1 += SECTOR;
                continue;
            }
        }
        if out.len() == max {
            break;
        }
        out.push((s * SECTOR, (s + 1) * SECTOR));
    }
    out
}

/// Figures of one answered pair.
#[derive(Clone, Copy, Debug, Default)]
pub struct Coverage {
    pub reported_bytes: u64,
    pub true_bytes: u64,
}

/// Asserts the contract's first rule: every sector whose bytes differ lies
/// inside a reported range. Also checks the answer's capacity, order and
/// bounds. Returns the figures for the report.
pub fn assert_delta_superset(what: &str, delta: &Ranges, truth: &Truth) -> Coverage {
    if let Err(e) = delta.validate(truth.len) {
        panic!("{what}: malformed answer: {e}");
    }
    let covered = delta.covered(SECTOR);
    let missing = &truth.sectors - &covered;
    let cov = Coverage { reported_bytes: delta.bytes(), true_bytes: truth.report_bytes() };
    if !missing.is_empty() {
        let missing_blocks = {
            let t = Truth { sectors: missing.clone(), len: truth.len };
            t.chunks(REPORT_BLOCK).len()
        };
        let first: Vec<String> = sector_ranges(&missing, 10).iter().map(|(s, e)| format!("[{s}, {e}) ({} B)", e - s)).collect();
        panic!(
            "{what}: UNDER-REPORTED: {} of {} changed sectors ({missing_blocks} of {} changed 4 KiB blocks, {} bytes) \
             are not covered by the {} reported ranges ({} bytes). First missing byte ranges: {}",
            missing.len(),
            truth.sectors.len(),
            truth.chunks(REPORT_BLOCK).len(),
            missing.len() * SECTOR,
            delta.list.len(),
            cov.reported_bytes,
            first.join(", ")
        );
    }
    cov
}

/// Applies ranges: copies their bytes from `from` onto `onto` (the
/// harness's own, tracker-independent copy; `cbtctl copy` is the other).
pub fn apply_ranges(ranges: &Ranges, from: &Path, onto: &Path) {
    let src = File::open(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    let src_len = src.metadata().unwrap().len();
    let dst = OpenOptions::new().write(true).open(onto).unwrap_or_else(|e| panic!("{}: {e}", onto.display()));
    let mut buf = vec![0u8; 1 << 20];
    for (s, e) in ranges.merged() {
        let mut off = s;
        while off < e {
            let n = ((e - off) as usize).min(buf.len());
            read_padded(&src, src_len, off, &mut buf[..n]);
            dst.write_all_at(&buf[..n], off).unwrap_or_else(|e| panic!("writing {}: {e}", onto.display()));
            off += n as u64;
        }
    }
    if dst.metadata().unwrap().len() != src_len {
        dst.set_len(src_len).unwrap();
    }
}

/// A 64-bit fingerprint of a file (for messages; equality is decided by
/// comparing bytes).
pub fn fingerprint(path: &Path) -> u64 {
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ len;
    let mut buf = vec![0u8; WINDOW as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(WINDOW) as usize;
        read_padded(&f, len, off, &mut buf[..n]);
        for w in buf[..n].chunks(8) {
            let mut x = [0u8; 8];
            x[..w.len()].copy_from_slice(w);
            h = (h ^ u64::from_le_bytes(x)).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
        off += n as u64;
    }
    drop_cache(&f);
    h
}

/// Compares two files byte for byte: `Err` describes the difference.
pub fn compare_files(a: &Path, b: &Path) -> Result<(), String> {
    let (la, lb) = (std::fs::metadata(a).unwrap().len(), std::fs::metadata(b).unwrap().len());
    let diff = changed_chunks(a, b, SECTOR);
    if la == lb && diff.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = sector_ranges(&diff, 10).iter().map(|(s, e)| format!("[{s}, {e})")).collect();
    Err(format!(
        "{} ({la} bytes, fingerprint {:016x}) and {} ({lb} bytes, fingerprint {:016x}) differ in {} sectors ({} 4 KiB blocks); first: {}",
        a.display(),
        fingerprint(a),
        b.display(),
        fingerprint(b),
        diff.len(),
        Truth { sectors: diff.clone(), len: la.max(lb) }.chunks(REPORT_BLOCK).len(),
        first.join(", ")
    ))
}

pub fn assert_files_equal(what: &str, a: &Path, b: &Path) {
    if let Err(e) = compare_files(a, b) {
        panic!("{what}: RESTORE MISMATCH: {e}");
    }
}

/// Where the `ACCURACY` lines go: `$CBT_ACCURACY_REPORT`, else
/// `<target dir>/accuracy-report.txt`.
pub fn report_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CBT_ACCURACY_REPORT") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("accuracy-report.txt")
}

/// Per-workload false-positive figures, printed and appended as
/// `ACCURACY workload=<name> pairs=<n> reported_bytes=<n> true_bytes=<n> ratio=<x>`
/// (ratio = reported / true, `inf` when nothing truly changed but
/// something was reported). Pairs answered FAILED_PRECONDITION are not in
/// the figures; a `FALLBACK workload=<name> pairs=<n>` line counts them.
pub struct AccuracyLog {
    pub workload: String,
    pub pairs: u64,
    pub reported_bytes: u64,
    pub true_bytes: u64,
    pub fallbacks: u64,
}

impl AccuracyLog {
    pub fn new(workload: &str) -> Self {
        Self { workload: workload.to_string(), pairs: 0, reported_bytes: 0, true_bytes: 0, fallbacks: 0 }
    }

    pub fn add(&mut self, c: Coverage) {
        self.pairs += 1;
        self.reported_bytes += c.reported_bytes;
        self.true_bytes += c.true_bytes;
    }

    pub fn line(&self) -> String {
        let ratio = if self.true_bytes > 0 {
            format!("{:.3}", self.reported_bytes as f64 / self.true_bytes as f64)
        } else if self.reported_bytes > 0 {
            "inf".into()
        } else {
            "1.000".into()
        };
        format!(
            "ACCURACY workload={} pairs={} reported_bytes={} true_bytes={} ratio={ratio}",
            self.workload, self.pairs, self.reported_bytes, self.true_bytes
        )
    }

    /// Prints the line(s) and appends them to [`report_path`].
    pub fn finish(&self) {
        let mut text = format!("{}\n", self.line());
        if self.fallbacks > 0 {
            text.push_str(&format!("FALLBACK workload={} pairs={}\n", self.workload, self.fallbacks));
        }
        eprint!("{text}");
        let path = report_path();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match OpenOptions::new().create(true).append(true).open(&path) {
            // One write: lines from parallel tests do not interleave.
            Ok(mut f) => {
                let _ = f.write_all(text.as_bytes());
            }
            Err(e) => eprintln!("warning: cannot append to {}: {e}", path.display()),
        }
    }
}
