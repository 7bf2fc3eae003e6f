//! `cbtctl snapshot ...` and `cbtctl status`: the agent's admin socket.

use std::io::Write;

use anyhow::{Context, Result};
use cbt_agent::admin::proto::{
    admin_client::AdminClient, BeginSnapshotRequest, CommitSnapshotRequest, DeleteSnapshotRequest,
    ListSnapshotsRequest, Snapshot, StatusRequest,
};
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use crate::{print_out, shown, RpcError};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Open VOLUME's cut window: run just BEFORE the backend takes the
    /// snapshot. Prints the cut id.
    Begin { volume: String },
    /// Close it: run just AFTER the snapshot exists. HANDLE is the id the
    /// backup tool will query (the CSI snapshot handle).
    Commit { volume: String, handle: String },
    /// Forget a snapshot (the log may then merge the segments it needed).
    Delete { handle: String },
    /// List registered snapshots.
    List(ListArgs),
}

#[derive(Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Print the agent's whole JSON self-report instead of a summary.
    #[arg(long)]
    json: bool,
}

fn rpc(status: tonic::Status) -> anyhow::Error {
    RpcError(status).into()
}

pub async fn snapshot(channel: Channel, command: SnapshotCommand) -> Result<()> {
    let mut client = AdminClient::new(channel);
    match command {
        SnapshotCommand::Begin { volume } => {
            let cut = client.begin_snapshot(BeginSnapshotRequest { volume }).await.map_err(rpc)?.into_inner();
            print_out(|out| writeln!(out, "{}", cut.cut_id))?;
        }
        SnapshotCommand::Commit { volume, handle } => {
            let reply = client.commit_snapshot(CommitSnapshotRequest { volume, handle }).await.map_err(rpc)?;
            let snapshot = reply.into_inner().snapshot.context("the agent sent no snapshot")?;
            print_out(|out| writeln!(out, "{}", snapshot.handle))?;
        }
        SnapshotCommand::Delete { handle } => {
            client.delete_snapshot(DeleteSnapshotRequest { handle }).await.map_err(rpc)?;
        }
        SnapshotCommand::List(args) => {
            let list = client.list_snapshots(ListSnapshotsRequest {}).await.map_err(rpc)?.into_inner();
            if args.json {
                let items: Vec<_> = list.snapshots.iter().map(snapshot_json).collect();
                let json = serde_json::to_string_pretty(&items)?;
                print_out(|out| writeln!(out, "{json}"))?;
            } else {
                print_out(|out| {
                    writeln!(
                        out,
                        "{:<24} {:<16} {:<20} {:>16} {:>22}",
                        "HANDLE", "VOLUME", "DEVICE", "CAPACITY", "WINDOW (ms)"
                    )?;
                    for s in &list.snapshots {
                        let window_ms = s.window_hi.saturating_sub(s.window_lo) as f64 / 1e6;
                        writeln!(
                            out,
                            "{:<24} {:<16} {:<20} {:>16} {:>22.1}",
                            shown(&s.handle),
                            shown(&s.volume),
                            s.device,
                            s.capacity_bytes,
                            window_ms
                        )?;
                    }
                    Ok(())
                })?;
            }
        }
    }
    Ok(())
}

fn snapshot_json(s: &Snapshot) -> serde_json::Value {
    serde_json::json!({
        "handle": s.handle,
        "volume": s.volume,
        "device": s.device,
        "window_lo": s.window_lo,
        "window_hi": s.window_hi,
        "capacity_bytes": s.capacity_bytes,
        "committed_unix_ns": s.committed_unix_ns,
    })
}

pub async fn status(channel: Channel, args: StatusArgs) -> Result<()> {
    let json = AdminClient::new(channel).status(StatusRequest {}).await.map_err(rpc)?.into_inner().json;
    let value: serde_json::Value = serde_json::from_str(&json).context("the agent's status is not JSON")?;
    if args.json {
        let json = serde_json::to_string_pretty(&value)?;
        return print_out(|out| writeln!(out, "{json}"));
    }
    print_out(|out| status_summary(out, &value))
}

fn status_summary(out: &mut dyn Write, value: &serde_json::Value) -> std::io::Result<()> {
    let log = &value["log"];
    writeln!(
        out,
        "change log: {} segments, {} chunks in {} B ({} B journal), {} snapshots, {} gaps",
        log["segments"],
        log["segment_chunks"],
        log["segment_bytes"],
        log["journal_bytes"],
        log["snapshots"],
        log["gaps"]
    )?;
    let loss = &value["capture"]["loss"];
    writeln!(
        out,
        "capture: {} events, {} dropped, {} witness alarms, max ring fill {}",
        loss["events"], loss["dropped_events"], loss["witness_alarms"], loss["max_ring_fill"]
    )?;
    for v in value["volumes"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "volume {}: {} on {} ({} B), {} snapshots{}",
            shown(v["name"].as_str().unwrap_or("?")),
            v["device"].as_str().unwrap_or("?"),
            v["instance"].as_str().unwrap_or("-"),
            v["capacity_bytes"],
            v["snapshots"],
            v["error"].as_str().map(|e| format!(", error: {e}")).unwrap_or_default()
        )?;
    }
    for g in value["gaps"].as_array().into_iter().flatten() {
        writeln!(out, "gap {}..{} {}: {}", g["from"], g["to"], g["instance"], g["reason"].as_str().unwrap_or(""))?;
    }
    Ok(())
}
