//! Fixtures for the interoperability tests (`tests/tests/interop.rs`): the
//! agent's CSI service against the real upstream peers, built from Go by
//! `cargo xtask test` (or `cargo xtask interop-peers`) into
//! `$CBT_INTEROP_BIN_DIR` (default `<workspace>/target/interop-peers/`):
//!
//! - [`cluster`]: etcd and a kube-apiserver (RBAC, service-account tokens)
//!   on loopback ports, the snapshot and SnapshotMetadataService CRDs,
//!   VolumeSnapshots bound to contents whose handles the agent knows;
//! - [`sidecar`]: the external-snapshot-metadata sidecar in front of the
//!   agent's CSI socket, deployed with `deploy/snapshot-metadata.yaml`;
//! - [`client`]: a backup client (its own ServiceAccount and the RBAC of
//!   `deploy/backup-client.yaml`) running the snapshot-metadata-lister and
//!   snapshot-metadata-verifier, and the lister's JSON parsed.
//!
//! Every process is a [`Peer`]: its output goes to a log file, it dies with
//! the test process (parent-death signal) and is stopped on drop; a failing
//! test prints the tail of every peer's log. A missing binary FAILS the test.

pub mod client;
pub mod cluster;
pub mod sidecar;

use std::{
    collections::BTreeSet,
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

pub use client::{Base, BackupClient, Listing};
pub use cluster::Cluster;
pub use sidecar::Sidecar;

use crate::accuracy::{attach_loop, copy_file, detach_loop, snapshot_reflink, unique_name, Agent, Image, ScratchFs, Volume};

/// The VolumeSnapshotClass the tests' snapshots name (the driver's default).
pub const SNAPSHOT_CLASS: &str = "cbt-interop";
/// The backup client's namespace (its VolumeSnapshots live there).
pub const BACKUP_NAMESPACE: &str = "backup";

/// Everything in front of the agent: a cluster with the CRDs and a
/// snapshot class for the driver, the sidecar on the agent's CSI socket,
/// and a backup client. Dropped in field order: processes, then the
/// directory.
pub struct Stack {
    pub client: BackupClient,
    pub sidecar: Sidecar,
    pub cluster: Cluster,
    pub work: WorkDir,
}

impl Stack {
    pub fn up(tag: &str, agent: &Agent) -> Self {
        let work = WorkDir::new(tag);
        let cluster = Cluster::start(&work.path);
        cluster.install_crds();
        cluster.add_snapshot_class(SNAPSHOT_CLASS, &agent.driver_name);
        let sidecar = Sidecar::deploy(&cluster, &work.path, &agent.csi_socket, &agent.driver_name);
        let client = BackupClient::create(&cluster, &work.path, BACKUP_NAMESPACE);
        Self { client, sidecar, cluster, work }
    }

    /// A snapshot as the tests take it: `cbtctl snapshot begin`, a reflink
    /// image of the volume (the storage system's point-in-time snapshot),
    /// `cbtctl snapshot commit` with a CSI handle, then the VolumeSnapshot
    /// `name` bound to a content with that handle. The handle differs from
    /// the name: the sidecar must resolve one to the other.
    pub fn snapshot(&self, agent: &Agent, vol: &Volume, name: &str) -> Snapshot {
        let handle = format!("handle-{}", unique_name(name));
        let ctl = agent.ctl();
        ctl.begin(&vol.name);
        let image = snapshot_reflink(vol, name);
        ctl.commit(&vol.name, &handle);
        self.cluster.add_snapshot(&self.client.namespace, name, SNAPSHOT_CLASS, &agent.driver_name, &handle, vol.size);
        Snapshot { name: name.to_string(), handle, image }
    }
}

/// A VolumeSnapshot, its CSI handle and its image.
pub struct Snapshot {
    pub name: String,
    pub handle: String,
    pub image: Image,
}

/// A loop device over a file of its own in the scratch filesystem (a
/// snapshot restored, or an empty volume); detached and removed on drop.
pub struct ImageDevice {
    pub dev: String,
    pub file: PathBuf,
    attached: bool,
}

impl ImageDevice {
    /// A copy (reflink) of `image`, attached read-only if `read_only`.
    pub fn restore(fs: &ScratchFs, image: &Image, tag: &str, read_only: bool) -> Self {
        let file = fs.unique_path(tag);
        copy_file(&image.path, &file);
        let dev = attach_loop(&file, if read_only { "-r" } else { "" });
        Self { dev, file, attached: true }
    }

    /// An all-zero device of `size` bytes.
    pub fn empty(fs: &ScratchFs, size: u64, tag: &str) -> Self {
        let file = fs.unique_path(tag);
        File::create(&file).and_then(|f| f.set_len(size)).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let dev = attach_loop(&file, "");
        Self { dev, file, attached: true }
    }

    /// Detaches (flushing what was written through the device).
    pub fn detach(&mut self) {
        if self.attached {
            detach_loop(&self.dev);
            self.attached = false;
        }
    }
}

impl Drop for ImageDevice {
    fn drop(&mut self) {
        self.detach();
        let _ = std::fs::remove_file(&self.file);
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the peers were built.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CBT_INTEROP_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target/interop-peers"))
}

/// A file of [`bin_dir`]; fails the test if it is missing.
pub fn peer_file(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the interoperability peers with `cargo xtask interop-peers` \
         (`cargo xtask test` does) or point CBT_INTEROP_BIN_DIR at them",
        p.display()
    );
    p
}

/// Everything `cargo xtask interop-peers` builds or copies.
pub const PEER_FILES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kubectl",
    "csi-snapshot-metadata",
    "snapshot-metadata-lister",
    "snapshot-metadata-verifier",
    "csi-sanity",
    "VERSIONS",
    "crds/snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
    "crds/snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
    "crds/snapshot.storage.k8s.io_volumesnapshots.yaml",
    "crds/cbt.storage.k8s.io_snapshotmetadataservices.yaml",
];

/// Fails the test, naming every missing one, unless all peers are there.
pub fn require_peers() {
    let dir = bin_dir();
    let missing: Vec<&str> = PEER_FILES.iter().copied().filter(|f| !dir.join(f).exists()).collect();
    assert!(
        missing.is_empty(),
        "interoperability peers missing from {}: {}; build them with `cargo xtask interop-peers` \
         (`cargo xtask test` does) or point CBT_INTEROP_BIN_DIR at them",
        dir.display(),
        missing.join(", ")
    );
}

/// The module versions the peers were built from (`VERSIONS`, one line each).
pub fn versions() -> String {
    std::fs::read_to_string(peer_file("VERSIONS")).unwrap_or_default()
}

/// `N` distinct loopback TCP ports, free right now and never handed out
/// before in this process (tests running in parallel start their peers
/// a moment after choosing).
pub fn free_ports<const N: usize>() -> [u16; N] {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < N {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port");
        let port = l.local_addr().expect("local address").port();
        if handed_out.insert(port) {
            ports.push(port);
        }
        held.push(l);
    }
    std::array::from_fn(|i| ports[i])
}

/// A directory for one test's peers, certificates and logs: removed on
/// drop, kept (and named) when the test failed.
pub struct WorkDir {
    pub path: PathBuf,
}

impl WorkDir {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from(format!("/tmp/{}", unique_name(tag)));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("interop work directory kept for inspection: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A peer process, its stdout and stderr appended to a log file.
pub struct Peer {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Peer {
    /// Starts `cmd`; it gets SIGKILL if this thread's process dies first.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Self {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let _ = writeln!(f, "===== {cmd:?}");
        cmd.stdin(Stdio::null()).stdout(f.try_clone().expect("log fd")).stderr(f);
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Self { name: name.to_string(), log, child: Some(child) }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        format!("--- {}: last {} lines of {} ---\n{}", self.name, lines.min(v.len()), self.log.display(), v[v.len().saturating_sub(lines)..].join("\n"))
    }

    /// Polls `ready` until it holds; fails with the log's tail if the
    /// process exits first or `timeout` passes.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("{} exited ({status}) before {what}\n{}", self.name, self.log_tail(40));
            }
            assert!(Instant::now() < deadline, "{}: no {what} within {timeout:?}\n{}", self.name, self.log_tail(40));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; reaped.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(30));
        }
    }
}

/// The status code of `GET http://127.0.0.1:PORT/PATH`, if it answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = String::new();
    s.take(64).read_to_string(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Writes `text` to a new file.
pub fn write_file(path: &Path, text: &str) {
    File::create(path).and_then(|mut f| f.write_all(text.as_bytes())).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
