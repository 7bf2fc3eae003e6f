//! `cbt-agent`: the node agent binary.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use cbt_agent::{
    admin::{self, AdminService, StatusFn},
    canary::Canary,
    capture::{CaptureOptions, Flavor, PinDir},
    changelog::{lock, ChangeLog, LogQueries, SharedLog},
    journal::write_atomic,
    statedir::StateDir,
    query::MetadataSource,
    recorder::{Recorder, RecorderOptions},
    service::{self, MetadataType, ServiceOptions},
    status::Status,
    tracker::{Tracker, TrackerOptions},
    volumes::{VolumeSpec, Volumes},
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
    /// Capture block-device changes and serve the CSI SnapshotMetadata and
    /// admin APIs until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Detach the programs an agent left pinned (when uninstalling it; the
    /// next agent on this state directory then starts with a gap). Refused
    /// while an agent runs on the state directory.
    Release(ReleaseArgs),
}

#[derive(clap::Args)]
struct ReleaseArgs {
    #[arg(long, default_value = "/var/lib/cbt", env = "CBT_STATE_DIR")]
    state_dir: PathBuf,
    #[arg(long, default_value = "/sys/fs/bpf/cbt", env = "CBT_PIN_ROOT")]
    pin_root: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where the change log lives (created if missing, 0700).
    #[arg(long, default_value = "/var/lib/cbt", env = "CBT_STATE_DIR")]
    state_dir: PathBuf,
    /// The CSI socket the external-snapshot-metadata sidecar dials.
    #[arg(long, default_value = "/run/cbt/csi.sock", env = "CBT_CSI_SOCKET")]
    csi_socket: PathBuf,
    /// The local admin socket (`cbtctl snapshot ...`, status).
    #[arg(long, default_value = "/run/cbt/admin.sock", env = "CBT_ADMIN_SOCKET")]
    admin_socket: PathBuf,
    /// The name of the existing CSI driver whose volumes are served: the
    /// sidecar requires VolumeSnapshotContent.spec.driver to equal it.
    #[arg(long, default_value = "cbt.example.io", env = "CBT_DRIVER_NAME")]
    driver_name: String,
    /// A volume to serve, as NAME=DEVICE (repeatable), e.g. data=/dev/loop3.
    #[arg(long = "volume", value_name = "NAME=DEVICE")]
    volumes: Vec<VolumeSpec>,
    /// More volumes, one NAME=DEVICE per line (`#` comments allowed).
    #[arg(long, env = "CBT_VOLUMES_FILE")]
    volumes_file: Option<PathBuf>,
    /// Tuples per chunk (FIXED_LENGTH) or coalesced extents (VARIABLE_LENGTH).
    #[arg(long, value_enum, default_value_t = MetadataType::Variable)]
    block_metadata_type: MetadataType,
    /// Bytes per tracked chunk (a power of two, 512 B – 1 MiB).
    #[arg(long, default_value_t = 4096)]
    granularity: u64,
    /// Do not attach the request-completion program: one program run less
    /// per request, but a write in flight at a seal keeps its segment open
    /// until the device is idle (less precise deltas under steady load).
    #[arg(long)]
    no_completion_tracking: bool,
    /// Hook flavor; by default `btf`, falling back to `classic`.
    #[arg(long, value_enum)]
    flavor: Option<Flavor>,
    /// How often the event rings are drained.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// How often loss counters, the kernel witness and devices are checked.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    check_interval: Duration,
    /// How often the open segment of the change log is sealed and persisted
    /// (snapshots seal at once). A crash loses at most this much as a gap.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    segment_interval: Duration,
    /// Also write the JSON status here every check.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Where (in bpffs) the programs, links and rings are pinned, under a
    /// directory per state directory: they keep capturing while the agent
    /// restarts or is upgraded, and the next agent takes them over without
    /// a gap. `cbt-agent release` removes them.
    #[arg(long, default_value = "/sys/fs/bpf/cbt", env = "CBT_PIN_ROOT")]
    pin_root: PathBuf,
    /// Do not pin: every agent restart is a gap for every device.
    #[arg(long)]
    no_pin: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run(*args))
        }
        Command::Release(args) => release(args),
    }
}

fn release(args: ReleaseArgs) -> Result<()> {
    // Holding the state directory's lock: no agent can be running on it.
    let _state = StateDir::open(&args.state_dir)
        .with_context(|| format!("state directory {} (is an agent running on it?)", args.state_dir.display()))?;
    let pins = PinDir::keyed(&args.pin_root, &args.state_dir);
    if pins.release()? {
        println!("released the capture pinned in {}", pins.path().display());
    } else {
        println!("nothing pinned in {}", pins.path().display());
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let mut specs = args.volumes.clone();
    if let Some(file) = &args.volumes_file {
        specs.extend(cbt_agent::volumes::read_specs(file)?);
    }
    let volumes = Volumes::new(specs)?;
    for spec in volumes.iter() {
        match volumes.locate(&spec.name) {
            Ok(extent) => tracing::info!(volume = %spec, disk = %extent.disk.key, "volume found"),
            // Not fatal: the device may appear later (it is looked up at
            // every snapshot).
            Err(e) => tracing::warn!("{e}"),
        }
    }
    let state = StateDir::open(&args.state_dir).with_context(|| format!("state directory {}", args.state_dir.display()))?;

    // Both sockets are bound before anything else starts, so a socket the
    // agent cannot own (a file is there, another agent serves it, its
    // directory is not root's alone) stops it here, non-zero, instead of
    // an agent that runs, says "serving" and passes its liveness check
    // without the service.
    let queries = Arc::new(LogQueries::default());
    let csi_routes = service::csi_routes(
        Arc::clone(&queries) as Arc<dyn MetadataSource>,
        &ServiceOptions {
            block_metadata_type: args.block_metadata_type,
            ..ServiceOptions::new(args.driver_name.clone())
        },
    )?;
    let csi_listener = service::Listener::bind(&args.csi_socket, service::CSI_SOCKET_MODE)
        .await
        .context("the CSI socket (--csi-socket)")?;
    let admin_listener = service::Listener::bind(&args.admin_socket, admin::SOCKET_MODE)
        .await
        .context("the admin socket (--admin-socket)")?;

    // A server that stops before shutdown stops the agent (non-zero).
    let (server_down_tx, mut server_down) = tokio::sync::mpsc::unbounded_channel::<&'static str>();

    // The CSI socket answers Probe (not ready) while the log loads; admin
    // calls wait in the socket's backlog until the recorder runs.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let csi = watched("CSI", &server_down_tx, service::serve_on(csi_listener, csi_routes, stopped(stop_rx.clone())));

    let (mut log, report) = ChangeLog::load(state.path(), args.granularity)
        .with_context(|| format!("opening the change log in {}", args.state_dir.display()))?;
    if let Some(damage) = &report.damage {
        tracing::error!(%damage, "change log damaged: a copy was kept; everything after the damage is a gap");
    }
    tracing::info!(?report, "change log loaded");
    let options = TrackerOptions {
        capture: CaptureOptions {
            flavor: args.flavor,
            completions: !args.no_completion_tracking,
            pins: (!args.no_pin).then(|| PinDir::keyed(&args.pin_root, &args.state_dir)),
        },
        granularity: args.granularity,
        idle_probe: args.check_interval,
    };
    let (mut tracker, continuity) = Tracker::take_over(&options, log.checkpoint()).context("starting capture")?;
    tracing::info!(?continuity, "capture running");
    match Canary::in_dir(&args.state_dir) {
        Ok(canary) => {
            tracing::info!(disk = %canary.disk(), "liveness canary: every check writes to {}", canary.path().display());
            tracker.set_canary(canary);
        }
        Err(e) => tracing::warn!(error = %e, "no liveness canary: nothing proves the capture programs still run"),
    }
    state.mark_dirty(b"running").context("writing the run marker")?;
    log.begin_run(tracker.started_ns(), &continuity).context("recording the run's start")?;
    let log: SharedLog = Arc::new(Mutex::new(log));
    queries.loaded(Arc::clone(&log));

    let recorder = Arc::new(Recorder::spawn(
        tracker,
        Arc::clone(&log),
        RecorderOptions {
            poll_interval: args.poll_interval,
            check_interval: args.check_interval,
            segment_interval: args.segment_interval,
        },
    ));
    let status_volumes = volumes.clone();
    let status: StatusFn = Arc::new(move |tracker, log| status_json(tracker, log, &status_volumes));
    let admin = watched(
        "admin",
        &server_down_tx,
        admin::serve(
            admin_listener,
            AdminService::new(Arc::clone(&log), Arc::clone(&recorder), volumes, Arc::clone(&status)),
            stopped(stop_rx.clone()),
        ),
    );
    tracing::info!(csi = %args.csi_socket.display(), admin = %args.admin_socket.display(), "serving; stop with SIGINT or SIGTERM");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut status_tick = tokio::time::interval(args.check_interval);
    let write_status = || async {
        let Some(path) = &args.status_file else { return Ok(()) };
        let (log, status) = (Arc::clone(&log), Arc::clone(&status));
        let value = recorder.with_tracker(move |t| status(t, &lock(&log))).await?;
        write_atomic(path, &serde_json::to_vec_pretty(&value)?).with_context(|| format!("writing {}", path.display()))
    };
    let mut server_failed = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            Some(name) = server_down.recv() => {
                tracing::error!("the {name} service stopped on its own: stopping the agent");
                server_failed = Some(name);
                break;
            }
            _ = status_tick.tick() => {
                if recorder.is_finished() {
                    break;
                }
                write_status().await?;
            }
        }
    }
    if !recorder.is_finished() {
        write_status().await?;
    }
    let _ = stop_tx.send(true);
    let outcome = tokio::task::spawn_blocking(move || recorder.stop()).await?;
    for (name, server) in [("CSI", csi), ("admin", admin)] {
        if let Err(e) = server.await? {
            tracing::error!("{name} service: {e}");
            server_failed.get_or_insert(name);
        }
    }
    outcome.context("recording")?;
    // The marker pins the journal's end: the next start can tell it reads
    // this very file, whole.
    let marker = lock(&log).clean_stop_marker();
    state.mark_clean(marker.as_bytes()).context("writing the run marker")?;
    if let Some(name) = server_failed {
        anyhow::bail!("the {name} service failed (see above)");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Runs a server; its name goes to `down` when it ends, whyever it does.
fn watched(
    name: &'static str,
    down: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    server: impl std::future::Future<Output = Result<(), service::ServiceError>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), service::ServiceError>> {
    let down = down.clone();
    tokio::spawn(async move {
        let result = server.await;
        let _ = down.send(name);
        result
    })
}

fn status_json(tracker: &Tracker, log: &ChangeLog, volumes: &Volumes) -> serde_json::Value {
    let volumes: Vec<_> = volumes
        .iter()
        .map(|spec| {
            let extent = volumes.locate(&spec.name);
            serde_json::json!({
                "name": spec.name,
                "device": spec.device,
                "instance": extent.as_ref().ok().map(|e| log.instance_id(e.disk.key).to_string()),
                "capacity_bytes": extent.as_ref().ok().map(|e| e.size_bytes),
                "error": extent.as_ref().err().map(ToString::to_string),
                "snapshots": log.snapshots().filter(|s| s.volume == spec.name).count(),
            })
        })
        .collect();
    serde_json::json!({
        "volumes": volumes,
        "log": log.stats(),
        "gaps": log.gaps(),
        "journal_damage": log.damage(),
        "snapshots": log.snapshots().collect::<Vec<_>>(),
        "capture": Status::of(tracker, &[]),
        "canary": tracker.canary().map(|(disk, last_ok_ns)| serde_json::json!({
            "disk": disk.to_string(),
            "last_passed_ns": last_ok_ns,
        })),
    })
}
