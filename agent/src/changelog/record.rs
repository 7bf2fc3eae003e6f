//! What the change log persists: one CBOR-encoded [`Record`] per journal
//! frame. Records only ever describe facts; replaying them in order rebuilds
//! the log. Fields added later must be `#[serde(default)]`.

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use super::{InstanceId, Placement, SnapshotInfo, Stamp};
use crate::tracker::Checkpoint;

#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// An agent run began: stamps of this boot are `CLOCK_MONOTONIC + base`.
    Run { boot_id: String, boot: u32, base: u64, started: Stamp, granularity: u64, pid: u32 },
    /// A device instance was first seen at `tracked_since`.
    Instance { id: InstanceId, name: String, tracked_since: Stamp },
    /// A seal: every change submitted before `cut` is in this or an earlier
    /// seal. Durable once synced; the unit of crash recovery.
    /// With `checkpoint`, a later agent can take over the capture from here.
    Seal {
        cut: Stamp,
        segments: Vec<SegmentRecord>,
        #[serde(default)]
        checkpoint: Option<Box<Checkpoint>>,
    },
    /// Every captured change of `instance` had completed by `at`.
    Settled { instance: InstanceId, at: Stamp },
    /// Changes in `[from, to]` may be missing; `instance: None` = all.
    /// `to == Stamp::MAX`: still open (see `GapClosed`).
    Gap { instance: Option<InstanceId>, from: Stamp, to: Stamp, reason: String },
    /// The open gaps of `instance` end at `at`: it was seen with nothing
    /// pending from before capture.
    GapClosed { instance: InstanceId, at: Stamp },
    /// A snapshot's cut window opened at `lo` for `volume`, which then was
    /// `placement`. Several cuts of one volume may be open at once; each
    /// stays open until a commit names it, it is aborted or it expires.
    /// Written without `placement` by agents that kept one cut per volume
    /// (a later one replaced it). `taken` only in compacted state (see
    /// `Committed`).
    CutBegun {
        volume: String,
        cut_id: u64,
        lo: Stamp,
        #[serde(default)]
        placement: Option<Placement>,
        #[serde(default)]
        taken: bool,
    },
    /// The open cut `cut_id` closed without a snapshot: aborted, or
    /// uncommitted for too long. `expired`: an untaken cut expired, so
    /// `volume` refuses commits that name no cut (its client may be one);
    /// `cut_id` 0 (never issued) restores only that.
    CutAbandoned { volume: String, cut_id: u64, at: Stamp, reason: String, expired: bool },
    /// Every open cut of `volume` closed at once, and its expiries
    /// forgotten: an operator said no client still holds one.
    CutsCleared { volume: String, at: Stamp },
    /// A snapshot committed: the cut `closes` (named by the commit) is
    /// closed; the cut `takes` is *taken*: it no longer counts towards the
    /// windows of commits that name no cut, but its client may still commit
    /// it by id.
    Committed { snapshot: SnapshotInfo, closes: Option<u64>, takes: Option<u64> },
    /// A snapshot, as compaction writes it and as older agents wrote every
    /// commit (those, without a cut id, closed their volume's one cut).
    Snapshot(SnapshotInfo),
    SnapshotDeleted { handle: String },
    /// The agent stopped after its final seal.
    Stop { at: Stamp },
    /// The journal was found damaged at `detected` (see `DamageInfo`):
    /// records may be lost, so every handle the log does not know answers
    /// FAILED_PRECONDITION from then on. Carried by every rewrite.
    Damage { detected: Stamp, reason: String, copy: Option<String> },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub instance: InstanceId,
    pub start: Stamp,
    pub end: Stamp,
    pub settled_by: Option<Stamp>,
    /// Portable roaring serialization of the chunk set.
    #[serde(with = "serde_bytes")]
    pub chunks: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("encoding a record: {0}")]
    Encode(String),
    #[error("undecodable record: {0}")]
    Decode(String),
}

impl Record {
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).map_err(|e| RecordError::Encode(e.to_string()))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        ciborium::from_reader(bytes).map_err(|e| RecordError::Decode(e.to_string()))
    }
}

pub fn encode_chunks(chunks: &RoaringTreemap) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.serialized_size());
    chunks.serialize_into(&mut out).expect("writing to a Vec cannot fail");
    out
}

pub fn decode_chunks(bytes: &[u8]) -> Result<RoaringTreemap, RecordError> {
    RoaringTreemap::deserialize_from(bytes).map_err(|e| RecordError::Decode(format!("chunk set: {e}")))
}
