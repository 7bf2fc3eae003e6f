//! CSI `SnapshotMetadata`: the allocated and changed blocks of snapshots,
//! streamed as `(byte_offset, size_bytes)` tuples.
//!
//! Each call asks the [`MetadataSource`] for a [`ChunkMap`] on a blocking
//! thread; its refusals become the call's status before any message is sent.
//! A producer on another blocking thread then walks the chunk set from the
//! chunk holding `starting_offset` and feeds a channel of
//! [`CHANNEL_DEPTH`] messages: it runs only as fast as the client reads, and
//! stops as soon as the client cancels or goes away (the channel closes).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, debug_span, error, Span};

use super::{
    blocking,
    csi::{
        snapshot_metadata_server::SnapshotMetadata, BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest,
        GetMetadataAllocatedResponse, GetMetadataDeltaRequest, GetMetadataDeltaResponse,
    },
    tuples::{chunks_from, Tuples},
    MetadataType, ServiceOptions, MAX_TUPLES_PER_MESSAGE,
};
use crate::{
    names::{Echo, MAX_HANDLE_BYTES},
    query::{ChunkMap, MetadataSource},
};

/// Messages a stream buffers ahead of its reader.
const CHANNEL_DEPTH: usize = 4;

/// How many chunks the producer walks between checks that the client is
/// still there (a long run of chunks can be one tuple).
const CANCEL_CHECK_CHUNKS: u32 = 1 << 16;

pub(super) struct MetadataService {
    source: Arc<dyn MetadataSource>,
    fixed: bool,
    default_max_results: u32,
}

/// What a request asks for, validated.
struct Page {
    starting_offset: u64,
    per_message: usize,
}

impl MetadataService {
    pub(super) fn new(source: Arc<dyn MetadataSource>, options: &ServiceOptions) -> Self {
        MetadataService {
            source,
            fixed: options.block_metadata_type == MetadataType::Fixed,
            default_max_results: options.default_max_results,
        }
    }

    /// "max_results > 0: at most that many tuples per message; 0: plugin's
    /// choice"; negative is invalid. "starting_offset negative or beyond the
    /// volume size" is OUT_OF_RANGE (the second half is checked once the
    /// capacity is known).
    fn page(&self, starting_offset: i64, max_results: i32) -> Result<Page, Status> {
        if max_results < 0 {
            return Err(Status::invalid_argument(format!("max_results {max_results} is negative")));
        }
        if starting_offset < 0 {
            return Err(Status::out_of_range(format!("starting_offset {starting_offset} is negative")));
        }
        let asked = if max_results == 0 { self.default_max_results } else { max_results as u32 };
        Ok(Page {
            starting_offset: starting_offset as u64,
            per_message: asked.clamp(1, MAX_TUPLES_PER_MESSAGE) as usize,
        })
    }

    fn block_metadata_type(&self) -> BlockMetadataType {
        if self.fixed {
            BlockMetadataType::FixedLength
        } else {
            BlockMetadataType::VariableLength
        }
    }

    /// Starts the producer for `map`; `make` wraps one message's tuples in
    /// the call's response type.
    fn stream<R: Send + 'static>(
        &self,
        map: ChunkMap,
        page: Page,
        span: Span,
        make: impl Fn(BlockMetadataType, i64, Vec<BlockMetadata>) -> R + Send + 'static,
    ) -> Result<ReceiverStream<Result<R, Status>>, Status> {
        // The change log's own invariants; a violation is a bug there.
        if map.granularity == 0
            || map.capacity_bytes.checked_add(map.granularity).is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(Status::internal(format!(
                "metadata source returned an invalid chunk map (capacity {}, granularity {})",
                map.capacity_bytes, map.granularity
            )));
        }
        if page.starting_offset > map.capacity_bytes {
            return Err(Status::out_of_range(format!(
                "starting_offset {} is beyond the volume capacity {}",
                page.starting_offset, map.capacity_bytes
            )));
        }
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let ty = self.block_metadata_type();
        let fixed = self.fixed;
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let capacity = map.capacity_bytes as i64;
            let produced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                produce(&map, page, fixed, &tx, |tuples| make(ty, capacity, tuples))
            }));
            match produced {
                Ok(Some((tuples, messages))) => debug!(tuples, messages, "stream complete"),
                Ok(None) => debug!("client went away: stream stopped"),
                Err(_) => {
                    // Dropping `tx` alone would end the stream OK, short.
                    error!("stream producer panicked: aborting the stream");
                    let _ = tx.blocking_send(Err(Status::internal("producing the stream failed")));
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// Sends every tuple of `map` from `page.starting_offset` on, in messages of
/// at most `page.per_message` tuples; at least one message (possibly with no
/// tuples, so the client still learns the capacity and type). Returns
/// `(tuples, messages)`, or `None` when the client went away.
fn produce<R>(
    map: &ChunkMap,
    page: Page,
    fixed: bool,
    tx: &mpsc::Sender<Result<R, Status>>,
    make: impl Fn(Vec<BlockMetadata>) -> R,
) -> Option<(u64, u64)> {
    let (mut tuples, mut messages) = (0u64, 0u64);
    let batch_capacity = page.per_message.min(4096);
    let mut batch = Vec::with_capacity(batch_capacity);
    // The first tuple must end after starting_offset: start at the chunk
    // holding it. At capacity exactly there is nothing left to send.
    if page.starting_offset < map.capacity_bytes {
        let mut walked = 0u32;
        let chunks = chunks_from(&map.chunks, page.starting_offset / map.granularity).take_while(|_| {
            walked = walked.wrapping_add(1);
            !walked.is_multiple_of(CANCEL_CHECK_CHUNKS) || !tx.is_closed()
        });
        for extent in Tuples::new(chunks, map.granularity, map.capacity_bytes, fixed) {
            batch.push(BlockMetadata { byte_offset: extent.offset as i64, size_bytes: extent.len as i64 });
            if batch.len() == page.per_message {
                tuples += batch.len() as u64;
                let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_capacity));
                tx.blocking_send(Ok(make(full))).ok()?;
                messages += 1;
            }
        }
        if tx.is_closed() {
            return None;
        }
    }
    if !batch.is_empty() || messages == 0 {
        tuples += batch.len() as u64;
        tx.blocking_send(Ok(make(batch))).ok()?;
        messages += 1;
    }
    Some((tuples, messages))
}

/// A snapshot id is required, and one longer than any handle commit
/// accepts names no snapshot: refused before it is looked up (or echoed).
fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.len() > MAX_HANDLE_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; snapshot handles are at most {MAX_HANDLE_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl SnapshotMetadata for MetadataService {
    type GetMetadataAllocatedStream = ReceiverStream<Result<GetMetadataAllocatedResponse, Status>>;
    type GetMetadataDeltaStream = ReceiverStream<Result<GetMetadataDeltaResponse, Status>>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = request.into_inner();
        // Never the request itself: it carries secrets.
        let span = debug_span!("GetMetadataAllocated", snapshot_id = %Echo(&req.snapshot_id));
        span.in_scope(|| debug!(starting_offset = req.starting_offset, max_results = req.max_results, "call"));
        require("snapshot_id", &req.snapshot_id)?;
        let page = self.page(req.starting_offset, req.max_results)?;
        let source = self.source.clone();
        let id = req.snapshot_id;
        let map = blocking(move || source.allocated(&id)).await?.inspect_err(|e| {
            span.in_scope(|| debug!(error = %e, "refused"));
        })?;
        let stream = self.stream(map, page, span, |ty, capacity, tuples| GetMetadataAllocatedResponse {
            block_metadata_type: ty as i32,
            volume_capacity_bytes: capacity,
            block_metadata: tuples,
        })?;
        Ok(Response::new(stream))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = request.into_inner();
        // Never the request itself: it carries secrets.
        let span = debug_span!(
            "GetMetadataDelta",
            base_snapshot_id = %Echo(&req.base_snapshot_id),
            target_snapshot_id = %Echo(&req.target_snapshot_id)
        );
        span.in_scope(|| debug!(starting_offset = req.starting_offset, max_results = req.max_results, "call"));
        require("base_snapshot_id", &req.base_snapshot_id)?;
        require("target_snapshot_id", &req.target_snapshot_id)?;
        let page = self.page(req.starting_offset, req.max_results)?;
        let source = self.source.clone();
        let (base, target) = (req.base_snapshot_id, req.target_snapshot_id);
        let map = blocking(move || source.delta(&base, &target)).await?.inspect_err(|e| {
            span.in_scope(|| debug!(error = %e, "refused"));
        })?;
        let stream = self.stream(map, page, span, |ty, capacity, tuples| GetMetadataDeltaResponse {
            block_metadata_type: ty as i32,
            volume_capacity_bytes: capacity,
            block_metadata: tuples,
        })?;
        Ok(Response::new(stream))
    }
}
