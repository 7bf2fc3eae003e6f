//! The capture loop: drains the kernel rings into the change sets and turns
//! every loss signal into a gap. One `Tracker` per node.

use std::collections::{BTreeMap, HashMap};

use cbt_common::{CaptureEvent, EventKind};
use serde::{Deserialize, Serialize};

use crate::{
    canary::Canary,
    capture::{
        BarrierError, Capture, CaptureCheckpoint, CaptureError, CaptureOptions, DrainReport, Flavor, ProgramBarrier,
        ProgramStats, ReplayReport,
    },
    changes::{ChangeSetError, ChangeSets, DeviceCheckpoint, Gap, GapScope, TakenChanges},
    devices::{self, Disk},
    mapping::{MappingWatch, Sample},
};

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    ChangeSets(#[from] ChangeSetError),
    #[error(transparent)]
    Barrier(#[from] BarrierError),
    #[error("waiting for running eBPF programs: {0}")]
    BarrierWait(std::io::Error),
    #[error("damaged checkpoint: {0}")]
    Checkpoint(String),
}

/// Where a seal left the record, for a later agent to take over the pinned
/// capture and go on without a gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// `cut_ns` is on this boot's `CLOCK_MONOTONIC`.
    pub boot_id: String,
    pub cut_ns: u64,
    pub capture: CaptureCheckpoint,
    pub devices: Vec<DeviceCheckpoint>,
    /// Every disk's mapping as the seal saw it (`None` in checkpoints from
    /// before it was kept): a re-map while no agent ran is a gap.
    #[serde(default)]
    pub mappings: Option<Vec<(devices::DeviceKey, Sample)>>,
}

/// How a tracker began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuity {
    /// A new capture: nothing before its start is covered. `why`: the
    /// reason an earlier one could not be taken over.
    Fresh { why: Option<String> },
    /// The capture of the checkpoint cut at `from_ns` was taken over:
    /// coverage never stopped.
    Resumed { from_ns: u64 },
}

/// Everything captured since the previous seal, cut at one instant.
#[derive(Debug)]
pub struct Seal {
    /// The cut (CLOCK_MONOTONIC ns): every change submitted before it is in
    /// this seal or an earlier one; later ones may be here too.
    pub cut_ns: u64,
    /// No change in this seal was submitted after this.
    pub end_ns: u64,
    pub changes: Vec<TakenChanges>,
    /// With a pinned capture: where a later agent may take over from.
    pub checkpoint: Option<Checkpoint>,
}

/// What a periodic check proved.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub at_ns: u64,
    /// Devices on which every captured change has completed by `at_ns`.
    pub settled: Vec<crate::devices::DeviceKey>,
}

#[derive(Debug, Clone)]
pub struct TrackerOptions {
    pub capture: CaptureOptions,
    /// Bytes per tracked chunk (power of two).
    pub granularity: u64,
    /// How long after attaching to watch devices for stillness before
    /// returning: a device untouched throughout has no write from before
    /// capture pending, so its completions count from the start. Like the
    /// check interval, the longer the stronger the proof.
    pub idle_probe: std::time::Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        Self {
            capture: CaptureOptions::default(),
            granularity: 4096,
            idle_probe: std::time::Duration::from_millis(200),
        }
    }
}

/// Counters of everything that can lose or delay events.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LossCounters {
    pub drains: u64,
    pub events: u64,
    /// Highest ring fill seen (slots): how far user space fell behind.
    pub max_ring_fill: u64,
    pub dropped_events: u64,
    pub corrupt_rings: u64,
    pub recursion_misses: HashMap<&'static str, u64>,
    /// Events a program could not publish at all (no ring): never expected.
    pub unpublishable: u64,
    pub witness_alarms: u64,
    /// Completion events lost (ring full, program skipped): not gaps, they
    /// only keep writes counted in flight until the device is idle.
    pub completions_lost: u64,
}

pub struct Tracker {
    capture: Capture,
    barrier: ProgramBarrier,
    /// The liveness self-check, and when it last passed.
    canary: Option<(Canary, u64)>,
    changes: ChangeSets,
    buf: Vec<CaptureEvent>,
    last_drain_ns: u64,
    last_drain_end_ns: u64,
    last_check_ns: u64,
    started_ns: u64,
    stats: HashMap<&'static str, ProgramStats>,
    loss: LossCounters,
    /// Sector mappings at the last check or seal (contract §6).
    mappings: MappingWatch,
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` stamps events with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Tracker {
    /// Attaches a new capture. Everything written from this call's return
    /// on is recorded or shows up as a gap.
    pub fn start(options: &TrackerOptions) -> Result<Self, TrackerError> {
        Self::take_over(options, None).map(|(tracker, _)| tracker)
    }

    /// Takes over the pinned capture `checkpoint` describes if it can be
    /// proven to have run on since, else attaches a new one.
    pub fn take_over(
        options: &TrackerOptions,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<(Self, Continuity), TrackerError> {
        let mut replayed = Vec::new();
        let attempt = match checkpoint {
            None => Err(None),
            Some(c) if devices::boot_id().ok().as_deref() != Some(c.boot_id.as_str()) => {
                Err(Some("the checkpoint is from another boot".to_string()))
            }
            Some(c) => match Capture::resume(&options.capture, &c.capture, &mut replayed) {
                Ok((capture, report)) => Ok((capture, report, c)),
                Err(refused) => Err(Some(refused.to_string())),
            },
        };
        let (mut tracker, continuity) = match attempt {
            Ok((capture, report, c)) => {
                let mut tracker = Self::with_capture(capture, options.granularity)?;
                tracker.go_on_from(c, &replayed, &report)?;
                (tracker, Continuity::Resumed { from_ns: c.cut_ns })
            }
            Err(why) => {
                if let Some(why) = &why {
                    tracing::warn!(%why, "cannot take over the pinned capture: starting a new one");
                }
                (Self::with_capture(Capture::start(&options.capture)?, options.granularity)?, Continuity::Fresh { why })
            }
        };
        tracker.changes.discover(&Disk::all(), monotonic_ns());
        // A new capture's counters start at zero: no baseline read, so a
        // miss between attach and a first read is counted at the first
        // check instead of being absorbed.
        // Draining meanwhile: the rings are live and must not overflow.
        let probe_end = std::time::Instant::now() + options.idle_probe;
        while std::time::Instant::now() < probe_end {
            std::thread::sleep(std::time::Duration::from_millis(2));
            tracker.poll();
        }
        tracker.check()?;
        Ok((tracker, continuity))
    }

    fn with_capture(capture: Capture, granularity: u64) -> Result<Self, TrackerError> {
        let changes = ChangeSets::new(granularity)?.with_completions(capture.tracks_completions());
        let now = monotonic_ns();
        Ok(Self {
            capture,
            barrier: ProgramBarrier::new()?,
            canary: None,
            changes,
            buf: Vec::with_capacity(1 << 14),
            last_drain_ns: now,
            last_drain_end_ns: now,
            last_check_ns: now,
            started_ns: now,
            stats: HashMap::new(),
            loss: LossCounters::default(),
            mappings: MappingWatch::default(),
        })
    }

    /// Taken over at checkpoint `c`: its devices' state, the events
    /// re-read since, and every loss since its cut as a gap from there
    /// (the counters start from the checkpoint's accounted values).
    fn go_on_from(&mut self, c: &Checkpoint, replayed: &[CaptureEvent], report: &ReplayReport) -> Result<(), TrackerError> {
        let now = monotonic_ns();
        self.changes.restore(&c.devices, now).map_err(TrackerError::Checkpoint)?;
        self.changes.apply(replayed, c.cut_ns, now);
        if report.dropped > 0 {
            self.changes.record_gap(
                GapScope::AllDevices,
                c.cut_ns,
                now,
                format!("event ring overflow while no agent ran: {} events dropped", report.dropped),
            );
        }
        self.loss.events += report.events;
        self.loss.dropped_events += report.dropped;
        self.loss.completions_lost += report.completions_lost;
        self.stats = self
            .capture
            .program_stats()?
            .into_iter()
            .map(|(name, now)| {
                let accounted = c.capture.recursion_misses.get(name).copied().unwrap_or(0);
                (name, ProgramStats { recursion_misses: accounted, ..now })
            })
            .collect();
        self.loss.unpublishable = c.capture.unpublishable;
        self.mappings.resume(c.mappings.as_deref(), c.cut_ns);
        self.last_check_ns = c.cut_ns;
        Ok(())
    }

    /// Proves at every check that the programs still see writes at all
    /// (see [`Canary`]); a check where they did not is a gap for every
    /// device since the last one where they did.
    pub fn set_canary(&mut self, canary: Canary) {
        self.canary = Some((canary, monotonic_ns()));
    }

    /// The canary's disk and when it last passed.
    pub fn canary(&self) -> Option<(crate::devices::DeviceKey, u64)> {
        self.canary.as_ref().map(|(c, ok)| (c.disk(), *ok))
    }

    pub fn flavor(&self) -> Flavor {
        self.capture.flavor()
    }

    pub fn started_ns(&self) -> u64 {
        self.started_ns
    }

    pub fn changes(&self) -> &ChangeSets {
        &self.changes
    }

    pub fn loss(&self) -> &LossCounters {
        &self.loss
    }

    pub fn pins(&self) -> Option<&crate::capture::PinDir> {
        self.capture.pins()
    }

    pub fn kernel_ring_bytes(&self) -> u64 {
        self.capture.kernel_ring_bytes()
    }

    pub fn program_stats(&self) -> &HashMap<&'static str, ProgramStats> {
        &self.stats
    }

    /// Drains the rings into the change sets. Cheap; call every few ms.
    pub fn poll(&mut self) {
        self.drain(None);
    }

    fn drain(&mut self, marks: Option<&[u64]>) -> DrainReport {
        let started = monotonic_ns();
        self.buf.clear();
        let report = self.capture.drain(&mut self.buf, marks);
        let ended = monotonic_ns();
        // Every event here was published after the previous drain started
        // reading its ring and before this one finished.
        self.changes.apply(&self.buf, self.last_drain_ns, ended);
        self.loss.drains += 1;
        self.loss.events += report.events;
        self.loss.max_ring_fill = self.loss.max_ring_fill.max(report.max_fill);
        self.loss.completions_lost += report.completions_lost;
        if report.dropped > 0 || report.corrupt_rings > 0 {
            self.loss.dropped_events += report.dropped;
            self.loss.corrupt_rings += report.corrupt_rings;
            self.changes.record_gap(
                GapScope::AllDevices,
                self.last_drain_ns,
                ended,
                format!("event ring overflow: {} events dropped, {} rings damaged", report.dropped, report.corrupt_rings),
            );
        }
        self.last_drain_ns = started;
        self.last_drain_end_ns = ended;
        report
    }

    /// Cuts the record: returns every change captured since the previous
    /// seal, including every change submitted before the returned cut.
    pub fn seal(&mut self) -> Result<Seal, TrackerError> {
        let cut_ns = monotonic_ns();
        // A program that began before the cut may not have published yet:
        // wait until every run in progress has ended; the drain after it
        // sees all their events.
        self.barrier.wait().map_err(TrackerError::BarrierWait)?;
        self.drain(None);
        // Instances that exist but never wrote must be known too: a snapshot
        // of an idle volume needs its tracking start.
        let disks = Disk::all();
        self.changes.discover(&disks, monotonic_ns());
        self.watch_mappings(&disks);
        let end_ns = self.last_drain_end_ns;
        // A checkpoint must not claim losses as accounted that are not:
        // read the kernel's counters up to the drain now.
        if self.capture.pins().is_some() {
            self.account_kernel_losses(monotonic_ns())?;
        }
        let changes = self.changes.take_changes();
        let checkpoint = self.checkpoint(cut_ns);
        Ok(Seal { cut_ns, end_ns, changes, checkpoint })
    }

    fn checkpoint(&self, cut_ns: u64) -> Option<Checkpoint> {
        let misses = self.stats.iter().map(|(name, s)| (name.to_string(), s.recursion_misses)).collect::<BTreeMap<_, _>>();
        Some(Checkpoint {
            boot_id: devices::boot_id().ok()?,
            cut_ns,
            capture: self.capture.checkpoint(misses, self.loss.unpublishable)?,
            devices: self.changes.checkpoint(),
            mappings: Some(self.mappings.samples()),
        })
    }

    /// A disk whose sectors were re-mapped since the last look (or whose
    /// backing file was written behind it) may hold other bytes with no
    /// write to it: a gap for it and every device stacked on it.
    fn watch_mappings(&mut self, disks: &[Disk]) {
        let remaps = self.mappings.observe(disks, monotonic_ns);
        let now = monotonic_ns();
        for r in remaps {
            self.changes.record_gap(GapScope::Device(r.key), r.since_ns, now, r.reason);
        }
    }

    /// Gaps recorded since the previous call.
    pub fn new_gaps(&mut self) -> Vec<Gap> {
        self.changes.new_gaps().to_vec()
    }

    /// Drains the rings and throws the events away unrecorded, as a bug or
    /// a lost batch would. Only for tests proving the witness catches it.
    #[cfg(feature = "fault-injection")]
    pub fn lose_pending_events(&mut self) -> u64 {
        self.buf.clear();
        self.capture.drain(&mut self.buf, None).events
    }

    /// The slower checks: witness counters, recursion misses, new devices.
    /// Call about once a second.
    pub fn check(&mut self) -> Result<CheckReport, TrackerError> {
        // The canary's write first: it completes before the samples, and
        // its submission is published before it completes.
        let writes_seen = |changes: &ChangeSets, disk| {
            changes.device(&disk).map_or(0, |d| d.events[EventKind::Write as usize])
        };
        let canary = self.canary.as_mut().map(|(c, _)| (writes_seen(&self.changes, c.disk()), c.write()));
        // Witness samples first, then drain (see ChangeSets::witness).
        let sampled_at = monotonic_ns();
        let samples: Vec<_> = self
            .changes
            .devices()
            .iter()
            .filter_map(|(key, d)| {
                let name = d.name.clone()?;
                let counters = Disk { name, key: *key }.counters()?;
                Some((*key, counters))
            })
            .collect();
        // Marked AFTER the counters were read: an event published past the
        // marks was submitted after the read, so the kernel cannot have
        // counted its completion.
        let marks = self.capture.marks();
        let report = self.drain(Some(&marks));
        let now = monotonic_ns();
        let samples: Vec<_> = samples
            .into_iter()
            .map(|(key, counters)| {
                let after: u64 = report
                    .after_marks
                    .iter()
                    .flat_map(|range| &self.buf[range.clone()])
                    .filter(|e| e.dev == key.dev && !matches!(EventKind::from_u32(e.kind), Some(EventKind::Completed | EventKind::BioCompleted)))
                    .map(|e| e.nr_sectors as u64)
                    .sum();
                (key, counters, after)
            })
            .collect();
        let witness = self.changes.witness(&samples, now);
        self.loss.witness_alarms += witness.short.len() as u64;
        if let (Some((before, written)), Some((c, last_ok))) = (canary, self.canary.as_mut()) {
            let failure = match written {
                Err(e) => Some(format!("the liveness canary could not write {}: {e}", c.path().display())),
                Ok(()) if writes_seen(&self.changes, c.disk()) > before => None,
                Ok(()) => Some(format!(
                    "the capture did not see the agent's own write to {} (disk {}): its programs may not be running",
                    c.path().display(),
                    c.disk()
                )),
            };
            // A failure is a gap back to the last pass; the next one's
            // gap, if any, starts here.
            let since = std::mem::replace(last_ok, now);
            if let Some(why) = failure {
                self.changes.record_gap(GapScope::AllDevices, since, now, why);
            }
        }

        self.account_kernel_losses(now)?;
        let disks = Disk::all();
        self.changes.discover(&disks, now);
        self.watch_mappings(&disks);
        self.capture.flush_kernel_logs();
        self.last_check_ns = now;
        // Settled as of the counters' reading: changes drained after it
        // were not part of the proof.
        Ok(CheckReport { at_ns: sampled_at, settled: witness.settled })
    }

    /// Turns what the kernel counted as skipped or unpublishable since the
    /// last look into gaps (from the previous check).
    fn account_kernel_losses(&mut self, now: u64) -> Result<(), TrackerError> {
        for (name, stats) in self.capture.program_stats()? {
            let before = self.stats.insert(name, stats).unwrap_or_default();
            let missed = stats.recursion_misses.saturating_sub(before.recursion_misses);
            // A skipped completion only leaves a write counted in flight.
            if missed > 0 && crate::capture::is_completion_program(name) {
                self.loss.completions_lost += missed;
            } else if missed > 0 {
                *self.loss.recursion_misses.entry(name).or_default() += missed;
                self.changes.record_gap(
                    GapScope::AllDevices,
                    self.last_check_ns,
                    now,
                    format!("{name}: {missed} runs skipped by the kernel (recursion)"),
                );
            }
        }
        let unpublishable = self.capture.unpublishable()?;
        if unpublishable > self.loss.unpublishable {
            self.changes.record_gap(
                GapScope::AllDevices,
                self.last_check_ns,
                now,
                format!("{} events could not be published", unpublishable - self.loss.unpublishable),
            );
            self.loss.unpublishable = unpublishable;
        }
        Ok(())
    }
}
