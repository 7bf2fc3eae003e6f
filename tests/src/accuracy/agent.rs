//! The agent process, the `cbtctl` client, and the backend the accuracy
//! tests talk to.
//!
//! Backend selection (`$CBT_ACCURACY_BACKEND`):
//! - `agent` (default): the real `cbt-agent` and `cbtctl` binaries
//!   (`$CBT_AGENT_BIN`, `$CBTCTL_BIN`, default `<workspace>/target/release/`);
//! - `oracle`: no agent; every delta is the image diff itself. Exercises the
//!   whole harness (workloads, snapshots, truth, application, report) so it
//!   can be checked without the agent; fault hooks are no-ops;
//! - `oracle-lossy`: the oracle drops the first changed range of every
//!   answer: every test that checks a non-empty delta must then FAIL with
//!   UNDER-REPORTED (proves the checks bite).

use std::{
    collections::HashSet,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::{
    scratch::{copy_file, snapshot_reflink, unique_name, Image, Volume},
    truth::{apply_ranges, assert_delta_superset, assert_files_equal, changed_chunks, AccuracyLog, Coverage, Ranges, Truth, REPORT_BLOCK},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin(var: &str, name: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| workspace().join("target/release").join(name));
    assert!(
        p.exists(),
        "{} not found (set {var}, or build it: cargo build --release -p cbt-agent --bins; `cargo xtask test` does)",
        p.display()
    );
    p
}

pub fn agent_bin() -> PathBuf {
    bin("CBT_AGENT_BIN", "cbt-agent")
}

pub fn cbtctl_bin() -> PathBuf {
    bin("CBTCTL_BIN", "cbtctl")
}

/// What a command printed and how it ended.
#[derive(Clone, Debug)]
pub struct CtlOut {
    pub cmdline: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for CtlOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` exited {}; stdout: {:.600}; stderr: {:.1500}", self.cmdline, self.code, self.stdout.trim(), self.stderr.trim())
    }
}

/// Runs a command with a deadline; output captured.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CtlOut {
    let cmdline = format!("{cmd:?}").replace('"', "");
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("starting {cmdline}: {e}"));
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{cmdline}` did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    CtlOut { cmdline, code: status.code().unwrap_or(-1), stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// The answer to a delta or allocated query.
#[derive(Debug)]
pub enum Answer {
    List(Ranges),
    /// Exit 3: FAILED_PRECONDITION, take a full backup.
    FailedPrecondition(CtlOut),
    /// Exit 4: NOT_FOUND.
    NotFound(CtlOut),
    Error(CtlOut),
}

impl Answer {
    fn from(out: CtlOut) -> Self {
        match out.code {
            0 => Answer::List(Ranges::parse(&out.stdout).unwrap_or_else(|e| panic!("{out}: cannot parse the answer: {e}"))),
            3 => Answer::FailedPrecondition(out),
            4 => Answer::NotFound(out),
            _ => Answer::Error(out),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Answer::List(_) => "a list",
            Answer::FailedPrecondition(_) => "FAILED_PRECONDITION (exit 3)",
            Answer::NotFound(_) => "NOT_FOUND (exit 4)",
            Answer::Error(_) => "an error",
        }
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::List(r) => write!(f, "a list of {} ranges ({} bytes)", r.list.len(), r.bytes()),
            Answer::FailedPrecondition(o) | Answer::NotFound(o) | Answer::Error(o) => write!(f, "{}: {o}", self.kind()),
        }
    }
}

/// `cbtctl` with this agent's sockets.
#[derive(Clone)]
pub struct Cbtctl {
    pub bin: PathBuf,
    pub admin_socket: PathBuf,
    pub csi_socket: PathBuf,
    pub timeout: Duration,
}

impl Cbtctl {
    pub fn run(&self, args: &[&str]) -> CtlOut {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--admin-socket").arg(&self.admin_socket).arg("--csi-socket").arg(&self.csi_socket).args(args);
        run_with_timeout(&mut cmd, self.timeout)
    }

    /// Runs and requires exit 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.code, 0, "{out}");
        out.stdout
    }

    pub fn status(&self) -> Result<serde_json::Value, String> {
        let out = self.run(&["status", "--json"]);
        if out.code != 0 {
            return Err(out.to_string());
        }
        serde_json::from_str(out.stdout.trim()).map_err(|e| format!("status is not JSON ({e}): {out}"))
    }

    /// `snapshot begin VOLUME`: returns the cut id.
    pub fn begin(&self, volume: &str) -> String {
        self.ok(&["snapshot", "begin", volume]).trim().to_string()
    }

    pub fn commit(&self, volume: &str, handle: &str) {
        self.ok(&["snapshot", "commit", volume, handle]);
    }

    pub fn delete(&self, handle: &str) -> CtlOut {
        self.run(&["snapshot", "delete", handle])
    }

    pub fn list(&self) -> serde_json::Value {
        let s = self.ok(&["snapshot", "list", "--json"]);
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("snapshot list is not JSON ({e}): {s}"))
    }

    pub fn delta(&self, base: &str, target: &str, extra: &[&str]) -> Answer {
        let mut args = vec!["delta", base, target, "-o", "json"];
        args.extend_from_slice(extra);
        Answer::from(self.run(&args))
    }

    pub fn allocated(&self, snap: &str, extra: &[&str]) -> Answer {
        let mut args = vec!["allocated", snap, "-o", "json"];
        args.extend_from_slice(extra);
        Answer::from(self.run(&args))
    }

    pub fn copy(&self, base: &str, target: &str, from: &Path, onto: &Path) -> CtlOut {
        let (from, onto) = (from.display().to_string(), onto.display().to_string());
        self.run(&["copy", base, target, "--from", &from, "--onto", &onto])
    }
}

/// Where test agents pin their captures (one directory per state dir);
/// `cargo xtask test` clears it before the suite.
pub const PIN_ROOT: &str = "/sys/fs/bpf/cbt-tests/agents";

/// Options of `cbt-agent run` beyond the fixed ones.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub segment_interval: Option<String>,
    pub check_interval: String,
    pub poll_interval: String,
    pub granularity: u64,
    /// `--driver-name` (what GetPluginInfo answers).
    pub driver_name: String,
    pub extra: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            segment_interval: None,
            check_interval: "200ms".into(),
            poll_interval: "2ms".into(),
            granularity: 4096,
            driver_name: "accuracy.cbt.example.com".into(),
            extra: Vec::new(),
        }
    }
}

/// A `cbt-agent run` process with its own state dir, sockets, status file
/// and log (stderr, appended across restarts, shown when a test fails).
/// Dropping it stops it (SIGCONT, SIGTERM, then SIGKILL) and removes its
/// directory unless the test failed.
pub struct Agent {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub csi_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub status_file: PathBuf,
    pub log_path: PathBuf,
    pub driver_name: String,
    volumes: Vec<(String, String)>,
    options: AgentOptions,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    pub fn start(volumes: &[&Volume]) -> Self {
        Self::start_with(volumes, AgentOptions::default())
    }

    pub fn start_with(volumes: &[&Volume], options: AgentOptions) -> Self {
        let named: Vec<(&str, &str)> = volumes.iter().map(|v| (v.name.as_str(), v.dev.as_str())).collect();
        Self::start_devices(&named, options)
    }

    /// Serving `(volume name, device node)` pairs: any block device, not
    /// only a [`Volume`].
    pub fn start_devices(volumes: &[(&str, &str)], options: AgentOptions) -> Self {
        crate::require_root();
        let dir = PathBuf::from(format!("/tmp/{}", unique_name("agent")));
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir).expect("agent dir");
        let mut a = Self {
            csi_socket: dir.join("csi.sock"),
            admin_socket: dir.join("admin.sock"),
            status_file: dir.join("status.json"),
            log_path: dir.join("agent.log"),
            driver_name: options.driver_name.clone(),
            state_dir,
            dir,
            volumes: volumes.iter().map(|&(name, dev)| (name.to_string(), dev.to_string())).collect(),
            options,
            child: None,
            runs: 0,
        };
        a.spawn();
        a.wait_ready(Duration::from_secs(30));
        a
    }

    pub fn ctl(&self) -> Cbtctl {
        Cbtctl {
            bin: cbtctl_bin(),
            admin_socket: self.admin_socket.clone(),
            csi_socket: self.csi_socket.clone(),
            timeout: Duration::from_secs(60),
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        self.runs += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("agent log");
        use std::io::Write;
        let _ = writeln!(log, "===== cbt-agent run #{} =====", self.runs);
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--csi-socket")
            .arg(&self.csi_socket)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .arg("--driver-name")
            .arg(&self.driver_name)
            .arg("--check-interval")
            .arg(&self.options.check_interval)
            .arg("--poll-interval")
            .arg(&self.options.poll_interval)
            .arg("--granularity")
            .arg(self.options.granularity.to_string())
            .arg("--status-file")
            .arg(&self.status_file)
            .arg("--pin-root")
            .arg(PIN_ROOT);
        if let Some(s) = &self.options.segment_interval {
            cmd.arg("--segment-interval").arg(s);
        }
        for (name, dev) in &self.volumes {
            cmd.arg("--volume").arg(format!("{name}={dev}"));
        }
        cmd.args(&self.options.extra);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", agent_bin().display())));
    }

    /// Waits until `cbtctl status --json` lists every volume.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let ctl = Cbtctl { timeout: Duration::from_secs(10), ..self.ctl() };
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("the agent exited ({st}) before it was ready; last status: {last}\n{}", self.log_tail(60));
            }
            if self.csi_socket.exists() && self.admin_socket.exists() {
                match ctl.status() {
                    Ok(v) => {
                        let names: Vec<&str> = v["volumes"].as_array().map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect()).unwrap_or_default();
                        if self.volumes.iter().all(|(n, _)| names.contains(&n.as_str())) {
                            return;
                        }
                        last = format!("volumes {names:?}");
                    }
                    Err(e) => last = e,
                }
            }
            assert!(Instant::now() < deadline, "the agent was not ready within {timeout:?}; last status: {last}\n{}", self.log_tail(60));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("the agent is not running").id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.take().unwrap().wait();
    }

    /// SIGTERM and wait (at most 30 s) for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the agent did not exit within 30 s of SIGTERM\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigstop(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn sigcont(&mut self) {
        self.signal(libc::SIGCONT);
    }

    /// `cbt-agent release`: detaches what the agent pinned (it must not be
    /// running); the next start is a new capture.
    pub fn release(&self) {
        if let Err(e) = self.try_release() {
            panic!("{e}");
        }
    }

    fn try_release(&self) -> Result<(), String> {
        let out = Command::new(agent_bin())
            .args(["release", "--pin-root", PIN_ROOT, "--state-dir"])
            .arg(&self.state_dir)
            .output()
            .map_err(|e| format!("running cbt-agent release: {e}"))?;
        if !out.status.success() {
            return Err(format!("cbt-agent release failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// Starts it again on the same state dir and waits until ready.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let v: Vec<&str> = log.lines().collect();
        format!("--- last {} lines of {} ---\n{}", lines.min(v.len()), self.log_path.display(), v[v.len().saturating_sub(lines)..].join("\n"))
    }

    /// Running, answering status, and no panic in its log.
    pub fn assert_healthy(&mut self) {
        assert!(self.is_running(), "the agent is not running\n{}", self.log_tail(60));
        let log = self.log();
        assert!(!log.contains("panicked at"), "the agent panicked\n{}", self.log_tail(80));
        if let Err(e) = self.ctl().status() {
            panic!("status failed: {e}\n{}", self.log_tail(40));
        }
    }

    /// The largest regular file under the state dir.
    pub fn largest_state_file(&self) -> Option<(PathBuf, u64)> {
        fn walk(d: &Path, best: &mut Option<(PathBuf, u64)>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    walk(&e.path(), best);
                } else if m.is_file() && best.as_ref().is_none_or(|(_, l)| m.len() > *l) {
                    *best = Some((e.path(), m.len()));
                }
            }
        }
        let mut best = None;
        walk(&self.state_dir, &mut best);
        best
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Its programs stay attached otherwise, costing every later test.
        if let Err(e) = self.try_release() {
            eprintln!("{e}");
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(80));
            eprintln!("agent directory kept for inspection: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Agent,
    Oracle,
    OracleLossy,
}

pub fn mode() -> Mode {
    match std::env::var("CBT_ACCURACY_BACKEND").as_deref() {
        Ok("oracle") => Mode::Oracle,
        Ok("oracle-lossy") => Mode::OracleLossy,
        Ok("agent") | Err(_) => Mode::Agent,
        Ok(other) => panic!("CBT_ACCURACY_BACKEND={other}: expected agent, oracle or oracle-lossy"),
    }
}

/// A snapshot: its handle and its image.
pub struct Snap {
    pub handle: String,
    pub volume: String,
    pub image: Image,
    /// The cut id `snapshot begin` printed (empty for the oracle).
    pub cut: String,
    pub taken: Instant,
}

/// What the tests talk to: the agent through `cbtctl`, or the oracle.
pub struct Cbt {
    pub mode: Mode,
    pub agent: Option<Agent>,
    deleted: Mutex<HashSet<String>>,
}

impl Cbt {
    /// Starts the agent (or the oracle) for these volumes.
    pub fn start(volumes: &[&Volume]) -> Self {
        Self::start_with(volumes, AgentOptions::default())
    }

    pub fn start_with(volumes: &[&Volume], options: AgentOptions) -> Self {
        let mode = mode();
        let agent = (mode == Mode::Agent).then(|| Agent::start_with(volumes, options));
        Self { mode, agent, deleted: Mutex::new(HashSet::new()) }
    }

    pub fn is_agent(&self) -> bool {
        self.agent.is_some()
    }

    pub fn ctl(&self) -> Option<Cbtctl> {
        self.agent.as_ref().map(|a| a.ctl())
    }

    /// The agent, for fault injection; `None` with the oracle.
    pub fn agent_mut(&mut self) -> Option<&mut Agent> {
        self.agent.as_mut()
    }

    /// `snapshot begin`, the image, `snapshot commit`: the image is taken
    /// by `take` between the two calls.
    pub fn snapshot_with(&self, vol: &Volume, handle: &str, take: impl FnOnce() -> Image) -> Snap {
        let cut = self.ctl().map(|c| c.begin(&vol.name)).unwrap_or_default();
        let image = take();
        if let Some(c) = self.ctl() {
            c.commit(&vol.name, handle);
        }
        Snap { handle: handle.to_string(), volume: vol.name.clone(), image, cut, taken: Instant::now() }
    }

    /// A snapshot whose image is a reflink clone of the volume.
    pub fn snapshot(&self, vol: &Volume, handle: &str) -> Snap {
        self.snapshot_with(vol, handle, || snapshot_reflink(vol, handle))
    }

    fn oracle_delta(&self, base: &Snap, target: &Snap, starting_offset: u64) -> Answer {
        let deleted = self.deleted.lock().unwrap();
        if deleted.contains(&base.handle) || deleted.contains(&target.handle) || base.volume != target.volume {
            return Answer::NotFound(CtlOut { cmdline: "oracle".into(), code: 4, stdout: String::new(), stderr: String::new() });
        }
        let mut set = changed_chunks(&base.image.path, &target.image.path, REPORT_BLOCK);
        self.oracle_shape(&mut set, starting_offset);
        Answer::List(Ranges::from_chunks(&set, REPORT_BLOCK, target.image.len))
    }

    fn oracle_shape(&self, set: &mut roaring::RoaringTreemap, starting_offset: u64) {
        set.remove_range(..starting_offset / REPORT_BLOCK);
        if self.mode == Mode::OracleLossy {
            if let Some(first) = set.min() {
                set.remove(first);
            }
        }
    }

    pub fn delta(&self, base: &Snap, target: &Snap) -> Answer {
        self.delta_from(base, target, None)
    }

    /// `delta --starting-offset N` (the answer must cover everything that
    /// changed at or after N).
    pub fn delta_from(&self, base: &Snap, target: &Snap, starting_offset: Option<u64>) -> Answer {
        match self.ctl() {
            Some(c) => {
                let s = starting_offset.map(|o| o.to_string());
                let extra: Vec<&str> = s.as_deref().map(|s| vec!["--starting-offset", s]).unwrap_or_default();
                c.delta(&base.handle, &target.handle, &extra)
            }
            None => self.oracle_delta(base, target, starting_offset.unwrap_or(0)),
        }
    }

    /// A delta read page by page (`--max-results N`), each next page from
    /// the end of the last range, until a page adds nothing: works whether
    /// cbtctl prints one page or the whole stream.
    pub fn delta_paged(&self, base: &Snap, target: &Snap, max_results: u64) -> Answer {
        let Some(c) = self.ctl() else { return self.oracle_delta(base, target, 0) };
        let mut all: Option<Ranges> = None;
        let mut from = 0u64;
        for _ in 0..100_000 {
            let (m, s) = (max_results.to_string(), from.to_string());
            match c.delta(&base.handle, &target.handle, &["--max-results", &m, "--starting-offset", &s]) {
                Answer::List(page) => {
                    if let Err(e) = page.validate(page.capacity) {
                        panic!("delta {} → {} page from {from}: malformed: {e}", base.handle, target.handle);
                    }
                    if let Some(&(o, l)) = page.list.first() {
                        assert!(o + l > from, "delta page from {from} starts with a tuple ending at {}", o + l);
                    }
                    let end = page.list.iter().map(|&(o, l)| o + l).max().unwrap_or(0);
                    let acc = all.get_or_insert_with(|| Ranges { list: Vec::new(), ..page.clone() });
                    acc.list.extend(page.list.iter().copied());
                    if page.list.is_empty() || end <= from {
                        // Pages may touch or (rounded down) overlap: merge.
                        acc.list = acc.merged().into_iter().map(|(s, e)| (s, e - s)).collect();
                        return Answer::List(acc.clone());
                    }
                    from = end;
                }
                other => return other,
            }
        }
        panic!("paging through the delta did not end");
    }

    pub fn allocated(&self, snap: &Snap) -> Answer {
        match self.ctl() {
            Some(c) => c.allocated(&snap.handle, &[]),
            None => {
                let mut set = super::truth::nonzero_chunks(&snap.image.path, REPORT_BLOCK);
                self.oracle_shape(&mut set, 0);
                Answer::List(Ranges::from_chunks(&set, REPORT_BLOCK, snap.image.len))
            }
        }
    }

    /// A delta by raw handles (e.g. unknown ones); the oracle knows none.
    pub fn delta_handles(&self, base: &str, target: &str) -> Answer {
        match self.ctl() {
            Some(c) => c.delta(base, target, &[]),
            None => Answer::NotFound(CtlOut { cmdline: "oracle".into(), code: 4, stdout: String::new(), stderr: String::new() }),
        }
    }

    pub fn delete(&self, snap: &Snap) {
        if let Some(c) = self.ctl() {
            let out = c.delete(&snap.handle);
            assert_eq!(out.code, 0, "{out}");
        }
        self.deleted.lock().unwrap().insert(snap.handle.clone());
    }

    /// `cbtctl copy BASE TARGET --from TARGET_IMAGE --onto OUTPUT` (the
    /// oracle applies its own answer).
    pub fn copy(&self, base: &Snap, target: &Snap, onto: &Path) {
        match self.ctl() {
            Some(c) => {
                let out = c.copy(&base.handle, &target.handle, &target.image.path, onto);
                assert_eq!(out.code, 0, "copy {} → {} onto {}: {out}", base.handle, target.handle, onto.display());
            }
            None => match self.oracle_delta(base, target, 0) {
                Answer::List(r) => apply_ranges(&r, &target.image.path, onto),
                other => panic!("oracle copy: {other}"),
            },
        }
    }

    /// At the end of a test: the agent is still up and never panicked.
    pub fn assert_healthy(&mut self) {
        if let Some(a) = self.agent.as_mut() {
            a.assert_healthy();
        }
    }
}

/// What a pair may answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A list, and it must be a superset.
    List,
    /// A superset list or FAILED_PRECONDITION.
    ListOrFallback,
    /// A superset list, FAILED_PRECONDITION or NOT_FOUND (state lost).
    ListOrFallbackOrNotFound,
}

/// How a pair answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Listed(u64, u64),
    FellBack,
    NotFound,
}

/// Checks one pair: computes the truth from the images, asks the delta,
/// asserts it is a superset (or an allowed refusal), optionally restores
/// base + `cbtctl copy` and compares with the target byte for byte, and
/// adds the figures to `log`.
pub fn check_pair(cbt: &Cbt, base: &Snap, target: &Snap, expect: Expect, restore: bool, log: &mut AccuracyLog) -> Outcome {
    let what = format!("{}: delta {} → {}", log.workload, base.handle, target.handle);
    let truth = Truth::between(&base.image.path, &target.image.path);
    let answer = cbt.delta(base, target);
    check_answer(&what, answer, &truth, expect, log, || {
        if restore {
            restore_and_compare(cbt, base, target);
        }
    })
}

/// The judgement part of [`check_pair`], for any answer and truth.
pub fn check_answer(what: &str, answer: Answer, truth: &Truth, expect: Expect, log: &mut AccuracyLog, then: impl FnOnce()) -> Outcome {
    match answer {
        Answer::List(r) => {
            let cov: Coverage = assert_delta_superset(what, &r, truth);
            then();
            log.add(cov);
            eprintln!(
                "{what}: superset: {} bytes reported for {} truly changed ({} sectors)",
                cov.reported_bytes,
                cov.true_bytes,
                truth.sectors.len()
            );
            Outcome::Listed(cov.reported_bytes, cov.true_bytes)
        }
        Answer::FailedPrecondition(o) if expect != Expect::List => {
            log.fallbacks += 1;
            eprintln!("{what}: FAILED_PRECONDITION (allowed here): {}", o.stderr.trim());
            Outcome::FellBack
        }
        Answer::NotFound(o) if expect == Expect::ListOrFallbackOrNotFound => {
            eprintln!("{what}: NOT_FOUND (allowed here): {}", o.stderr.trim());
            Outcome::NotFound
        }
        other => panic!("{what}: expected {expect:?}, got {other}"),
    }
}

/// Restores base + delta onto a copy of the base image with `cbtctl copy`
/// and compares it with the target image byte for byte.
pub fn restore_and_compare(cbt: &Cbt, base: &Snap, target: &Snap) {
    let dir = target.image.path.parent().expect("image dir");
    let out = Image { len: 0, path: dir.join(unique_name("restore.img")) };
    copy_file(&base.image.path, &out.path);
    cbt.copy(base, target, &out.path);
    assert_files_equal(&format!("restore {} + copy({} → {})", base.handle, base.handle, target.handle), &out.path, &target.image.path);
}

/// Checks `allocated(snap)` ⊇ the image's non-zero sectors; FAILED_PRECONDITION
/// is allowed only if `fallback_ok`. Returns whether it answered a list.
pub fn check_allocated(cbt: &Cbt, snap: &Snap, fallback_ok: bool, log: &mut AccuracyLog) -> bool {
    let what = format!("{}: allocated {}", log.workload, snap.handle);
    let truth = Truth::nonzero(&snap.image.path);
    let expect = if fallback_ok { Expect::ListOrFallback } else { Expect::List };
    matches!(check_answer(&what, cbt.allocated(snap), &truth, expect, log, || {}), Outcome::Listed(..))
}

/// The pairs to check among `n` snapshots: every consecutive one, first to
/// last, and a few random non-consecutive ones.
pub fn pairs(n: usize, rng: &mut super::workload::Rng) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = (1..n).map(|i| (i - 1, i)).collect();
    if n > 2 {
        v.push((0, n - 1));
        for _ in 0..3 {
            let a = rng.range(0, n as u64 - 2) as usize;
            let b = rng.range(a as u64 + 2, n as u64) as usize;
            if !v.contains(&(a, b)) {
                v.push((a, b));
            }
        }
    }
    v
}

/// Opens a file for reading (helper for tests).
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap_or_else(|e| panic!("{} at {offset}: {e}", path.display()));
    buf
}
