//! `cbtctl snapshot ...` and `cbtctl status`: the agent's admin socket.

use std::io::Write;

use anyhow::{Context, Result};
use cbt_agent::admin::proto::{
    admin_client::AdminClient, AbortSnapshotRequest, BeginSnapshotRequest, CommitSnapshotRequest,
    DeleteSnapshotRequest, ListSnapshotsRequest, OpenCut, Snapshot, StatusRequest,
};
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use crate::{print_out, shown, RpcError};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Open VOLUME's cut window: run just BEFORE the backend takes the
    /// snapshot. Prints the cut id, for `commit --cut`.
    Begin { volume: String },
    /// Close it: run just AFTER the snapshot exists. HANDLE is the id the
    /// backup tool will query (the CSI snapshot handle).
    Commit {
        volume: String,
        handle: String,
        /// The cut id `begin` printed. Without it the window starts at the
        /// volume's earliest open cut (never too late, but a begin left
        /// open widens every later window).
        #[arg(long = "cut", value_name = "ID")]
        cut: Option<u64>,
    },
    /// Close VOLUME's open cut ID (`--cut`), or all of them (`--all`),
    /// without a snapshot: the backend failed to cut, or the client that
    /// began them is gone.
    Abort(AbortArgs),
    /// List the cuts begun and not yet committed or aborted.
    Cuts(ListArgs),
    /// Forget a snapshot (the log may then merge the segments it needed).
    Delete { handle: String },
    /// List registered snapshots.
    List(ListArgs),
}

#[derive(Args)]
#[group(id = "which", required = true, args = ["cut", "all"])]
pub struct AbortArgs {
    volume: String,
    #[arg(long = "cut", value_name = "ID")]
    cut: Option<u64>,
    /// Every open cut of the volume; also lets commits without `--cut`
    /// through again after a cut expired. Only when no client still holds
    /// a cut of the volume.
    #[arg(long)]
    all: bool,
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
        SnapshotCommand::Commit { volume, handle, cut } => {
            let request = CommitSnapshotRequest { volume: volume.clone(), handle, cut_id: cut };
            let reply = client.commit_snapshot(request).await.map_err(rpc)?.into_inner();
            let snapshot = reply.snapshot.context("the agent sent no snapshot")?;
            print_out(|out| writeln!(out, "{}", snapshot.handle))?;
            // Taken cuts wait only for a client naming them: they widen no
            // window.
            let untaken: Vec<String> =
                reply.open_cuts.iter().filter(|c| !c.taken).map(|c| c.cut_id.to_string()).collect();
            if !untaken.is_empty() {
                // A closed stderr must not fail a commit that happened.
                let _ = writeln!(
                    std::io::stderr(),
                    "note: volume {volume} still has open cuts ({}); commit them with --cut, or abort the ones no \
                     client will commit (`cbtctl snapshot abort {volume} --cut ID`): until then they widen the \
                     windows of commits without --cut",
                    untaken.join(", ")
                );
            }
        }
        SnapshotCommand::Abort(args) => {
            let request = AbortSnapshotRequest { volume: args.volume, cut_id: args.cut, all: args.all };
            let reply = client.abort_snapshot(request).await.map_err(rpc)?.into_inner();
            print_out(|out| reply.aborted.iter().try_for_each(|id| writeln!(out, "{id}")))?;
        }
        SnapshotCommand::Cuts(args) => {
            let list = client.list_snapshots(ListSnapshotsRequest {}).await.map_err(rpc)?.into_inner();
            if args.json {
                let items: Vec<_> = list.open_cuts.iter().map(cut_json).collect();
                let json = serde_json::to_string_pretty(&items)?;
                print_out(|out| writeln!(out, "{json}"))?;
            } else {
                print_out(|out| {
                    writeln!(out, "{:<18} {:<16} {:<20} {:>16} {:>12} TAKEN", "CUT", "VOLUME", "DEVICE", "CAPACITY", "OPEN (s)")?;
                    for c in &list.open_cuts {
                        let open_s = c.open_ns as f64 / 1e9;
                        let taken = if c.taken { "yes" } else { "-" };
                        writeln!(
                            out,
                            "{:<18} {:<16} {:<20} {:>16} {:>12.1} {taken}",
                            c.cut_id,
                            shown(&c.volume),
                            c.device,
                            c.capacity_bytes,
                            open_s
                        )?;
                    }
                    Ok(())
                })?;
            }
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
        "cut_id": s.cut_id,
    })
}

fn cut_json(c: &OpenCut) -> serde_json::Value {
    serde_json::json!({
        "cut_id": c.cut_id,
        "volume": c.volume,
        "device": c.device,
        "window_lo": c.window_lo,
        "capacity_bytes": c.capacity_bytes,
        "open_ns": c.open_ns,
        "taken": c.taken,
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
