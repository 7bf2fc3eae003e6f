//! `cargo xtask bench …`: benchmarks whose results go to bench/results/.
//!
//! `capture` measures what capture costs the workload it watches: fio 4k
//! random O_DIRECT writes on a loop device backed by /dev/shm, so the "disk"
//! is nearly free and the block layer, where the programs hook, is a large
//! share of each write. Baseline and agent rounds are interleaved
//! B,A,A,B,B,A,… so drift of the VM hits both sides alike, neither kind
//! always runs first, and every adjacent pair holds one round of each.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::demo::{self, Loop};

mod query;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// fio 4k randwrite with and without the agent, interleaved rounds.
    Capture(CaptureArgs),
    /// GetMetadataDelta over a fabricated 1 TiB log and a real tracked
    /// image pair (against comparing the images); change-log size and
    /// compaction.
    Query(query::QueryArgs),
}

#[derive(clap::Args)]
pub struct CaptureArgs {
    /// Rounds of each kind (baseline and agent).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured seconds of fio per round, after a short ramp.
    #[arg(long, default_value_t = 15)]
    runtime: u64,
    /// Markdown results [default: bench/results/capture.md in the workspace].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra arguments for `cbt-agent run` (repeatable), e.g.
    /// `--agent-arg=--no-completion-tracking`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Capture(args) => capture(&args),
        Bench::Query(args) => query::run(&args),
    }
}

/// The loop device's size: 2 GiB of /dev/shm.
const DEVICE_MIB: u64 = 2048;
/// Seconds fio writes before it measures, so queues are full when it does.
const RAMP_SECS: u64 = 2;
/// fio's job, apart from the device, the timing and the output.
const FIO_JOB: &[&str] = &[
    "--name=capture",
    "--rw=randwrite",
    "--bs=4k",
    "--direct=1",
    "--ioengine=io_uring",
    "--iodepth=32",
    "--numjobs=2",
    "--group_reporting",
    "--time_based",
];
/// Without it the kernel does not time program runs (run_time_ns stays 0).
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Disturbed rounds measured again, in all, before giving up.
const MAX_REPEATS: usize = 10;
/// How long to wait for a busy machine to become quiet before a round.
const QUIET_TIMEOUT: Duration = Duration::from_secs(30 * 60);

// Targets from the issue.
const TARGET_IOPS_RATIO: f64 = 0.97;
const TARGET_NS_PER_RUN: f64 = 150.0;
const TARGET_CPU_PCT: f64 = 5.0;
const TARGET_CPU_AT_WRITES: f64 = 200_000.0;

fn capture(args: &CaptureArgs) -> Result<()> {
    ensure!(crate::nix_is_root(), "the capture benchmark loads eBPF programs and makes loop devices: run it as root");
    ensure!(args.rounds >= 1 && args.runtime >= 1, "--rounds and --runtime must be at least 1");
    let fio_version = fio_version()?;
    // Now, while it matches what `cargo xtask bench` just built.
    let source = source_version();
    let out = args.out.clone().unwrap_or_else(|| crate::root().join("bench/results/capture.md"));
    catch_sigint();

    // Declared before the loop device so it is removed after it.
    let scratch = Scratch::new()?;
    let disk = Loop::new(&scratch.0.join("disk.img"), DEVICE_MIB)?;
    println!("bench capture: {} over a {DEVICE_MIB} MiB file in /dev/shm; pre-filling it", disk.dev);
    prefill(&disk.dev)?;

    let total = 2 * args.rounds;
    let mut rounds = Vec::with_capacity(total);
    let mut repeats = 0;
    for i in 0..total {
        let label = format!("round {}/{total}", i + 1);
        let round = loop {
            wait_for_quiet(&label, &disk.dev)?;
            let (round, disturbances) = if is_agent_run(i) {
                // Every other agent round times the programs: bpf_stats adds
                // clock reads to each run, so those rounds give ns/run and the
                // others give the IOPS the agent really costs.
                let timed = rounds.iter().filter(|r: &&Round| r.agent.is_some()).count() % 2 == 1;
                agent_round(&disk.dev, args.runtime, &scratch.0, timed, &args.agent_args)?
            } else {
                baseline_round(&disk.dev, args.runtime, &scratch.0)?
            };
            if disturbances.is_empty() {
                break round;
            }
            repeats += 1;
            ensure!(repeats <= MAX_REPEATS, "{label}: disturbed too often ({}); giving up", disturbances.join("; "));
            println!("{label}: disturbed ({}); repeating it", disturbances.join("; "));
        };
        println!("{label}: {}", round.progress());
        rounds.push(round);
    }

    let summary = Summary::of(&rounds);
    let report = Report { args, fio_version, source, rounds: &rounds, repeats, summary: &summary }.markdown()?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    println!("\n{}", summary.targets_text());
    println!("results: {}", out.display());
    Ok(())
}

/// B,A,A,B, B,A,A,B, …
fn is_agent_run(i: usize) -> bool {
    matches!(i % 4, 1 | 2)
}

// ---------------------------------------------------------------- rounds --

struct Round {
    fio: Fio,
    /// `None` for baseline rounds.
    agent: Option<AgentStats>,
}

impl Round {
    fn progress(&self) -> String {
        let fio = format!("{:>7} IOPS, p99 {:>6.1} µs", kilo(self.fio.iops), self.fio.p99_ns / 1e3);
        match &self.agent {
            None => format!("baseline {fio}"),
            Some(a) => format!(
                "agent    {fio}, agent CPU {:.2} % at {} writes/s, {}, dropped {}, recursion misses {}, gaps {}",
                a.cpu_pct,
                kilo(a.events_per_s),
                if a.timed {
                    a.ns_per_run.iter().map(|(p, ns)| format!("{p} {ns:.0} ns/run")).collect::<Vec<_>>().join(", ")
                } else {
                    "untimed".to_string()
                },
                a.dropped,
                a.recursion_misses,
                a.gaps,
            ),
        }
    }
}

struct Fio {
    iops: f64,
    /// 99th percentile completion latency.
    p99_ns: f64,
}

fn fio_version() -> Result<String> {
    let out = Command::new("fio")
        .arg("--version")
        .output()
        .context("fio is missing (`cargo xtask setup` installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn fio_timing(runtime: u64) -> [String; 2] {
    [format!("--ramp_time={RAMP_SECS}"), format!("--runtime={runtime}")]
}

/// One sequential pass over the device, so that every round overwrites
/// pages tmpfs already holds instead of the first ones paying to allocate.
fn prefill(dev: &str) -> Result<()> {
    crate::run(
        Command::new("fio")
            .args(["--name=prefill", "--rw=write", "--bs=1M", "--direct=1", "--ioengine=io_uring", "--iodepth=8"])
            .arg(format!("--filename={dev}"))
            .stdout(Stdio::null()),
    )
    .context("pre-filling the device")?;
    check_interrupted()
}

fn run_fio(dev: &str, runtime: u64, scratch: &Path) -> Result<Fio> {
    // To a file: fio may print warnings on stdout ahead of the JSON.
    let output = scratch.join("fio.json");
    crate::run(
        Command::new("fio")
            .arg(format!("--filename={dev}"))
            .args(FIO_JOB)
            .args(fio_timing(runtime))
            .arg("--output-format=json")
            .arg(format!("--output={}", output.display()))
            .stdout(Stdio::null()),
    )?;
    check_interrupted()?;
    let json: Value = serde_json::from_slice(&std::fs::read(&output).context("reading fio's output")?)
        .context("parsing fio's JSON output")?;
    let write = &json["jobs"][0]["write"];
    Ok(Fio {
        iops: write["iops"].as_f64().context("fio JSON has no jobs[0].write.iops")?,
        p99_ns: write["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .context("fio JSON has no jobs[0].write.clat_ns.percentile.99.000000")?,
    })
}

/// A round without the agent, and what else ran during it.
fn baseline_round(dev: &str, runtime: u64, scratch: &Path) -> Result<(Round, Vec<String>)> {
    let watch = Watch::start(dev, 0)?;
    let fio = run_fio(dev, runtime, scratch)?;
    Ok((Round { fio, agent: None }, watch.disturbances()?))
}

/// What the agent reported, and cost, over one round.
struct AgentStats {
    flavor: String,
    kernel_ring_bytes: u64,
    /// CPU spent loading and attaching, before capture was live.
    load_cpu_s: f64,
    /// Agent CPU from attach until just before SIGINT, over that window's
    /// wall time, in % of one core.
    cpu_pct: f64,
    /// Captured events over the same window (every device, though only the
    /// loop device is busy).
    events_per_s: f64,
    events: u64,
    dropped: u64,
    recursion_misses: u64,
    corrupt_rings: u64,
    witness_alarms: u64,
    max_ring_fill: u64,
    gaps: usize,
    gap_reasons: Vec<String>,
    /// run_time_ns / run_count of each program.
    ns_per_run: BTreeMap<String, f64>,
    /// run_time_ns of all programs over captured events.
    program_ns_per_write: f64,
    /// `kernel.bpf_stats_enabled` was on: the round has ns/run, and its
    /// IOPS include the timing's own cost, so the IOPS ratio leaves it out.
    timed: bool,
}

/// A round with the agent, and what else ran during it.
fn agent_round(dev: &str, runtime: u64, scratch: &Path, timed: bool, extra: &[String]) -> Result<(Round, Vec<String>)> {
    // Declared first so the agent (stopped on drop) is gone before the
    // previous setting returns.
    let bpf_stats = if timed { Some(BpfStats::enable()?) } else { None };
    let status = scratch.join("status.json");
    // A state directory of the round's own, on disk like /var/lib/cbt:
    // nothing left behind, and each round starts a new capture as a first
    // install would. Declared before the agent: removed after it stopped.
    let state = Scratch::new_in(&std::env::temp_dir(), "cbt-bench-state")?;
    let state_arg = state.0.to_str().context("temp dir path")?;
    let mut extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    if !extra.contains(&"--state-dir") {
        extra.extend(["--state-dir", state_arg]);
    }
    let mut agent = demo::start_agent_with(&status, &extra, true)?;
    // The machine was quiet just before, so every capture program now is ours.
    let watch = Watch::start(dev, capture_programs()?)?;
    let pid = agent.0.id();
    let load_cpu_s = cpu_seconds(pid)?;
    let started = Instant::now();
    let fio = run_fio(dev, runtime, scratch)?;
    // Before SIGINT: the final check and status are exit costs, not capture.
    let cpu_s = cpu_seconds(pid)? - load_cpu_s;
    let window_s = started.elapsed().as_secs_f64();
    let disturbances = watch.disturbances()?;
    agent.stop()?;
    drop(bpf_stats);

    let json: Value = serde_json::from_slice(&std::fs::read(&status).context("reading the agent's final status")?)
        .context("parsing the agent's status")?;
    let json = &json["capture"];
    let loss = &json["loss"];
    let count = |v: &Value| v.as_u64().unwrap_or(0);
    let events = count(&loss["events"]);
    let programs = json["programs"].as_object().context("agent status has no programs")?;
    let ns_per_run = programs
        .iter()
        .filter(|(_, p)| count(&p["run_count"]) > 0)
        .map(|(name, p)| (name.clone(), count(&p["run_time_ns"]) as f64 / count(&p["run_count"]) as f64))
        .collect();
    let program_ns: u64 = programs.values().map(|p| count(&p["run_time_ns"])).sum();
    let stats = AgentStats {
        timed,
        program_ns_per_write: program_ns as f64 / events as f64,
        flavor: json["flavor"].as_str().unwrap_or("?").to_string(),
        kernel_ring_bytes: count(&json["kernel_ring_bytes"]),
        load_cpu_s,
        cpu_pct: 100.0 * cpu_s / window_s,
        events_per_s: events as f64 / window_s,
        events,
        dropped: count(&loss["dropped_events"]),
        recursion_misses: loss["recursion_misses"].as_object().map_or(0, |m| m.values().map(count).sum()),
        corrupt_rings: count(&loss["corrupt_rings"]),
        witness_alarms: count(&loss["witness_alarms"]),
        max_ring_fill: count(&loss["max_ring_fill"]),
        gaps: json["gaps"].as_array().map_or(0, Vec::len),
        gap_reasons: json["gaps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| format!("{} (scope {})", g["reason"].as_str().unwrap_or("?"), g["scope"]))
            .collect(),
        ns_per_run,
    };
    Ok((Round { fio, agent: Some(stats) }, disturbances))
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading the agent's /proc stat")?;
    let stat = Stat::parse(&stat).context("malformed /proc/PID/stat")?;
    let ticks = stat.field(14).zip(stat.field(15)).map(|(u, s)| u + s).context("short /proc/PID/stat")?;
    Ok(ticks as f64 / clock_ticks_per_s())
}

/// One /proc/PID/stat, split.
struct Stat<'a> {
    name: &'a str,
    /// From field 3 of proc_pid_stat(5) on.
    fields: Vec<&'a str>,
}

impl<'a> Stat<'a> {
    fn parse(stat: &'a str) -> Option<Self> {
        // The name may itself hold spaces or ')': split at the last one.
        let (head, tail) = stat.rsplit_once(')')?;
        Some(Self { name: head.split_once('(')?.1, fields: tail.split_whitespace().collect() })
    }

    /// Field `n`, numbered as in proc_pid_stat(5).
    fn field(&self, n: usize) -> Option<u64> {
        self.fields.get(n.checked_sub(3)?)?.parse().ok()
    }
}

/// The unit of /proc/PID/stat CPU times.
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

// ----------------------------------------------------------- quiet machine --
//
// The VM is shared: anything else using the CPU (another fio, a build, a
// test suite) competes with fio and the agent for 2 CPUs, I/O to other
// block devices does too through kernel threads no process is charged for,
// and another tracker's programs on the same tracepoints add their cost to
// every bio. Rounds wait for a quiet machine and are measured again if it
// got busy meanwhile.

/// Above this, other processes skew a round (in % of one core).
const OTHERS_MAX_PCT: f64 = 3.0;
/// Above this, writes to other block devices skew a round (MiB).
const OTHERS_MAX_WRITE_MIB: u64 = 16;

/// What counts as a disturbance.
#[derive(Clone, Copy)]
struct Limits {
    /// Other processes' CPU, in % of one core.
    cpu_pct: f64,
    /// Written to other block devices, MiB.
    write_mib: u64,
    /// Capture programs that are the agent's (0 in baseline rounds);
    /// `None`: other trackers' programs do not count.
    own_programs: Option<usize>,
}

impl Limits {
    fn capture(own_programs: usize) -> Self {
        Self { cpu_pct: OTHERS_MAX_PCT, write_mib: OTHERS_MAX_WRITE_MIB, own_programs: Some(own_programs) }
    }
}

/// What else runs on the machine, from the start of a round.
struct Watch<'a> {
    /// The benchmark's own device (name as in /proc/diskstats).
    dev: &'a str,
    start: Processes,
    start_written: u64,
    since: Instant,
    limits: Limits,
}

impl<'a> Watch<'a> {
    fn start(dev: &'a str, own_programs: usize) -> Result<Self> {
        Self::start_with(dev, Limits::capture(own_programs))
    }

    fn start_with(dev: &'a str, limits: Limits) -> Result<Self> {
        let dev = dev.trim_start_matches("/dev/");
        Ok(Self {
            dev,
            start: Processes::snapshot()?,
            start_written: sectors_written_except(dev)?,
            since: Instant::now(),
            limits,
        })
    }

    /// What disturbed the machine since the start; empty if nothing did.
    fn disturbances(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let others = self.start.cpu_since(&Processes::snapshot()?, self.since.elapsed().as_secs_f64());
        let total: f64 = others.iter().map(|(_, pct)| pct).sum();
        if total > self.limits.cpu_pct {
            let top: Vec<String> = others.iter().take(3).map(|(name, pct)| format!("{name} {pct:.0} %")).collect();
            found.push(format!("other processes using {total:.0} % of a core ({})", top.join(", ")));
        }
        let written_mib = sectors_written_except(self.dev)?.saturating_sub(self.start_written) >> 11;
        if written_mib > self.limits.write_mib {
            found.push(format!("{written_mib} MiB written to other block devices"));
        }
        if let Some(own) = self.limits.own_programs {
            let programs = capture_programs()?;
            if programs > own {
                found.push(format!("{} capture programs of another tracker", programs - own));
            }
        }
        Ok(found)
    }
}

/// CPU clock ticks used so far by each user-space process outside this
/// benchmark's own process tree, keyed by pid, with its name.
struct Processes(HashMap<u32, (String, u64)>);

impl Processes {
    fn snapshot() -> Result<Self> {
        // pid → (ppid, name, ticks), for every process still there.
        let mut all = HashMap::new();
        for entry in std::fs::read_dir("/proc").context("listing /proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // The reaped children's times count short-lived compilers and
            // tests through their parents.
            let Some(stat) = Stat::parse(&stat) else { continue };
            let ticks = [14, 15, 16, 17].into_iter().map(|n| stat.field(n)).sum::<Option<u64>>();
            if let (Some(ppid), Some(ticks)) = (stat.field(4), ticks) {
                all.insert(pid, (ppid as u32, stat.name.to_string(), ticks));
            }
        }
        let me = std::process::id();
        let ours = |mut pid: u32| loop {
            if pid == me {
                return true;
            }
            match all.get(&pid) {
                Some((ppid, _, _)) if *ppid > 1 => pid = *ppid,
                _ => return false,
            }
        };
        // Kernel threads (children of kthreadd, pid 2) are left out: the
        // loop device's own workers run there on behalf of our fio.
        let others = all
            .iter()
            .filter(|(pid, (ppid, _, _))| **pid != 2 && *ppid != 2 && !ours(**pid))
            .map(|(pid, (_, name, ticks))| (*pid, (name.clone(), *ticks)))
            .collect();
        Ok(Self(others))
    }

    /// CPU each process used between `self` and `later`, in % of one core
    /// over `secs`, summed by name, busiest first.
    fn cpu_since(&self, later: &Self, secs: f64) -> Vec<(String, f64)> {
        let mut by_name: HashMap<&str, u64> = HashMap::new();
        for (pid, (name, ticks)) in &later.0 {
            // A process new since `self` used all its ticks in between.
            let before = self.0.get(pid).map_or(0, |(_, t)| *t);
            *by_name.entry(name).or_default() += ticks.saturating_sub(before);
        }
        let mut pct: Vec<(String, f64)> = by_name
            .into_iter()
            .filter(|(_, ticks)| *ticks > 0)
            .map(|(name, ticks)| (name.to_string(), 100.0 * ticks as f64 / clock_ticks_per_s() / secs))
            .collect();
        pct.sort_by(|a, b| b.1.total_cmp(&a.1));
        pct
    }
}

/// Sectors written so far on every block device but `dev`. Discards are
/// left out: the root filesystem issues them in bulk, at little CPU cost.
fn sectors_written_except(dev: &str) -> Result<u64> {
    let stats = std::fs::read_to_string("/proc/diskstats").context("reading /proc/diskstats")?;
    Ok(stats
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.get(2).is_some_and(|name| *name != dev))
        // Field 7 of the kernel's Documentation/admin-guide/iostats.rst,
        // after major, minor and name.
        .filter_map(|f| f.get(9)?.parse::<u64>().ok())
        .sum())
}

/// Loaded eBPF programs named like this project's capture programs.
fn capture_programs() -> Result<usize> {
    let out = Command::new("bpftool").args(["prog", "show", "--json"]).output().context("running bpftool")?;
    ensure!(out.status.success(), "bpftool prog show: {}", String::from_utf8_lossy(&out.stderr));
    let progs: Value = serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
    let is_capture = |p: &&Value| p["name"].as_str().is_some_and(|n| n.starts_with("bio_queue") || n.starts_with("rq_issue"));
    Ok(progs.as_array().map_or(0, |a| a.iter().filter(is_capture).count()))
}

/// Waits until a few seconds pass with nothing else busy.
fn wait_for_quiet(label: &str, dev: &str) -> Result<()> {
    wait_for_quiet_with(label, dev, Limits::capture(0))
}

/// [`wait_for_quiet`] with other limits.
fn wait_for_quiet_with(label: &str, dev: &str, limits: Limits) -> Result<()> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    let mut said = false;
    loop {
        let watch = Watch::start_with(dev, limits)?;
        std::thread::sleep(Duration::from_secs(3));
        check_interrupted()?;
        let busy = watch.disturbances()?;
        if busy.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{label}: the machine stayed busy ({}); giving up", busy.join("; "));
        if !said {
            println!("{label}: waiting, machine busy: {}", busy.join("; "));
            said = true;
        }
    }
}

// ---------------------------------------------------------------- guards --

/// A scratch directory in /dev/shm, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        Self::new_in(Path::new("/dev/shm"), "cbt-bench")
    }

    /// `<parent>/<name>-<pid>`.
    fn new_in(parent: &Path, name: &str) -> Result<Self> {
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kernel.bpf_stats_enabled=1` while alive; the previous value on drop.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { previous: previous.trim().to_string() })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C reaches fio and the agent too (same process group), and both
/// exit cleanly on it; this process notes it and bails after the current
/// step, so the guards above still detach the device and restore the sysctl.
fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t) };
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

// --------------------------------------------------------------- summary --

struct Summary {
    base_iops: f64,
    agent_iops: f64,
    /// Median agent IOPS over median baseline IOPS.
    ratio: f64,
    /// Agent over baseline IOPS within each adjacent pair of rounds.
    paired: Vec<f64>,
    paired_ratio: f64,
    /// (max − min) / median of baseline IOPS: the machine's own noise.
    base_spread: f64,
    base_p99_ns: f64,
    agent_p99_ns: f64,
    cpu_pct: f64,
    events_per_s: f64,
    ns_per_run: BTreeMap<String, f64>,
    program_ns_per_write: f64,
    events: u64,
    dropped: u64,
    recursion_misses: u64,
    corrupt_rings: u64,
    witness_alarms: u64,
    gaps: usize,
    max_ring_fill: u64,
}

impl Summary {
    fn of(rounds: &[Round]) -> Self {
        let base: Vec<&Fio> = rounds.iter().filter(|r| r.agent.is_none()).map(|r| &r.fio).collect();
        let with: Vec<(&Fio, &AgentStats)> = rounds.iter().filter_map(|r| Some((&r.fio, r.agent.as_ref()?))).collect();
        let agents = || with.iter().map(|(_, a)| *a);
        let timed = || agents().filter(|a| a.timed);
        // IOPS from untimed agent rounds only (all rounds if none is).
        let untimed_exist = agents().any(|a| !a.timed);
        let for_iops = |a: &AgentStats| !a.timed || !untimed_exist;
        let paired: Vec<f64> = rounds
            .chunks_exact(2)
            .filter_map(|pair| {
                let (a, b) = if pair[0].agent.is_some() { (&pair[0], &pair[1]) } else { (&pair[1], &pair[0]) };
                for_iops(a.agent.as_ref()?).then(|| a.fio.iops / b.fio.iops)
            })
            .collect();
        let base_iops = median(base.iter().map(|f| f.iops));
        let agent_iops = median(with.iter().filter(|(_, a)| for_iops(a)).map(|(f, _)| f.iops));
        let base_min = base.iter().map(|f| f.iops).fold(f64::INFINITY, f64::min);
        let base_max = base.iter().map(|f| f.iops).fold(0.0, f64::max);
        let programs: BTreeSet<String> = timed().flat_map(|a| a.ns_per_run.keys().cloned()).collect();
        let ns_per_run = programs
            .into_iter()
            .map(|p| {
                let m = median(timed().filter_map(|a| a.ns_per_run.get(&p).copied()));
                (p, m)
            })
            .collect();
        Self {
            base_iops,
            agent_iops,
            ratio: agent_iops / base_iops,
            paired_ratio: median(paired.iter().copied()),
            paired,
            base_spread: (base_max - base_min) / base_iops,
            base_p99_ns: median(base.iter().map(|f| f.p99_ns)),
            agent_p99_ns: median(with.iter().filter(|(_, a)| for_iops(a)).map(|(f, _)| f.p99_ns)),
            cpu_pct: median(agents().map(|a| a.cpu_pct)),
            events_per_s: median(agents().map(|a| a.events_per_s)),
            ns_per_run,
            program_ns_per_write: median(timed().map(|a| a.program_ns_per_write)),
            events: agents().map(|a| a.events).sum(),
            dropped: agents().map(|a| a.dropped).sum(),
            recursion_misses: agents().map(|a| a.recursion_misses).sum(),
            corrupt_rings: agents().map(|a| a.corrupt_rings).sum(),
            witness_alarms: agents().map(|a| a.witness_alarms).sum(),
            gaps: agents().map(|a| a.gaps).sum(),
            max_ring_fill: agents().map(|a| a.max_ring_fill).max().unwrap_or(0),
        }
    }

    /// The agent's CPU scaled linearly to the target's write rate: the
    /// measured rate is whatever this machine reaches, not 200k/s.
    fn cpu_at_target_rate(&self) -> f64 {
        self.cpu_pct * TARGET_CPU_AT_WRITES / self.events_per_s
    }

    /// What capture is known to cost, in % of one core: the programs'
    /// time at the measured write rate plus the agent's own CPU.
    fn accounted_cpu_pct(&self) -> f64 {
        100.0 * self.program_ns_per_write * self.events_per_s / 1e9 + self.cpu_pct
    }

    fn worst_ns_per_run(&self) -> f64 {
        self.ns_per_run.values().copied().fold(0.0, f64::max)
    }

    /// (target, measured, met) for each of the targets.
    fn targets(&self) -> Vec<(String, String, bool)> {
        let ns = self.ns_per_run.iter().map(|(p, ns)| format!("{p} {ns:.0} ns")).collect::<Vec<_>>().join(", ");
        vec![
            (
                format!("IOPS ratio ≥ {TARGET_IOPS_RATIO}"),
                format!("{:.3} (medians), {:.3} (paired rounds)", self.ratio, self.paired_ratio),
                self.ratio >= TARGET_IOPS_RATIO && self.paired_ratio >= TARGET_IOPS_RATIO,
            ),
            (
                format!("≤ {TARGET_NS_PER_RUN:.0} ns per program run"),
                ns,
                !self.ns_per_run.is_empty() && self.worst_ns_per_run() <= TARGET_NS_PER_RUN,
            ),
            (
                format!("agent ≤ {TARGET_CPU_PCT} % of one core at {} writes/s", kilo(TARGET_CPU_AT_WRITES)),
                format!(
                    "{:.2} % at {} writes/s (≈ {:.2} % scaled linearly to {})",
                    self.cpu_pct,
                    kilo(self.events_per_s),
                    self.cpu_at_target_rate(),
                    kilo(TARGET_CPU_AT_WRITES)
                ),
                self.cpu_pct <= TARGET_CPU_PCT && self.cpu_at_target_rate() <= TARGET_CPU_PCT,
            ),
            (
                "zero drops (and no other loss)".to_string(),
                format!(
                    "{} dropped events; {} recursion misses, {} gaps, {} corrupt rings, {} witness alarms",
                    self.dropped, self.recursion_misses, self.gaps, self.corrupt_rings, self.witness_alarms
                ),
                self.dropped == 0
                    && self.recursion_misses == 0
                    && self.gaps == 0
                    && self.corrupt_rings == 0
                    && self.witness_alarms == 0,
            ),
        ]
    }

    fn targets_text(&self) -> String {
        let mut s = format!(
            "medians: baseline {} IOPS (p99 {:.1} µs), agent {} IOPS (p99 {:.1} µs)\n",
            kilo(self.base_iops),
            self.base_p99_ns / 1e3,
            kilo(self.agent_iops),
            self.agent_p99_ns / 1e3
        );
        for (target, measured, met) in self.targets() {
            let _ = writeln!(s, "  {:<5} {target}: {measured}", if met { "met" } else { "MISS" });
        }
        s
    }
}

/// Median; the mean of the middle two for an even count.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// 231400.0 → "231.4k".
fn kilo(x: f64) -> String {
    format!("{:.1}k", x / 1e3)
}

// ---------------------------------------------------------------- report --

struct Report<'a> {
    args: &'a CaptureArgs,
    fio_version: String,
    /// Commit (and uncommitted changes) the agent was built from.
    source: String,
    rounds: &'a [Round],
    /// Rounds measured again because something else ran during them.
    repeats: usize,
    summary: &'a Summary,
}

impl Report<'_> {
    fn markdown(&self) -> Result<String> {
        let mut md = String::new();
        self.header(&mut md)?;
        self.rounds_table(&mut md)?;
        self.medians(&mut md)?;
        self.targets(&mut md)?;
        self.reading(&mut md)?;
        Ok(md)
    }

    fn header(&self, md: &mut String) -> Result<()> {
        let command = std::iter::once("cargo xtask".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
        let agent = self.rounds.iter().find_map(|r| r.agent.as_ref());
        let job = FIO_JOB.iter().copied().map(String::from).chain(fio_timing(self.args.runtime)).collect::<Vec<_>>().join(" ");
        writeln!(md, "# Capture overhead: fio 4k randwrite with and without the agent\n")?;
        writeln!(md, "- command: `{command}`")?;
        writeln!(md, "- date: {}", date()?)?;
        writeln!(md, "- source: {}", self.source)?;
        writeln!(md, "- machine: {}", machine())?;
        writeln!(md, "- fio: {}", self.fio_version)?;
        if let Some(a) = agent {
            writeln!(
                md,
                "- agent: `cbt-agent run --check-interval 200ms --status-file …` (hook flavor {}, {} KiB of kernel rings)",
                a.flavor,
                a.kernel_ring_bytes >> 10
            )?;
        }
        writeln!(md, "\n## Set-up\n")?;
        writeln!(
            md,
            "- device: a loop device over a {DEVICE_MIB} MiB sparse file in /dev/shm, pre-filled once by a \
             sequential 1 MiB pass so every round overwrites pages tmpfs already holds"
        )?;
        writeln!(md, "- each round: `fio --filename=/dev/loopN {job} --output-format=json`")?;
        writeln!(
            md,
            "- rounds: {} baseline (B, no agent) and {} agent (A), interleaved B,A,A,B,B,A,…; \
             paired ratios compare rounds 1–2, 3–4, …",
            self.args.rounds, self.args.rounds
        )?;
        writeln!(
            md,
            "- the VM is shared, so each round waits for a quiet machine (other processes under \
             {OTHERS_MAX_PCT} % of a core, at most {OTHERS_MAX_WRITE_MIB} MiB written to other block devices, \
             no other tracker's programs loaded) and is measured again if that changed during it; \
             rounds measured again: {}",
            self.repeats
        )?;
        writeln!(
            md,
            "- agent rounds: agent started and attached before fio, stopped with SIGINT after; every other \
             agent round (\"A (timed)\") runs with `kernel.bpf_stats_enabled=1` so run_time_ns is counted. \
             That timing is itself a per-run cost the baseline does not pay, so IOPS, p99 and the IOPS \
             ratios come from the untimed agent rounds and ns/run from the timed ones"
        )?;
        writeln!(
            md,
            "- agent CPU: utime+stime from /proc/PID/stat between attach and just before SIGINT, over that \
             window's wall time, in % of one core (loading and verifying the programs is excluded and shown \
             separately); writes/s: the agent's captured events over the same window"
        )?;
        writeln!(md, "- IOPS and p99 completion latency (clat_ns percentile 99.000000) from fio's JSON\n")?;
        Ok(())
    }

    fn programs(&self) -> Vec<&str> {
        self.summary.ns_per_run.keys().map(String::as_str).collect()
    }

    fn rounds_table(&self, md: &mut String) -> Result<()> {
        let programs = self.programs();
        writeln!(md, "## Rounds\n")?;
        write!(md, "| # | run | IOPS | p99 clat µs | agent CPU % | writes/s | load CPU s |")?;
        for p in &programs {
            write!(md, " {p} ns/run |")?;
        }
        writeln!(md, " events | dropped | recursion misses | gaps | max ring fill |")?;
        writeln!(md, "|{}", "---|".repeat(12 + programs.len()))?;
        for (i, r) in self.rounds.iter().enumerate() {
            let kind = match &r.agent {
                None => "B",
                Some(a) if a.timed => "A (timed)",
                Some(_) => "A",
            };
            write!(md, "| {} | {kind} | {:.0} | {:.1} |", i + 1, r.fio.iops, r.fio.p99_ns / 1e3)?;
            match &r.agent {
                None => writeln!(md, "{}", " – |".repeat(8 + programs.len()))?,
                Some(a) => {
                    write!(md, " {:.2} | {:.0} | {:.2} |", a.cpu_pct, a.events_per_s, a.load_cpu_s)?;
                    for p in &programs {
                        match a.ns_per_run.get(*p) {
                            Some(ns) => write!(md, " {ns:.1} |")?,
                            None => write!(md, " – |")?,
                        }
                    }
                    writeln!(md, " {} | {} | {} | {} | {} |", a.events, a.dropped, a.recursion_misses, a.gaps, a.max_ring_fill)?;
                }
            }
        }
        writeln!(md)?;
        Ok(())
    }

    fn medians(&self, md: &mut String) -> Result<()> {
        let s = self.summary;
        writeln!(md, "## Medians\n")?;
        writeln!(md, "| | baseline | agent |\n|---|---|---|")?;
        writeln!(md, "| IOPS | {:.0} | {:.0} |", s.base_iops, s.agent_iops)?;
        writeln!(md, "| p99 completion latency µs | {:.1} | {:.1} |\n", s.base_p99_ns / 1e3, s.agent_p99_ns / 1e3)?;
        writeln!(md, "- IOPS ratio, agent / baseline medians: **{:.3}**", s.ratio)?;
        writeln!(
            md,
            "- IOPS ratio, median of paired adjacent rounds: **{:.3}** (pairs: {})",
            s.paired_ratio,
            s.paired.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")
        )?;
        writeln!(md, "- baseline IOPS spread (max − min over median): {:.1} %", 100.0 * s.base_spread)?;
        for (p, ns) in &s.ns_per_run {
            writeln!(md, "- {p}: {ns:.1} ns per run")?;
        }
        writeln!(md, "- agent CPU: {:.2} % of one core at {:.0} writes/s", s.cpu_pct, s.events_per_s)?;
        writeln!(
            md,
            "- eBPF time per captured write, all programs: {:.1} ns; with the agent's CPU, capture accounts for \
             {:.1} % of one core, {:.1} % of the machine's {} CPUs",
            s.program_ns_per_write,
            s.accounted_cpu_pct(),
            s.accounted_cpu_pct() / nproc() as f64,
            nproc()
        )?;
        writeln!(
            md,
            "- totals over all agent rounds: {} events, {} dropped, {} recursion misses, {} gaps, {} corrupt rings, \
             {} witness alarms; highest ring fill {} slots\n",
            s.events, s.dropped, s.recursion_misses, s.gaps, s.corrupt_rings, s.witness_alarms, s.max_ring_fill
        )?;
        Ok(())
    }

    fn targets(&self, md: &mut String) -> Result<()> {
        let gaps: Vec<&String> = self.rounds.iter().filter_map(|r| r.agent.as_ref()).flat_map(|a| &a.gap_reasons).collect();
        if !gaps.is_empty() {
            writeln!(md, "Gaps the agent reported:\n")?;
            for g in gaps {
                writeln!(md, "- {g}")?;
            }
            writeln!(md)?;
        }
        writeln!(md, "## Targets\n")?;
        writeln!(md, "| target | measured | met |\n|---|---|---|")?;
        for (target, measured, met) in self.summary.targets() {
            writeln!(md, "| {target} | {measured} | {} |", if met { "yes" } else { "**no**" })?;
        }
        writeln!(md)?;
        Ok(())
    }

    /// Plain sentences from the figures; a miss is said as a miss.
    fn reading(&self, md: &mut String) -> Result<()> {
        let s = self.summary;
        let verdict = |met: bool| if met { "meets" } else { "misses" };
        let targets = s.targets();
        writeln!(md, "## Reading\n")?;
        write!(
            md,
            "With the agent attached fio kept {:.1} % of its baseline IOPS by medians and {:.1} % by paired rounds, \
             which {} the ≥ {:.0} % target; the agent round was the slower one in {} of {} pairs, while the \
             baseline rounds alone spread {:.1} % (max − min over median) on this machine. p99 completion latency \
             went from {:.1} µs to {:.1} µs. ",
            100.0 * s.ratio,
            100.0 * s.paired_ratio,
            verdict(targets[0].2),
            100.0 * TARGET_IOPS_RATIO,
            s.paired.iter().filter(|r| **r < 1.0).count(),
            s.paired.len(),
            100.0 * s.base_spread,
            s.base_p99_ns / 1e3,
            s.agent_p99_ns / 1e3,
        )?;
        write!(
            md,
            "The slowest program took {:.0} ns per run ({} the {TARGET_NS_PER_RUN:.0} ns budget; measured with \
             bpf_stats on, which adds its own clock reads). ",
            s.worst_ns_per_run(),
            verdict(targets[1].2)
        )?;
        write!(
            md,
            "The agent used {:.2} % of one core while capturing {} writes/s, ≈ {:.2} % scaled linearly to {} \
             writes/s, which {} the {TARGET_CPU_PCT} % target; fio and the agent share {} CPUs. ",
            s.cpu_pct,
            kilo(s.events_per_s),
            s.cpu_at_target_rate(),
            kilo(TARGET_CPU_AT_WRITES),
            verdict(targets[2].2),
            nproc()
        )?;
        let accounted = s.accounted_cpu_pct() / nproc() as f64;
        let lost = 100.0 * (1.0 - s.paired_ratio);
        write!(
            md,
            "Program time plus agent CPU account for {accounted:.1} % of the machine's CPU against {lost:.1} % of \
             IOPS lost (paired){} ",
            if lost > 2.0 * accounted {
                ": most of the loss is a cost that neither run_time_ns nor the agent's CPU shows."
            } else {
                "."
            }
        )?;
        if targets[3].2 {
            writeln!(md, "Nothing was lost: no dropped events, recursion misses, gaps, corrupt rings or witness alarms.")?;
        } else {
            writeln!(
                md,
                "Loss was NOT zero: {} dropped events, {} recursion misses, {} gaps, {} corrupt rings, {} witness alarms.",
                s.dropped, s.recursion_misses, s.gaps, s.corrupt_rings, s.witness_alarms
            )?;
        }
        Ok(())
    }
}

/// The commit the agent was built from, and which of its sources differ
/// from it (read-only: no index refresh).
fn source_version() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("--no-optional-locks")
            .args(args)
            .current_dir(crate::root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            // Not trim(): a porcelain line starts with a space (" M path").
            .map(|o| String::from_utf8_lossy(&o.stdout).trim_end().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown (no git)".to_string() };
    let dirty = git(&["status", "--porcelain", "--", "agent", "common", "tracker-ebpf"]).unwrap_or_default();
    if dirty.is_empty() {
        format!("commit {commit}")
    } else {
        let paths: Vec<&str> = dirty.lines().map(|l| l.get(3..).unwrap_or(l)).collect();
        format!("commit {commit} with uncommitted changes to {}", paths.join(", "))
    }
}

fn date() -> Result<String> {
    let out = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]).output().context("running date")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

/// CPU count and model, kernel release, memory.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map_or(String::from("?"), |(_, v)| v.trim().to_string())
    };
    let mem_kib: u64 = field(&read("/proc/meminfo"), "MemTotal").trim_end_matches(" kB").parse().unwrap_or(0);
    format!(
        "{} CPUs ({}), kernel {}, {:.1} GiB memory",
        nproc(),
        field(&read("/proc/cpuinfo"), "model name"),
        read("/proc/sys/kernel/osrelease").trim(),
        mem_kib as f64 / (1 << 20) as f64
    )
}
