//! `cargo xtask …`: every build, test, demo and benchmark entry point, each
//! doing its own set-up on a fresh machine.

mod bench;
mod demo;
mod interop;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test, demo and benchmark the changed-block tracker")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent).
    Setup,
    /// Build the eBPF object (nightly, bpf-linker).
    BuildEbpf,
    /// Build the eBPF object and the agent (release).
    Build,
    /// Track a loop device, snapshot it, change blocks, snapshot again, list
    /// the delta over the CSI socket and restore incrementally from it.
    Demo,
    /// Build the real upstream peers of the interoperability tests (Go):
    /// sidecar, lister, verifier, csi-sanity, kube-apiserver, kubectl, etcd.
    InteropPeers,
    /// Run every test: unit tests and the privileged ones on real devices.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmarks; results go to bench/results/.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::all(),
        Cmd::BuildEbpf => {
            setup::toolchain()?;
            build_ebpf()
        }
        Cmd::Build => {
            setup::all()?;
            build_release()
        }
        Cmd::Demo => {
            setup::all()?;
            build_release()?;
            demo::run()
        }
        Cmd::InteropPeers => interop::build_peers(),
        Cmd::Test { filter } => test(filter),
        Cmd::Bench(b) => {
            setup::all()?;
            build_release()?;
            bench::run(b)
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A cargo command that does not inherit this cargo's toolchain choice.
fn cargo(toolchain: Option<&str>) -> Command {
    let mut cmd = Command::new("cargo");
    if let Some(t) = toolchain {
        cmd.arg(format!("+{t}"));
    }
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn ebpf_object() -> PathBuf {
    root().join("tracker-ebpf/target/bpfel-unknown-none/release/cbt-ebpf")
}

fn build_ebpf() -> Result<()> {
    run(cargo(Some("nightly"))
        .current_dir(root().join("tracker-ebpf"))
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"]))
    .context("building the eBPF object")
}

pub fn agent_binary() -> PathBuf {
    root().join("target/release/cbt-agent")
}

fn build_release() -> Result<()> {
    build_ebpf()?;
    run(cargo(None).current_dir(root()).args(["build", "--release", "-p", "cbt-agent", "--bins"]))
}

pub fn cbtctl_binary() -> PathBuf {
    root().join("target/release/cbtctl")
}

/// Where the accuracy tests append their `ACCURACY ...` lines.
fn accuracy_report() -> PathBuf {
    root().join("target/accuracy-report.txt")
}

fn test(filter: Option<String>) -> Result<()> {
    if !nix_is_root() {
        bail!("the tests load eBPF programs and make loop devices: run them as root");
    }
    setup::all()?;
    // The accuracy tests drive the release binaries (agent and cbtctl).
    build_release().context("building the release binaries the accuracy tests run")?;
    // The interoperability tests run the real upstream peers (sidecar,
    // lister, verifier, csi-sanity, kube-apiserver, etcd), built from Go.
    interop::build_peers()?;
    let filter: Vec<String> = filter.into_iter().collect();
    // Unit tests of every crate, then the privileged suite. Two threads:
    // the suite's tests each make their own devices and tracker.
    run(cargo(None).current_dir(root()).args(["test", "--workspace", "--exclude", "cbt-tests"]).args(&filter))?;
    let _ = std::fs::remove_file(accuracy_report());
    // Captures pinned by tests of an earlier, interrupted run would stay
    // attached and slow every write: unpinning detaches them.
    let pins = std::path::Path::new(TEST_PIN_ROOT);
    if pins.exists() {
        std::fs::remove_dir_all(pins).with_context(|| format!("clearing {}", pins.display()))?;
    }
    let mut suite = cargo(None);
    suite.current_dir(root()).args(["test", "--release", "-p", "cbt-tests"]).args(&filter).args(["--", "--test-threads=2"]);
    for (var, path) in [("CBT_AGENT_BIN", agent_binary()), ("CBTCTL_BIN", cbtctl_binary()), ("CBT_INTEROP_BIN_DIR", interop::peers_dir())] {
        if std::env::var_os(var).is_none() {
            suite.env(var, path);
        }
    }
    let result = run(&mut suite);
    // Leave the machine as it was: the tests' pin root (empty unless a test
    // failed to release what it pinned, which this detaches).
    if pins.exists() {
        if let Err(e) = std::fs::remove_dir_all(pins) {
            eprintln!("warning: could not remove {}: {e}", pins.display());
        }
    }
    if let Ok(report) = std::fs::read_to_string(accuracy_report()) {
        println!("\nAccuracy (reported / truly changed bytes per workload; {}):\n{report}", accuracy_report().display());
    }
    result
}

/// Where the privileged tests pin captures (see tests/src/accuracy/agent.rs).
const TEST_PIN_ROOT: &str = "/sys/fs/bpf/cbt-tests";

pub fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
