//! `cargo xtask demo`: the point of the project in under a minute.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};



/// A loop device over a sparse file; detached and removed on drop.
pub struct Loop {
    pub dev: String,
    pub file: PathBuf,
}

impl Loop {
    pub fn new(file: &Path, size_mib: u64) -> Result<Self> {
        let f = std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        f.set_len(size_mib << 20)?;
        Self::attach(file)
    }

    /// A loop device over an existing file (removed with it on drop).
    pub fn attach(file: &Path) -> Result<Self> {
        let out = Command::new("losetup").args(["-f", "--show"]).arg(file).output().context("losetup")?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { dev: String::from_utf8(out.stdout)?.trim().to_string(), file: file.to_path_buf() })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A `cbt-agent run` child. Its capture is pinned under a bpffs root of
/// its own, released (programs detached, pins removed) once it has
/// stopped: the agent pins by default so that a restart is no gap, and a
/// demo or benchmark must leave no program attached behind it. Stopped with
/// SIGINT (so it writes its final status) on drop.
pub struct Agent(pub Child, Option<Release>);

/// What `cbt-agent release` needs to detach what an agent pinned.
struct Release {
    state_dir: PathBuf,
    pin_root: PathBuf,
}

impl Agent {
    /// Spawns `cmd`, a `cbt-agent run` command line whose change log is in
    /// `state_dir`, with a private pin root unless `args` turn pinning off.
    pub fn spawn(mut cmd: Command, state_dir: &Path, args: &[&str]) -> Result<Self> {
        let release = (!args.contains(&"--no-pin")).then(|| {
            let pin_root = PathBuf::from(format!("/sys/fs/bpf/cbt-xtask-{}", std::process::id()));
            cmd.arg("--pin-root").arg(&pin_root);
            Release { state_dir: state_dir.to_path_buf(), pin_root }
        });
        let child = cmd.args(args).spawn().context("starting cbt-agent")?;
        Ok(Self(child, release))
    }

    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let status = self.0.wait()?;
        self.release()?;
        if !status.success() {
            bail!("agent exited with {status}");
        }
        Ok(())
    }

    /// Detaches what the (stopped) agent left pinned.
    fn release(&mut self) -> Result<()> {
        let Some(r) = self.1.take() else { return Ok(()) };
        crate::run(
            Command::new(crate::agent_binary())
                .arg("release")
                .arg("--state-dir")
                .arg(&r.state_dir)
                .arg("--pin-root")
                .arg(&r.pin_root)
                .stdout(Stdio::null()),
        )
        .context("releasing the agent's pinned capture")?;
        match std::fs::remove_dir(&r.pin_root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", r.pin_root.display()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.stop();
        } else if let Err(e) = self.release() {
            eprintln!("{e:#}");
        }
    }
}

/// Starts `cbt-agent run` with `extra` arguments (a `--state-dir` among
/// them, or the agent's default) and waits until it has attached (its first
/// status file appears).
pub fn start_agent_with(status: &Path, extra: &[&str], quiet: bool) -> Result<Agent> {
    let _ = std::fs::remove_file(status);
    let state_dir = extra.iter().position(|a| *a == "--state-dir").and_then(|i| extra.get(i + 1)).unwrap_or(&"/var/lib/cbt");
    let mut cmd = Command::new(crate::agent_binary());
    cmd.args(["run", "--check-interval", "200ms"])
        .arg("--status-file")
        .arg(status)
        .stderr(if quiet { Stdio::null() } else { Stdio::inherit() });
    let agent = Agent::spawn(cmd, Path::new(state_dir), extra)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status.exists() {
        if Instant::now() > deadline {
            bail!("agent did not attach within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

pub fn run_demo_step(what: &str, cmd: &mut Command) -> Result<()> {
    println!("  {what:<44} $ {}", format!("{cmd:?}").replace('"', ""));
    crate::run(cmd.stdout(Stdio::null()).stderr(Stdio::null()))
}

/// Runs cbtctl against the demo agent's sockets.
fn cbtctl(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(crate::root().join("target/release/cbtctl"))
        .arg("--csi-socket")
        .arg(dir.join("csi.sock"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .args(args)
        .output()
        .context("running cbtctl")?;
    if !out.status.success() {
        bail!("cbtctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A snapshot the way a storage backend would take one: the window opens,
/// the image is cut (here: a copy of the loop device's backing file), the
/// window closes with the snapshot's handle.
fn snapshot(dir: &Path, disk: &Loop, handle: &str) -> Result<PathBuf> {
    cbtctl(dir, &["snapshot", "begin", "demo"])?;
    let image = dir.join(format!("{handle}.img"));
    std::fs::copy(&disk.file, &image).context("copying the snapshot image")?;
    cbtctl(dir, &["snapshot", "commit", "demo", handle])?;
    Ok(image)
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("sha256sum")?;
    Ok(String::from_utf8(out.stdout)?.split_whitespace().next().unwrap_or_default().to_string())
}

pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cbt-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = Loop::new(&dir.join("disk.img"), 256)?;
    let dev = disk.dev.clone();
    println!("\n1. A fresh 256 MiB loop device: {dev}, served as volume \"demo\"");
    let status = dir.join("status.json");
    let volume = format!("demo={dev}");
    let (state, csi, admin) = (dir.join("state"), dir.join("csi.sock"), dir.join("admin.sock"));
    let args: Vec<&str> = vec![
        "--volume",
        &volume,
        "--state-dir",
        state.to_str().context("temp dir path")?,
        "--csi-socket",
        csi.to_str().context("temp dir path")?,
        "--admin-socket",
        admin.to_str().context("temp dir path")?,
    ];
    let mut agent = start_agent_with(&status, &args, true)?;
    println!("2. cbt-agent attached its eBPF programs and serves CSI SnapshotMetadata on {}", csi.display());
    let base = snapshot(&dir, &disk, "snap-1")?;
    println!("3. Snapshot snap-1 taken (cbtctl snapshot begin / copy the image / cbtctl snapshot commit)");
    println!("4. Changing some blocks:");
    let dd = |seek_4k: u64, count: u64| {
        let mut c = Command::new("dd");
        c.args(["if=/dev/urandom", "bs=4096", "oflag=direct"])
            .arg(format!("of={dev}"))
            .arg(format!("seek={seek_4k}"))
            .arg(format!("count={count}"));
        c
    };
    let expected: [(&str, u64, u64); 5] = [
        ("write 4 KiB at 1 MiB (O_DIRECT)", 1 << 20, 4096),
        ("write 64 KiB at 10 MiB (O_DIRECT)", 10 << 20, 65536),
        ("buffered write 12 KiB at 50 MiB + fsync", 50 << 20, 12288),
        ("discard 1 MiB at 100 MiB", 100 << 20, 1 << 20),
        ("write zeroes 8 KiB at 200 MiB", 200 << 20, 8192),
    ];
    run_demo_step(expected[0].0, &mut dd(256, 1))?;
    run_demo_step(expected[1].0, &mut dd(2560, 16))?;
    run_demo_step(
        expected[2].0,
        Command::new("dd").args(["if=/dev/urandom", "bs=4096", "seek=12800", "count=3", "conv=fsync,notrunc"]).arg(format!("of={dev}")),
    )?;
    run_demo_step(expected[3].0, Command::new("blkdiscard").args(["-o", "104857600", "-l", "1048576"]).arg(&dev))?;
    run_demo_step(expected[4].0, Command::new("blkdiscard").args(["-z", "-o", "209715200", "-l", "8192"]).arg(&dev))?;
    let target = snapshot(&dir, &disk, "snap-2")?;
    println!("5. Snapshot snap-2 taken\n\n6. $ cbtctl delta snap-1 snap-2   (GetMetadataDelta over the CSI socket)");
    print!("{}", cbtctl(&dir, &["delta", "snap-1", "snap-2"])?);
    let listing: serde_json::Value = serde_json::from_str(&cbtctl(&dir, &["delta", "snap-1", "snap-2", "-o", "json"])?)?;
    let ranges: Vec<(u64, u64)> = listing["block_metadata"]
        .as_array()
        .context("no block_metadata in the delta")?
        .iter()
        .map(|r| (r["byte_offset"].as_u64().unwrap_or(0), r["size_bytes"].as_u64().unwrap_or(0)))
        .collect();
    let all_seen = expected.iter().all(|(_, off, len)| ranges.iter().any(|(o, l)| o <= off && off + len <= o + l));

    let restored = dir.join("restored.img");
    std::fs::copy(&base, &restored)?;
    println!("\n7. Incremental restore: copy snap-1's image, apply only the delta from snap-2's image");
    print!("   {}", cbtctl(&dir, &["copy", "snap-1", "snap-2", "--from", target.to_str().unwrap_or_default(), "--onto", restored.to_str().unwrap_or_default()])?);
    let identical = sha256(&restored)? == sha256(&target)?;
    println!("   restored image == snap-2 image (sha256): {}", if identical { "yes" } else { "NO" });
    agent.stop()?;
    println!("\n   every change above is in the delta: {}", if all_seen { "yes" } else { "NO" });
    let _ = std::fs::remove_dir_all(&dir);
    if !all_seen || !identical {
        bail!("the delta missed a change");
    }
    Ok(())
}
