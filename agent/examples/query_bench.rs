//! The library half of `cargo xtask bench query` (xtask cannot depend on
//! this crate: it builds the eBPF object the crate embeds).
//!
//! - `fabricate`: builds a change log for a device instance that does not
//!   exist, through the same calls the recorder and the admin API make
//!   (`ChangeLog::open`, `apply_seal`, `settle`, `begin_cut`,
//!   `commit_snapshot`, `compact`): a base snapshot, `--seals` seals that
//!   together change `--changed-pct` % of the chunks of a
//!   `--capacity-gib` volume (each chunk once, deterministic seed), a target
//!   snapshot. Leaves `DIR/raw` (every seal its own segment) and
//!   `DIR/compacted` (after `compact`), for `cbt-agent run --state-dir` to
//!   serve, and prints sizes and timings as one JSON object.
//! - `stream`: one `GetMetadataDelta` call over the CSI socket, timed,
//!   tuples counted (not printed); prints one JSON object.
//!
//! `cargo run --release -p cbt-agent --example query_bench -- fabricate --dir /var/tmp/q`

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use cbt_agent::{
    changelog::{ChangeLog, LogStats},
    changes::TakenChanges,
    devices::DeviceKey,
    service::{
        self,
        csi::{
            identity_client::IdentityClient, snapshot_metadata_client::SnapshotMetadataClient, GetMetadataDeltaRequest,
            ProbeRequest,
        },
    },
    tracker::{monotonic_ns, Seal},
};
use clap::{Parser, Subcommand};
use roaring::RoaringTreemap;
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the state directories DIR/raw and DIR/compacted.
    Fabricate(FabricateArgs),
    /// Time one GetMetadataDelta stream.
    Stream(StreamArgs),
    /// Wait until the agent's socket exists and Probe says ready.
    Ready {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(clap::Args)]
struct FabricateArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1024)]
    capacity_gib: u64,
    /// Share of the volume's chunks changed between the snapshots, in %.
    #[arg(long, default_value_t = 1.0)]
    changed_pct: f64,
    /// Seals the changes are spread over (each its own segment until
    /// compaction).
    #[arg(long, default_value_t = 300)]
    seals: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Times the replay, delta and compaction of DIR/raw are measured, each
    /// on a fresh copy.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args)]
struct StreamArgs {
    /// The agent's CSI socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, default_value = BASE)]
    base: String,
    #[arg(long, default_value = TARGET)]
    target: String,
    /// Tuples per message (0: the server's choice).
    #[arg(long, default_value_t = 0)]
    max_results: i32,
    /// Wait up to this long for Probe to say ready before the call.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait_ready: Duration,
    /// Also write every tuple as "offset length" lines here.
    #[arg(long)]
    ranges_out: Option<PathBuf>,
}

const GRANULARITY: u64 = 4096;
const VOLUME: &str = "bench-vol";
const BASE: &str = "base";
const TARGET: &str = "target";
const JOURNAL: &str = "changelog.journal";

/// A device number no real disk has (major 4095, the largest), so the
/// agent serving this state never records changes for it.
fn fabricated_device() -> DeviceKey {
    DeviceKey::from_major_minor(4095, 0xf_fff0, u64::MAX >> 1)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Fabricate(args) => fabricate(&args),
        Command::Stream(args) => runtime()?.block_on(stream(&args)),
        Command::Ready { socket, timeout } => runtime()?.block_on(async {
            wait_ready(&socket, timeout).await?;
            Ok(())
        }),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

// ------------------------------------------------------------- fabricate --

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn stats_json(s: &LogStats, journal_file_bytes: u64) -> serde_json::Value {
    json!({
        "segments": s.segments,
        "segment_chunks": s.segment_chunks,
        "segment_bytes": s.segment_bytes,
        "journal_bytes": s.journal_bytes,
        "journal_file_bytes": journal_file_bytes,
    })
}

fn file_len(dir: &Path) -> Result<u64> {
    Ok(std::fs::metadata(dir.join(JOURNAL)).with_context(|| format!("{}", dir.join(JOURNAL).display()))?.len())
}

fn fabricate(args: &FabricateArgs) -> Result<()> {
    ensure!(args.seals >= 1 && args.rounds >= 1, "--seals and --rounds must be at least 1");
    ensure!(args.changed_pct > 0.0 && args.changed_pct <= 100.0, "--changed-pct must be in (0, 100]");
    let capacity = args.capacity_gib << 30;
    let total_chunks = capacity / GRANULARITY;
    let wanted = ((total_chunks as f64) * args.changed_pct / 100.0).round() as u64;

    // The changed chunks, and which seal each one lands in.
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut drawn: Vec<u64> = Vec::with_capacity(wanted as usize);
    while (drawn.len() as u64) < wanted {
        let missing = wanted - drawn.len() as u64;
        drawn.extend((0..missing).map(|_| rng.u64(..total_chunks)));
        drawn.sort_unstable();
        drawn.dedup();
    }
    let changed = RoaringTreemap::from_sorted_iter(drawn.iter().copied()).expect("ascending");
    let mut per_seal: Vec<Vec<u64>> = vec![Vec::new(); args.seals];
    for &chunk in &drawn {
        per_seal[rng.usize(..args.seals)].push(chunk);
    }
    drop(drawn);
    let per_seal: Vec<RoaringTreemap> =
        per_seal.into_iter().map(|v| RoaringTreemap::from_sorted_iter(v).expect("ascending")).collect();
    let generate_s = secs(started.elapsed());

    let raw = args.dir.join("raw");
    std::fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
    let started = Instant::now();
    let key = fabricated_device();
    let first_seen = monotonic_ns();
    let (mut log, _) = ChangeLog::open(&raw, GRANULARITY, first_seen)?;
    let mut seal = |log: &mut ChangeLog, chunks: RoaringTreemap| -> Result<()> {
        let cut_ns = monotonic_ns();
        let changes = vec![TakenChanges {
            key,
            name: Some("fabricated".into()),
            first_seen_ns: first_seen,
            last_change_ns: cut_ns,
            chunks,
            // A fabricated device: nothing from before capture to wait for.
            proven_ns: Some(first_seen),
            carries_in_flight: false,
        }];
        log.apply_seal(Seal { cut_ns, end_ns: monotonic_ns(), changes, checkpoint: None })?;
        // The next check saw the device idle: this seal's writes completed.
        log.settle(key, monotonic_ns())?;
        Ok(())
    };
    // As the admin API does it: begin, seal, hi, seal, commit.
    let snapshot = |log: &mut ChangeLog, handle: &str, seal: &mut dyn FnMut(&mut ChangeLog, RoaringTreemap) -> Result<()>| -> Result<()> {
        let placement = log.placement(key, 0, capacity);
        let cut = log.begin_cut(VOLUME, placement)?;
        seal(log, RoaringTreemap::new())?;
        let hi = log.now();
        seal(log, RoaringTreemap::new())?;
        log.commit_snapshot(VOLUME, Some(cut), handle, placement, hi)?;
        Ok(())
    };
    seal(&mut log, RoaringTreemap::new())?; // registers the instance
    snapshot(&mut log, BASE, &mut seal)?;
    let seals_started = Instant::now();
    for chunks in per_seal {
        seal(&mut log, chunks)?;
    }
    let seals_s = secs(seals_started.elapsed());
    snapshot(&mut log, TARGET, &mut seal)?;
    log.stop()?;
    let raw_stats = stats_json(&log.stats(), file_len(&raw)?);
    drop(log);
    let build_s = secs(started.elapsed());

    // Replay, delta and compaction of the raw log, each round on a copy.
    let compacted = args.dir.join("compacted");
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let work = args.dir.join(format!("work-{round}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        std::fs::copy(raw.join(JOURNAL), work.join(JOURNAL)).context("copying the raw journal")?;
        let t = Instant::now();
        let (mut log, report) = ChangeLog::open(&work, GRANULARITY, monotonic_ns())?;
        let open_s = secs(t.elapsed());
        ensure!(report.damage.is_none(), "the fabricated journal reads as damaged: {:?}", report.damage);
        let before = stats_json(&log.stats(), file_len(&work)?);
        let t = Instant::now();
        let delta_raw = log.delta(BASE, TARGET).map_err(|e| anyhow::anyhow!("delta before compaction: {e}"))?;
        let delta_raw_s = secs(t.elapsed());
        check_superset(&delta_raw.chunks, &changed, "before compaction")?;
        let t = Instant::now();
        log.compact()?;
        let compact_s = secs(t.elapsed());
        let after = stats_json(&log.stats(), file_len(&work)?);
        let t = Instant::now();
        let delta_compacted = log.delta(BASE, TARGET).map_err(|e| anyhow::anyhow!("delta after compaction: {e}"))?;
        let delta_compacted_s = secs(t.elapsed());
        check_superset(&delta_compacted.chunks, &changed, "after compaction")?;
        ensure!(delta_compacted.chunks == delta_raw.chunks, "compaction changed the delta");
        log.stop()?;
        drop(log);
        rounds.push(json!({
            "open_s": open_s,
            "delta_raw_s": delta_raw_s,
            "compact_s": compact_s,
            "delta_compacted_s": delta_compacted_s,
            "delta_chunks": delta_raw.chunks.len(),
            "before": before,
            "after": after,
        }));
        if round + 1 == args.rounds {
            let _ = std::fs::remove_dir_all(&compacted);
            std::fs::rename(&work, &compacted)?;
        } else {
            std::fs::remove_dir_all(&work)?;
        }
    }

    let out = json!({
        "capacity_bytes": capacity,
        "granularity": GRANULARITY,
        "chunks_changed": changed.len(),
        "seals": args.seals,
        "seed": args.seed,
        "volume": VOLUME,
        "base": BASE,
        "target": TARGET,
        "generate_s": generate_s,
        "build_s": build_s,
        "seals_s": seals_s,
        "raw": raw_stats,
        "rounds": rounds,
        "raw_dir": raw,
        "compacted_dir": compacted,
    });
    println!("{out}");
    Ok(())
}

/// The delta must hold every changed chunk; here it must be exactly them
/// (nothing else was written between the snapshots).
fn check_superset(delta: &RoaringTreemap, changed: &RoaringTreemap, when: &str) -> Result<()> {
    let missing = changed - delta;
    if !missing.is_empty() {
        bail!("delta {when} misses {} changed chunks (first {:?})", missing.len(), missing.min());
    }
    ensure!(delta.len() == changed.len(), "delta {when} has {} chunks, {} were changed", delta.len(), changed.len());
    Ok(())
}

// ---------------------------------------------------------------- stream --

/// A channel to `socket` once the agent there says it is ready (the
/// socket appears before the change log is loaded, and Probe says
/// `ready = false` until it is).
async fn wait_ready(socket: &Path, timeout: Duration) -> Result<tonic::transport::Channel> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match service::connect(socket).await {
            Ok(channel) => match IdentityClient::new(channel.clone()).probe(ProbeRequest {}).await {
                Ok(reply) if reply.get_ref().ready == Some(true) => return Ok(channel),
                Ok(_) => "not ready".to_string(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        ensure!(Instant::now() < deadline, "{}: not ready within {timeout:?} ({last_error})", socket.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stream(args: &StreamArgs) -> Result<()> {
    let channel = wait_ready(&args.socket, args.wait_ready).await?;
    let mut ranges_out = match &args.ranges_out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };

    let mut client = SnapshotMetadataClient::new(channel);
    let request = GetMetadataDeltaRequest {
        base_snapshot_id: args.base.clone(),
        target_snapshot_id: args.target.clone(),
        starting_offset: 0,
        max_results: args.max_results,
        secrets: Default::default(),
    };
    let started = Instant::now();
    let mut response = client.get_metadata_delta(request).await.context("GetMetadataDelta")?.into_inner();
    let (mut tuples, mut messages, mut bytes, mut last_end) = (0u64, 0u64, 0u64, 0i64);
    let mut first_message_s = None;
    let mut kind = None;
    while let Some(message) = response.message().await.context("reading the stream")? {
        first_message_s.get_or_insert_with(|| secs(started.elapsed()));
        messages += 1;
        kind.get_or_insert((message.block_metadata_type, message.volume_capacity_bytes));
        for t in &message.block_metadata {
            ensure!(t.byte_offset >= last_end && t.size_bytes > 0, "tuple at {} out of order", t.byte_offset);
            last_end = t.byte_offset + t.size_bytes;
            bytes += t.size_bytes as u64;
        }
        tuples += message.block_metadata.len() as u64;
        if let Some(out) = &mut ranges_out {
            for t in &message.block_metadata {
                writeln!(out, "{} {}", t.byte_offset, t.size_bytes)?;
            }
        }
    }
    let elapsed = secs(started.elapsed());
    if let Some(mut out) = ranges_out {
        out.flush()?;
    }
    let (ty, capacity) = kind.unwrap_or_default();
    let out = json!({
        "secs": elapsed,
        "first_message_s": first_message_s,
        "tuples": tuples,
        "messages": messages,
        "bytes": bytes,
        "block_metadata_type": ty,
        "volume_capacity_bytes": capacity,
        "max_results": args.max_results,
    });
    println!("{out}");
    Ok(())
}
