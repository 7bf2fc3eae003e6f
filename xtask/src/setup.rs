//! Idempotent set-up of a fresh machine: toolchains, Debian tools, and the
//! kernel filesystems the agent needs mounted.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::run;

/// Debian packages the demo, tests and benchmarks use, keyed by a binary
/// each provides (checked before installing anything).
const PACKAGES: &[(&str, &str)] = &[
    ("fio", "fio"),
    ("losetup", "util-linux"),
    ("sfdisk", "fdisk"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("mkfs.btrfs", "btrfs-progs"),
    ("filefrag", "e2fsprogs"),
    ("bpftool", "bpftool"),
    // The interoperability tests make the sidecar's TLS certificates.
    ("openssl", "openssl"),
    // A gRPC C-core client (grpcio) for the service tests; see grpcio().
    ("python3", "python3"),
    // Device-mapper tests: dm-linear over loop devices, tables swapped.
    ("dmsetup", "dmsetup"),
];

/// The grpcio the service tests dial the CSI socket with: C-core, whose
/// default `:authority` on a UNIX socket differs from Go's. Pinned so a new
/// release cannot change the test's outcome by itself.
const GRPCIO: &str = "grpcio==1.85.4";

const BPF_LINKER_VERSION: &str = "0.10.0";

pub fn all() -> Result<()> {
    toolchain()?;
    packages()?;
    grpcio()?;
    kernel_filesystems()?;
    device_mapper();
    Ok(())
}

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {binary} >/dev/null 2>&1 || test -x /usr/sbin/{binary} || test -x /sbin/{binary}"),
        ])
        .status()
        .is_ok_and(|s| s.success())
}

/// Nightly with rust-src (for `-Z build-std=core`) and a pinned bpf-linker:
/// 0.10.0 links with rustc's own LLVM; newer ones need a system LLVM 21+.
pub fn toolchain() -> Result<()> {
    let has_src = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        eprintln!("setup: installing nightly with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "-c",
            "rust-src",
        ]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !linker_ok {
        eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        run(crate::cargo(None).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ]))?;
    }
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(bin, _)| !have(bin)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// A venv under target/ with grpcio (agent/tests/service.rs runs its
/// python): Debian's own Python refuses `pip install` outside a venv
/// (PEP 668), and a venv leaves the system alone.
fn grpcio() -> Result<()> {
    let venv = crate::root().join("target/grpcio-venv");
    let python = venv.join("bin/python");
    let has_grpcio = |python: &Path| {
        Command::new(python)
            .args(["-c", &format!("import grpc, sys; sys.exit(grpc.__version__ != {:?})", &GRPCIO["grpcio==".len()..])])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_grpcio(&python) {
        return Ok(());
    }
    eprintln!("setup: installing {GRPCIO} in {}", venv.display());
    let make_venv =
        || Command::new("python3").arg("-m").arg("venv").arg("--clear").arg(&venv).status().is_ok_and(|s| s.success());
    if !make_venv() {
        // Debian ships the venv module's pip bootstrap separately.
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "python3-venv"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        run(Command::new("python3").arg("-m").arg("venv").arg("--clear").arg(&venv))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "--disable-pip-version-check", GRPCIO]))?;
    anyhow::ensure!(has_grpcio(&python), "{GRPCIO} is not importable from {} after installing it", python.display());
    Ok(())
}

/// Loads device-mapper if the kernel has it as a module, and makes its
/// control node. Not fatal: a kernel built without it (as on some machine
/// kinds) cannot run the device-mapper tests, which say so.
fn device_mapper() {
    let control = Path::new("/dev/mapper/control");
    if control.exists() {
        return;
    }
    let _ = Command::new("modprobe").arg("dm_mod").status();
    if Path::new("/sys/class/misc/device-mapper").exists() && !control.exists() {
        let _ = Command::new("dmsetup").arg("mknodes").status();
    }
    if !control.exists() {
        eprintln!("setup: device-mapper is not available on this kernel; its tests cannot run here");
    }
}

/// tracefs (classic tracepoint formats) and bpffs (pinning) are not mounted
/// by default on these machines.
fn kernel_filesystems() -> Result<()> {
    for (fstype, target) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        let mounted = std::fs::read_to_string("/proc/mounts")
            .context("reading /proc/mounts")?
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(target));
        if !mounted && Path::new(target).exists() {
            run(Command::new("mount").args(["-t", fstype, fstype, target]))?;
        }
    }
    Ok(())
}
