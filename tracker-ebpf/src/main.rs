//! Kernel side of the changed-block tracker.
//!
//! Every content-changing bio is published, as submitted, to a per-CPU
//! single-producer ring that the agent maps and drains without syscalls.
//! The hot path is: read a few fields, one table lookup, one slot write, one
//! atomic publish. Nothing here allocates, locks or wakes anyone. There is
//! deliberately no timestamp: `bpf_ktime_get_ns` alone cost ~65 ns per run
//! on this VM (a third of the program), and the agent bounds every event in
//! time by the drains around it instead.
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to the
// BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::read_volatile,
};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_get_smp_processor_id,
    macros::{btf_tracepoint, map, tracepoint},
    maps::Array,
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::{error, warn};
use cbt_common::{CpuRing, EventKind, ProgramConfig, RingSet, RING_SLOTS};

/// Filled in by the agent before load (frozen `.rodata`).
#[no_mangle]
static CONFIG: ProgramConfig = ProgramConfig::EMPTY;

/// `RING_SETS * nr_cpus` rings; the agent sets the real size at load time.
#[map(name = "RINGS")]
static RINGS: Array<CpuRing> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map(name = "UNPUBLISHABLE")]
static UNPUBLISHABLE: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn config() -> &'static ProgramConfig {
    // The volatile read keeps the compiler from folding the placeholder
    // values; the verifier then sees the loaded bytes as constants.
    // SAFETY: CONFIG is a static that lives as long as the program.
    unsafe { &*read_volatile(&(&CONFIG as *const ProgramConfig)) }
}

#[inline(always)]
fn op_kind(op: u32) -> u32 {
    let table = &config().op_kind;
    // SAFETY: `op & 0xff` < 256 = the table's length.
    unsafe { read_volatile(table.as_ptr().add((op & 0xff) as usize)) as u32 }
}

/// Reads a field of a kernel object through a BTF-typed pointer. In
/// `tp_btf` programs the verifier checks the (constant) offset against the
/// kernel's BTF and turns the load into a fault-safe one.
#[inline(always)]
unsafe fn field<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: the caller passes a BTF-typed kernel pointer and an offset
    // from the kernel's BTF; the verifier makes the load fault-safe.
    unsafe { read_volatile(base.add(offset as usize) as *const T) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn publish<C: EbpfContext>(
    ctx: &C,
    set: RingSet,
    kind: u32,
    dev: u32,
    diskseq: u64,
    sector: u64,
    nr_sectors: u32,
    cookie: u64,
    raw_op: u32,
) {
    let cfg = config();
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ring) = RINGS.get_ptr_mut(set as u32 * cfg.nr_cpus + cpu) else {
        // No ring to count the loss in: count it where the agent still looks.
        if let Some(count) = UNPUBLISHABLE.get_ptr_mut(0) {
            // SAFETY: a valid map value pointer; the add is atomic.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(count, 1) };
        }
        return;
    };
    // SAFETY: this program is the only producer of this ring on this CPU
    // (tracing programs do not migrate; the kernel's recursion guard stops a
    // nested run of the same program), the agent only reads `producer` and
    // only writes `consumer`.
    unsafe {
        let head = (*ring).producer.head;
        let tail = read_volatile(&(*ring).consumer.tail);
        if head.wrapping_sub(tail) >= RING_SLOTS as u64 {
            // Log the first drop of each ring only: the counter carries the rest.
            if (*ring).producer.dropped == 0 {
                warn!(ctx, "cbt: event ring {} full on cpu {}: dropping (agent not draining?)", set as u32, cpu);
            }
            (*ring).producer.dropped += 1;
            return;
        }
        let slot = &mut (*ring).slots[(head & (RING_SLOTS as u64 - 1)) as usize];
        slot.sector = sector;
        slot.diskseq = diskseq;
        slot.cookie = cookie;
        slot.dev = dev;
        slot.nr_sectors = nr_sectors;
        slot.kind = kind;
        slot.raw_op = raw_op;
        // A fetching atomic is fully ordered in the BPF memory model: the
        // slot's bytes are visible before the agent can see the new head.
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&mut (*ring).producer.head, 1);
    }
}

/// The whole disk (`major << 20 | minor`, the kernel's MKDEV) and its
/// instance number, read from the gendisk itself: no pointer chase to part0.
#[inline(always)]
unsafe fn disk_identity(disk: *const u8) -> (u32, u64) {
    let cfg = config();
    // SAFETY: `disk` is a BTF-typed gendisk pointer (see `field`).
    unsafe {
        let major: u32 = field(disk, cfg.disk_major);
        let first_minor: u32 = field(disk, cfg.disk_first_minor);
        (major << 20 | first_minor, field(disk, cfg.disk_seq))
    }
}

/// Every bio as submitted, after partition remapping (absolute sectors).
#[btf_tracepoint(function = "block_bio_queue")]
pub fn bio_queue_btf(ctx: BtfTracePointContext) -> u32 {
    let cfg = config();
    // SAFETY: the tracepoint's argument is the bio; fields are read at
    // BTF-checked offsets.
    unsafe {
        let bio: *const u8 = ctx.arg(0);
        let opf: u32 = field(bio, cfg.bio_opf);
        let kind = op_kind(opf);
        if kind == 0 {
            return 0;
        }
        let bdev: *const u8 = field(bio, cfg.bio_bdev);
        let disk: *const u8 = field(bdev, cfg.bdev_disk);
        let (dev, diskseq) = disk_identity(disk);
        let size: u32 = field(bio, cfg.bio_size);
        publish(&ctx, RingSet::Bio, kind, dev, diskseq, field(bio, cfg.bio_sector), size >> 9, bio as u64, opf & 0xff);
    }
    0
}

/// Requests that never were bios (driver passthrough such as SG_IO or NVMe
/// admin/IO passthrough) only show up here. Only unclassifiable ops are kept.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn rq_issue_btf(ctx: BtfTracePointContext) -> u32 {
    let cfg = config();
    // SAFETY: the tracepoint's argument is the request; fields are read at
    // BTF-checked offsets.
    unsafe {
        let rq: *const u8 = ctx.arg(0);
        let opf: u32 = field(rq, cfg.rq_cmd_flags);
        if op_kind(opf) != EventKind::Unclassified as u32 {
            return 0;
        }
        let queue: *const u8 = field(rq, cfg.rq_q);
        let disk: *const u8 = field(queue, cfg.queue_disk);
        if disk.is_null() {
            return 0;
        }
        let (dev, diskseq) = disk_identity(disk);
        warn!(&ctx, "cbt: unclassifiable op {} on dev {}:{}: tracking gap", opf & 0xff, dev >> 20, dev & 0xfffff);
        publish(&ctx, RingSet::Request, EventKind::Unclassified as u32, dev, diskseq, 0, 0, rq as u64, opf & 0xff);
    }
    0
}

/// Completions of write and write-zeroes requests, and of discards where
/// the queue merges them only contiguously: which sectors are no longer in
/// flight. Every sector a request holds came from exactly one submitted bio
/// (requests merge bios and bios split into requests, but a sector is never
/// in two), and every completion, partial or whole, reports each sector
/// once: so the agent counts sectors, and splits, merges and partial
/// completions need no special case. Multi-range discards are left out
/// (their sectors are not contiguous): they stay "in flight" until the
/// device is proven settled. Only precision depends on this hook.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn rq_complete_btf(ctx: BtfTracePointContext) -> u32 {
    let cfg = config();
    // SAFETY: tp_btf arguments are the tracepoint's (request, error,
    // nr_bytes); the request fields are read at BTF-checked offsets.
    unsafe {
        let rq: *const u8 = ctx.arg(0);
        let nr_bytes: u32 = ctx.arg(2);
        let opf: u32 = field(rq, cfg.rq_cmd_flags);
        let kind = op_kind(opf);
        let contiguous = kind == EventKind::Write as u32 || kind == EventKind::WriteZeroes as u32;
        if !(contiguous || kind == EventKind::Discard as u32) || nr_bytes == 0 {
            return 0;
        }
        let queue: *const u8 = field(rq, cfg.rq_q);
        if !contiguous && field::<u16>(queue, cfg.queue_max_discard_segments) != 1 {
            return 0;
        }
        let disk: *const u8 = field(queue, cfg.queue_disk);
        if disk.is_null() {
            return 0;
        }
        let (dev, diskseq) = disk_identity(disk);
        let sector: u64 = field(rq, cfg.rq_sector);
        publish(&ctx, RingSet::Complete, EventKind::Completed as u32, dev, diskseq, sector, nr_bytes >> 9, rq as u64, kind);
    }
    0
}

/// Bio completions. The kernel reports them only for bios that were
/// traced at submission and never completed as part of a request (a
/// request's completion is reported by `block_rq_complete` instead): the
/// bios of bio-based devices such as device-mapper and md, and bios ended
/// before a request held them (io_uring's non-blocking attempts that
/// cannot split, failed submissions), whose sectors then still stand in the
/// bio. The agent pairs the first kind with its submission by address.
#[btf_tracepoint(function = "block_bio_complete")]
pub fn bio_complete_btf(ctx: BtfTracePointContext) -> u32 {
    let cfg = config();
    // SAFETY: tp_btf arguments are the tracepoint's (request_queue, bio);
    // the bio fields are read at BTF-checked offsets.
    unsafe {
        let bio: *const u8 = ctx.arg(1);
        let opf: u32 = field(bio, cfg.bio_opf);
        let kind = op_kind(opf);
        if kind == 0 || kind == EventKind::Unclassified as u32 {
            return 0;
        }
        let bdev: *const u8 = field(bio, cfg.bio_bdev);
        if bdev.is_null() {
            return 0;
        }
        let disk: *const u8 = field(bdev, cfg.bdev_disk);
        let (dev, diskseq) = disk_identity(disk);
        let size: u32 = field(bio, cfg.bio_size);
        let sector: u64 = field(bio, cfg.bio_sector);
        publish(&ctx, RingSet::BioComplete, EventKind::BioCompleted as u32, dev, diskseq, sector, size >> 9, bio as u64, kind);
    }
    0
}

/// Decodes the classic tracepoints' `rwbs` text. It cannot tell
/// WRITE_ZEROES from other 'N' ops, so an 'N' with sectors is taken as a
/// change of its range and an 'N' without sectors as unclassifiable.
#[inline(always)]
fn classify_rwbs(rwbs: [u8; 4], nr_sectors: u32) -> u32 {
    let (op, next) = if rwbs[0] == b'F' { (rwbs[1], rwbs[2]) } else { (rwbs[0], rwbs[1]) };
    match op {
        b'W' => EventKind::Write as u32,
        b'D' if next == b'E' => EventKind::SecureErase as u32,
        b'D' => EventKind::Discard as u32,
        b'N' if nr_sectors > 0 => EventKind::WriteZeroes as u32,
        b'R' | b'F' | 0 => 0,
        _ => EventKind::Unclassified as u32,
    }
}

#[inline(always)]
unsafe fn tp_read<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: a bounds-checked probe read of the tracepoint record.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// Fallback for kernels without `tp_btf`: the same hook through the classic
/// tracepoint, field offsets read from tracefs by the agent.
#[tracepoint(category = "block", name = "block_bio_queue")]
pub fn bio_queue_classic(ctx: TracePointContext) -> u32 {
    let cfg = config();
    // SAFETY: record reads at offsets from tracefs, each checked.
    unsafe {
        let (Some(dev), Some(sector), Some(nr), Some(rwbs)) = (
            tp_read::<u32>(&ctx, cfg.tp_bio_dev),
            tp_read::<u64>(&ctx, cfg.tp_bio_sector),
            tp_read::<u32>(&ctx, cfg.tp_bio_nr_sector),
            tp_read::<[u8; 4]>(&ctx, cfg.tp_bio_rwbs),
        ) else {
            error!(&ctx, "cbt: cannot read the block_bio_queue record: tracking gap");
            publish(&ctx, RingSet::Bio, EventKind::Unclassified as u32, 0, 0, 0, 0, 0, 0);
            return 0;
        };
        let kind = classify_rwbs(rwbs, nr);
        if kind != 0 {
            publish(&ctx, RingSet::Bio, kind, dev, 0, sector, nr, 0, 0);
        }
    }
    0
}

/// Classic fallback for passthrough: such requests show `N` with no sectors.
#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn rq_issue_classic(ctx: TracePointContext) -> u32 {
    let cfg = config();
    // SAFETY: record reads at offsets from tracefs, each checked.
    unsafe {
        let (Some(dev), Some(nr), Some(rwbs)) = (
            tp_read::<u32>(&ctx, cfg.tp_rq_dev),
            tp_read::<u32>(&ctx, cfg.tp_rq_nr_sector),
            tp_read::<[u8; 4]>(&ctx, cfg.tp_rq_rwbs),
        ) else {
            return 0;
        };
        if classify_rwbs(rwbs, nr) == EventKind::Unclassified as u32 {
            warn!(&ctx, "cbt: unclassifiable request on dev {}:{}: tracking gap", dev >> 20, dev & 0xfffff);
            publish(&ctx, RingSet::Request, EventKind::Unclassified as u32, dev, 0, 0, 0, 0, 0);
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
