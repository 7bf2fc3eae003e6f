//! The agent's self-report: what it captures, what it lost, per device.

use std::collections::HashMap;

use crate::{
    capture::{Flavor, ProgramStats},
    changes::{self, Gap, Witness},
    devices::DeviceKey,
    tracker::{LossCounters, Tracker},
};

#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub flavor: Flavor,
    pub granularity: u64,
    pub kernel_ring_bytes: u64,
    pub started_monotonic_ns: u64,
    /// Where the capture is pinned (it outlives the agent), if it is.
    pub pinned_in: Option<std::path::PathBuf>,
    pub loss: LossCounters,
    pub programs: HashMap<&'static str, ProgramStats>,
    pub gaps: Vec<Gap>,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, serde::Serialize)]
pub struct DeviceStatus {
    pub name: Option<String>,
    pub key: DeviceKey,
    /// When tracking of this instance began (CLOCK_MONOTONIC ns).
    pub tracked_since_ns: u64,
    pub changed_chunks: u64,
    pub changed_bytes: u64,
    /// Events by kind name.
    pub events: HashMap<&'static str, u64>,
    pub captured_sectors: u64,
    /// Chunks that may have a write in flight, and whether completions are
    /// counted for this device yet.
    pub in_flight_chunks: u64,
    pub completions_trusted: bool,
    pub witness: Witness,
    /// Changed byte ranges `[offset, length]`, only for devices asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<[u64; 2]>>,
}

const KIND_NAMES: [&str; 8] =
    ["", "write", "discard", "write_zeroes", "secure_erase", "zone_append", "unclassified", "completed"];

impl Status {
    /// `with_ranges`: disk names whose changed ranges are listed in full.
    pub fn of(tracker: &Tracker, with_ranges: &[String]) -> Self {
        let changes = tracker.changes();
        let granularity = changes.granularity();
        let devices = changes
            .devices()
            .iter()
            .map(|(key, d)| {
                let listed = d.name.as_ref().is_some_and(|n| with_ranges.contains(n));
                DeviceStatus {
                    name: d.name.clone(),
                    key: *key,
                    tracked_since_ns: d.first_seen_ns,
                    changed_chunks: d.changed.len(),
                    changed_bytes: d.changed.len() * granularity,
                    events: KIND_NAMES
                        .iter()
                        .zip(d.events)
                        .filter(|(name, n)| !name.is_empty() && *n > 0)
                        .map(|(name, n)| (*name, n))
                        .collect(),
                    captured_sectors: d.captured_sectors,
                    in_flight_chunks: d.in_flight.len(),
                    completions_trusted: d.completions_trusted,
                    witness: d.witness,
                    ranges: listed.then(|| {
                        changes::runs(&d.changed).map(|(c, n)| [c * granularity, n * granularity]).collect()
                    }),
                }
            })
            .collect();
        Self {
            flavor: tracker.flavor(),
            granularity,
            kernel_ring_bytes: tracker.kernel_ring_bytes(),
            started_monotonic_ns: tracker.started_ns(),
            pinned_in: tracker.pins().map(|p| p.path().to_path_buf()),
            loss: tracker.loss().clone(),
            programs: tracker.program_stats().clone(),
            gaps: changes.gaps().to_vec(),
            devices,
        }
    }
}
