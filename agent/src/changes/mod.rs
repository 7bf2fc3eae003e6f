//! Per device instance: which chunks changed, and the gaps where the
//! record cannot be trusted.
//!
//! This is the first stage after capture. It never drops a change: what it
//! cannot attribute or prove becomes a [`Gap`] (contract §3).

mod inflight;

use std::collections::{BTreeMap, HashMap};

use cbt_common::{CaptureEvent, EventKind};
pub use inflight::{InFlight, SavedInFlight, BLOCK_SHIFT};
use roaring::RoaringTreemap;

use crate::devices::{self, DeviceKey, Disk, KernelCounters};

/// Length of [`DeviceChanges::events`]: one slot per [`EventKind`] value.
pub const EVENT_KINDS: usize = EventKind::BioCompleted as usize + 1;

/// What a gap covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapScope {
    /// The loss cannot be pinned to a device.
    AllDevices,
    Device(DeviceKey),
}

/// An interval (CLOCK_MONOTONIC ns, inclusive) in which changes may have
/// happened that the record does not hold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub scope: GapScope,
    pub from_ns: u64,
    pub to_ns: u64,
    pub reason: String,
}

impl Gap {
    pub fn covers(&self, key: DeviceKey) -> bool {
        match self.scope {
            GapScope::AllDevices => true,
            GapScope::Device(k) => k == key,
        }
    }
}

/// The kernel-counter witness of one device (see [`ChangeSets::witness`]).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Witness {
    /// Kernel counters when this instance was first observed.
    pub baseline: Option<KernelCounters>,
    /// `captured - kernel` at the last moment nothing was in flight. Later
    /// values can only be larger (in-flight, failed I/O) unless the capture
    /// missed something.
    pub committed_offset: Option<i64>,
    pub last_quiescent_ns: u64,
    pub last_kernel: Option<KernelCounters>,
    /// Captured sectors at the previous sample, to tell an idle device.
    pub last_captured: u64,
}

/// Everything recorded for one device instance.
#[derive(Debug, Default)]
pub struct DeviceChanges {
    pub name: Option<String>,
    /// Changed chunks since the last [`ChangeSets::take_changes`] (the open
    /// segment of the change log).
    pub changed: RoaringTreemap,
    /// End of the drain that last brought a change (CLOCK_MONOTONIC ns).
    pub last_change_ns: u64,
    /// Sum of sectors of all captured change ops (for the witness).
    pub captured_sectors: u64,
    /// Events by [`EventKind`] (index = kind value).
    pub events: [u64; EVENT_KINDS],
    /// When this instance's record began (CLOCK_MONOTONIC ns): nothing
    /// before it is covered.
    pub first_seen_ns: u64,
    /// Sectors per zone for zoned devices (zone append lands anywhere in it).
    pub zone_sectors: Option<u64>,
    /// The queue merges discards only contiguously (max_discard_segments
    /// is 1), so their completions are reported and counted.
    pub discards_counted: bool,
    /// How the kernel reports this device's completions (fixed when
    /// counting begins).
    pub completion_mode: CompletionMode,
    pub witness: Witness,
    /// Chunks that may have a write in flight now.
    pub in_flight: InFlight,
    /// Completions are trusted once the device was seen idle with the
    /// completion hooks attached: from then on no completion can belong to
    /// a write submitted before capture began, and [`Self::in_flight`] is
    /// this agent's own exact account of what is in flight.
    pub completions_trusted: bool,
    /// With trusted completions: the chunks in flight at the previous
    /// take, which belong to the next segment too.
    pub carried: RoaringTreemap,
    /// When the device was first seen with nothing pending (or, for one
    /// that appeared after capture began, when it appeared): from then on
    /// no write submitted before capture can still land. Until then, one
    /// may: the record does not cover the device yet.
    pub proven_ns: Option<u64>,
}


/// Where a device's completions are reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionMode {
    /// blk-mq: `block_rq_complete`, by sector range.
    #[default]
    Requests,
    /// Bio-based (device-mapper, md): `block_bio_complete`, by bio address.
    Bios,
}

impl CompletionMode {
    fn of(name: Option<&str>) -> Self {
        // Only blk-mq disks have an `mq` directory.
        match name {
            Some(n) if !std::path::Path::new("/sys/block").join(n).join("mq").exists() => Self::Bios,
            _ => Self::Requests,
        }
    }
}

/// One device's changes handed to the change log at a seal.
#[derive(Debug)]
pub struct TakenChanges {
    pub key: DeviceKey,
    pub name: Option<String>,
    pub first_seen_ns: u64,
    pub last_change_ns: u64,
    pub chunks: RoaringTreemap,
    /// See [`DeviceChanges::proven_ns`].
    pub proven_ns: Option<u64>,
    /// `chunks` includes every write still in flight at the previous take
    /// (from completions), so the segment's life ends with it; otherwise it
    /// lasts until the device is seen settled.
    pub carries_in_flight: bool,
}

/// A device's state at a seal that a later agent needs to go on without a
/// gap (see [`ChangeSets::checkpoint`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceCheckpoint {
    pub dev: u32,
    pub diskseq: u64,
    /// Nothing from before capture can still land (see
    /// [`DeviceChanges::proven_ns`]).
    pub proven: bool,
    pub completions_trusted: bool,
    /// Portable roaring set of the 64 KiB blocks that may have had a write
    /// in flight at the seal.
    #[serde(with = "serde_bytes")]
    pub in_flight_blocks: Vec<u8>,
    /// The exact account behind `in_flight_blocks`, so that a later agent
    /// goes on counting down (absent in checkpoints of older agents: their
    /// blocks then stay in flight until the device is proven settled).
    #[serde(default)]
    pub in_flight: Option<SavedInFlight>,
    #[serde(default)]
    pub completion_mode: CompletionMode,
    /// The kernel-counter witness, so that a loss the dead agent had not
    /// yet detected is still held against the kernel's counters (absent in
    /// checkpoints of older agents: the witness then starts afresh).
    #[serde(default)]
    pub witness: Option<SavedWitness>,
}

/// What the witness needs to go on across a take-over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedWitness {
    pub baseline: KernelCounters,
    /// Sectors captured since the baseline, up to the checkpoint.
    pub captured_sectors: u64,
    pub committed_offset: Option<i64>,
    pub last_quiescent_ns: u64,
}

/// What one witness pass found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WitnessReport {
    /// Devices whose kernel counters show changes the capture missed.
    pub short: Vec<DeviceKey>,
    /// Devices on which every captured change has completed.
    pub settled: Vec<DeviceKey>,
}

impl DeviceChanges {
    /// The device was proven to have nothing in flight, nothing from
    /// before capture included: start counting completions afresh (see
    /// [`InFlight`]).
    fn trust_completions(&mut self, completions: bool) {
        self.in_flight.clear();
        self.carried.clear();
        self.completions_trusted = completions;
        // Fixed from here on: what is counted up must be counted down.
        self.discards_counted =
            self.name.as_deref().and_then(|n| queue_limit(n, "max_discard_segments")) == Some(1);
        self.completion_mode = CompletionMode::of(self.name.as_deref());
    }
}

#[derive(Debug)]
pub struct ChangeSets {
    chunk_shift: u32,
    devices: BTreeMap<DeviceKey, DeviceChanges>,
    gaps: Vec<Gap>,
    /// How many of `gaps` [`ChangeSets::new_gaps`] already handed out.
    gaps_taken: usize,
    /// The capture reports request completions.
    completions: bool,
    /// The highest `diskseq` of the disks present at the first discovery.
    /// `diskseq` only grows within a boot, so an instance above it was
    /// created after capture began: none of its writes can predate it. One
    /// at or below it (a disk hidden from /sys/block, such as an NVMe
    /// multipath leg, first seen later) may have older writes in flight.
    diskseq_at_attach: Option<u64>,
    /// Classic hooks report only `dev`: its current instance as last
    /// resolved, and the start of the batch that resolved it.
    classic_instances: HashMap<u32, (DeviceKey, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeSetError {
    #[error("granularity {0} must be a power of two between 512 B and 1 MiB")]
    Granularity(u64),
}

impl ChangeSets {
    /// `granularity`: bytes per tracked chunk.
    pub fn new(granularity: u64) -> Result<Self, ChangeSetError> {
        if !granularity.is_power_of_two() || !(512..=1 << 20).contains(&granularity) {
            return Err(ChangeSetError::Granularity(granularity));
        }
        Ok(Self {
            chunk_shift: granularity.trailing_zeros(),
            devices: BTreeMap::new(),
            gaps: Vec::new(),
            gaps_taken: 0,
            completions: false,
            diskseq_at_attach: None,
            classic_instances: HashMap::new(),
        })
    }

    pub fn granularity(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// The capture reports request completions ([`EventKind::Completed`]).
    pub fn with_completions(mut self, completions: bool) -> Self {
        self.completions = completions;
        self
    }

    pub fn devices(&self) -> &BTreeMap<DeviceKey, DeviceChanges> {
        &self.devices
    }

    pub fn device(&self, key: &DeviceKey) -> Option<&DeviceChanges> {
        self.devices.get(key)
    }

    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Gaps recorded since the previous call (all stay in [`Self::gaps`]).
    pub fn new_gaps(&mut self) -> &[Gap] {
        let from = std::mem::replace(&mut self.gaps_taken, self.gaps.len());
        &self.gaps[from..]
    }

    /// Hands out every device's changes since the previous call and starts
    /// collecting afresh: the change log seals them into a segment.
    pub fn take_changes(&mut self) -> Vec<TakenChanges> {
        let shift = self.chunk_shift - 9;
        self.devices
            .iter_mut()
            .map(|(key, d)| {
                let mut chunks = std::mem::take(&mut d.changed);
                if d.completions_trusted {
                    chunks |= std::mem::replace(&mut d.carried, d.in_flight.chunks(shift));
                }
                TakenChanges {
                    key: *key,
                    name: d.name.clone(),
                    first_seen_ns: d.first_seen_ns,
                    last_change_ns: d.last_change_ns,
                    chunks,
                    proven_ns: d.proven_ns,
                    carries_in_flight: d.completions_trusted,
                }
            })
            .collect()
    }

    /// Every device's state as [`Self::take_changes`] left it: call right
    /// after it, with nothing applied in between.
    pub fn checkpoint(&self) -> Vec<DeviceCheckpoint> {
        self.devices
            .iter()
            .map(|(key, d)| {
                let mut in_flight_blocks = Vec::new();
                d.in_flight.blocks().serialize_into(&mut in_flight_blocks).expect("writing to a Vec cannot fail");
                DeviceCheckpoint {
                    dev: key.dev,
                    diskseq: key.diskseq,
                    proven: d.proven_ns.is_some(),
                    completions_trusted: d.completions_trusted,
                    in_flight_blocks,
                    in_flight: Some(d.in_flight.save()),
                    completion_mode: d.completion_mode,
                    witness: d.witness.baseline.map(|baseline| SavedWitness {
                        baseline,
                        captured_sectors: d.captured_sectors,
                        committed_offset: d.witness.committed_offset,
                        last_quiescent_ns: d.witness.last_quiescent_ns,
                    }),
                }
            })
            .collect()
    }

    /// Goes on from a [`Self::checkpoint`] of the same capture (which never
    /// stopped since): the writes in flight then are carried into the next
    /// segment and counted down as they complete.
    pub fn restore(&mut self, devices: &[DeviceCheckpoint], now_ns: u64) -> Result<(), String> {
        let shift = self.chunk_shift - 9;
        let completions = self.completions;
        for c in devices {
            let damaged = |e: std::io::Error| format!("in-flight blocks of {}:{}: {e}", c.dev, c.diskseq);
            let blocks = RoaringTreemap::deserialize_from(&c.in_flight_blocks[..]).map_err(damaged)?;
            let exact = c.in_flight.as_ref().map(InFlight::from_saved).transpose().map_err(damaged)?;
            let d = self.entry(DeviceKey { dev: c.dev, diskseq: c.diskseq }, now_ns);
            if c.proven {
                d.proven_ns = Some(now_ns);
            }
            if let Some(w) = &c.witness {
                d.witness.baseline = Some(w.baseline);
                d.captured_sectors = w.captured_sectors;
                d.witness.committed_offset = w.committed_offset;
                d.witness.last_quiescent_ns = w.last_quiescent_ns;
            }
            if c.completions_trusted {
                d.trust_completions(completions);
                match exact {
                    Some(exact) => {
                        d.in_flight = exact;
                        d.completion_mode = c.completion_mode;
                    }
                    None => d.in_flight.restore_uncounted(&blocks),
                }
                d.carried = d.in_flight.chunks(shift);
            }
        }
        // Every device present at the checkpoint is in it: any later one
        // appeared while capture ran.
        self.diskseq_at_attach = devices.iter().map(|c| c.diskseq).max().or(Some(0));
        Ok(())
    }

    pub fn record_gap(&mut self, scope: GapScope, from_ns: u64, to_ns: u64, reason: impl Into<String>) {
        let gap = Gap { scope, from_ns, to_ns, reason: reason.into() };
        tracing::warn!(?gap.scope, gap.from_ns, gap.to_ns, reason = %gap.reason, "tracking gap");
        self.gaps.push(gap);
    }

    fn entry(&mut self, key: DeviceKey, now_ns: u64) -> &mut DeviceChanges {
        let born_after_capture = self.diskseq_at_attach.is_some_and(|floor| key.diskseq > floor);
        self.devices.entry(key).or_insert_with(|| DeviceChanges {
            first_seen_ns: now_ns,
            proven_ns: born_after_capture.then_some(now_ns),
            ..Default::default()
        })
    }

    /// Makes sure every disk present now has a record and a witness
    /// baseline. Called at start and periodically.
    pub fn discover(&mut self, disks: &[Disk], now_ns: u64) {
        for disk in disks {
            let d = self.entry(disk.key, now_ns);
            if d.name.is_none() {
                d.name = Some(disk.name.clone());
                d.zone_sectors = zone_sectors(&disk.name);
            }
            if d.witness.baseline.is_none() {
                d.witness.baseline = disk.counters();
            }
        }
        if self.diskseq_at_attach.is_none() {
            self.diskseq_at_attach = Some(disks.iter().map(|d| d.key.diskseq).max().unwrap_or(0));
        }
    }

    /// Applies one drain's events, all submitted within `[from_ns, to_ns]`
    /// (from the start of the previous drain to the end of this one: the
    /// programs stamp nothing, a clock read costs more than the rest).
    pub fn apply(&mut self, events: &[CaptureEvent], from_ns: u64, to_ns: u64) {
        // Classic events are resolved once per device per batch: sysfs is
        // far too slow to consult per event.
        let mut resolved = HashMap::new();
        for ev in events {
            let key = match ev.diskseq {
                0 => *resolved.entry(ev.dev).or_insert_with(|| self.resolve_classic(ev.dev, from_ns, to_ns)),
                diskseq => DeviceKey { dev: ev.dev, diskseq },
            };
            self.apply_change(key, ev, from_ns, to_ns);
        }
    }

    fn resolve_classic(&mut self, dev: u32, from_ns: u64, to_ns: u64) -> DeviceKey {
        // Classic hooks: the instance is whatever holds `dev` now. If that
        // changed since we last looked, events in between cannot be
        // attributed: both instances get a gap.
        let current = devices::instance_of(dev).map(|d| d.key);
        let key = match (self.classic_instances.get(&dev).copied(), current) {
            (Some((p, _)), Some(c)) if p == c => c,
            (Some((p, resolved_from)), c) => {
                // The number changed hands after the batch that last saw
                // the old instance began: events since may belong to either.
                let c = c.unwrap_or(DeviceKey { dev, diskseq: 0 });
                for k in [p, c] {
                    self.record_gap(GapScope::Device(k), resolved_from, to_ns, "device number reused (classic hooks)");
                }
                c
            }
            (None, c) => {
                let c = c.unwrap_or(DeviceKey { dev, diskseq: 0 });
                // First events at this number: if discovery last saw
                // another instance holding it, the number changed hands
                // since, and some of this batch may be that one's writes
                // (taken for the current one's: an over-report there).
                let known = self.devices.keys().filter(|k| k.dev == dev && **k != c).max_by_key(|k| k.diskseq).copied();
                if let Some(known) = known.filter(|k| k.diskseq < c.diskseq || c.diskseq == 0) {
                    self.record_gap(GapScope::Device(known), from_ns, to_ns, "device number reused (classic hooks)");
                }
                c
            }
        };
        self.classic_instances.insert(dev, (key, from_ns));
        key
    }

    fn apply_change(&mut self, key: DeviceKey, ev: &CaptureEvent, from_ns: u64, to_ns: u64) {
        let Some(kind) = EventKind::from_u32(ev.kind) else {
            self.record_gap(GapScope::AllDevices, from_ns, to_ns, format!("undecodable event kind {}", ev.kind));
            return;
        };
        if ev.dev == 0 {
            self.record_gap(GapScope::AllDevices, from_ns, to_ns, "event without a device");
            return;
        }
        let shift = self.chunk_shift - 9;
        let d = self.entry(key, to_ns);
        d.events[kind as usize] += 1;
        match kind {
            EventKind::Completed => {
                // A discard's completion counts down only what its
                // submission counted up (a device seen before its queue
                // limits were read counted nothing).
                let discard = ev.raw_op == EventKind::Discard as u32;
                if d.completions_trusted
                    && d.completion_mode == CompletionMode::Requests
                    && (!discard || d.discards_counted)
                {
                    d.in_flight.completed(ev.sector, ev.sector + ev.nr_sectors as u64);
                }
                return;
            }
            EventKind::BioCompleted if d.completion_mode == CompletionMode::Requests => {
                // Ended before a request held it (an io_uring attempt that
                // could not split without blocking, a failed submission):
                // what it still held never completes otherwise.
                if d.completions_trusted {
                    d.in_flight.completed(ev.sector, ev.sector + ev.nr_sectors as u64);
                }
                return;
            }
            EventKind::BioCompleted => {
                let unknown = d.completions_trusted && !d.in_flight.bio_completed(ev.cookie);
                if unknown {
                    // Counting began when nothing was in flight, so this
                    // bio was held where no counter saw it since before
                    // capture: it may have landed any time since.
                    let since = d.first_seen_ns;
                    self.record_gap(
                        GapScope::Device(key),
                        since,
                        to_ns,
                        "a write submitted before capture completed after the device was proven idle",
                    );
                }
                return;
            }
            _ => {}
        }
        let zone_of = |z: u64| {
            let start = ev.sector / z * z;
            (start, start + z)
        };
        // A device first met through this event, not discovered yet: where
        // a zone append lands depends on whether it is zoned (anywhere in
        // the zone), and classic hooks cannot tell zone append from
        // write-zeroes, so that must be known before placing the event.
        let may_be_zone_append = kind == EventKind::ZoneAppend || (kind == EventKind::WriteZeroes && ev.diskseq == 0);
        if may_be_zone_append && d.name.is_none() {
            match devices::instance_of(ev.dev).filter(|disk| ev.diskseq == 0 || disk.key == key) {
                Some(disk) => {
                    d.zone_sectors = zone_sectors(&disk.name);
                    d.name = Some(disk.name);
                }
                None => {
                    let why = format!("{kind:?} on a device gone before it could be told zoned or not");
                    self.record_gap(GapScope::Device(key), from_ns, to_ns, why);
                    return;
                }
            }
        }
        let range = match kind {
            EventKind::Unclassified => None,
            EventKind::ZoneAppend => d.zone_sectors.map(zone_of),
            // Classic hooks show zone append as 'N' too, indistinguishable
            // from write-zeroes, and its data lands at the zone's write
            // pointer, not at the sector reported: take the whole zone.
            EventKind::WriteZeroes if ev.diskseq == 0 && d.zone_sectors.is_some() => d.zone_sectors.map(zone_of),
            _ => Some((ev.sector, ev.sector + ev.nr_sectors as u64)),
        };
        let Some((start, end)) = range else {
            self.record_gap(
                GapScope::Device(key),
                from_ns,
                to_ns,
                format!("{kind:?} op {} cannot be placed on the device", ev.raw_op),
            );
            return;
        };
        // An empty write is a pure cache flush (fsync's preflush).
        if end == start {
            return;
        }
        d.captured_sectors += ev.nr_sectors as u64;
        d.last_change_ns = d.last_change_ns.max(to_ns);
        let (first_chunk, last_chunk) = (start >> shift, (end - 1) >> shift);
        d.changed.insert_range(first_chunk..=last_chunk);
        // Counting is only worth its cost once completions can count down
        // (until then the settle rule carries everything, and trusting
        // clears the counts).
        if d.completions_trusted {
            match (d.completion_mode, kind) {
                // Every bio's completion is reported, by its address.
                (CompletionMode::Bios, _) => d.in_flight.bio_submitted(ev.cookie, start, end),
                // Their requests' completions are reported, as ranges.
                (_, EventKind::Write | EventKind::WriteZeroes) => d.in_flight.submitted(start, end),
                (_, EventKind::Discard) if d.discards_counted => d.in_flight.submitted(start, end),
                _ => d.in_flight.submitted_uncounted(start, end),
            }
        }
    }

    /// The kernel-counter witness (contract §3). Each sample is
    /// `(device, counters, sectors captured after the sample)`: counters read
    /// BEFORE the drain whose events were just applied (every write the
    /// kernel counted as completed was submitted, and published, before the
    /// read), minus what that drain brought that was submitted later.
    ///
    /// `captured - kernel` is at least the number of sectors in flight; it
    /// can only fall below its value at the last quiescent moment (nothing
    /// in flight) if the capture missed sectors.
    ///
    /// A device is *settled* when it is idle and `captured - kernel` equals
    /// its value at the previous idle check: every change captured so far
    /// has completed, so none is still in flight across a later cut.
    pub fn witness(&mut self, samples: &[(DeviceKey, KernelCounters, u64)], now_ns: u64) -> WitnessReport {
        let mut short = Vec::new();
        let mut settled = Vec::new();
        for (key, counters, captured_after) in samples {
            let Some(d) = self.devices.get_mut(key) else { continue };
            let Some(base) = d.witness.baseline else { continue };
            let captured = d.captured_sectors.saturating_sub(*captured_after);
            let kernel = counters.changed_sectors().saturating_sub(base.changed_sectors()) as i64;
            let offset = captured as i64 - kernel;
            // The kernel's in-flight count misses requests not started yet
            // (plugged, queued in a scheduler) and bios held before they
            // are accounted (a suspended device-mapper device), so "0 in
            // flight" alone is not idle. Idle by the kernel = nothing in
            // flight, nothing held, neither side moved over a whole sampling
            // interval, and nothing submitted since the sample (such a
            // submission must be counted once completions are trusted).
            let kernel_idle = !counters.holds_io
                && !counters.blind
                && counters.in_flight == 0
                && d.witness.last_kernel.is_some_and(|k| k.changed_sectors() == counters.changed_sectors())
                && d.witness.last_captured == captured
                && *captured_after == 0;
            // Once counting, this agent's own account decides: a write
            // held where the kernel's figures do not see it is still
            // counted in flight.
            let idle = kernel_idle && (!d.completions_trusted || d.in_flight.counted_settled());
            // Nothing written since it was first seen, and nothing in flight
            // or held then or now: no write from before capture can still be
            // pending, so completions can be trusted from the start.
            let untouched = d.captured_sectors == 0
                && *captured_after == 0
                && !base.holds_io
                && !counters.holds_io
                && !counters.blind
                && base.in_flight == 0
                && counters.in_flight == 0
                && base.changed_sectors() == counters.changed_sectors();
            if untouched && d.proven_ns.is_none() {
                d.trust_completions(self.completions);
                d.proven_ns = Some(now_ns);
            }
            d.witness.last_kernel = Some(*counters);
            d.witness.last_captured = captured;
            match d.witness.committed_offset {
                Some(committed) if offset < committed => {
                    short.push((*key, d.witness.last_quiescent_ns, committed - offset));
                    // Re-arm from here so one loss is reported once.
                    d.witness.committed_offset = Some(offset);
                    d.witness.last_quiescent_ns = now_ns;
                }
                _ if idle => {
                    if d.witness.committed_offset == Some(offset) {
                        settled.push(*key);
                        if d.completions_trusted {
                            // Every counted write completed, and the
                            // kernel saw the device idle throughout: the
                            // uncounted ops completed too.
                            d.in_flight.clear_uncounted();
                        } else {
                            d.trust_completions(self.completions);
                        }
                        d.proven_ns.get_or_insert(now_ns);
                    }
                    d.witness.committed_offset = Some(offset);
                    d.witness.last_quiescent_ns = now_ns;
                }
                _ => {}
            }
        }
        for &(key, since, missing) in &short {
            self.record_gap(
                GapScope::Device(key),
                since,
                now_ns,
                format!("kernel counted {missing} more changed sectors than were captured"),
            );
        }
        WitnessReport { short: short.into_iter().map(|(k, _, _)| k).collect(), settled }
    }
}

fn queue_limit(name: &str, limit: &str) -> Option<u64> {
    let path = std::path::Path::new("/sys/block").join(name).join("queue").join(limit);
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn zone_sectors(name: &str) -> Option<u64> {
    let base = std::path::Path::new("/sys/block").join(name).join("queue");
    let zoned = std::fs::read_to_string(base.join("zoned")).ok()?;
    if zoned.trim() == "none" {
        return None;
    }
    std::fs::read_to_string(base.join("chunk_sectors")).ok()?.trim().parse().ok().filter(|&z| z > 0)
}

/// Coalesces a chunk set into `(first_chunk, chunk_count)` runs, ascending.
pub fn runs(set: &RoaringTreemap) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut iter = set.iter().peekable();
    std::iter::from_fn(move || {
        let start = iter.next()?;
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        Some((start, end - start + 1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQ: u64 = 42;
    const DEV: u32 = 7 << 20 | 9;

    fn ev(kind: EventKind, sector: u64, nr: u32) -> CaptureEvent {
        CaptureEvent { sector, diskseq: SEQ, cookie: 0, dev: DEV, nr_sectors: nr, kind: kind as u32, raw_op: 0 }
    }

    fn key() -> DeviceKey {
        DeviceKey { dev: DEV, diskseq: SEQ }
    }

    #[test]
    fn only_instances_created_after_attach_are_covered_from_their_first_write() {
        let mut cs = ChangeSets::new(4096).unwrap();
        let present = Disk { name: "present".into(), key: key() };
        cs.discover(&[present], 1);
        let at = |seq: u64| CaptureEvent { diskseq: seq, ..ev(EventKind::Write, 0, 8) };
        // A disk hidden from /sys/block that existed at attach (lower
        // diskseq), and one created since (higher).
        cs.apply(&[at(SEQ - 3), at(SEQ + 1)], 10, 20);
        let hidden = cs.device(&DeviceKey { dev: DEV, diskseq: SEQ - 3 }).unwrap();
        assert_eq!(hidden.proven_ns, None, "a write from before attach may still land on it");
        let created = cs.device(&DeviceKey { dev: DEV, diskseq: SEQ + 1 }).unwrap();
        assert_eq!(created.proven_ns, Some(20));
        assert_eq!(cs.device(&key()).unwrap().proven_ns, None, "present at attach: proven only when seen still");
    }

    #[test]
    fn straddling_write_marks_both_chunks() {
        let mut cs = ChangeSets::new(4096).unwrap();
        // 4 KiB starting at sector 4: chunks 0 and 1.
        cs.apply(&[ev(EventKind::Write, 4, 8)], 1, 2);
        assert_eq!(cs.device(&key()).unwrap().changed.iter().collect::<Vec<_>>(), vec![0, 1]);
        // One sector at the last sector of chunk 5.
        cs.apply(&[ev(EventKind::Discard, 47, 1)], 1, 2);
        assert!(cs.device(&key()).unwrap().changed.contains(5));
        assert!(!cs.device(&key()).unwrap().changed.contains(6));
    }

    #[test]
    fn empty_write_is_a_flush_not_a_change() {
        let mut cs = ChangeSets::new(4096).unwrap();
        cs.apply(&[ev(EventKind::Write, 0, 0)], 1, 2);
        assert!(cs.device(&key()).unwrap().changed.is_empty());
        assert!(cs.gaps().is_empty());
    }

    #[test]
    fn unclassified_op_is_a_device_gap() {
        let mut cs = ChangeSets::new(4096).unwrap();
        cs.apply(&[ev(EventKind::Unclassified, 0, 0)], 19, 20);
        assert_eq!(cs.gaps().len(), 1);
        assert!(cs.gaps()[0].covers(key()));
        assert!(!cs.gaps()[0].covers(DeviceKey { dev: DEV, diskseq: SEQ + 1 }));
    }

    #[test]
    fn zone_append_without_zone_size_is_a_gap() {
        let mut cs = ChangeSets::new(4096).unwrap();
        cs.apply(&[ev(EventKind::ZoneAppend, 0, 8)], 19, 20);
        assert_eq!(cs.gaps().len(), 1);
    }

    #[test]
    fn witness_flags_only_real_shortfalls() {
        let mut cs = ChangeSets::new(4096).unwrap();
        let k = key();
        let counters = |sectors, in_flight| KernelCounters { write_sectors: sectors, in_flight, ..Default::default() };
        cs.entry(k, 0).witness.baseline = Some(counters(1000, 0));
        let quiet = WitnessReport::default();
        // 8 sectors captured and completed, seen twice unchanged: idle, offset 0.
        cs.apply(&[ev(EventKind::Write, 0, 8)], 1, 2);
        assert_eq!(cs.witness(&[(k, counters(1008, 0), 0)], 3), quiet);
        assert_eq!(cs.device(&k).unwrap().witness.committed_offset, None, "one sample is not idle");
        assert_eq!(cs.witness(&[(k, counters(1008, 0), 0)], 4), quiet, "first idle: nothing to compare with");
        assert_eq!(cs.device(&k).unwrap().witness.committed_offset, Some(0));
        assert_eq!(cs.witness(&[(k, counters(1008, 0), 0)], 5).settled, vec![k], "idle twice, same offset");
        // 8 more captured but not yet counted by the kernel, which reports
        // nothing in flight (a plugged request): not idle, nothing committed.
        cs.apply(&[ev(EventKind::Write, 8, 8)], 5, 6);
        assert_eq!(cs.witness(&[(k, counters(1008, 0), 0)], 6), quiet);
        assert_eq!(cs.device(&k).unwrap().witness.committed_offset, Some(0));
        // It completes: the offset returns to 0, no false alarm.
        assert!(cs.witness(&[(k, counters(1016, 0), 0)], 7).short.is_empty());
        // Submitted after the sample: not held against the kernel's count.
        cs.apply(&[ev(EventKind::Write, 16, 8)], 8, 9);
        assert!(cs.witness(&[(k, counters(1016, 0), 8)], 9).short.is_empty());
        // The kernel completed 24 sectors more than were captured: alarm,
        // with the gap starting at the last idle moment (the check at 9
        // saw a submission after its sample: not idle).
        assert_eq!(cs.witness(&[(k, counters(1048, 0), 0)], 10).short, vec![k]);
        assert_eq!(cs.gaps().len(), 1);
        assert_eq!(cs.gaps()[0].from_ns, 5, "gap starts at the last idle check");
    }

    #[test]
    fn in_flight_writes_are_carried_into_the_next_take() {
        let mut cs = ChangeSets::new(4096).unwrap().with_completions(true);
        let k = key();
        let idle = KernelCounters { write_sectors: 1000, ..Default::default() };
        cs.entry(k, 0).witness.baseline = Some(idle);
        // Untouched since first seen, nothing in flight: trusted at once.
        cs.witness(&[(k, idle, 0)], 1);
        assert!(cs.device(&k).unwrap().completions_trusted);
        assert_eq!(cs.device(&k).unwrap().proven_ns, Some(1), "nothing from before capture can land any more");
        let completed = |sector, nr| CaptureEvent {
            kind: EventKind::Completed as u32,
            raw_op: EventKind::Write as u32,
            ..ev(EventKind::Write, sector, nr)
        };
        // Two writes; only the first completes before the take.
        cs.apply(&[ev(EventKind::Write, 0, 8), ev(EventKind::Write, 256, 8), completed(0, 8)], 2, 3);
        let first = cs.take_changes();
        assert_eq!(first[0].chunks.iter().collect::<Vec<_>>(), vec![0, 32]);
        assert!(first[0].carries_in_flight);
        // Nothing new, but the second may still be in flight: its counting
        // block (64 KiB: chunks 32..48) is carried.
        let second = cs.take_changes();
        assert_eq!(second[0].chunks.iter().collect::<Vec<_>>(), (32..48).collect::<Vec<_>>());
        cs.apply(&[completed(256, 8)], 4, 5);
        let _ = cs.take_changes();
        assert!(cs.take_changes()[0].chunks.is_empty(), "completed: carried no more");
    }

    #[test]
    fn completions_before_trust_are_ignored() {
        let mut cs = ChangeSets::new(4096).unwrap().with_completions(true);
        let k = key();
        let busy = KernelCounters { write_sectors: 1000, in_flight: 3, ..Default::default() };
        cs.entry(k, 0).witness.baseline = Some(busy);
        cs.witness(&[(k, busy, 0)], 1);
        assert!(!cs.device(&k).unwrap().completions_trusted, "writes from before capture may be pending");
        assert_eq!(cs.device(&k).unwrap().proven_ns, None);
        let done = CaptureEvent { kind: EventKind::Completed as u32, raw_op: 1, ..ev(EventKind::Write, 0, 8) };
        cs.apply(&[ev(EventKind::Write, 0, 8), done], 2, 3);
        let taken = cs.take_changes();
        assert!(!taken[0].carries_in_flight, "the settle rule keeps the segment open instead");
    }

    /// A device proven idle and counting, its completions by bio (as a
    /// device-mapper device's are).
    fn counting_bio_device() -> ChangeSets {
        let mut cs = ChangeSets::new(4096).unwrap().with_completions(true);
        let idle = KernelCounters { write_sectors: 1000, ..Default::default() };
        cs.entry(key(), 0).witness.baseline = Some(idle);
        cs.witness(&[(key(), idle, 0)], 1);
        let d = cs.devices.get_mut(&key()).unwrap();
        assert!(d.completions_trusted);
        d.completion_mode = CompletionMode::Bios;
        cs
    }

    fn bio(kind: EventKind, cookie: u64, sector: u64, nr: u32) -> CaptureEvent {
        CaptureEvent { cookie, ..ev(kind, sector, nr) }
    }

    /// dm suspend: the bio is held before the kernel accounts it, so its
    /// counters show an idle device. Only this agent's own count knows.
    #[test]
    fn a_held_bio_stays_in_flight_while_the_kernel_shows_idle() {
        let mut cs = counting_bio_device();
        let k = key();
        cs.apply(&[bio(EventKind::Write, 0xb10, 256, 8)], 2, 3);
        let idle = KernelCounters { write_sectors: 1000, ..Default::default() };
        for t in 4..8 {
            let report = cs.witness(&[(k, idle, 0)], t);
            assert!(report.settled.is_empty(), "a counted write is pending: not settled at {t}");
        }
        cs.take_changes();
        assert_eq!(cs.take_changes()[0].chunks.iter().collect::<Vec<_>>(), (32..48).collect::<Vec<_>>(), "carried");
        cs.apply(&[bio(EventKind::BioCompleted, 0xb10, 0, 0)], 8, 9);
        cs.take_changes();
        assert!(cs.take_changes()[0].chunks.is_empty(), "completed: carried no more");
        assert!(cs.gaps().is_empty());
    }

    #[test]
    fn a_suspended_device_is_never_idle() {
        let mut cs = ChangeSets::new(4096).unwrap().with_completions(true);
        let k = key();
        let held = KernelCounters { write_sectors: 1000, holds_io: true, ..Default::default() };
        cs.entry(k, 0).witness.baseline = Some(held);
        for t in 1..5 {
            assert!(cs.witness(&[(k, held, 0)], t).settled.is_empty());
        }
        let d = cs.device(&k).unwrap();
        assert!(!d.completions_trusted && d.proven_ns.is_none(), "a write from before capture may be held");
    }

    /// With `queue/iostats` 0 the kernel's counters never move: a busy
    /// device would look untouched and idle forever.
    #[test]
    fn counters_of_a_device_without_iostats_prove_nothing() {
        let mut cs = ChangeSets::new(4096).unwrap().with_completions(true);
        let k = key();
        let blind = KernelCounters { write_sectors: 1000, blind: true, ..Default::default() };
        cs.entry(k, 0).witness.baseline = Some(blind);
        for t in 1..5 {
            assert!(cs.witness(&[(k, blind, 0)], t).settled.is_empty());
        }
        let d = cs.device(&k).unwrap();
        assert!(!d.completions_trusted && d.proven_ns.is_none());
    }

    #[test]
    fn a_bio_completing_that_was_never_submitted_is_a_gap() {
        let mut cs = counting_bio_device();
        cs.apply(&[bio(EventKind::BioCompleted, 0x5eed, 0, 0)], 5, 6);
        assert_eq!(cs.gaps().len(), 1);
        assert!(cs.gaps()[0].covers(key()));
        assert_eq!((cs.gaps()[0].from_ns, cs.gaps()[0].to_ns), (0, 6), "from the start of tracking");
    }

    /// A write submitted after the counters were sampled is applied before
    /// the device is trusted: it must keep the device from being trusted
    /// in that check, or its completion would count down a later write.
    #[test]
    fn a_submission_after_the_sample_defers_trust() {
        let mut cs = ChangeSets::new(4096).unwrap().with_completions(true);
        let k = key();
        let idle = KernelCounters { write_sectors: 1000, ..Default::default() };
        cs.entry(k, 0).witness.baseline = Some(idle);
        cs.apply(&[ev(EventKind::Write, 0, 8)], 1, 2);
        assert!(cs.witness(&[(k, idle, 8)], 2).settled.is_empty());
        assert!(!cs.device(&k).unwrap().completions_trusted);
    }

    /// A write the dead agent never captured, counted by the kernel
    /// before the take-over, must still be caught by the new agent.
    #[test]
    fn the_witness_goes_on_across_a_take_over() {
        let k = key();
        let counters = |sectors| KernelCounters { write_sectors: sectors, ..Default::default() };
        let mut before = ChangeSets::new(4096).unwrap().with_completions(true);
        before.entry(k, 0).witness.baseline = Some(counters(1000));
        before.apply(&[ev(EventKind::Write, 0, 8)], 1, 2);
        for t in 3..6 {
            before.witness(&[(k, counters(1008), 0)], t);
        }
        assert_eq!(before.device(&k).unwrap().witness.committed_offset, Some(0));
        before.take_changes();
        let checkpoint = before.checkpoint();
        // The kernel completes 16 sectors that no event reported.
        let mut after = ChangeSets::new(4096).unwrap().with_completions(true);
        after.restore(&checkpoint, 10).unwrap();
        after.discover(&[], 10);
        assert_eq!(after.witness(&[(k, counters(1024), 0)], 11).short, vec![k], "the loss is not absorbed");
        assert_eq!(after.gaps()[0].from_ns, 5, "from the last idle check before the take-over");
    }

    #[test]
    fn classic_n_on_a_zoned_device_covers_the_zone() {
        let mut cs = ChangeSets::new(4096).unwrap();
        // A classic event (no diskseq) for a device already known as zoned.
        let dev = 250 << 20; // no such device: resolves to diskseq 0
        let classic = DeviceKey { dev, diskseq: 0 };
        let d = cs.entry(classic, 0);
        d.name = Some("zoned".into());
        d.zone_sectors = Some(2048);
        let n = CaptureEvent { sector: 4096, diskseq: 0, cookie: 0, dev, nr_sectors: 8, kind: EventKind::WriteZeroes as u32, raw_op: 0 };
        cs.apply(&[n], 1, 2);
        let changed = &cs.device(&classic).unwrap().changed;
        // Zone 2 = sectors [4096, 6144) = chunks [512, 768).
        assert_eq!(changed.len(), 256, "the whole zone, not 8 sectors");
        assert!(changed.contains(512) && changed.contains(767));
    }

    /// Classic hooks carry no diskseq: write-zeroes and zone append look
    /// alike, so an undiscovered device whose zoning cannot be read any
    /// more cannot be placed.
    #[test]
    fn classic_n_on_a_device_of_unknown_zoning_is_a_gap() {
        let mut cs = ChangeSets::new(4096).unwrap();
        let dev = 250 << 20 | 7; // no such device
        let n = CaptureEvent { sector: 4096, diskseq: 0, cookie: 0, dev, nr_sectors: 8, kind: EventKind::WriteZeroes as u32, raw_op: 0 };
        cs.apply(&[n], 1, 2);
        assert_eq!(cs.gaps().len(), 1, "{:?}", cs.gaps());
    }

    /// Discovery saw an instance at a number; in the first batch that
    /// writes through the classic hooks, the number is held by another
    /// (or nobody): the batch may be the first instance's.
    #[test]
    fn classic_number_reused_before_its_first_event_is_a_gap() {
        let mut cs = ChangeSets::new(4096).unwrap();
        let dev = 250 << 20 | 8; // no such device any more
        let known = DeviceKey { dev, diskseq: 77 };
        cs.discover(&[Disk { name: "gone".into(), key: known }], 0);
        let w = CaptureEvent { sector: 0, diskseq: 0, cookie: 0, dev, nr_sectors: 8, kind: EventKind::Write as u32, raw_op: 0 };
        cs.apply(&[w], 5, 6);
        assert!(cs.gaps().iter().any(|g| g.covers(known)), "the discovered instance may have written: {:?}", cs.gaps());
    }

    #[test]
    fn runs_coalesce() {
        let set: RoaringTreemap = [1u64, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(runs(&set).collect::<Vec<_>>(), vec![(1, 3), (7, 1), (9, 2)]);
    }

    #[test]
    fn rejects_bad_granularity() {
        assert!(ChangeSets::new(3000).is_err());
        assert!(ChangeSets::new(256).is_err());
        assert!(ChangeSets::new(65536).is_ok());
    }
}
