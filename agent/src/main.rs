//! `cbt-agent`: the node agent binary.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use cbt_agent::{
    capture::{CaptureOptions, Flavor},
    devices::Disk,
    status::Status,
    tracker::{Tracker, TrackerOptions},
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Changed-block tracker node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture block-device changes until SIGINT/SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Bytes per tracked chunk (a power of two, 512 B – 1 MiB).
    #[arg(long, default_value_t = 4096)]
    granularity: u64,
    /// Hook flavor; by default `btf`, falling back to `classic`.
    #[arg(long, value_enum)]
    flavor: Option<Flavor>,
    /// How often the event rings are drained.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// How often loss counters, the kernel witness and devices are checked.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    check_interval: Duration,
    /// Write a JSON status here after attaching, every check, and at exit.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Devices (e.g. /dev/loop3) whose changed ranges the final status (at
    /// exit) lists in full; periodic statuses carry only counts, since
    /// listing a large random set every check costs more than capturing it.
    #[arg(long = "show")]
    show: Vec<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> Result<()> {
    let show: Vec<String> = args
        .show
        .iter()
        .map(|p| Disk::for_path(p).map(|d| d.name).with_context(|| format!("--show {}", p.display())))
        .collect::<Result<_>>()?;
    let options = TrackerOptions {
        capture: CaptureOptions { flavor: args.flavor },
        granularity: args.granularity,
    };
    let mut tracker = Tracker::start(&options).context("starting capture")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("installing signal handler")?;
    }
    write_status(&tracker, &[], args.status_file.as_deref())?;
    tracing::info!("tracking; stop with SIGINT or SIGTERM");

    let mut next_check = Instant::now() + args.check_interval;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(args.poll_interval);
        tracker.poll();
        if Instant::now() >= next_check {
            tracker.check().context("periodic check")?;
            write_status(&tracker, &[], args.status_file.as_deref())?;
            next_check = Instant::now() + args.check_interval;
        }
    }
    tracker.check().context("final check")?;
    write_status(&tracker, &show, args.status_file.as_deref())?;
    tracing::info!("stopped");
    Ok(())
}

/// Atomic replace, so a reader never sees half a status.
fn write_status(tracker: &Tracker, show: &[String], path: Option<&Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let json = serde_json::to_vec_pretty(&Status::of(tracker, show))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
