//! The real upstream peers of the interoperability tests
//! (`tests/tests/interop.rs`): built from the Go module in
//! `tests/interop/go/` (its go.mod and go.sum pin every version) into
//! `target/interop-peers/`, with the CRDs they need copied from the Go
//! module cache next to them. Go's build cache makes a rebuild with nothing
//! changed take about a second; a cold build (modules downloaded and
//! compiled) takes minutes (see the README's Interoperability section).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{root, run};

/// Where the binaries and CRDs go (`$CBT_INTEROP_BIN_DIR` for the tests).
pub fn peers_dir() -> PathBuf {
    root().join("target/interop-peers")
}

fn module_dir() -> PathBuf {
    root().join("tests/interop/go")
}

/// The packages built, each into a binary named after its last element.
const PACKAGES: &[&str] = &[
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kubectl",
    "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity",
    "./cmd/etcd",
    "./cmd/csi-snapshot-metadata",
    "./cmd/snapshot-metadata-lister",
    "./cmd/snapshot-metadata-verifier",
];

/// CRDs, by module and path inside it.
const CRDS: &[(&str, &str)] = &[
    ("github.com/kubernetes-csi/external-snapshotter/client/v8", "config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml"),
    ("github.com/kubernetes-csi/external-snapshotter/client/v8", "config/crd/snapshot.storage.k8s.io_volumesnapshotcontents.yaml"),
    ("github.com/kubernetes-csi/external-snapshotter/client/v8", "config/crd/snapshot.storage.k8s.io_volumesnapshots.yaml"),
    ("github.com/kubernetes-csi/external-snapshot-metadata/client", "config/crd/cbt.storage.k8s.io_snapshotmetadataservices.yaml"),
];

/// Modules whose versions are written to `VERSIONS` (and printed by the tests).
const REPORTED: &[&str] = &[
    "k8s.io/kubernetes",
    "go.etcd.io/etcd/server/v3",
    "github.com/kubernetes-csi/external-snapshot-metadata",
    "github.com/kubernetes-csi/external-snapshot-metadata/client",
    "github.com/kubernetes-csi/external-snapshotter/client/v8",
    "github.com/kubernetes-csi/csi-test/v5",
];

fn go_binary() -> Result<PathBuf> {
    for candidate in ["go", "/usr/local/go/bin/go"] {
        if Command::new(candidate).arg("version").output().is_ok_and(|o| o.status.success()) {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!("the interoperability tests need Go (1.26+) to build the upstream peers, and `go` was not found")
}

/// `go` in the peers' module: versions from go.mod/go.sum only (never
/// rewritten), this machine's toolchain (never a downloaded one), no VCS
/// stamping (the module is inside this repository's work tree).
fn go(go: &Path) -> Command {
    let mut cmd = Command::new(go);
    cmd.current_dir(module_dir()).env("GOFLAGS", "-mod=readonly -buildvcs=false").env("GOTOOLCHAIN", "local");
    cmd
}

fn go_output(go_bin: &Path, args: &[&str]) -> Result<String> {
    let out = go(go_bin).args(args).output().with_context(|| format!("running go {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("go {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds every peer into [`peers_dir`], copies the CRDs there and writes
/// `VERSIONS`.
pub fn build_peers() -> Result<()> {
    let go_bin = go_binary()?;
    let out = peers_dir();
    std::fs::create_dir_all(out.join("crds")).context("creating target/interop-peers")?;
    let started = Instant::now();
    let kubernetes = go_output(&go_bin, &["list", "-m", "-f", "{{.Version}}", "k8s.io/kubernetes"])?;
    let (major, minor) = {
        let mut parts = kubernetes.trim_start_matches('v').split('.');
        (parts.next().unwrap_or("1").to_string(), parts.next().unwrap_or("0").to_string())
    };
    // What `kube-apiserver --version` and `kubectl version` report (the
    // Kubernetes build scripts set these; a plain `go build` leaves
    // "v0.0.0-master", which kubectl refuses to parse).
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={kubernetes} -X k8s.io/component-base/version.gitMajor={major} \
         -X k8s.io/component-base/version.gitMinor={minor} -X k8s.io/component-base/version.gitTreeState=clean"
    );
    eprintln!("interop peers: building {} into {} (kubernetes {kubernetes})", PACKAGES.len(), out.display());
    run(go(&go_bin).args(["build", "-ldflags", &ldflags, "-o"]).arg(format!("{}/", out.display())).args(PACKAGES))
        .context("building the interoperability peers (tests/interop/go)")?;
    for (module, path) in CRDS {
        let dir = go_output(&go_bin, &["list", "-m", "-f", "{{.Dir}}", module])?;
        let src = Path::new(&dir).join(path);
        let dst = out.join("crds").join(Path::new(path).file_name().expect("a file name"));
        std::fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    }
    let mut args = vec!["list", "-m"];
    args.extend_from_slice(REPORTED);
    let versions = format!("{}\n{}\n", go_output(&go_bin, &["version"])?, go_output(&go_bin, &args)?);
    std::fs::write(out.join("VERSIONS"), versions).context("writing VERSIONS")?;
    eprintln!("interop peers: ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
