//! Which chunks of a device may have a write in flight: submitted (seen at
//! `block_bio_queue`) and not yet seen completed.
//!
//! The record counts *sectors*, per block of a fixed grid: a submission adds
//! the sectors it holds in each block it touches, a completion takes away
//! the sectors it completed there. That is exact whatever the kernel does
//! between the two, because every written sector belongs to exactly one
//! submitted bio and is reported complete exactly once:
//!
//! - requests merge bios: the request's completion covers each of their
//!   sectors once;
//! - one bio is split into several requests (max_sectors, segment limits),
//!   each completing whole: together they cover the bio's sectors once, so
//!   a block holding a split point is counted down by both pieces, for the
//!   sectors each held (counting whole *operations* per block would count
//!   that block down twice for one bio and lose another write's count);
//! - partial completions report the sectors they finished.
//!
//! Bio-based devices (device-mapper, md) have no requests: their bios are
//! reported complete by address ([`InFlight::bio_completed`]), and the
//! sectors the submission recorded for that address are counted down.
//!
//! Ops whose completions are not reported (multi-range discards, zone
//! append, secure erase on request-based devices) are *uncounted*: in
//! flight until the device is proven settled. A lost completion leaves a
//! count up: more is carried, nothing is lost. A completion for sectors
//! that were never counted (a request cloned by request-based
//! device-mapper onto this device, which has no bio of its own) takes
//! nothing below zero.
//!
//! The grid (64 KiB) is independent of the tracking granularity: it bounds
//! the work per event (a 1 MiB write is 16 counts, not 2048 at 512 B
//! granularity) at the price of carrying a whole block for a write that is
//! still in flight at a seal, which few are.

use roaring::RoaringTreemap;
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

/// Sectors per counted block, as a shift: 64 KiB.
pub const BLOCK_SHIFT: u32 = 7;

/// Above this many counted blocks (or bios awaiting completion), new
/// submissions are put in the uncounted set instead (still carried, just
/// no longer counted down): bounds memory on a device whose completions
/// stopped being reported.
const MAX_COUNTED: usize = 1 << 20;

/// The sectors a bio-based device's bio covered, by the bio's address.
#[derive(Debug, Default, Clone)]
struct PendingBio {
    /// Submissions seen at this address and not yet completed. A bio's
    /// memory is reused for a new bio once it completed, and a completion
    /// may be drained after the reuse's submission (different CPUs'
    /// rings): the ranges are counted down only when every submission at
    /// the address has completed.
    outstanding: u32,
    ranges: SmallVec<[(u64, u64); 1]>,
}

#[derive(Debug, Default)]
pub struct InFlight {
    /// Block → sectors submitted and not yet completed in it. Fx hashing: a
    /// lookup per write and per completion is on the agent's hottest path.
    counts: FxHashMap<u64, u32>,
    /// Bio-based devices: bio address → what its submission counted.
    bios: FxHashMap<u64, PendingBio>,
    /// Blocks of ops that are never counted down: in flight until
    /// [`Self::clear_uncounted`].
    uncounted: RoaringTreemap,
}

/// The blocks touched by sectors `[start, end)` (`end > start`), each with
/// the number of those sectors it holds.
fn block_sectors(start: u64, end: u64) -> impl Iterator<Item = (u64, u32)> {
    let (first, last) = (start >> BLOCK_SHIFT, (end - 1) >> BLOCK_SHIFT);
    (first..=last).map(move |b| {
        let from = start.max(b << BLOCK_SHIFT);
        let to = end.min((b + 1) << BLOCK_SHIFT);
        (b, (to - from) as u32)
    })
}

/// The blocks touched by sectors `[start, end)`.
fn blocks(start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
    (start >> BLOCK_SHIFT)..=((end - 1) >> BLOCK_SHIFT)
}

impl InFlight {
    /// A write (or an op whose completion is reported) of sectors
    /// `[start, end)` was submitted.
    pub fn submitted(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        if self.counts.len() + blocks(start, end).count() > MAX_COUNTED {
            self.uncounted.insert_range(blocks(start, end));
            return;
        }
        for (block, sectors) in block_sectors(start, end) {
            *self.counts.entry(block).or_insert(0) += sectors;
        }
    }

    /// A bio of a bio-based device, at address `bio`, was submitted over
    /// `[start, end)`: its completion is reported by address.
    pub fn bio_submitted(&mut self, bio: u64, start: u64, end: u64) {
        if end <= start {
            return;
        }
        if self.bios.len() >= MAX_COUNTED {
            self.uncounted.insert_range(blocks(start, end));
            return;
        }
        self.submitted(start, end);
        let pending = self.bios.entry(bio).or_default();
        pending.outstanding += 1;
        pending.ranges.push((start, end));
    }

    /// An op whose completion is never reported touched `[start, end)`.
    pub fn submitted_uncounted(&mut self, start: u64, end: u64) {
        if end > start {
            self.uncounted.insert_range(blocks(start, end));
        }
    }

    /// A request completed sectors `[start, end)`, wholly or in part.
    pub fn completed(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        for (block, sectors) in block_sectors(start, end) {
            if let Some(count) = self.counts.get_mut(&block) {
                *count = count.saturating_sub(sectors);
                if *count == 0 {
                    self.counts.remove(&block);
                }
            }
        }
    }

    /// The bio at address `bio` completed. Returns false if no submission
    /// at that address was counted (one from before counting began, or a
    /// bio that a request completion already counted down).
    pub fn bio_completed(&mut self, bio: u64) -> bool {
        let Some(pending) = self.bios.get_mut(&bio) else { return false };
        pending.outstanding -= 1;
        if pending.outstanding == 0 {
            let pending = self.bios.remove(&bio).expect("present");
            for (start, end) in pending.ranges {
                self.completed(start, end);
            }
        }
        true
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

    /// Nothing is in flight any more (the device was proven settled):
    /// forget everything, counted or not.
    pub fn clear(&mut self) {
        self.counts.clear();
        self.bios.clear();
        self.uncounted.clear();
    }

    /// Every counted write has completed and the device was seen idle:
    /// the uncounted ops have completed too.
    pub fn clear_uncounted(&mut self) {
        self.uncounted.clear();
    }

    /// The 64 KiB blocks that may have a write in flight.
    pub fn blocks(&self) -> RoaringTreemap {
        let mut blocks = self.uncounted.clone();
        blocks.extend(self.counts.keys().copied());
        blocks
    }

    /// Whether every counted write has completed (uncounted ops aside).
    pub fn counted_settled(&self) -> bool {
        self.counts.is_empty() && self.bios.is_empty()
    }

    /// The exact state, for a later agent to go on counting
    /// ([`Self::from_saved`]).
    pub fn save(&self) -> SavedInFlight {
        let mut uncounted = Vec::new();
        self.uncounted.serialize_into(&mut uncounted).expect("writing to a Vec cannot fail");
        let mut counts: Vec<_> = self.counts.iter().map(|(&b, &c)| (b, c)).collect();
        counts.sort_unstable();
        let mut bios: Vec<_> = self
            .bios
            .iter()
            .map(|(&bio, p)| SavedBio { bio, outstanding: p.outstanding, ranges: p.ranges.to_vec() })
            .collect();
        bios.sort_unstable_by_key(|b| b.bio);
        SavedInFlight { counts, bios, uncounted }
    }

    pub fn from_saved(saved: &SavedInFlight) -> Result<Self, std::io::Error> {
        Ok(Self {
            counts: saved.counts.iter().copied().filter(|&(_, c)| c > 0).collect(),
            bios: saved
                .bios
                .iter()
                .filter(|b| b.outstanding > 0)
                .map(|b| (b.bio, PendingBio { outstanding: b.outstanding, ranges: b.ranges.iter().copied().collect() }))
                .collect(),
            uncounted: RoaringTreemap::deserialize_from(&saved.uncounted[..])?,
        })
    }

    /// Takes over `blocks` (from [`Self::blocks`] of an earlier record that
    /// kept no counts) as in flight until the device is proven settled.
    pub fn restore_uncounted(&mut self, blocks: &RoaringTreemap) {
        self.uncounted |= blocks;
    }

    /// Blocks that may have a write in flight.
    pub fn len(&self) -> u64 {
        self.blocks().len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.bios.is_empty() && self.uncounted.is_empty()
    }
}

/// [`InFlight`] as a checkpoint keeps it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedInFlight {
    /// (block, sectors in flight), ascending.
    pub counts: Vec<(u64, u32)>,
    pub bios: Vec<SavedBio>,
    /// Portable roaring set of uncounted blocks.
    #[serde(with = "serde_bytes")]
    pub uncounted: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedBio {
    pub bio: u64,
    pub outstanding: u32,
    pub ranges: Vec<(u64, u64)>,
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
        f.completed(B / 2, 2 * B + 8);
        assert!(f.is_empty(), "every sector of both bios completed");
    }

    /// The review's trace (tracefs, one `dd bs=2M oflag=direct` to a loop
    /// device): `block_bio_queue 8 + 2072`, `block_split 8 / 1056`,
    /// requests `8 + 1048` and `1056 + 1024` completing whole. Block 8
    /// (sectors 1024..1152) holds the split point: with another write in
    /// flight there, the first piece's completion must not take it down.
    #[test]
    fn a_split_bio_completing_as_two_requests_keeps_other_writes() {
        let mut f = InFlight::default();
        f.submitted(8, 8 + 2072);
        f.submitted(1100, 1108); // another write, in the split block
        f.completed(8, 8 + 1048);
        assert!(blocks_of(&f).contains(&8), "the rest of the bio and the other write are in flight");
        f.completed(1056, 1056 + 1024);
        assert_eq!(blocks_of(&f), vec![8], "the other write is still in flight");
        f.completed(1100, 1108);
        assert!(f.is_empty());
    }

    #[test]
    fn restored_blocks_survive_any_completion() {
        let mut before = InFlight::default();
        before.submitted(3 * B, 3 * B + 8);
        before.submitted_uncounted(9 * B, 9 * B + 8);
        let mut after = InFlight::default();
        after.restore_uncounted(&before.blocks());
        after.submitted(3 * B, 3 * B + 8);
        after.completed(3 * B, 3 * B + 8);
        after.completed(3 * B, 3 * B + 8);
        assert_eq!(blocks_of(&after), vec![3, 9]);
        after.clear();
        assert!(after.is_empty());
    }

    #[test]
    fn saved_state_goes_on_counting_exactly() {
        let mut before = InFlight::default();
        before.submitted(3 * B, 3 * B + 8);
        before.bio_submitted(0xdead, 5 * B, 5 * B + 16);
        before.submitted_uncounted(9 * B, 9 * B + 8);
        let mut after = InFlight::from_saved(&before.save()).unwrap();
        assert_eq!(blocks_of(&after), vec![3, 5, 9]);
        after.completed(3 * B, 3 * B + 8);
        assert!(after.bio_completed(0xdead));
        assert_eq!(blocks_of(&after), vec![9]);
    }

    #[test]
    fn overlapping_writes_stay_until_both_complete() {
        let mut f = InFlight::default();
        f.submitted(5 * B, 5 * B + 8);
        f.submitted(5 * B, 5 * B + 8);
        f.completed(5 * B, 5 * B + 8);
        assert_eq!(blocks_of(&f), vec![5], "the second write is still in flight");
        f.completed(5 * B, 5 * B + 8);
        assert!(f.is_empty());
    }

    #[test]
    fn completions_without_submissions_change_nothing() {
        let mut f = InFlight::default();
        f.completed(0, 100 * B);
        f.submitted(3 * B, 3 * B + 1);
        assert_eq!(blocks_of(&f), vec![3]);
        assert!(!f.bio_completed(42));
    }

    #[test]
    fn a_reused_bio_address_completes_only_when_all_its_bios_did() {
        let mut f = InFlight::default();
        // Bio A at address 7 completes, its memory is reused for bio B at
        // the same address, and B's submission is drained before A's
        // completion.
        f.bio_submitted(7, 0, 8);
        f.bio_submitted(7, 4 * B, 4 * B + 8);
        assert!(f.bio_completed(7));
        assert_eq!(blocks_of(&f), vec![0, 4], "which of the two completed is unknown: both stay");
        assert!(f.bio_completed(7));
        assert!(f.is_empty());
    }

    #[test]
    fn uncounted_ops_stay_until_cleared() {
        let mut f = InFlight::default();
        f.submitted_uncounted(10 * B, 1001 * B);
        f.completed(0, 2000 * B);
        assert_eq!(f.len(), 991);
        assert!(f.counted_settled());
        f.clear_uncounted();
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
}
