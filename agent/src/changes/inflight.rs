//! Which chunks of a device may have a write in flight: submitted (seen at
//! `block_bio_queue`) and not yet seen completed (`block_rq_complete`).
//!
//! Submissions and completions cannot be paired one to one (requests merge
//! bios, split them, and complete in parts), so the record is a count per
//! *block* of a fixed grid, built so that it can only err towards "still in
//! flight":
//!
//! - a submission counts +1 on every block it touches;
//! - a whole completion (the request's entire remaining range) counts −1 on
//!   every block it touches: that range is exactly the union of the
//!   request's bios, so each block it touches belongs to a bio that
//!   completed and counted +1 there;
//! - a partial completion counts −1 only on blocks it covers entirely: a
//!   block at its edge may be touched again by the rest of the request, and
//!   must not be counted down twice for one bio;
//! - discards and other ops whose completions are not reported never count
//!   down: they stay in flight until the device is proven idle.
//!
//! A lost completion leaves a count up: more is carried, nothing is lost.
//!
//! The grid (64 KiB) is independent of the tracking granularity: it bounds
//! the work per event (a 1 MiB write is 16 counts, not 2048 at 512 B
//! granularity) at the price of carrying a whole block for a write that is
//! still in flight at a seal, which few are.

use roaring::RoaringTreemap;
use rustc_hash::FxHashMap;

/// Sectors per counted block, as a shift: 64 KiB.
const BLOCK_SHIFT: u32 = 7;

/// Above this many counted blocks, counts are folded into the uncounted
/// set (still carried, just no longer counted down).
const MAX_COUNTED_BLOCKS: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct InFlight {
    /// Block → submissions not yet counted down. Fx hashing: a lookup per
    /// write and per completion is on the agent's hottest path.
    counts: FxHashMap<u64, u32>,
    /// Blocks of ops that are never counted down (discards, secure erase,
    /// zone append, overflowed counts): in flight until [`Self::clear`].
    uncounted: RoaringTreemap,
}

/// The blocks touched by sectors `[start, end)` (`end > start`).
fn blocks(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    (start >> BLOCK_SHIFT)..=((end - 1) >> BLOCK_SHIFT)
}

impl InFlight {
    /// A write (or an op whose completion is counted) of sectors
    /// `[start, end)` was submitted.
    pub fn submitted(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let touched = blocks(start, end);
        if self.counts.len() + touched.clone().count() > MAX_COUNTED_BLOCKS {
            self.uncounted.insert_range(touched);
            return;
        }
        for block in touched {
            *self.counts.entry(block).or_insert(0) += 1;
        }
    }

    /// An op whose completion is never reported touched `[start, end)`.
    pub fn submitted_uncounted(&mut self, start: u64, end: u64) {
        if end > start {
            self.uncounted.insert_range(blocks(start, end));
        }
    }

    /// A request completed sectors `[start, end)`; `partial` if it still
    /// had more to do.
    pub fn completed(&mut self, start: u64, end: u64, partial: bool) {
        if end <= start {
            return;
        }
        let (first, last) = if partial {
            // Only blocks entirely inside [start, end).
            (start.div_ceil(1 << BLOCK_SHIFT), (end >> BLOCK_SHIFT).checked_sub(1))
        } else {
            (start >> BLOCK_SHIFT, Some((end - 1) >> BLOCK_SHIFT))
        };
        let Some(last) = last else { return };
        for c in first..=last {
            if let Some(count) = self.counts.get_mut(&c) {
                *count -= 1;
                if *count == 0 {
                    self.counts.remove(&c);
                }
            }
        }
    }

    /// Every chunk (of `2^chunk_shift` sectors) that may still have a write
    /// in flight.
    pub fn chunks(&self, chunk_shift: u32) -> RoaringTreemap {
        let blocks = self.blocks();
        if chunk_shift >= BLOCK_SHIFT {
            return blocks.iter().map(|b| b >> (chunk_shift - BLOCK_SHIFT)).collect();
        }
        let per_block = BLOCK_SHIFT - chunk_shift;
        let mut out = RoaringTreemap::new();
        for b in blocks.iter() {
            out.insert_range(b << per_block..(b + 1) << per_block);
        }
        out
    }

    /// The device was proven idle: nothing is in flight.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.uncounted.clear();
    }

    /// The 64 KiB blocks that may have a write in flight.
    pub fn blocks(&self) -> RoaringTreemap {
        let mut blocks = self.uncounted.clone();
        blocks.extend(self.counts.keys().copied());
        blocks
    }

    /// Takes over `blocks` (from [`Self::blocks`] of an earlier record) as
    /// in flight until [`Self::clear`]: how many writes each had pending is
    /// not known, so none is ever counted down.
    pub fn restore(&mut self, blocks: &RoaringTreemap) {
        self.uncounted |= blocks;
    }

    /// Blocks that may have a write in flight.
    pub fn len(&self) -> u64 {
        self.counts.len() as u64 + self.uncounted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.uncounted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sectors per block.
    const B: u64 = 1 << BLOCK_SHIFT;

    fn blocks_of(f: &InFlight) -> Vec<u64> {
        f.chunks(BLOCK_SHIFT).iter().collect()
    }

    #[test]
    fn a_merged_request_completes_its_bios() {
        let mut f = InFlight::default();
        // Two bios straddling block 1, merged into one request.
        f.submitted(B / 2, B + B / 2);
        f.submitted(B + B / 2, 2 * B + 8);
        f.completed(B / 2, 2 * B + 8, false);
        // Block 1 was counted twice and counted down once: carried, safely.
        assert_eq!(blocks_of(&f), vec![1]);
    }

    #[test]
    fn restored_blocks_survive_any_completion() {
        let mut before = InFlight::default();
        before.submitted(3 * B, 3 * B + 8);
        before.submitted_uncounted(9 * B, 9 * B + 8);
        let mut after = InFlight::default();
        after.restore(&before.blocks());
        // The write in flight at the checkpoint completes, and so does a
        // new one on the same block: neither may take the block down, as
        // the new agent cannot tell how many were pending.
        after.submitted(3 * B, 3 * B + 8);
        after.completed(3 * B, 3 * B + 8, false);
        after.completed(3 * B, 3 * B + 8, false);
        assert_eq!(blocks_of(&after), vec![3, 9]);
        after.clear();
        assert!(after.is_empty());
    }

    #[test]
    fn overlapping_writes_stay_until_both_complete() {
        let mut f = InFlight::default();
        f.submitted(5 * B, 5 * B + 8);
        f.submitted(5 * B, 5 * B + 8);
        f.completed(5 * B, 5 * B + 8, false);
        assert_eq!(blocks_of(&f), vec![5], "the second write is still in flight");
        f.completed(5 * B, 5 * B + 8, false);
        assert!(f.is_empty());
    }

    #[test]
    fn partial_completions_never_count_an_edge_block_twice() {
        let mut f = InFlight::default();
        // One bio over blocks 0..=2, and another write on block 1.
        f.submitted(0, 3 * B);
        f.submitted(B, B + 8);
        // The first request completes in two parts split inside block 1.
        f.completed(0, B + B / 2, true);
        f.completed(B + B / 2, 3 * B, false);
        // Block 1: +2, counted down only by the whole remainder: still 1,
        // which is exactly the other write still in flight.
        assert_eq!(blocks_of(&f), vec![1]);
    }

    #[test]
    fn completions_without_submissions_change_nothing() {
        let mut f = InFlight::default();
        f.completed(0, 100 * B, false);
        f.submitted(3 * B, 3 * B + 1);
        assert_eq!(blocks_of(&f), vec![3]);
    }

    #[test]
    fn uncounted_ops_stay_until_idle() {
        let mut f = InFlight::default();
        f.submitted_uncounted(10 * B, 1001 * B);
        f.completed(0, 2000 * B, false);
        assert_eq!(f.len(), 991);
        f.clear();
        assert!(f.is_empty());
    }

    #[test]
    fn blocks_map_to_chunks_of_any_size() {
        let mut f = InFlight::default();
        f.submitted(B + 3, B + 4); // one sector in block 1
        // 4 KiB chunks (8 sectors): block 1 is chunks 16..32.
        assert_eq!(f.chunks(3).iter().collect::<Vec<_>>(), (16..32).collect::<Vec<_>>());
        // 1 MiB chunks (2048 sectors): block 1 is in chunk 0.
        assert_eq!(f.chunks(11).iter().collect::<Vec<_>>(), vec![0]);
    }

    /// Random interleavings of the kernel's behaviour (merging neighbours,
    /// splitting into partial completions, losing completions) against the
    /// truth: a block with a write truly in flight is always reported.
    #[test]
    fn never_forgets_a_write_in_flight() {
        let mut rng = fastrand::Rng::with_seed(0x2545f4914f6cdd1d);
        let mut next = move |n: u64| rng.u64(..n);
        for _ in 0..300 {
            let mut f = InFlight::default();
            // Truly in flight: (start, end) sector ranges of bios.
            let mut live: Vec<(u64, u64)> = Vec::new();
            for _ in 0..60 {
                match next(3) {
                    0 | 1 => {
                        let start = next(8 * B);
                        let end = start + 1 + next(2 * B);
                        f.submitted(start, end);
                        live.push((start, end));
                    }
                    _ if !live.is_empty() => {
                        // A request: a bio and, sometimes, its contiguous
                        // successor merged behind it.
                        let i = next(live.len() as u64) as usize;
                        let (start, mut end) = live.swap_remove(i);
                        if let Some(j) = live.iter().position(|&(s, _)| s == end) {
                            end = live.swap_remove(j).1;
                        }
                        let lost = next(10) == 0;
                        if next(3) == 0 && end - start > 1 {
                            let mid = start + 1 + next(end - start - 1);
                            if !lost {
                                f.completed(start, mid, true);
                                f.completed(mid, end, false);
                            }
                        } else if !lost {
                            f.completed(start, end, false);
                        }
                    }
                    _ => {}
                }
                let reported = f.chunks(BLOCK_SHIFT);
                for &(s, e) in &live {
                    for b in blocks(s, e) {
                        assert!(reported.contains(b), "block {b} of in-flight bio [{s}, {e}) forgotten");
                    }
                }
            }
        }
    }
}
