//! The answers the CSI service streams: which chunks of a snapshot are
//! allocated, or changed between two snapshots, and why an answer cannot be
//! given. The change log computes them; the service only encodes them.

use std::sync::Arc;

use roaring::RoaringTreemap;

/// A set of chunks of one volume, as the change log proved it: every chunk
/// that may differ (delta) or may be non-zero (allocated) is in `chunks`.
#[derive(Debug, Clone)]
pub struct ChunkMap {
    /// Size of the volume at the target snapshot. Chunks at or past it are
    /// never reported; the last one is clamped to it.
    pub capacity_bytes: u64,
    /// Bytes per chunk (a power of two).
    pub granularity: u64,
    /// Chunk indices (byte offset / granularity), shared so a long stream
    /// never copies the set.
    pub chunks: Arc<RoaringTreemap>,
}

/// Why there is no [`ChunkMap`]. Each maps to one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The snapshot id is unknown (or being deleted).
    #[error("snapshot {} is not known to this tracker", crate::names::Echo(.0))]
    NotFound(String),
    /// The request cannot be meaningful: another volume, wrong order, ...
    #[error("{0}")]
    InvalidArgument(String),
    /// The tracker cannot prove its answer is complete: take a full backup.
    #[error("changed blocks cannot be proven complete: {0}; take a full backup")]
    FailedPrecondition(String),
    /// Not ready to answer yet (loading state); the caller may retry.
    #[error("{0}")]
    Unavailable(String),
}

/// What the query service needs from the change log.
pub trait MetadataSource: Send + Sync + 'static {
    /// Every chunk of `snapshot_id` that may hold non-zero data.
    fn allocated(&self, snapshot_id: &str) -> Result<ChunkMap, QueryError>;
    /// Every chunk that may differ between `base_snapshot_id` and
    /// `target_snapshot_id` (a superset of the true difference).
    fn delta(&self, base_snapshot_id: &str, target_snapshot_id: &str) -> Result<ChunkMap, QueryError>;
    /// False while state is loading: Probe answers `ready = false`.
    fn ready(&self) -> bool;
}
