//! Segments: the changes of one device instance over one interval, and the
//! rule that decides which of them a snapshot window needs.

use std::collections::BTreeMap;

use roaring::{RoaringBitmap, RoaringTreemap};

use super::Stamp;

/// The chunks changed by writes submitted within `[start, end]`.
///
/// A write belongs to every segment its life overlaps, from submission to
/// completion (contract §5). The capture sees submissions only, so a
/// segment stays *open-ended* (`settled_by == None`) until the device was
/// seen with every captured write completed; from then on its life ends at
/// `settled_by`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub start: Stamp,
    pub end: Stamp,
    pub settled_by: Option<Stamp>,
    pub chunks: RoaringTreemap,
}

impl Segment {
    /// The last instant a write of this segment may still have been in
    /// flight.
    pub fn life_end(&self) -> Stamp {
        self.settled_by.map_or(Stamp::MAX, |s| s.max(self.end))
    }

    /// Whether a write of this segment may have been alive in `[lo, hi]`.
    pub fn overlaps(&self, lo: Stamp, hi: Stamp) -> bool {
        self.start <= hi && self.life_end() >= lo
    }
}

/// Merges neighbouring segments wherever no snapshot window in `cuts` can
/// tell them apart, so compaction never changes an answer.
///
/// A window `[lo(B), hi(T)]` includes a segment iff `start <= hi(T)` and
/// `life_end >= lo(B)`. If two segments agree on both tests for every live
/// snapshot's `lo` and `hi`, they agree for every pair, and so does their
/// union. Settled and unsettled segments are never merged: a future window
/// (all of whose bounds lie after now) includes exactly the unsettled ones.
pub fn compact(segments: Vec<Segment>, cuts: &[(Stamp, Stamp)]) -> Vec<Segment> {
    let same_side = |a: &Segment, b: &Segment| {
        a.settled_by.is_some() == b.settled_by.is_some()
            && cuts.iter().all(|&(lo, hi)| (a.start <= hi) == (b.start <= hi) && (a.life_end() >= lo) == (b.life_end() >= lo))
    };
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    // The chunk sets of the segments merged into `out.last()`, united only
    // once its run ends: see [`union`].
    let mut merged: Vec<RoaringTreemap> = Vec::new();
    let unite = |last: Option<&mut Segment>, merged: &mut Vec<RoaringTreemap>| {
        if let Some(last) = last.filter(|_| !merged.is_empty()) {
            merged.push(std::mem::take(&mut last.chunks));
            last.chunks = union(merged.iter());
            merged.clear();
        }
    };
    for seg in segments {
        match out.last_mut() {
            Some(last) if same_side(last, &seg) => {
                last.start = last.start.min(seg.start);
                last.end = last.end.max(seg.end);
                last.settled_by = match (last.settled_by, seg.settled_by) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
                merged.push(seg.chunks);
            }
            last => {
                unite(last, &mut merged);
                out.push(seg);
            }
        }
    }
    unite(out.last_mut(), &mut merged);
    out
}

/// The union of `sets`.
///
/// Folding k sets into one accumulator (`acc |= set`) rebuilds the
/// accumulator's containers at every step: with a few hundred sparse
/// segments of a big volume that cost half a second for 2.7 M chunks, and
/// grows with k. Here every 2^16-chunk block is united once: each set's
/// chunks in the block are marked in one 8 KiB scratch bitmap, which is then
/// read out into the result. Memory beyond the result: the scratch and one
/// cursor per set.
pub(crate) fn union<'a>(sets: impl IntoIterator<Item = &'a RoaringTreemap>) -> RoaringTreemap {
    // The treemap's 32-bit partitions, each united on its own.
    let mut partitions: BTreeMap<u32, Vec<&RoaringBitmap>> = BTreeMap::new();
    for set in sets {
        for (hi, bitmap) in set.bitmaps() {
            partitions.entry(hi).or_default().push(bitmap);
        }
    }
    RoaringTreemap::from_bitmaps(partitions.into_iter().map(|(hi, bitmaps)| (hi, union_bitmaps(&bitmaps))))
}

fn union_bitmaps(bitmaps: &[&RoaringBitmap]) -> RoaringBitmap {
    if let [only] = bitmaps {
        return (*only).clone();
    }
    let mut cursors: Vec<_> = bitmaps.iter().filter(|b| !b.is_empty()).map(|b| b.iter().peekable()).collect();
    let mut out = RoaringBitmap::new();
    let mut scratch = [0u64; 1 << 10];
    while let Some(first) = cursors.iter_mut().filter_map(|c| c.peek().copied()).min() {
        let block = first & !0xffff;
        let end = u64::from(block) + (1 << 16);
        // The words touched, so a sparse block is not scanned whole.
        let (mut lo, mut hi) = (usize::MAX, 0);
        for cursor in &mut cursors {
            while let Some(v) = cursor.next_if(|&v| u64::from(v) < end) {
                let word = ((v - block) >> 6) as usize;
                scratch[word] |= 1 << (v & 63);
                lo = lo.min(word);
                hi = hi.max(word);
            }
        }
        for (i, word) in scratch[lo..=hi].iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                // Ascending (blocks in order, bits in order): every push
                // appends.
                let appended = out.push(block + ((lo + i) as u32) * 64 + bits.trailing_zeros());
                debug_assert!(appended, "union out of order");
                bits &= bits - 1;
            }
        }
        cursors.retain_mut(|c| c.peek().is_some());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: Stamp, end: Stamp, settled_by: Option<Stamp>, chunks: &[u64]) -> Segment {
        Segment { start, end, settled_by, chunks: chunks.iter().copied().collect() }
    }

    fn window(segments: &[Segment], lo: Stamp, hi: Stamp) -> RoaringTreemap {
        segments.iter().filter(|s| s.overlaps(lo, hi)).fold(RoaringTreemap::new(), |acc, s| acc | &s.chunks)
    }

    #[test]
    fn unsettled_segment_reaches_every_later_window() {
        let s = seg(10, 20, None, &[1]);
        assert!(s.overlaps(1000, 2000), "a write possibly still in flight belongs to later windows");
        let settled = seg(10, 20, Some(25), &[1]);
        assert!(settled.overlaps(25, 30));
        assert!(!settled.overlaps(26, 30));
        assert!(!settled.overlaps(0, 9));
    }

    #[test]
    fn compaction_never_changes_an_answer() {
        // Random segments and snapshot windows: every answer for every pair
        // of live snapshots is the same before and after compaction.
        let mut rng = fastrand::Rng::with_seed(0x9e3779b97f4a7c15);
        let mut next = move |n: u64| rng.u64(..n);
        for _ in 0..200 {
            let mut segments = Vec::new();
            let mut t = 0;
            for _ in 0..next(12) + 1 {
                let start = t;
                let end = start + next(10) + 1;
                let settled = (next(3) > 0).then(|| end + next(15));
                let chunks: Vec<u64> = (0..next(5)).map(|_| next(64)).collect();
                segments.push(seg(start, end, settled, &chunks));
                t = end - next(2);
            }
            let mut cuts: Vec<(Stamp, Stamp)> = (0..next(4))
                .map(|_| {
                    let lo = next(t + 20);
                    (lo, lo + next(5))
                })
                .collect();
            cuts.sort();
            let compacted = compact(segments.clone(), &cuts);
            assert!(compacted.len() <= segments.len());
            for &(lo, _) in &cuts {
                for &(_, hi) in &cuts {
                    assert_eq!(window(&segments, lo, hi), window(&compacted, lo, hi), "window [{lo}, {hi}] changed");
                }
                // A window in the future (past every bound) too.
                assert_eq!(window(&segments, t + 100, t + 200), window(&compacted, t + 100, t + 200));
            }
        }
    }

    #[test]
    fn union_equals_the_fold_of_its_sets() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let hi = 1u64 << 32;
        for _ in 0..100 {
            let sets: Vec<RoaringTreemap> = (0..next(6))
                .map(|_| {
                    let mut set = RoaringTreemap::new();
                    for _ in 0..next(300) {
                        // Dense and sparse blocks, block edges, several
                        // 32-bit partitions, the very top of the range.
                        let c = match next(6) {
                            0 => next(1 << 16),
                            1 => (next(8) << 16) + [0, 1, 63, 64, 0xffff][next(5) as usize],
                            2 => next(3) * hi + next(1 << 20),
                            3 => u64::MAX - next(3),
                            4 => hi - 1 - next(2),
                            _ => next(1 << 40),
                        };
                        set.insert(c);
                    }
                    if next(4) == 0 {
                        let start = next(1 << 20);
                        set.insert_range(start..start + next(20_000));
                    }
                    set
                })
                .collect();
            let folded = sets.iter().fold(RoaringTreemap::new(), |acc, s| acc | s);
            assert_eq!(union(sets.iter()), folded);
        }
        assert_eq!(union(std::iter::empty()), RoaringTreemap::new());
    }

    #[test]
    fn without_snapshots_settled_history_collapses() {
        let segments = vec![seg(0, 10, Some(12), &[1]), seg(9, 20, Some(21), &[2]), seg(19, 30, None, &[3])];
        let out = compact(segments, &[]);
        assert_eq!(out.len(), 2, "settled history merges; the unsettled tail stays apart");
        assert_eq!(out[0].chunks.iter().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(out[0].settled_by, Some(21));
    }
}
