//! Types shared by the kernel programs (`tracker-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and free of `bool` and implicit padding so
//! the two sides agree on layout without a translation step.
#![no_std]

/// Slots in each CPU's event ring. A power of two so the producer can mask.
///
/// 8 Ki slots × 40 B = 320 KiB per ring. At 250 k events/s on one CPU and a
/// 10 ms drain period 2.5 k slots are in use: a 3× margin before overflow,
/// and overflow is counted, never silent.
pub const RING_SLOTS: u32 = 1 << 13;

/// Name of the array map (one element per possible CPU) holding the rings.
pub const RINGS_MAP: &str = "RINGS";

/// Name of the one-element array counting events a program could not even
/// try to publish (its ring could not be looked up). Never expected; if it
/// moves, every device has a gap.
pub const UNPUBLISHABLE_MAP: &str = "UNPUBLISHABLE";

/// Program names, as the agent attaches them.
pub mod programs {
    pub const BIO_QUEUE_BTF: &str = "bio_queue_btf";
    pub const RQ_ISSUE_BTF: &str = "rq_issue_btf";
    pub const BIO_QUEUE_CLASSIC: &str = "bio_queue_classic";
    pub const RQ_ISSUE_CLASSIC: &str = "rq_issue_classic";
    pub const RQ_COMPLETE_BTF: &str = "rq_complete_btf";
    pub const BIO_COMPLETE_BTF: &str = "bio_complete_btf";
}

/// What a captured event says happened to its sector range.
///
/// Kernel `REQ_OP_*` values are translated in the program so user space never
/// depends on a kernel's numbering.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Write = 1,
    Discard = 2,
    WriteZeroes = 3,
    SecureErase = 4,
    ZoneAppend = 5,
    /// An op the program could not classify as read, flush or a known change
    /// (driver passthrough, zone management, an op code newer than this code):
    /// the device's content may have changed anywhere → a tracking gap.
    Unclassified = 6,
    /// Not a change: a write, write-zeroes or (on queues that merge
    /// discards only contiguously) discard request finished sectors
    /// `[sector, sector + nr_sectors)`, wholly or in part; `raw_op` has the
    /// op's kind. Lets the agent know which sectors are no longer in flight.
    Completed = 7,
    /// Not a change: a bio finished that no request completion reported:
    /// on a bio-based device (device-mapper, md) every bio, paired with its
    /// submission by `cookie` (the bio's address); on a request-based one a
    /// bio ended before any request held it, over `[sector, sector +
    /// nr_sectors)` (what it still held).
    BioCompleted = 8,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Discard,
            3 => Self::WriteZeroes,
            4 => Self::SecureErase,
            5 => Self::ZoneAppend,
            6 => Self::Unclassified,
            7 => Self::Completed,
            8 => Self::BioCompleted,
            _ => return None,
        })
    }
}

/// One captured block-layer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureEvent {
    /// First sector (512 B) on the WHOLE disk, partitions already remapped.
    pub sector: u64,
    /// Per-boot device instance number of the whole disk (`diskseq`);
    /// 0 when the hook cannot see it (classic tracepoints).
    pub diskseq: u64,
    /// The bio's (or request's) address; 0 when the hook has none. Pairs a
    /// bio-based device's submission with its [`EventKind::BioCompleted`].
    pub cookie: u64,
    /// Whole-disk device number in the kernel's internal encoding
    /// (`major << 20 | minor`).
    pub dev: u32,
    pub nr_sectors: u32,
    /// An [`EventKind`] as u32.
    pub kind: u32,
    /// The raw `REQ_OP_*` (or 0 on classic tracepoints), for diagnostics.
    pub raw_op: u32,
}

/// Producer-owned half of a CPU ring's header. Kept on its own cache line so
/// the consumer's writes to [`RingConsumer`] never bounce the producer's line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct RingProducer {
    /// Count of events ever published on this CPU (monotonic, wraps at 2^64).
    pub head: u64,
    /// Events dropped because the ring was full.
    pub dropped: u64,
    pub _pad: [u64; 6],
}

/// Consumer-owned half: written only by the agent through its mapping.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct RingConsumer {
    /// Count of events consumed (the agent advances it after copying).
    pub tail: u64,
    pub _pad: [u64; 7],
}

/// A single-producer single-consumer ring, one per CPU.
///
/// The producer is the program running on that CPU: BPF tracing programs
/// cannot migrate, and the kernel's per-program recursion guard stops a
/// second run of the same program on the same CPU (counted as a recursion
/// miss, which the agent reads). Two different programs (bio and request
/// hooks) may interleave on one CPU (an interrupt during a run), so each
/// program owns its own ring family; see [`RingSet`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CpuRing {
    pub producer: RingProducer,
    pub consumer: RingConsumer,
    pub slots: [CaptureEvent; RING_SLOTS as usize],
}

/// Index of the ring family a program writes to: one family per program so
/// every ring has exactly one producer on each CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSet {
    Bio = 0,
    Request = 1,
    /// Request completions: only precision depends on them, so their loss
    /// is never a gap.
    Complete = 2,
    /// Bio completions of bio-based devices: as [`RingSet::Complete`].
    BioComplete = 3,
}

impl RingSet {
    /// Completions: drained only up to positions read before the
    /// submissions are drained, so that none is applied before its
    /// submission; their loss costs precision, never coverage.
    pub const fn is_completion(self) -> bool {
        matches!(self, Self::Complete | Self::BioComplete)
    }

    pub const fn from_index(set: u32) -> Option<Self> {
        Some(match set {
            0 => Self::Bio,
            1 => Self::Request,
            2 => Self::Complete,
            3 => Self::BioComplete,
            _ => return None,
        })
    }
}

/// Number of ring families, see [`RingSet`].
pub const RING_SETS: u32 = 4;

/// Load-time configuration of the programs, written once into their
/// read-only data. The verifier treats frozen read-only data as constants, so
/// BTF pointer walks with these offsets are checked like compile-time ones,
/// and one object serves kernels with different struct layouts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProgramConfig {
    /// Number of possible CPUs: rings are indexed `set * nr_cpus + cpu`.
    pub nr_cpus: u32,
    /// BTF offsets (bytes) of the fields the `tp_btf` programs read.
    pub bio_opf: u32,
    pub bio_bdev: u32,
    pub bio_sector: u32,
    pub bio_size: u32,
    pub bdev_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
    pub disk_seq: u32,
    pub rq_cmd_flags: u32,
    pub rq_q: u32,
    pub queue_disk: u32,
    pub rq_sector: u32,
    /// `request_queue.limits.max_discard_segments` (u16).
    pub queue_max_discard_segments: u32,
    /// Classic tracepoint record offsets (from tracefs `format` files).
    pub tp_bio_dev: u32,
    pub tp_bio_sector: u32,
    pub tp_bio_nr_sector: u32,
    pub tp_bio_rwbs: u32,
    pub tp_rq_dev: u32,
    pub tp_rq_nr_sector: u32,
    pub tp_rq_rwbs: u32,
    /// `REQ_OP_*` (low 8 bits of `bi_opf`) → [`EventKind`] as u8, 0 = not a
    /// change (read, flush). Built from the kernel's own `enum req_op`; codes
    /// the kernel does not name map to `Unclassified`.
    pub op_kind: [u8; 256],
}

impl ProgramConfig {
    pub const EMPTY: Self = Self {
        nr_cpus: 0,
        bio_opf: 0,
        bio_bdev: 0,
        bio_sector: 0,
        bio_size: 0,
        bdev_disk: 0,
        disk_major: 0,
        disk_first_minor: 0,
        disk_seq: 0,
        rq_cmd_flags: 0,
        rq_q: 0,
        queue_disk: 0,
        rq_sector: 0,
        queue_max_discard_segments: 0,
        tp_bio_dev: 0,
        tp_bio_sector: 0,
        tp_bio_nr_sector: 0,
        tp_bio_rwbs: 0,
        tp_rq_dev: 0,
        tp_rq_nr_sector: 0,
        tp_rq_rwbs: 0,
        op_kind: [0; 256],
    };
}

/// Name of the read-only global holding the [`ProgramConfig`].
pub const CONFIG_GLOBAL: &str = "CONFIG";

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding-sensitive invariants.
    unsafe impl aya::Pod for super::CaptureEvent {}
    // SAFETY: as above; all fields are integers.
    unsafe impl aya::Pod for super::ProgramConfig {}
}
