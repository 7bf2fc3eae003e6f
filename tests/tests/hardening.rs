//! The real agent and `cbtctl` at their edges, as a careless operator or a
//! hostile client meets them: sockets the agent cannot own, names that
//! would look like other names, huge names, and a closed stdout.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use cbt_tests::{
    accuracy::{agent_bin, cbtctl_bin, run_with_timeout, unique_name, Agent, CtlOut},
    require_root,
};

/// A directory only root can write, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/{}", unique_name(tag)));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cbt-agent run` with no volume and nothing pinned (a run that wrongly
/// gets as far as capturing leaves nothing behind); at most 60 s.
fn run_agent(dir: &Path, csi: &Path, admin: &Path) -> CtlOut {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--csi-socket")
        .arg(csi)
        .arg("--admin-socket")
        .arg(admin)
        .arg("--no-pin")
        .env("RUST_LOG", "info");
    run_with_timeout(&mut cmd, Duration::from_secs(60))
}

/// A socket the agent cannot own used to leave it running without that
/// service: it logged "serving", passed its liveness check and reported the
/// bind error only at shutdown, with exit 0. Now it stops at once, non-zero,
/// naming the socket, before it captures or says it serves.
#[test]
fn an_agent_that_cannot_own_its_sockets_fails_at_start() {
    require_root();
    let dir = Dir::new("sockets");
    type Setup = fn(&Path) -> (PathBuf, PathBuf, Option<std::os::unix::net::UnixListener>);
    let cases: [(&str, Setup, &str); 4] = [
        (
            "the CSI socket path is a regular file",
            |d| {
                std::fs::write(d.join("csi.sock"), b"precious").unwrap();
                (d.join("csi.sock"), d.join("admin.sock"), None)
            },
            "exists and is not a socket",
        ),
        (
            "another process serves the admin socket",
            |d| {
                let live = std::os::unix::net::UnixListener::bind(d.join("admin.sock")).unwrap();
                (d.join("csi.sock"), d.join("admin.sock"), Some(live))
            },
            "another process is serving on this socket",
        ),
        (
            "the CSI socket's directory is writable by others",
            |d| {
                let shared = d.join("shared");
                std::fs::create_dir(&shared).unwrap();
                std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
                (shared.join("csi.sock"), d.join("admin.sock"), None)
            },
            "writable by group or others",
        ),
        (
            "the admin socket's directory belongs to another user",
            |d| {
                let foreign = d.join("foreign");
                std::fs::create_dir(&foreign).unwrap();
                std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
                (d.join("csi.sock"), foreign.join("admin.sock"), None)
            },
            "belongs to uid 65534",
        ),
    ];
    for (i, (what, setup, expected)) in cases.into_iter().enumerate() {
        let case = dir.0.join(format!("case-{i}"));
        std::fs::create_dir(&case).unwrap();
        let (csi, admin, live) = setup(&case);
        let out = run_agent(&case, &csi, &admin);
        assert!(out.code != 0 && out.code != -1, "{what}: {out}");
        assert!(out.stderr.contains(expected), "{what}: {out}");
        for too_far in ["stop with SIGINT", "change log loaded", "capture running"] {
            assert!(!out.stderr.contains(too_far), "{what}: got as far as {too_far:?}: {out}");
        }
        if let Ok(text) = std::fs::read(case.join("csi.sock")) {
            assert_eq!(text, b"precious", "{what}: the file is left as it was");
        }
        if live.is_some() {
            assert!(case.join("admin.sock").exists(), "{what}: the live socket stays");
            assert!(!case.join("csi.sock").exists(), "{what}: the socket bound first is removed");
        }
    }
}

/// Runs `cbtctl` with its stdout already closed by its reader.
fn cbtctl_into_closed_pipe(agent: &Agent, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(cbtctl_bin())
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .arg("--csi-socket")
        .arg(&agent.csi_socket)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(writer)
        .output()
        .unwrap()
}

/// The Python with grpcio `cargo xtask setup` installs (see
/// agent/tests/service.rs), calling the admin API without cbtctl, which
/// bounds what it prints by itself.
fn grpcio_admin(socket: &Path, calls: &[&str]) -> Vec<serde_json::Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("CBT_GRPCIO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/grpcio-venv/bin/python"));
    assert!(python.exists(), "{} not found: `cargo xtask setup` installs grpcio there", python.display());
    let mut cmd = Command::new(python);
    cmd.arg(root.join("agent/tests/grpcio_client.py")).arg(socket).args(calls);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");
    out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// `cbtctl snapshot list | head` and `cbtctl status | head` panicked on the
/// closed pipe (println! on EPIPE). Handles that look like other handles
/// (bidi overrides, zero-width characters) were accepted, and a huge
/// volume name came back whole in the admin API's error.
#[test]
fn the_admin_api_and_cbtctl_at_their_edges() {
    require_root();
    let agent = Agent::start(&[]);

    for args in [&["snapshot", "list"][..], &["snapshot", "list", "--json"], &["status"], &["status", "--json"]] {
        let out = cbtctl_into_closed_pipe(&agent, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }

    let ctl = agent.ctl();
    for (handle, shown) in [
        ("snap-\u{202E}1-pans", "U+202E"),
        ("snap\u{200B}-1", "U+200B"),
        ("snap-1\u{2066}", "U+2066"),
        ("\u{FEFF}snap-1", "U+FEFF"),
    ] {
        let out = ctl.run(&["snapshot", "delete", handle]);
        assert_eq!(out.code, 1, "{out}");
        assert!(out.stderr.contains("InvalidArgument") && out.stderr.contains(shown), "{out}");
        assert!(out.stderr.is_ascii(), "the handle is shown escaped: {out}");
        let raw = grpcio_admin(&agent.admin_socket, &["admin-delete", handle]);
        assert_eq!(raw[0]["error"], "INVALID_ARGUMENT", "{}", raw[0]);
    }

    let raw = grpcio_admin(&agent.admin_socket, &["admin-begin", "@65536", "admin-begin", "@1048576"]);
    for r in &raw {
        assert_eq!(r["error"], "NOT_FOUND", "{r}");
        assert!(r["details_bytes"].as_u64().unwrap() < 300, "{r}");
    }
    assert_eq!(raw.len(), 2);
    drop(agent);
}
