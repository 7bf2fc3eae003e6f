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
    file: PathBuf,
}

impl Loop {
    pub fn new(file: &Path, size_mib: u64) -> Result<Self> {
        let f = std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        f.set_len(size_mib << 20)?;
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

/// Stops the agent with SIGINT (so it writes its final status) on drop.
pub struct Agent(pub Child);

impl Agent {
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let status = self.0.wait()?;
        if !status.success() {
            bail!("agent exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

pub fn start_agent(status: &Path, show: &str, quiet: bool) -> Result<Agent> {
    start_agent_with(status, &["--show", show], quiet)
}

/// [`start_agent`] with other extra arguments. The benchmark passes none:
/// `--show` lists every changed range in each status, which on a randomly
/// written disk costs the agent more CPU than capture itself.
pub fn start_agent_with(status: &Path, extra: &[&str], quiet: bool) -> Result<Agent> {
    let _ = std::fs::remove_file(status);
    let child = Command::new(crate::agent_binary())
        .args(["run", "--check-interval", "200ms"])
        .args(extra)
        .arg("--status-file")
        .arg(status)
        .stderr(if quiet { Stdio::null() } else { Stdio::inherit() })
        .spawn()
        .context("starting cbt-agent")?;
    let agent = Agent(child);
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

pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cbt-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = Loop::new(&dir.join("disk.img"), 256)?;
    let dev = disk.dev.clone();
    println!("\n1. A fresh 256 MiB loop device: {dev}");
    let status = dir.join("status.json");
    let mut agent = start_agent(&status, &dev, true)?;
    println!("2. cbt-agent attached its eBPF programs to the block layer\n3. Changing some blocks:");
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
    agent.stop()?;

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&status)?)?;
    let name = dev.trim_start_matches("/dev/");
    let device = report["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .context("the agent reported nothing for the demo device")?;
    let ranges: Vec<(u64, u64)> = device["ranges"]
        .as_array()
        .context("no ranges in status")?
        .iter()
        .map(|r| (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0)))
        .collect();
    println!("\n4. What the agent saw change on {dev} (flavor {}, {} B chunks):", report["flavor"], report["granularity"]);
    println!("     {:>12}  {:>10}", "offset", "length");
    for (off, len) in &ranges {
        println!("     {off:>12}  {len:>10}");
    }
    let gaps = report["gaps"].as_array().map_or(0, Vec::len);
    let all_seen = expected.iter().all(|(_, off, len)| ranges.iter().any(|(o, l)| o <= off && off + len <= o + l));
    println!(
        "\n   every change above was seen: {}; tracking gaps: {gaps}; events dropped: {}",
        if all_seen { "yes" } else { "NO" },
        report["loss"]["dropped_events"]
    );
    let _ = std::fs::remove_dir_all(&dir);
    if !all_seen {
        bail!("the agent missed a change");
    }
    Ok(())
}
