//! The agent's side of the per-CPU event rings: a shared mapping of the
//! `RINGS` array map, drained without a syscall per event or per batch.

use std::{
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use cbt_common::{CaptureEvent, CpuRing, RingSet, RING_SETS, RING_SLOTS};

use super::CaptureError;

pub struct Rings {
    base: NonNull<u8>,
    len: usize,
    count: usize,
    /// Per ring: the `dropped` value already accounted.
    seen_dropped: Vec<u64>,
}

// SAFETY: the mapping is owned by this value; the kernel side synchronises
// through the atomic head/tail protocol, not through Rust references.
unsafe impl Send for Rings {}

/// What one drain found besides events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainReport {
    pub events: u64,
    /// Events the kernel could not publish since the last drain.
    pub dropped: u64,
    /// Completion events lost (full or damaged completion rings): they only
    /// cost precision, so they are counted apart.
    pub completions_lost: u64,
    /// Highest ring fill seen in this drain, in slots (userspace lag).
    pub max_fill: u64,
    /// A ring whose head/tail made no sense (memory damaged): its contents
    /// were discarded, which the caller must treat as loss.
    pub corrupt_rings: u64,
    /// With marks: index ranges of `out` holding events published after
    /// the marks were taken.
    pub after_marks: Vec<std::ops::Range<usize>>,
}

/// What re-reading the rings after a checkpoint found besides events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub events: u64,
    /// Events the kernel could not publish since the checkpoint.
    pub dropped: u64,
    /// Completion events no longer readable (see [`DrainReport`]).
    pub completions_lost: u64,
}

const ELEM_SIZE: usize = std::mem::size_of::<CpuRing>().next_multiple_of(8);

impl Rings {
    /// Number of array elements for `nr_cpus` possible CPUs.
    pub fn elements(nr_cpus: u32) -> u32 {
        RING_SETS * nr_cpus
    }

    /// Kernel memory the rings pin, in bytes.
    pub fn kernel_bytes(nr_cpus: u32) -> u64 {
        Self::elements(nr_cpus) as u64 * ELEM_SIZE as u64
    }

    /// Maps the `BPF_F_MMAPABLE` array holding `count` rings.
    pub fn map(fd: BorrowedFd<'_>, count: u32) -> Result<Self, CaptureError> {
        Self::mmap(Some(fd), count).map_err(CaptureError::Mmap)
    }

    /// A shared mapping of `fd`, or of fresh zeroed memory without one
    /// (tests: a producer thread then stands in for the programs).
    fn mmap(fd: Option<BorrowedFd<'_>>, count: u32) -> std::io::Result<Self> {
        let len = (count as usize * ELEM_SIZE).next_multiple_of(page_size());
        let (flags, raw_fd) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping of `len` bytes: of a BPF array map fd, whose
        // value area holds `count` rings, or anonymous memory.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, raw_fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            count: count as usize,
            seen_dropped: vec![0; count as usize],
        })
    }

    fn ring(&self, i: usize) -> *mut CpuRing {
        debug_assert!(i < self.count);
        // SAFETY: i < count, each element is ELEM_SIZE bytes inside the mapping.
        unsafe { self.base.as_ptr().add(i * ELEM_SIZE).cast() }
    }

    /// The current publish position of every ring: events published later
    /// are at or past these marks.
    pub fn marks(&self) -> Vec<u64> {
        (0..self.count)
            // SAFETY: as in `drain`.
            .map(|i| unsafe { AtomicU64::from_ptr(&raw mut (*self.ring(i)).producer.head).load(Ordering::Acquire) })
            .collect()
    }

    /// Every ring's consumer position: events before it were drained.
    pub fn tails(&self) -> Vec<u64> {
        // SAFETY: as in `drain`.
        (0..self.count).map(|i| unsafe { AtomicU64::from_ptr(&raw mut (*self.ring(i)).consumer.tail).load(Ordering::Acquire) }).collect()
    }

    /// Every ring's drop count already reported by a drain.
    pub fn accounted_drops(&self) -> Vec<u64> {
        self.seen_dropped.clone()
    }

    /// Copies into `out` the events an earlier consumer drained after
    /// `tails` (its checkpoint), which are still in their slots unless the
    /// producer has since gone a whole ring further; and reports the drops
    /// since `dropped`. Later drains report only newer drops.
    ///
    /// The consumer position is not moved back (the producer could see a
    /// full ring it has already freed): the slots are read in place, and
    /// trusted only if the producer's head shows, after the copy, that it
    /// has not written over them (nor is writing one: it writes one slot
    /// at a time, at its head).
    pub fn replay(&mut self, out: &mut Vec<CaptureEvent>, tails: &[u64], dropped: &[u64]) -> Result<ReplayReport, String> {
        let mut report = ReplayReport::default();
        let start = out.len();
        let mut copied = Vec::with_capacity(self.count);
        for (i, &from) in tails.iter().enumerate().take(self.count) {
            let ring = self.ring(i);
            // SAFETY: as in `drain`; only slots are read, nothing is written.
            unsafe {
                let tail = AtomicU64::from_ptr(&raw mut (*ring).consumer.tail).load(Ordering::Acquire);
                if from > tail || tail - from > RING_SLOTS as u64 {
                    copied.push(None);
                    continue;
                }
                let slots = &raw const (*ring).slots;
                let first = out.len();
                for seq in from..tail {
                    let slot = (slots as *const CaptureEvent).add((seq & (RING_SLOTS as u64 - 1)) as usize);
                    out.push(std::ptr::read_volatile(slot));
                }
                copied.push(Some(first..out.len()));
            }
        }
        // The copies above happen before the heads below are read.
        std::sync::atomic::fence(Ordering::Acquire);
        let mut kept = Vec::with_capacity(out.len() - start);
        for (i, range) in copied.into_iter().enumerate() {
            let completions = self.is_completion_ring(i);
            let ring = self.ring(i);
            // SAFETY: as in `drain`.
            let (head, dropped_now) = unsafe {
                (
                    AtomicU64::from_ptr(&raw mut (*ring).producer.head).load(Ordering::Acquire),
                    std::ptr::read_volatile(&raw const (*ring).producer.dropped),
                )
            };
            // Strictly below: the producer may be writing the slot of `head`
            // itself, not yet published.
            let intact = range.filter(|r| r.is_empty() || head.wrapping_sub(tails[i]) < RING_SLOTS as u64);
            match (intact, completions) {
                (Some(range), _) => kept.extend_from_slice(&out[range]),
                (None, true) => report.completions_lost += 1,
                (None, false) => {
                    return Err(format!(
                        "ring {i} moved {} events past the checkpoint, more than it holds ({RING_SLOTS})",
                        head.wrapping_sub(tails[i])
                    ))
                }
            }
            let new = dropped_now.wrapping_sub(dropped[i]);
            if completions {
                report.completions_lost += new;
            } else {
                report.dropped += new;
            }
            self.seen_dropped[i] = dropped_now;
        }
        out.truncate(start);
        report.events = kept.len() as u64;
        out.extend(kept);
        Ok(report)
    }

    fn is_completion_ring(&self, i: usize) -> bool {
        RingSet::from_index(i as u32 / (self.count as u32 / RING_SETS)).is_some_and(RingSet::is_completion)
    }

    /// Copies every published event into `out` and frees the slots.
    ///
    /// An event whose program finished before this call started is always
    /// included: the program's publish is the last thing it does. With
    /// `marks` (from [`Rings::marks`]), the report says which of the copied
    /// events were published after the marks.
    ///
    /// Completion rings are read only up to their positions taken BEFORE
    /// any submission ring is read: a completion published by then belongs
    /// to a write whose submission was published earlier still, so it is in
    /// this drain or an earlier one. Without that order, a completion
    /// published while the submission rings were being read could be
    /// applied before its own submission and count down another write.
    /// Submissions always come first in `out`.
    pub fn drain(&mut self, out: &mut Vec<CaptureEvent>, marks: Option<&[u64]>) -> DrainReport {
        let mut report = DrainReport::default();
        let completion_limits: Vec<Option<u64>> = (0..self.count)
            // SAFETY: as in `drain_ring`. Acquire: the submission rings'
            // heads below are read after these.
            .map(|i| {
                self.is_completion_ring(i)
                    .then(|| unsafe { AtomicU64::from_ptr(&raw mut (*self.ring(i)).producer.head).load(Ordering::Acquire) })
            })
            .collect();
        for (i, limit) in completion_limits.iter().enumerate() {
            if limit.is_none() {
                self.drain_ring(i, None, out, marks, &mut report);
            }
        }
        for (i, limit) in completion_limits.into_iter().enumerate() {
            if limit.is_some() {
                self.drain_ring(i, limit, out, marks, &mut report);
            }
        }
        report
    }

    /// Drains ring `i` up to its head, or up to `limit` if given (a head
    /// read earlier: never past the current one).
    fn drain_ring(
        &mut self,
        i: usize,
        limit: Option<u64>,
        out: &mut Vec<CaptureEvent>,
        marks: Option<&[u64]>,
        report: &mut DrainReport,
    ) {
        let ring = self.ring(i);
        let completions = self.is_completion_ring(i);
        // SAFETY: fields of a live mapping; head is only written by the
        // kernel (atomically), tail only by us.
        unsafe {
            let current = AtomicU64::from_ptr(&raw mut (*ring).producer.head).load(Ordering::Acquire);
            let tail_ptr = &raw mut (*ring).consumer.tail;
            let tail = AtomicU64::from_ptr(tail_ptr).load(Ordering::Relaxed);
            if current.wrapping_sub(tail) > RING_SLOTS as u64 {
                if completions {
                    report.completions_lost += 1;
                } else {
                    report.corrupt_rings += 1;
                }
                AtomicU64::from_ptr(tail_ptr).store(current, Ordering::Release);
                return;
            }
            // A limit read before `current` lies between tail and current.
            let head = limit.map_or(current, |l| l.clamp(tail, current));
            let fill = head - tail;
            report.max_fill = report.max_fill.max(current - tail);
            out.reserve(fill as usize);
            let slots = &raw const (*ring).slots;
            let first_after = marks.map_or(head, |m| m[i].clamp(tail, head));
            for seq in tail..head {
                if seq == first_after {
                    report.after_marks.push(out.len()..out.len() + (head - first_after) as usize);
                }
                let slot = (slots as *const CaptureEvent).add((seq & (RING_SLOTS as u64 - 1)) as usize);
                out.push(std::ptr::read_volatile(slot));
            }
            report.events += fill;
            AtomicU64::from_ptr(tail_ptr).store(head, Ordering::Release);

            let dropped = std::ptr::read_volatile(&raw const (*ring).producer.dropped);
            let new = dropped.wrapping_sub(self.seen_dropped[i]);
            if completions {
                report.completions_lost += new;
            } else {
                report.dropped += new;
            }
            self.seen_dropped[i] = dropped;
        }
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbt_common::EventKind;

    /// The producer side of one ring, as the programs publish: slot first,
    /// then a fully ordered head increment.
    struct Producer(*mut CpuRing);

    // SAFETY: each Producer is the single writer of its ring's slots and head.
    unsafe impl Send for Producer {}

    impl Producer {
        fn publish(&self, ev: CaptureEvent) {
            // SAFETY: as in `Rings::drain`, from the producer's side.
            unsafe {
                let head_ptr = AtomicU64::from_ptr(&raw mut (*self.0).producer.head);
                let head = head_ptr.load(Ordering::Relaxed);
                while head - AtomicU64::from_ptr(&raw mut (*self.0).consumer.tail).load(Ordering::Acquire)
                    >= RING_SLOTS as u64
                {
                    std::hint::spin_loop();
                }
                let slot = (&raw mut (*self.0).slots as *mut CaptureEvent).add((head & (RING_SLOTS as u64 - 1)) as usize);
                std::ptr::write_volatile(slot, ev);
                head_ptr.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// A write is submitted on one CPU and completes on another right
    /// after: however the two publishes fall around a drain, no drain may
    /// hand out a completion whose submission it has not handed out yet
    /// (it would count down another write's sectors).
    #[test]
    fn no_completion_is_drained_before_its_submission() {
        const CPUS: u32 = 2;
        const WRITES: u64 = 300_000;
        let mut rings = Rings::mmap(None, RING_SETS * CPUS).expect("anonymous rings");
        let submissions = Producer(rings.ring((RingSet::Bio as u32 * CPUS) as usize));
        let completions = Producer(rings.ring((RingSet::Complete as u32 * CPUS + 1) as usize));
        let producer = std::thread::spawn(move || {
            for cookie in 1..=WRITES {
                let ev = |kind: EventKind| CaptureEvent { cookie, kind: kind as u32, ..Default::default() };
                submissions.publish(ev(EventKind::Write));
                completions.publish(ev(EventKind::Completed));
            }
        });
        let mut submitted = 0;
        let mut completed = 0;
        let mut out = Vec::new();
        while completed < WRITES {
            out.clear();
            rings.drain(&mut out, None);
            for ev in &out {
                if ev.kind == EventKind::Write as u32 {
                    assert_eq!(ev.cookie, submitted + 1, "submissions in order");
                    submitted = ev.cookie;
                } else {
                    assert!(ev.cookie <= submitted, "completion of write {} drained before its submission", ev.cookie);
                    completed = ev.cookie;
                }
            }
        }
        producer.join().unwrap();
    }
}
