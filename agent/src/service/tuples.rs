//! From a [`ChunkMap`](crate::query::ChunkMap)'s chunk set to the stream's
//! `(byte_offset, size_bytes)` tuples: pure functions, no I/O.

use roaring::RoaringTreemap;

/// Chunk indices of `set` that are `>= first`, ascending.
///
/// Seeks instead of walking the indices below `first`: the treemap's 32-bit
/// partitions below `first`'s are skipped whole (a partition covers 2^32
/// chunks, so there are few), and inside `first`'s partition
/// [`roaring::RoaringBitmap::range`] seeks to the container. (roaring 0.10's
/// `treemap::Iter::advance_to` is not used: when `first`'s partition is
/// absent it applies the low 32 bits of `first` to the next partition and
/// skips values it must return.)
pub(crate) fn chunks_from(set: &RoaringTreemap, first: u64) -> impl Iterator<Item = u64> + '_ {
    let first_hi = (first >> 32) as u32;
    let first_lo = first as u32;
    set.bitmaps().skip_while(move |(hi, _)| *hi < first_hi).flat_map(move |(hi, bitmap)| {
        let lo_start = if hi == first_hi { first_lo } else { 0 };
        bitmap.range(lo_start..).map(move |lo| (u64::from(hi) << 32) | u64::from(lo))
    })
}

/// One reported range, in bytes. `len > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// The tuples of a stream, from an ascending iterator of chunk indices.
///
/// - variable length: each maximal run of consecutive chunks is one extent;
/// - fixed length: one extent per chunk of `granularity` bytes;
/// - in both, chunks at or past `capacity` are dropped and the extent that
///   crosses `capacity` is clamped to it ("the last tuple may not run past
///   the volume": the spec leaves it open, clamping is the safe reading).
///
/// Preconditions (checked by the caller): `granularity > 0` and
/// `capacity + granularity` does not overflow.
pub(crate) struct Tuples<I> {
    chunks: I,
    granularity: u64,
    capacity: u64,
    /// First chunk index that lies wholly at or past `capacity`.
    end_chunk: u64,
    fixed: bool,
    /// A chunk already taken from `chunks` that starts the next extent.
    pending: Option<u64>,
    done: bool,
}

impl<I: Iterator<Item = u64>> Tuples<I> {
    pub(crate) fn new(chunks: I, granularity: u64, capacity: u64, fixed: bool) -> Self {
        Tuples {
            chunks,
            granularity,
            capacity,
            end_chunk: capacity.div_ceil(granularity),
            fixed,
            pending: None,
            done: false,
        }
    }
}

impl<I: Iterator<Item = u64>> Iterator for Tuples<I> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        if self.done {
            return None;
        }
        let first = match self.pending.take().or_else(|| self.chunks.next()) {
            Some(c) if c < self.end_chunk => c,
            _ => {
                // Ascending input: everything after is past capacity too.
                self.done = true;
                return None;
            }
        };
        let mut end = first + 1;
        if !self.fixed {
            for c in self.chunks.by_ref() {
                if c == end && c < self.end_chunk {
                    end += 1;
                } else {
                    self.pending = Some(c);
                    break;
                }
            }
        }
        let offset = first * self.granularity;
        let stop = (end * self.granularity).min(self.capacity);
        Some(Extent { offset, len: stop - offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(chunks: &[u64]) -> RoaringTreemap {
        chunks.iter().copied().collect()
    }

    fn ext(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    #[test]
    fn seeking_finds_every_chunk_at_or_after_the_start() {
        let hi = 1u64 << 32;
        let s = set(&[0, 5, 100, hi - 1, hi + 3, 3 * hi + 7, 3 * hi + 9]);
        let all: Vec<u64> = s.iter().collect();
        for first in [0, 1, 5, 6, 100, 101, hi - 1, hi, hi + 3, hi + 4, 2 * hi + 50, 3 * hi + 8, 4 * hi] {
            let want: Vec<u64> = all.iter().copied().filter(|&c| c >= first).collect();
            assert_eq!(chunks_from(&s, first).collect::<Vec<_>>(), want, "first = {first}");
        }
    }

    #[test]
    fn seeking_into_an_absent_partition_keeps_the_next_partition_whole() {
        // The case roaring 0.10's treemap advance_to gets wrong: the start's
        // partition (0) is absent and its low bits (100) exceed the next
        // partition's values.
        let hi = 1u64 << 32;
        let s = set(&[hi + 5, hi + 200]);
        assert_eq!(chunks_from(&s, 100).collect::<Vec<_>>(), vec![hi + 5, hi + 200]);
    }

    #[test]
    fn variable_length_coalesces_runs_and_clamps_the_last() {
        let s = set(&[0, 1, 2, 5, 7, 8, 9]);
        let got: Vec<_> = Tuples::new(s.iter(), 4096, 9 * 4096 + 100, false).collect();
        assert_eq!(got, vec![ext(0, 3 * 4096), ext(5 * 4096, 4096), ext(7 * 4096, 2 * 4096 + 100)]);
    }

    #[test]
    fn fixed_length_is_one_tuple_per_chunk_and_clamps_the_last() {
        let s = set(&[1, 2, 4, 5]);
        let got: Vec<_> = Tuples::new(s.iter(), 512, 5 * 512 + 1, true).collect();
        assert_eq!(got, vec![ext(512, 512), ext(1024, 512), ext(2048, 512), ext(2560, 1)]);
    }

    #[test]
    fn chunks_at_or_past_capacity_are_never_reported() {
        let s = set(&[0, 1, 2, 3, 10]);
        let got: Vec<_> = Tuples::new(s.iter(), 4096, 2 * 4096, false).collect();
        assert_eq!(got, vec![ext(0, 2 * 4096)]);
        let got: Vec<_> = Tuples::new(s.iter(), 4096, 0, false).collect();
        assert_eq!(got, vec![]);
    }
}
