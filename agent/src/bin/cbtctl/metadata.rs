//! `allocated` and `delta`: list a SnapshotMetadata stream, checking that
//! the server keeps the spec's stream rules.

use std::io::Write;

use anyhow::{bail, ensure, Context, Result};
use cbt_agent::names::Echo;
use cbt_agent::service::csi::{
    snapshot_metadata_client::SnapshotMetadataClient, BlockMetadataType, GetMetadataAllocatedRequest,
    GetMetadataAllocatedResponse, GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use serde::Serialize;
use tonic::{transport::Channel, Streaming};

use crate::RpcError;

#[derive(clap::Args)]
pub struct AllocatedArgs {
    /// CSI snapshot handle.
    snapshot: String,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(clap::Args)]
pub struct DeltaArgs {
    /// CSI handle of the base (older) snapshot.
    base: String,
    /// CSI handle of the target (newer) snapshot.
    target: String,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(clap::Args)]
struct ListArgs {
    /// Report only ranges that end after this byte offset.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    starting_offset: i64,
    /// Tuples per message (0: the server's choice).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    max_results: i32,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    /// One row per range, like snapshot-metadata-lister's table.
    Table,
    /// One JSON object with all messages merged.
    Json,
}

/// What a metadata stream asks for.
pub(crate) enum Query {
    Allocated { snapshot: String },
    Delta { base: String, target: String },
}

/// One byte range reported by the server.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Range {
    pub byte_offset: i64,
    pub size_bytes: i64,
}

impl Range {
    pub(crate) fn end(&self) -> i64 {
        self.byte_offset + self.size_bytes
    }
}

/// One stream message, whatever the call.
pub(crate) struct Message {
    pub block_metadata_type: BlockMetadataType,
    pub volume_capacity_bytes: i64,
    pub ranges: Vec<Range>,
}

enum Inner {
    Allocated(Streaming<GetMetadataAllocatedResponse>),
    Delta(Streaming<GetMetadataDeltaResponse>),
}

/// A SnapshotMetadata stream whose messages are checked against the spec's
/// rules as they arrive: tuples strictly ascending and non-overlapping
/// across messages, `size_bytes > 0`, the first one ending after
/// `starting_offset`, a type that is FIXED_LENGTH or VARIABLE_LENGTH and
/// constant, a constant capacity, equal sizes in FIXED_LENGTH (except a last
/// tuple clamped to the capacity).
pub(crate) struct MetadataStream {
    inner: Inner,
    starting_offset: i64,
    messages: u64,
    kind: Option<(BlockMetadataType, i64)>,
    last_end: Option<i64>,
    fixed_size: Option<i64>,
    clamped: bool,
}

impl MetadataStream {
    pub(crate) async fn open(
        channel: Channel,
        query: &Query,
        starting_offset: i64,
        max_results: i32,
    ) -> Result<MetadataStream> {
        let mut client = SnapshotMetadataClient::new(channel).max_decoding_message_size(64 << 20);
        let inner = match query {
            Query::Allocated { snapshot } => {
                let request = GetMetadataAllocatedRequest {
                    snapshot_id: snapshot.clone(),
                    starting_offset,
                    max_results,
                    secrets: Default::default(),
                };
                let stream = client.get_metadata_allocated(request).await.map_err(RpcError)?;
                Inner::Allocated(stream.into_inner())
            }
            Query::Delta { base, target } => {
                let request = GetMetadataDeltaRequest {
                    base_snapshot_id: base.clone(),
                    target_snapshot_id: target.clone(),
                    starting_offset,
                    max_results,
                    secrets: Default::default(),
                };
                let stream = client.get_metadata_delta(request).await.map_err(RpcError)?;
                Inner::Delta(stream.into_inner())
            }
        };
        Ok(MetadataStream {
            inner,
            starting_offset,
            messages: 0,
            kind: None,
            last_end: None,
            fixed_size: None,
            clamped: false,
        })
    }

    /// The next message, checked; `None` once the server ended the stream OK.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>> {
        let raw = match &mut self.inner {
            Inner::Allocated(s) => s
                .message()
                .await
                .map_err(RpcError)?
                .map(|m| (m.block_metadata_type, m.volume_capacity_bytes, m.block_metadata)),
            Inner::Delta(s) => s
                .message()
                .await
                .map_err(RpcError)?
                .map(|m| (m.block_metadata_type, m.volume_capacity_bytes, m.block_metadata)),
        };
        let Some((ty, capacity, tuples)) = raw else { return Ok(None) };
        self.messages += 1;
        let n = self.messages;
        let ranges: Vec<Range> =
            tuples.into_iter().map(|t| Range { byte_offset: t.byte_offset, size_bytes: t.size_bytes }).collect();
        self.check(ty, capacity, &ranges).with_context(|| format!("server broke the stream rules in message {n}"))?;
        let block_metadata_type = BlockMetadataType::try_from(ty).expect("checked");
        Ok(Some(Message { block_metadata_type, volume_capacity_bytes: capacity, ranges }))
    }

    fn check(&mut self, ty: i32, capacity: i64, ranges: &[Range]) -> Result<()> {
        let ty = match BlockMetadataType::try_from(ty) {
            Ok(t @ (BlockMetadataType::FixedLength | BlockMetadataType::VariableLength)) => t,
            _ => bail!("block_metadata_type {ty} is neither FIXED_LENGTH nor VARIABLE_LENGTH"),
        };
        ensure!(capacity >= 0, "negative volume_capacity_bytes {capacity}");
        match self.kind {
            None => self.kind = Some((ty, capacity)),
            Some((t, c)) => {
                ensure!(t == ty, "block_metadata_type changed from {} to {}", t.as_str_name(), ty.as_str_name());
                ensure!(c == capacity, "volume_capacity_bytes changed from {c} to {capacity}");
            }
        }
        for r in ranges {
            ensure!(r.size_bytes > 0, "tuple at {} has size {}", r.byte_offset, r.size_bytes);
            ensure!(r.byte_offset >= 0, "tuple at negative offset {}", r.byte_offset);
            ensure!(r.byte_offset.checked_add(r.size_bytes).is_some(), "tuple at {} overflows", r.byte_offset);
            match self.last_end {
                None => ensure!(
                    r.end() > self.starting_offset,
                    "first tuple [{}, {}) ends at or before starting_offset {}",
                    r.byte_offset,
                    r.end(),
                    self.starting_offset
                ),
                Some(end) => ensure!(
                    r.byte_offset >= end,
                    "tuple at {} overlaps or precedes the previous one, which ends at {end}",
                    r.byte_offset
                ),
            }
            ensure!(r.byte_offset < capacity, "tuple at {} starts at or past the capacity {capacity}", r.byte_offset);
            if ty == BlockMetadataType::FixedLength {
                ensure!(!self.clamped, "FIXED_LENGTH tuple at {} follows a shorter, final one", r.byte_offset);
                match self.fixed_size {
                    None => self.fixed_size = Some(r.size_bytes),
                    Some(s) if s == r.size_bytes => {}
                    // The last tuple may be clamped to the capacity.
                    Some(s) if r.size_bytes < s && r.end() == capacity => self.clamped = true,
                    Some(s) => {
                        bail!("FIXED_LENGTH tuple at {} has size {} instead of {s}", r.byte_offset, r.size_bytes)
                    }
                }
            }
            self.last_end = Some(r.end());
        }
        Ok(())
    }
}

/// Every message of a stream, merged.
pub(crate) struct Listing {
    /// `None` when the server sent no message at all (legal for an empty answer).
    pub kind: Option<(BlockMetadataType, i64)>,
    /// Ranges with the number of the message that carried them (from 1).
    pub ranges: Vec<(u64, Range)>,
}

pub(crate) async fn list(channel: Channel, query: &Query, starting_offset: i64, max_results: i32) -> Result<Listing> {
    let mut stream = MetadataStream::open(channel, query, starting_offset, max_results).await?;
    let mut listing = Listing { kind: None, ranges: Vec::new() };
    while let Some(m) = stream.next().await? {
        listing.kind = Some((m.block_metadata_type, m.volume_capacity_bytes));
        let n = stream.messages;
        listing.ranges.extend(m.ranges.into_iter().map(|r| (n, r)));
    }
    Ok(listing)
}

pub async fn allocated(channel: Channel, args: AllocatedArgs) -> Result<()> {
    let query = Query::Allocated { snapshot: args.snapshot.clone() };
    let listing = list(channel, &query, args.list.starting_offset, args.list.max_results)
        .await
        .with_context(|| format!("GetMetadataAllocated({})", Echo(&args.snapshot)))?;
    print(&listing, args.list.output)
}

pub async fn delta(channel: Channel, args: DeltaArgs) -> Result<()> {
    let query = Query::Delta { base: args.base.clone(), target: args.target.clone() };
    let listing = list(channel, &query, args.list.starting_offset, args.list.max_results)
        .await
        .with_context(|| format!("GetMetadataDelta({}, {})", Echo(&args.base), Echo(&args.target)))?;
    print(&listing, args.list.output)
}

fn print(listing: &Listing, format: Format) -> Result<()> {
    crate::print_out(|out| write_listing(out, listing, format))
}

fn write_listing(out: &mut dyn Write, listing: &Listing, format: Format) -> std::io::Result<()> {
    match format {
        Format::Table => {
            let (ty, capacity) =
                listing.kind.map(|(t, c)| (t.as_str_name(), c.to_string())).unwrap_or(("-", "-".to_string()));
            writeln!(
                out,
                "{:>7} {:>14} {:>17} {:>14} {:>14} {:>16} {:>12}",
                "Record#",
                "VolCapBytes",
                "BlockMetadataType",
                "ByteOffset",
                "SizeBytes",
                "ByteOffset(hex)",
                "Size(hex)"
            )?;
            writeln!(out, "{:->7} {:->14} {:->17} {:->14} {:->14} {:->16} {:->12}", "", "", "", "", "", "", "")?;
            for (n, r) in &listing.ranges {
                writeln!(
                    out,
                    "{n:>7} {capacity:>14} {ty:>17} {:>14} {:>14} {:>#16x} {:>#12x}",
                    r.byte_offset, r.size_bytes, r.byte_offset, r.size_bytes
                )?;
            }
        }
        Format::Json => {
            #[derive(Serialize)]
            struct Json<'a> {
                block_metadata_type: Option<&'static str>,
                volume_capacity_bytes: Option<i64>,
                block_metadata: Vec<&'a Range>,
            }
            let json = Json {
                block_metadata_type: listing.kind.map(|(t, _)| t.as_str_name()),
                volume_capacity_bytes: listing.kind.map(|(_, c)| c),
                block_metadata: listing.ranges.iter().map(|(_, r)| r).collect(),
            };
            serde_json::to_writer(&mut *out, &json)?;
            writeln!(out)?;
        }
    }
    Ok(())
}
