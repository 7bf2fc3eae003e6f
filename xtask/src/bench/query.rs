//! `cargo xtask bench query`: what answering GetMetadataDelta costs.
//!
//! 1. A 1 TiB volume with 1 % of its 4 KiB chunks changed between two
//!    snapshots: too many writes for a real device in the time a bench has,
//!    so its change log is built through the library
//!    (`agent/examples/query_bench.rs fabricate`: the same `ChangeLog` calls
//!    the recorder and admin API make, for a device instance that does not
//!    exist). The real `cbt-agent run` then loads and serves it over its
//!    UNIX socket, and a client that counts tuples times the stream.
//!    Configurations are interleaved round by round, in alternating order.
//! 2. A real pair of multi-GiB images of a real tracked loop device, 1 % of
//!    its chunks rewritten through it with O_DIRECT: the agent's delta
//!    against reading both images and comparing every 4 KiB block, the way
//!    the reference hostpath CSI driver answers. The page cache is dropped
//!    before each side; the delta must cover every block that differs.
//! 3. The change log's size per changed chunk and what compaction costs,
//!    from the fabricated log.

use std::{
    fmt::Write as _,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::{
    check_interrupted, cpu_seconds, date, kilo, machine, median, source_version, wait_for_quiet_with, Limits,
    Scratch, Watch, MAX_REPEATS,
};
use crate::demo::{Agent, Loop};

#[derive(clap::Args)]
pub struct QueryArgs {
    /// Rounds of every measurement, interleaved.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of the fabricated volume, GiB.
    #[arg(long, default_value_t = 1024)]
    capacity_gib: u64,
    /// Share of the fabricated volume's chunks changed between its
    /// snapshots, %.
    #[arg(long, default_value_t = 1.0)]
    changed_pct: f64,
    /// Seals the fabricated changes are spread over.
    #[arg(long, default_value_t = 300)]
    seals: usize,
    /// Size of each image of the real pair, GiB.
    #[arg(long, default_value_t = 2)]
    image_gib: u64,
    /// Share of the real pair's chunks rewritten, %.
    #[arg(long, default_value_t = 1.0)]
    image_changed_pct: f64,
    /// Seed of the fabricated changes and of fio's random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where state directories and images go: a real disk, since the
    /// comparison side reads the images from it with a cold page cache.
    #[arg(long, default_value = "/var/tmp")]
    scratch: PathBuf,
    /// Markdown results [default: bench/results/query.md in the workspace].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Ceph's fast-diff walks 200 GiB in 1.2 s (the figure).
const CEPH_FAST_DIFF_GIB_PER_S: f64 = 200.0 / 1.2;
const TARGET_TUPLES_PER_S: f64 = 2e6;
const TARGET_BYTES_PER_CHUNK: f64 = 2.5;
const CHUNK: u64 = 4096;
/// Tuples per message when a request leaves max_results at 0 (the agent's
/// `ServiceOptions::new` default).
const DEFAULT_MAX_RESULTS: u32 = 256;
const VOLUME: &str = "bench";

/// What disturbs a measurement here. Looser than `bench capture`'s: the
/// timed work is short and CPU-bound in one or two threads, and this shared
/// VM has long-running agents of other engineers at a few % of a core.
/// Other trackers' programs cost per bio, which matters little here.
const LIMITS: Limits = Limits { cpu_pct: 15.0, write_mib: 16, own_programs: None };

pub fn run(args: &QueryArgs) -> Result<()> {
    ensure!(crate::nix_is_root(), "the query benchmark runs the agent and makes loop devices: run it as root");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.image_gib >= 1 && args.capacity_gib >= 1, "sizes must be at least 1 GiB");
    let source = source_version();
    let out = args.out.clone().unwrap_or_else(|| crate::root().join("bench/results/query.md"));
    crate::run(crate::cargo(None).current_dir(crate::root()).args([
        "build",
        "--release",
        "-p",
        "cbt-agent",
        "--example",
        "query_bench",
    ]))?;
    super::catch_sigint();
    let began = Instant::now();

    // Sockets and logs in /dev/shm, state and images on disk.
    let shm = Scratch::new_in(Path::new("/dev/shm"), "cbt-bench-query")?;
    let disk = Scratch::new_in(&args.scratch, "cbt-bench-query")?;
    let ctx = Ctx {
        client: crate::root().join("target/release/examples/query_bench"),
        csi: shm.0.join("csi.sock"),
        admin: shm.0.join("admin.sock"),
        logs: shm.0.clone(),
        disk: disk.0.clone(),
        disk_name: block_device_of(&disk.0).unwrap_or_default(),
    };

    println!("bench query: fabricating a {} GiB log ({} % changed over {} seals)", args.capacity_gib, args.changed_pct, args.seals);
    let fabricated = fabricate(&ctx, args)?;
    println!(
        "  {} chunks; journal {} B before compaction ({} segments), {} B after; compaction {:.3} s (median)",
        fabricated.chunks,
        fabricated.raw_journal_bytes,
        fabricated.raw_segments,
        fabricated.compacted_journal_bytes(),
        fabricated.median(|r| r.compact_s)
    );
    let streams = tib_streams(&ctx, args, &fabricated)?;
    let pair = real_pair(&ctx, args)?;
    let total_s = began.elapsed().as_secs_f64();

    let report = Report { args, source, fabricated: &fabricated, streams: &streams, pair: &pair, total_s };
    let md = report.markdown()?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    println!("\n{}", report.targets_text());
    println!("results: {} ({total_s:.0} s)", out.display());
    Ok(())
}

struct Ctx {
    /// `query_bench` (the example).
    client: PathBuf,
    csi: PathBuf,
    admin: PathBuf,
    logs: PathBuf,
    disk: PathBuf,
    /// The block device under `disk` (its writes are the fabricator's own).
    disk_name: String,
}

impl Ctx {
    fn client(&self) -> Command {
        let mut cmd = Command::new(&self.client);
        cmd.stderr(Stdio::inherit());
        cmd
    }
}

/// The kernel's name of the block device holding `path` (e.g. "vda").
fn block_device_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    // The glibc dev_t encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).ok()?;
    uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")).map(str::to_string)
}

/// Milliseconds spent in [`quiet`].
static WAITED_MS: AtomicU64 = AtomicU64::new(0);

/// Waits for a quiet machine (at least one 3 s look), counting the time.
fn quiet(label: &str, dev: &str) -> Result<()> {
    let started = Instant::now();
    let result = wait_for_quiet_with(label, dev, LIMITS);
    WAITED_MS.fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    result
}

/// Runs `measure` until it runs undisturbed by the rest of the machine;
/// returns its result and how many attempts were thrown away.
fn undisturbed<T>(label: &str, dev: &str, mut measure: impl FnMut() -> Result<T>) -> Result<(T, usize)> {
    let mut repeats = 0;
    loop {
        check_interrupted()?;
        let watch = Watch::start_with(dev, LIMITS)?;
        let value = measure()?;
        let disturbances = watch.disturbances()?;
        if disturbances.is_empty() {
            return Ok((value, repeats));
        }
        repeats += 1;
        ensure!(repeats <= MAX_REPEATS, "{label}: disturbed too often ({}); giving up", disturbances.join("; "));
        println!("  {label}: disturbed ({}); repeating it", disturbances.join("; "));
        quiet(label, dev)?;
    }
}

fn json_output(cmd: &mut Command) -> Result<Value> {
    let out = cmd.stdout(Stdio::piped()).output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing the output of {cmd:?}"))
}

fn f64_of(v: &Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no number {key:?} in {v}"))
}

fn u64_of(v: &Value, key: &str) -> Result<u64> {
    v[key].as_u64().with_context(|| format!("no integer {key:?} in {v}"))
}

// -------------------------------------------------------------- fabricate --

struct Fabricated {
    capacity: u64,
    chunks: u64,
    seals: usize,
    raw_dir: PathBuf,
    compacted_dir: PathBuf,
    raw_journal_bytes: u64,
    raw_segment_bytes: u64,
    raw_segments: u64,
    /// Seconds for all seals (apply_seal, each synced).
    seals_s: f64,
    rounds: Vec<CompactionRound>,
    repeats: usize,
}

struct CompactionRound {
    open_s: f64,
    delta_raw_s: f64,
    compact_s: f64,
    delta_compacted_s: f64,
    journal_bytes_after: u64,
    segment_bytes_after: u64,
    segments_after: u64,
}

impl Fabricated {
    fn median(&self, f: impl Fn(&CompactionRound) -> f64) -> f64 {
        median(self.rounds.iter().map(f))
    }

    fn compacted_journal_bytes(&self) -> u64 {
        self.rounds.last().map_or(0, |r| r.journal_bytes_after)
    }

    fn bytes_per_chunk(&self, bytes: u64) -> f64 {
        bytes as f64 / self.chunks as f64
    }
}

fn fabricate(ctx: &Ctx, args: &QueryArgs) -> Result<Fabricated> {
    let dir = ctx.disk.join("tib");
    quiet("fabricate", &ctx.disk_name)?;
    // Its own journal writes land on the scratch disk: that one is not
    // watched here.
    let (json, repeats) = undisturbed("fabricate", &ctx.disk_name, || {
        let _ = std::fs::remove_dir_all(&dir);
        json_output(
            ctx.client()
                .arg("fabricate")
                .arg("--dir")
                .arg(&dir)
                .args(["--capacity-gib", &args.capacity_gib.to_string()])
                .args(["--changed-pct", &args.changed_pct.to_string()])
                .args(["--seals", &args.seals.to_string()])
                .args(["--seed", &args.seed.to_string()])
                .args(["--rounds", &args.rounds.to_string()]),
        )
    })?;
    let raw = &json["raw"];
    let rounds = json["rounds"]
        .as_array()
        .context("fabricate: no rounds")?
        .iter()
        .map(|r| {
            Ok(CompactionRound {
                open_s: f64_of(r, "open_s")?,
                delta_raw_s: f64_of(r, "delta_raw_s")?,
                compact_s: f64_of(r, "compact_s")?,
                delta_compacted_s: f64_of(r, "delta_compacted_s")?,
                journal_bytes_after: u64_of(&r["after"], "journal_file_bytes")?,
                segment_bytes_after: u64_of(&r["after"], "segment_bytes")?,
                segments_after: u64_of(&r["after"], "segments")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Fabricated {
        capacity: u64_of(&json, "capacity_bytes")?,
        chunks: u64_of(&json, "chunks_changed")?,
        seals: args.seals,
        raw_dir: PathBuf::from(json["raw_dir"].as_str().context("no raw_dir")?),
        compacted_dir: PathBuf::from(json["compacted_dir"].as_str().context("no compacted_dir")?),
        raw_journal_bytes: u64_of(raw, "journal_file_bytes")?,
        raw_segment_bytes: u64_of(raw, "segment_bytes")?,
        raw_segments: u64_of(raw, "segments")?,
        seals_s: f64_of(&json, "seals_s")?,
        rounds,
        repeats,
    })
}

// ----------------------------------------------------------- the agent --

/// A running agent and what it cost to get it ready.
struct Served {
    agent: Agent,
    pid: u32,
    /// Spawn to Probe ready: loading the eBPF programs and the log.
    ready_s: f64,
    /// VmRSS once ready, KiB.
    rss_kib: u64,
    /// VmHWM once ready (the peak of start-up and loading), KiB.
    load_peak_kib: u64,
}

fn start_agent(ctx: &Ctx, state: &Path, extra: &[&str], log_name: &str) -> Result<Served> {
    let log = ctx.logs.join(log_name);
    let started = Instant::now();
    let mut cmd = Command::new(crate::agent_binary());
    cmd.arg("run")
        .arg("--state-dir")
        .arg(state)
        .arg("--csi-socket")
        .arg(&ctx.csi)
        .arg("--admin-socket")
        .arg(&ctx.admin)
        .stdout(Stdio::null())
        .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?);
    let mut agent = Agent::spawn(cmd, state, extra)?;
    let pid = agent.0.id();
    let ready = ctx.client().arg("ready").arg("--socket").arg(&ctx.csi).args(["--timeout", "60s"]).status();
    if !ready.is_ok_and(|s| s.success()) {
        let exited = agent.0.try_wait().ok().flatten();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("the agent did not become ready (exit: {exited:?}); its log ends:\n{}", tail.join("\n"));
    }
    let ready_s = started.elapsed().as_secs_f64();
    Ok(Served { agent, pid, ready_s, rss_kib: proc_status_kib(pid, "VmRSS")?, load_peak_kib: proc_status_kib(pid, "VmHWM")? })
}

/// A `kB` field of /proc/PID/status.
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Resets the process's peak RSS (VmHWM) to its current RSS (proc(5),
/// /proc/PID/clear_refs, value 5).
fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting VmHWM through /proc/PID/clear_refs")
}

/// One timed stream and what the server spent on it.
#[derive(Clone)]
struct StreamRun {
    secs: f64,
    first_message_s: f64,
    tuples: u64,
    messages: u64,
    bytes: u64,
    /// Agent CPU (all threads) over the call, s.
    server_cpu_s: f64,
    /// Agent VmRSS before the call and its peak during it, KiB.
    rss_before_kib: u64,
    peak_kib: u64,
}

fn timed_stream(ctx: &Ctx, pid: u32, max_results: u32, ranges_out: Option<&Path>) -> Result<StreamRun> {
    reset_peak_rss(pid)?;
    let rss_before_kib = proc_status_kib(pid, "VmRSS")?;
    let cpu_before = cpu_seconds(pid)?;
    let mut cmd = ctx.client();
    cmd.arg("stream").arg("--socket").arg(&ctx.csi).args(["--max-results", &max_results.to_string()]);
    if let Some(path) = ranges_out {
        cmd.arg("--ranges-out").arg(path);
    }
    let json = json_output(&mut cmd)?;
    let server_cpu_s = cpu_seconds(pid)? - cpu_before;
    Ok(StreamRun {
        secs: f64_of(&json, "secs")?,
        first_message_s: f64_of(&json, "first_message_s")?,
        tuples: u64_of(&json, "tuples")?,
        messages: u64_of(&json, "messages")?,
        bytes: u64_of(&json, "bytes")?,
        server_cpu_s,
        rss_before_kib,
        peak_kib: proc_status_kib(pid, "VmHWM")?,
    })
}

// ------------------------------------------------------ 1 TiB streams --

/// How one agent serves the fabricated log.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serving {
    Variable,
    Fixed,
    /// Variable, from the log before compaction.
    RawVariable,
}

impl Serving {
    const ALL: [Serving; 3] = [Serving::Variable, Serving::Fixed, Serving::RawVariable];

    fn label(self) -> &'static str {
        match self {
            Serving::Variable => "VARIABLE_LENGTH",
            Serving::Fixed => "FIXED_LENGTH",
            Serving::RawVariable => "VARIABLE_LENGTH, uncompacted log",
        }
    }

    fn max_results(self) -> &'static [u32] {
        match self {
            Serving::Variable | Serving::Fixed => &[0, 4096],
            Serving::RawVariable => &[0],
        }
    }
}

struct AgentRun {
    round: usize,
    serving: Serving,
    ready_s: f64,
    rss_kib: u64,
    load_peak_kib: u64,
}

struct StreamRound {
    round: usize,
    serving: Serving,
    max_results: u32,
    run: StreamRun,
}

struct Streams {
    agents: Vec<AgentRun>,
    runs: Vec<StreamRound>,
    repeats: usize,
}

impl Streams {
    fn of(&self, serving: Serving, max_results: u32) -> impl Iterator<Item = &StreamRun> + Clone {
        self.runs.iter().filter(move |r| r.serving == serving && r.max_results == max_results).map(|r| &r.run)
    }
}

fn tib_streams(ctx: &Ctx, args: &QueryArgs, fab: &Fabricated) -> Result<Streams> {
    let mut streams = Streams { agents: Vec::new(), runs: Vec::new(), repeats: 0 };
    for round in 0..args.rounds {
        // Alternate the order, so no configuration always comes first.
        let mut order = Serving::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for serving in order {
            let label = format!("1 TiB round {}/{} {}", round + 1, args.rounds, serving.label());
            quiet(&label, "")?;
            let (state, extra): (&Path, &[&str]) = match serving {
                Serving::Variable => (&fab.compacted_dir, &[]),
                Serving::Fixed => (&fab.compacted_dir, &["--block-metadata-type", "fixed"]),
                Serving::RawVariable => (&fab.raw_dir, &[]),
            };
            let mut served = start_agent(ctx, state, extra, &format!("agent-tib-{round}-{}.log", serving as u8))?;
            let mut sizes = serving.max_results().to_vec();
            if round % 2 == 1 {
                sizes.reverse();
            }
            for max_results in sizes {
                let (run, repeats) = undisturbed(&label, "", || timed_stream(ctx, served.pid, max_results, None))?;
                streams.repeats += repeats;
                ensure!(
                    run.bytes == fab.chunks * CHUNK && (serving != Serving::Fixed || run.tuples == fab.chunks),
                    "{label}: the stream covered {} B in {} tuples, {} chunks were changed",
                    run.bytes,
                    run.tuples,
                    fab.chunks
                );
                println!(
                    "{label}, max_results {max_results}: {} tuples in {:.3} s ({}/s), server CPU {:.2} s, peak RSS {} MiB",
                    run.tuples,
                    run.secs,
                    kilo(run.tuples as f64 / run.secs),
                    run.server_cpu_s,
                    run.peak_kib >> 10
                );
                streams.runs.push(StreamRound { round, serving, max_results, run });
            }
            streams.agents.push(AgentRun {
                round,
                serving,
                ready_s: served.ready_s,
                rss_kib: served.rss_kib,
                load_peak_kib: served.load_peak_kib,
            });
            served.agent.stop()?;
        }
    }
    Ok(streams)
}

// ------------------------------------------------------------ real pair --

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Delta,
    Compare,
}

struct PairRound {
    round: usize,
    side: Side,
    secs: f64,
    /// Delta: the stream's figures; compare: none.
    stream: Option<StreamRun>,
}

struct Pair {
    image_bytes: u64,
    /// Chunks fio rewrote (distinct: fio's random map writes each once).
    written_chunks: u64,
    /// Chunks that differ between the images.
    differing_chunks: u64,
    /// Chunks the delta reports.
    delta_chunks: u64,
    delta_tuples: u64,
    rounds: Vec<PairRound>,
    repeats: usize,
    fio_version: String,
    fio_command: String,
    setup_s: f64,
}

impl Pair {
    fn median(&self, side: Side) -> f64 {
        median(self.rounds.iter().filter(|r| r.side == side).map(|r| r.secs))
    }

    fn range(&self, side: Side) -> (f64, f64) {
        let secs = || self.rounds.iter().filter(|r| r.side == side).map(|r| r.secs);
        (secs().fold(f64::INFINITY, f64::min), secs().fold(0.0, f64::max))
    }
}

fn real_pair(ctx: &Ctx, args: &QueryArgs) -> Result<Pair> {
    let started = Instant::now();
    let dir = ctx.disk.join("pair");
    std::fs::create_dir_all(&dir)?;
    let image_bytes = args.image_gib << 30;
    let volume_file = dir.join("volume.img");
    println!("real pair: writing a {} GiB image of random data", args.image_gib);
    write_random_file(&volume_file, image_bytes, args.seed)?;
    let device = Loop::attach(&volume_file)?;
    let volume_spec = format!("{VOLUME}={}", device.dev);
    let served = start_agent(ctx, &dir.join("state"), &["--volume", &volume_spec], "agent-pair.log")?;
    let mut agent = served.agent;

    let cbtctl = |args: &[&str]| -> Result<()> {
        crate::run(
            Command::new(crate::root().join("target/release/cbtctl"))
                .arg("--admin-socket")
                .arg(&ctx.admin)
                .arg("--csi-socket")
                .arg(&ctx.csi)
                .args(args)
                .stdout(Stdio::null()),
        )
    };
    // A snapshot: the backend's cut is a copy of the volume's image, taken
    // inside the cut window. The loop device does buffered I/O on its file,
    // so a copy of the file sees every write the device completed.
    let snapshot = |handle: &str, image: &Path| -> Result<()> {
        cbtctl(&["snapshot", "begin", VOLUME])?;
        std::fs::copy(&volume_file, image).with_context(|| format!("copying the volume to {}", image.display()))?;
        cbtctl(&["snapshot", "commit", VOLUME, handle])
    };
    let (base_img, target_img) = (dir.join("base.img"), dir.join("target.img"));
    println!("real pair: base snapshot of {}", device.dev);
    snapshot("base", &base_img)?;
    let writes = ((image_bytes / CHUNK) as f64 * args.image_changed_pct / 100.0).round() as u64;
    let fio_job = [
        "--name=change".to_string(),
        "--rw=randwrite".to_string(),
        "--bs=4k".to_string(),
        "--direct=1".to_string(),
        "--ioengine=io_uring".to_string(),
        "--iodepth=16".to_string(),
        format!("--io_size={}", writes * CHUNK),
        format!("--randseed={}", args.seed),
    ];
    let fio_output = dir.join("fio.json");
    println!("real pair: {} random 4 KiB O_DIRECT writes through {}", writes, device.dev);
    crate::run(
        Command::new("fio")
            .arg(format!("--filename={}", device.dev))
            .args(&fio_job)
            .arg("--output-format=json")
            .arg(format!("--output={}", fio_output.display()))
            .stdout(Stdio::null()),
    )?;
    let fio: Value = serde_json::from_slice(&std::fs::read(&fio_output)?).context("parsing fio's output")?;
    let written = fio["jobs"][0]["write"]["io_bytes"].as_u64().context("fio JSON has no jobs[0].write.io_bytes")?;
    ensure!(written == writes * CHUNK, "fio wrote {written} B, {} B asked", writes * CHUNK);
    println!("real pair: target snapshot");
    snapshot("target", &target_img)?;
    // The copies' dirty pages go to disk now, not inside a measurement.
    crate::run(&mut Command::new("sync"))?;
    let setup_s = started.elapsed().as_secs_f64();

    // Interleaved: D,C, C,D, D,C, …
    let mut rounds = Vec::new();
    let mut repeats = 0;
    let mut differing: Option<Vec<u64>> = None;
    for round in 0..args.rounds {
        let sides = if round % 2 == 0 { [Side::Delta, Side::Compare] } else { [Side::Compare, Side::Delta] };
        for side in sides {
            let label = format!("pair round {}/{} {}", round + 1, args.rounds, if side == Side::Delta { "delta" } else { "compare" });
            quiet(&label, "")?;
            let (measured, again) = undisturbed(&label, "", || {
                drop_page_cache()?;
                match side {
                    Side::Delta => {
                        let run = timed_stream(ctx, served.pid, 0, None)?;
                        Ok((run.secs, Some(run), None))
                    }
                    Side::Compare => {
                        let t = Instant::now();
                        let diff = compare_images(&base_img, &target_img)?;
                        Ok((t.elapsed().as_secs_f64(), None, Some(diff)))
                    }
                }
            })?;
            repeats += again;
            let (secs, stream, diff) = measured;
            if let Some(diff) = diff {
                if let Some(previous) = &differing {
                    ensure!(*previous == diff, "two comparisons of the same images disagree");
                }
                differing = Some(diff);
            }
            println!("{label}: {secs:.3} s");
            rounds.push(PairRound { round, side, secs, stream });
        }
    }

    // The delta must cover every block that differs.
    let ranges_file = dir.join("delta.ranges");
    timed_stream(ctx, served.pid, 0, Some(&ranges_file))?;
    let ranges = read_ranges(&ranges_file)?;
    let differing = differing.context("no comparison ran")?;
    let uncovered: Vec<u64> = differing.iter().copied().filter(|&c| !covered(&ranges, c * CHUNK, CHUNK)).collect();
    agent.stop()?;
    drop(device);
    if !uncovered.is_empty() {
        bail!(
            "the delta misses {} of {} differing 4 KiB blocks (first at byte {}): it is not a superset",
            uncovered.len(),
            differing.len(),
            uncovered[0] * CHUNK
        );
    }
    let delta_bytes: u64 = ranges.iter().map(|(_, len)| len).sum();
    let fio_version = Command::new("fio").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    Ok(Pair {
        image_bytes,
        written_chunks: writes,
        differing_chunks: differing.len() as u64,
        delta_chunks: delta_bytes.div_ceil(CHUNK),
        delta_tuples: ranges.len() as u64,
        rounds,
        repeats,
        fio_version,
        fio_command: format!("fio --filename=/dev/loopN {}", fio_job.join(" ")),
        setup_s,
    })
}

/// `bytes` of splitmix64 output, synced.
fn write_random_file(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut state = seed ^ 0x5851_f42d_4c95_7f2d;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    check_interrupted()
}

/// Writes dirty pages back, then drops the page cache (and dentries and
/// inodes), so the next read of an image comes from the disk.
fn drop_page_cache() -> Result<()> {
    crate::run(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// Buffer per file for [`compare_images`]: large sequential reads, which
/// favour the comparison (hostpath reads 4 KiB at a time).
const COMPARE_BUFFER: usize = 4 << 20;

/// The indices of the 4 KiB blocks that differ between two images of the
/// same size.
fn compare_images(a: &Path, b: &Path) -> Result<Vec<u64>> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    ensure!(len == fb.metadata()?.len(), "{} and {} differ in size", a.display(), b.display());
    let (mut ba, mut bb) = (vec![0u8; COMPARE_BUFFER], vec![0u8; COMPARE_BUFFER]);
    let mut differing = Vec::new();
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(COMPARE_BUFFER as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        let first = offset / CHUNK;
        for (i, (x, y)) in ba[..n].chunks(CHUNK as usize).zip(bb[..n].chunks(CHUNK as usize)).enumerate() {
            if x != y {
                differing.push(first + i as u64);
            }
        }
        offset += n as u64;
    }
    Ok(differing)
}

/// "offset length" lines, ascending (the stream's order).
fn read_ranges(path: &Path) -> Result<Vec<(u64, u64)>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| {
            let (o, n) = l.split_once(' ').with_context(|| format!("bad range line {l:?}"))?;
            Ok((o.parse()?, n.parse()?))
        })
        .collect()
}

/// Whether `[offset, offset + len)` lies inside one of the ascending,
/// disjoint `ranges` (a chunk is always inside one tuple: tuples are whole
/// chunks, clamped only at the capacity).
fn covered(ranges: &[(u64, u64)], offset: u64, len: u64) -> bool {
    let i = ranges.partition_point(|&(o, _)| o <= offset);
    i > 0 && {
        let (o, n) = ranges[i - 1];
        offset + len <= o + n
    }
}

// ---------------------------------------------------------------- report --

struct Report<'a> {
    args: &'a QueryArgs,
    source: String,
    fabricated: &'a Fabricated,
    streams: &'a Streams,
    pair: &'a Pair,
    total_s: f64,
}

/// Medians of one stream configuration.
struct StreamSummary {
    serving: Serving,
    max_results: u32,
    tuples: u64,
    messages: u64,
    secs: f64,
    first_message_s: f64,
    server_cpu_s: f64,
    peak_kib: u64,
}

impl StreamSummary {
    fn tuples_per_s(&self) -> f64 {
        self.tuples as f64 / self.secs
    }

    fn label(&self) -> String {
        let size = if self.max_results == 0 {
            format!("0 (server default, {DEFAULT_MAX_RESULTS})")
        } else {
            self.max_results.to_string()
        };
        format!("{}, max_results {size}", self.serving.label())
    }
}

impl Report<'_> {
    fn summaries(&self) -> Vec<StreamSummary> {
        let mut out = Vec::new();
        for serving in Serving::ALL {
            for &max_results in serving.max_results() {
                let runs = self.streams.of(serving, max_results);
                let Some(first) = runs.clone().next() else { continue };
                out.push(StreamSummary {
                    serving,
                    max_results,
                    tuples: first.tuples,
                    messages: first.messages,
                    secs: median(runs.clone().map(|r| r.secs)),
                    first_message_s: median(runs.clone().map(|r| r.first_message_s)),
                    server_cpu_s: median(runs.clone().map(|r| r.server_cpu_s)),
                    peak_kib: runs.map(|r| r.peak_kib).max().unwrap_or(0),
                });
            }
        }
        out
    }

    fn capacity_gib(&self) -> f64 {
        self.fabricated.capacity as f64 / (1u64 << 30) as f64
    }

    /// Median spawn → ready s, highest RSS after load and peak RSS while
    /// loading, KiB.
    fn ready_rss(&self, serving: Serving) -> (f64, u64, u64) {
        let agents = self.streams.agents.iter().filter(|a| a.serving == serving);
        (
            median(agents.clone().map(|a| a.ready_s)),
            agents.clone().map(|a| a.rss_kib).max().unwrap_or(0),
            agents.map(|a| a.load_peak_kib).max().unwrap_or(0),
        )
    }

    fn markdown(&self) -> Result<String> {
        let mut md = String::new();
        self.header(&mut md)?;
        self.tib(&mut md)?;
        self.log_size(&mut md)?;
        self.pair_section(&mut md)?;
        self.targets(&mut md)?;
        self.reading(&mut md)?;
        self.not_measured(&mut md)?;
        self.raw(&mut md)?;
        Ok(md)
    }

    fn header(&self, md: &mut String) -> Result<()> {
        let command = std::iter::once("cargo xtask".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
        let a = self.args;
        writeln!(md, "# Query cost: GetMetadataDelta, change-log size, compaction\n")?;
        writeln!(md, "- command: `{command}`")?;
        writeln!(md, "- date: {}", date()?)?;
        writeln!(md, "- source: {}", self.source)?;
        writeln!(md, "- machine: {}", machine())?;
        writeln!(md, "- scratch (state directories, images): {} on {}", a.scratch.display(), block_device_of(&a.scratch).unwrap_or_else(|| "?".into()))?;
        writeln!(
            md,
            "- whole run: {:.0} s, of which {:.0} s waiting for a quiet machine (each wait looks for at least 3 s)\n",
            self.total_s,
            WAITED_MS.load(Ordering::Relaxed) as f64 / 1e3
        )?;
        writeln!(md, "## Set-up\n")?;
        writeln!(
            md,
            "- **fabricated log** (`agent/examples/query_bench.rs fabricate`): a {} GiB volume on a device instance \
             that does not exist, {} % of its 4 KiB chunks ({} chunks, seed {}, each chunk written once) changed \
             between a base and a target snapshot and spread at random over {} seals, made with the calls the \
             recorder and admin API make (`ChangeLog::open`, `apply_seal` + `settle` per seal, `begin_cut` / \
             seal / `commit_snapshot` per snapshot). Two state directories: the log as the seals left it \
             ({} segments) and after `compact` ({} segment)",
            a.capacity_gib,
            a.changed_pct,
            self.fabricated.chunks,
            a.seed,
            self.fabricated.seals,
            self.fabricated.raw_segments,
            self.fabricated.rounds.last().map_or(0, |r| r.segments_after)
        )?;
        writeln!(
            md,
            "- **served by the real agent**: `cbt-agent run --state-dir … --csi-socket … --admin-socket … \
             [--block-metadata-type fixed]` (release build, eBPF capture attached as always; it loads the log and \
             serves the fabricated instance like any other). One agent per configuration and round; \
             configurations interleaved, order reversed every other round"
        )?;
        writeln!(
            md,
            "- **client**: `query_bench stream`, one `GetMetadataDelta(base, target, starting_offset 0)` over the \
             UNIX socket with tonic, counting tuples and checking their order, printing nothing. Time: from \
             issuing the call to the end of the stream (connection and Probe before it are not timed)"
        )?;
        writeln!(
            md,
            "- **server figures**: CPU = utime+stime of the agent over the call; peak RSS = the agent's VmHWM \
             after the call, reset to its current RSS (`/proc/PID/clear_refs` = 5) just before it; RSS after \
             load = VmRSS once Probe said ready"
        )?;
        writeln!(
            md,
            "- **the VM is shared**: each agent start waits for a quiet machine (other processes under {} % of a \
             core, at most {} MiB written to block devices) and a measurement is repeated if that changed during \
             it; other trackers' programs are not counted. Measurements repeated: {}",
            LIMITS.cpu_pct,
            LIMITS.write_mib,
            self.fabricated.repeats + self.streams.repeats + self.pair.repeats
        )?;
        writeln!(md, "- every figure below is the median of {} rounds unless it says otherwise; raw rounds at the end\n", a.rounds)?;
        Ok(())
    }

    fn tib(&self, md: &mut String) -> Result<()> {
        let gib = self.capacity_gib();
        writeln!(md, "## 1. GetMetadataDelta over {gib:.0} GiB, {} chunks changed\n", self.fabricated.chunks)?;
        writeln!(
            md,
            "| configuration | tuples | messages | stream s | tuples/s | GiB of volume/s | × Ceph fast-diff ({CEPH_FAST_DIFF_GIB_PER_S:.1} GiB/s) | first message s | server CPU s | server peak RSS MiB |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
        for s in self.summaries() {
            writeln!(
                md,
                "| {} | {} | {} | {:.3} | {} | {:.0} | {:.1} | {:.3} | {:.2} | {:.1} |",
                s.label(),
                s.tuples,
                s.messages,
                s.secs,
                mega(s.tuples_per_s()),
                gib / s.secs,
                gib / s.secs / CEPH_FAST_DIFF_GIB_PER_S,
                s.first_message_s,
                s.server_cpu_s,
                s.peak_kib as f64 / 1024.0
            )?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "| agent serving | spawn → ready s (eBPF attach + log load) | RSS after load MiB | peak RSS while loading MiB |\n|---|---|---|---|"
        )?;
        for serving in Serving::ALL {
            let (ready, rss, peak) = self.ready_rss(serving);
            writeln!(md, "| {} | {ready:.2} | {:.1} | {:.1} |", serving.label(), rss as f64 / 1024.0, peak as f64 / 1024.0)?;
        }
        writeln!(md)?;
        writeln!(
            md,
            "\"first message\" is when the first message reached the client: the server computes the whole delta \
             (the union of the segments in the window) before it sends anything. Peak RSS is the highest of the \
             rounds.\n"
        )?;
        Ok(())
    }

    fn log_size(&self, md: &mut String) -> Result<()> {
        let f = self.fabricated;
        let after = f.rounds.last().context("no compaction round")?;
        writeln!(md, "## 2. Change-log size and compaction\n")?;
        writeln!(md, "| | segments | journal B | B per changed chunk | chunk sets B (roaring) |\n|---|---|---|---|---|")?;
        writeln!(
            md,
            "| as sealed ({} seals) | {} | {} | {:.2} | {} |",
            f.seals,
            f.raw_segments,
            f.raw_journal_bytes,
            f.bytes_per_chunk(f.raw_journal_bytes),
            f.raw_segment_bytes
        )?;
        writeln!(
            md,
            "| after `compact` | {} | {} | {:.2} | {} |\n",
            after.segments_after,
            after.journal_bytes_after,
            f.bytes_per_chunk(after.journal_bytes_after),
            after.segment_bytes_after
        )?;
        writeln!(md, "| operation (in process, on a copy of the sealed log, {} rounds) | median s |\n|---|---|", f.rounds.len())?;
        writeln!(md, "| `ChangeLog::open` (replay of {} segments) | {:.3} |", f.raw_segments, f.median(|r| r.open_s))?;
        writeln!(md, "| `delta` before compaction (union of {} segments) | {:.3} |", f.raw_segments, f.median(|r| r.delta_raw_s))?;
        writeln!(md, "| `compact` (merge + journal rewrite, synced) | {:.3} |", f.median(|r| r.compact_s))?;
        writeln!(md, "| `delta` after compaction | {:.4} |", f.median(|r| r.delta_compacted_s))?;
        writeln!(md, "| all {} seals (`apply_seal`, each synced, + `settle`) | {:.3} (once) |\n", f.seals, f.seals_s)?;
        writeln!(
            md,
            "Both deltas are checked in process to equal exactly the changed chunks, before and after compaction.\n"
        )?;
        Ok(())
    }

    fn pair_section(&self, md: &mut String) -> Result<()> {
        let p = self.pair;
        let gib = p.image_bytes as f64 / (1u64 << 30) as f64;
        let (d, c) = (p.median(Side::Delta), p.median(Side::Compare));
        writeln!(md, "## 3. A real pair: delta against comparing the images\n")?;
        writeln!(
            md,
            "- a {gib:.0} GiB image file of random data on the scratch disk, a loop device over it, the agent \
             started with `--volume {VOLUME}=/dev/loopN`; `cbtctl snapshot begin {VOLUME}`, copy the image to \
             base.img, `cbtctl snapshot commit {VOLUME} base`; then `{}` ({}); then begin / copy to target.img / \
             commit target (set-up {:.0} s)",
            p.fio_command, p.fio_version, p.setup_s
        )?;
        writeln!(
            md,
            "- each round, in alternating order: `sync; echo 3 > /proc/sys/vm/drop_caches`, then either the delta \
             (the client above, `GetMetadataDelta(base, target)`, max_results 0) or the comparison: read base.img \
             and target.img sequentially in {} MiB buffers and compare every 4 KiB block (what the hostpath \
             driver does, with larger reads than its 4 KiB ones, so if anything this favours the comparison)",
            COMPARE_BUFFER >> 20
        )?;
        writeln!(
            md,
            "- check: every 4 KiB block that differs between the images lies inside a tuple of the delta (the \
             bench fails otherwise): **passed**\n"
        )?;
        writeln!(md, "| | chunks |\n|---|---|")?;
        writeln!(md, "| written by fio (distinct) | {} |", p.written_chunks)?;
        writeln!(md, "| differing between the images (truth) | {} |", p.differing_chunks)?;
        writeln!(md, "| reported by the delta ({} tuples) | {} |\n", p.delta_tuples, p.delta_chunks)?;
        let ((dmin, dmax), (cmin, cmax)) = (p.range(Side::Delta), p.range(Side::Compare));
        writeln!(md, "| | median s | rounds min – max s | |\n|---|---|---|---|")?;
        writeln!(md, "| delta (GetMetadataDelta stream) | {d:.4} | {dmin:.4} – {dmax:.4} | |")?;
        writeln!(md, "| comparison (read both images, compare) | {c:.3} | {cmin:.3} – {cmax:.3} | {:.2} GiB/s read |", 2.0 * gib / c)?;
        writeln!(md, "| **comparison / delta** | **{:.0}×** | | |\n", c / d)?;
        writeln!(
            md,
            "drop_caches empties this VM's page cache, but its virtual disk may still be cached by the host: the \
             comparison's read speed here can be well above a real disk's, so its time is a lower bound (it reads \
             {:.0} GiB whatever changed; the delta's cost follows the changed chunks only).\n",
            2.0 * gib
        )?;
        Ok(())
    }

    fn target_rows(&self) -> Vec<(String, String, bool)> {
        let summaries = self.summaries();
        let default = |serving: Serving| summaries.iter().find(|s| s.serving == serving && s.max_results == 0);
        let mut rows = Vec::new();
        for serving in [Serving::Variable, Serving::Fixed] {
            if let Some(s) = default(serving) {
                rows.push((
                    format!("≥ {} tuples/s, {} (default max_results)", mega(TARGET_TUPLES_PER_S), serving.label()),
                    format!(
                        "{}/s ({:.0} GiB/s, {:.1}× Ceph fast-diff); peak server RSS {:.0} MiB",
                        mega(s.tuples_per_s()),
                        self.capacity_gib() / s.secs,
                        self.capacity_gib() / s.secs / CEPH_FAST_DIFF_GIB_PER_S,
                        s.peak_kib as f64 / 1024.0
                    ),
                    s.tuples_per_s() >= TARGET_TUPLES_PER_S,
                ));
            }
        }
        if let Some(s) = default(Serving::RawVariable) {
            rows.push((
                format!("≥ {} tuples/s, uncompacted log ({} segments)", mega(TARGET_TUPLES_PER_S), self.fabricated.raw_segments),
                format!("{}/s; peak server RSS {:.0} MiB", mega(s.tuples_per_s()), s.peak_kib as f64 / 1024.0),
                s.tuples_per_s() >= TARGET_TUPLES_PER_S,
            ));
        }
        let f = self.fabricated;
        let compacted = f.bytes_per_chunk(f.compacted_journal_bytes());
        let raw = f.bytes_per_chunk(f.raw_journal_bytes);
        rows.push((
            format!("≤ {TARGET_BYTES_PER_CHUNK} B persisted per changed chunk, compacted log"),
            format!("{compacted:.2} B"),
            compacted <= TARGET_BYTES_PER_CHUNK,
        ));
        rows.push((
            format!("≤ {TARGET_BYTES_PER_CHUNK} B persisted per changed chunk, log as sealed ({} seals)", f.seals),
            format!("{raw:.2} B"),
            raw <= TARGET_BYTES_PER_CHUNK,
        ));
        let p = self.pair;
        rows.push((
            "delta ⊇ true difference (real pair)".to_string(),
            format!("{} differing blocks, all inside the delta's {} chunks", p.differing_chunks, p.delta_chunks),
            true,
        ));
        rows
    }

    fn targets(&self, md: &mut String) -> Result<()> {
        writeln!(md, "## Targets\n")?;
        writeln!(md, "| target | measured | met |\n|---|---|---|")?;
        for (target, measured, met) in self.target_rows() {
            writeln!(md, "| {target} | {measured} | {} |", if met { "yes" } else { "**no**" })?;
        }
        writeln!(md)?;
        Ok(())
    }

    fn targets_text(&self) -> String {
        let mut s = String::new();
        for (target, measured, met) in self.target_rows() {
            let _ = writeln!(s, "  {:<5} {target}: {measured}", if met { "met" } else { "MISS" });
        }
        let _ = writeln!(
            s,
            "  real pair: comparison {:.3} s, delta {:.4} s, ratio {:.0}×",
            self.pair.median(Side::Compare),
            self.pair.median(Side::Delta),
            self.pair.median(Side::Compare) / self.pair.median(Side::Delta)
        );
        s
    }

    fn reading(&self, md: &mut String) -> Result<()> {
        let summaries = self.summaries();
        let find = |serving: Serving, m: u32| summaries.iter().find(|s| s.serving == serving && s.max_results == m);
        writeln!(md, "## Reading\n")?;
        if let (Some(v), Some(v4)) = (find(Serving::Variable, 0), find(Serving::Variable, 4096)) {
            write!(
                md,
                "The agent streamed the {:.0} GiB delta ({} tuples) in {:.2} s with the default {} tuples per \
                 message, {}/s, {} the {} tuples/s target; that is {:.0} GiB of volume per second, {:.1}× Ceph \
                 fast-diff's {CEPH_FAST_DIFF_GIB_PER_S:.1} GiB/s. 4096 tuples per message took {:.2} s ({:.0} % \
                 of the time at 256): per-message costs are {}. ",
                self.capacity_gib(),
                v.tuples,
                v.secs,
                DEFAULT_MAX_RESULTS,
                mega(v.tuples_per_s()),
                if v.tuples_per_s() >= TARGET_TUPLES_PER_S { "meeting" } else { "MISSING" },
                mega(TARGET_TUPLES_PER_S),
                self.capacity_gib() / v.secs,
                self.capacity_gib() / v.secs / CEPH_FAST_DIFF_GIB_PER_S,
                v4.secs,
                100.0 * v4.secs / v.secs,
                if v4.secs < 0.85 * v.secs { "a visible share" } else { "a small share" }
            )?;
        }
        if let Some(v) = find(Serving::Variable, 0) {
            if v.server_cpu_s >= 0.8 * v.secs {
                write!(
                    md,
                    "The agent's CPU over the call ({:.2} s) about equals the stream's time: one server core, \
                     producing and encoding the tuples, is the limit, not the client or the socket. ",
                    v.server_cpu_s
                )?;
            }
        }
        if let Some(fx) = find(Serving::Fixed, 0) {
            write!(md, "FIXED_LENGTH ({} tuples, one per chunk) took {:.2} s. ", fx.tuples, fx.secs)?;
        }
        if let (Some(v), Some(raw)) = (find(Serving::Variable, 0), find(Serving::RawVariable, 0)) {
            write!(
                md,
                "From the uncompacted log the first message came after {:.2} s instead of {:.3} s (the union of \
                 {} segments) and the server held {:.0} MiB instead of {:.0} MiB: the agent keeps every segment in \
                 memory until a compaction merges them. ",
                raw.first_message_s,
                v.first_message_s,
                self.fabricated.raw_segments,
                raw.peak_kib as f64 / 1024.0,
                v.peak_kib as f64 / 1024.0
            )?;
        }
        let f = self.fabricated;
        write!(
            md,
            "On disk the compacted log takes {:.2} B per changed chunk; as sealed, {:.2} B, since each seal's \
             sparse set pays roaring's per-container overhead (≈ 8 B per 2^16-chunk block touched) on top of 2 B \
             per chunk. Compacting {} segments took {:.2} s. ",
            f.bytes_per_chunk(f.compacted_journal_bytes()),
            f.bytes_per_chunk(f.raw_journal_bytes),
            f.raw_segments,
            f.median(|r| r.compact_s)
        )?;
        let p = self.pair;
        writeln!(
            md,
            "On the real {:.0} GiB pair the comparison read {:.0} GiB in {:.2} s; the agent answered in {:.4} s, \
             {:.0}× faster, with {} chunks for {} that differ.\n",
            p.image_bytes as f64 / (1u64 << 30) as f64,
            2.0 * p.image_bytes as f64 / (1u64 << 30) as f64,
            p.median(Side::Compare),
            p.median(Side::Delta),
            p.median(Side::Compare) / p.median(Side::Delta),
            p.delta_chunks,
            p.differing_chunks
        )?;
        Ok(())
    }

    fn not_measured(&self, md: &mut String) -> Result<()> {
        writeln!(md, "## Not measured here\n")?;
        for line in [
            "the 1 TiB case's changes never went through the kernel capture: its log is built through the library, so capture cost and loss are out of scope (see `bench capture`); the chunks are uniformly random and each written once, so runs of adjacent chunks are rare (VARIABLE_LENGTH coalesces little) and no chunk is rewritten across seals",
            "the external-snapshot-metadata sidecar and its Kubernetes API hop: the client talks to the agent's socket directly",
            "client-side work beyond decoding and counting (no backup data is read or written)",
            "concurrent queries, and queries racing seals or compaction (the log is locked while a delta is computed)",
            "logs with more segments (the agent compacts only once the journal has grown 64 MiB past its last compaction) or much larger volumes",
            "the comparison side's cost grows with the image size at the disk's read speed; the delta's with the number of changed chunks",
        ] {
            writeln!(md, "- {line}")?;
        }
        writeln!(md)?;
        Ok(())
    }

    fn raw(&self, md: &mut String) -> Result<()> {
        writeln!(md, "## Raw rounds\n")?;
        writeln!(md, "### 1 TiB streams\n")?;
        writeln!(md, "| round | configuration | max_results | s | first message s | tuples | messages | server CPU s | RSS before MiB | peak RSS MiB |")?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
        for r in &self.streams.runs {
            let x = &r.run;
            writeln!(
                md,
                "| {} | {} | {} | {:.3} | {:.3} | {} | {} | {:.2} | {:.1} | {:.1} |",
                r.round + 1,
                r.serving.label(),
                r.max_results,
                x.secs,
                x.first_message_s,
                x.tuples,
                x.messages,
                x.server_cpu_s,
                x.rss_before_kib as f64 / 1024.0,
                x.peak_kib as f64 / 1024.0
            )?;
        }
        writeln!(md, "\n| round | agent serving | spawn → ready s | RSS after load MiB | peak RSS while loading MiB |\n|---|---|---|---|---|")?;
        for a in &self.streams.agents {
            writeln!(
                md,
                "| {} | {} | {:.2} | {:.1} | {:.1} |",
                a.round + 1,
                a.serving.label(),
                a.ready_s,
                a.rss_kib as f64 / 1024.0,
                a.load_peak_kib as f64 / 1024.0
            )?;
        }
        writeln!(md, "\n### Change log (in process)\n")?;
        writeln!(md, "| round | open s | delta before s | compact s | delta after s | journal B after |\n|---|---|---|---|---|---|")?;
        for (i, r) in self.fabricated.rounds.iter().enumerate() {
            writeln!(
                md,
                "| {} | {:.3} | {:.3} | {:.3} | {:.4} | {} |",
                i + 1,
                r.open_s,
                r.delta_raw_s,
                r.compact_s,
                r.delta_compacted_s,
                r.journal_bytes_after
            )?;
        }
        writeln!(md, "\n### Real pair\n")?;
        writeln!(md, "| round | side | s | tuples | server CPU s |\n|---|---|---|---|---|")?;
        for r in &self.pair.rounds {
            let (side, tuples, cpu) = match (&r.side, &r.stream) {
                (Side::Delta, Some(s)) => ("delta", s.tuples.to_string(), format!("{:.3}", s.server_cpu_s)),
                _ => ("compare", "–".to_string(), "–".to_string()),
            };
            writeln!(md, "| {} | {side} | {:.4} | {tuples} | {cpu} |", r.round + 1, r.secs)?;
        }
        Ok(())
    }
}

/// 2657555.0 → "2.66M".
fn mega(x: f64) -> String {
    format!("{:.2}M", x / 1e6)
}
