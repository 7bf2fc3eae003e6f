//! The external-snapshot-metadata sidecar in front of the agent's CSI
//! socket, deployed the way `deploy/snapshot-metadata.yaml` tells an
//! operator to: that file's ServiceAccount, ClusterRole, binding, Service
//! and SnapshotMetadataService CR are applied as they are, with only the
//! CR's name (the driver), address (here 127.0.0.1:PORT instead of the
//! Service) and CA filled in. The sidecar runs with a token of that
//! ServiceAccount, so the role is exactly what it gets.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{free_ports, http_status, peer_file, Cluster, Peer};
use crate::sh;

/// Where the deploy files are.
pub fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name)
}

/// The ServiceAccount and namespace in `deploy/snapshot-metadata.yaml`.
pub const NAMESPACE: &str = "cbt-system";
pub const SERVICE_ACCOUNT: &str = "cbt-snapshot-metadata";

/// Replaces `from` (which must occur) in `text`.
pub fn fill(text: &str, from: &str, to: &str, file: &str) -> String {
    assert!(text.contains(from), "{file} no longer contains {from:?}: update the interop fixture");
    text.replace(from, to)
}

pub struct Sidecar {
    /// Its TLS gRPC port (the CR's address).
    pub port: u16,
    /// `--http-endpoint` (/health, /metrics).
    pub http_port: u16,
    pub driver: String,
    dir: PathBuf,
    csi_socket: PathBuf,
    kubeconfig: PathBuf,
    peer: Option<Peer>,
}

impl Sidecar {
    /// Makes a CA and a serving certificate for 127.0.0.1, applies
    /// `deploy/snapshot-metadata.yaml`, starts the sidecar on the agent's
    /// CSI socket and waits until it is serving (it has then called
    /// GetPluginInfo, Probe and GetPluginCapabilities).
    pub fn deploy(cluster: &Cluster, dir: &Path, csi_socket: &Path, driver: &str) -> Self {
        let dir = dir.join("sidecar");
        std::fs::create_dir_all(&dir).expect("sidecar dir");
        let d = dir.display();
        sh(&format!(
            "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=cbt-interop-ca 2>/dev/null \
             && openssl req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj /CN={SERVICE_ACCOUNT} 2>/dev/null \
             && printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > tls.ext \
             && openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 1 -extfile tls.ext 2>/dev/null"
        ));
        let ca = sh(&format!("base64 -w0 {d}/ca.crt"));
        let [port, http_port] = free_ports();

        cluster.kubectl_ok(&["create", "namespace", NAMESPACE]);
        let file = "deploy/snapshot-metadata.yaml";
        let yaml = std::fs::read_to_string(deploy_file("snapshot-metadata.yaml")).expect("reading deploy/snapshot-metadata.yaml");
        let yaml = fill(&yaml, "name: hostpath.csi.k8s.io # = the driver name", &format!("name: {driver}"), file);
        let yaml = fill(&yaml, "address: cbt-snapshot-metadata.cbt-system:6443", &format!("address: 127.0.0.1:{port}"), file);
        let yaml = fill(&yaml, "caCert: REPLACE_WITH_BASE64_PEM_CA", &format!("caCert: {}", ca.trim()), file);
        cluster.apply(&yaml);

        let kubeconfig = dir.join("sidecar.kubeconfig");
        cluster.kubeconfig_for(NAMESPACE, SERVICE_ACCOUNT, &kubeconfig);
        let mut s = Self {
            port,
            http_port,
            driver: driver.to_string(),
            dir,
            csi_socket: csi_socket.to_path_buf(),
            kubeconfig,
            peer: None,
        };
        s.start();
        s
    }

    /// Starts the sidecar and waits until /health answers 200.
    pub fn start(&mut self) {
        assert!(self.peer.is_none(), "the sidecar is already running");
        let mut cmd = Command::new(peer_file("csi-snapshot-metadata"));
        cmd.arg(format!("--csi-address={}", self.csi_socket.display()))
            .arg(format!("--tls-cert={}", self.dir.join("tls.crt").display()))
            .arg(format!("--tls-key={}", self.dir.join("tls.key").display()))
            .arg(format!("--port={}", self.port))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--http-endpoint=127.0.0.1:{}", self.http_port))
            .arg("--v=4");
        let mut peer = Peer::spawn("csi-snapshot-metadata", cmd, self.dir.join("sidecar.log"));
        let http = self.http_port;
        peer.wait_for("a healthy /health", Duration::from_secs(60), || http_status(http, "/health") == Some(200));
        self.peer = Some(peer);
    }

    /// Stops it (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.peer.take() {
            p.stop();
        }
    }

    /// Its container restarting. The sidecar exits when its connection to
    /// the CSI socket breaks (an agent restart), on its next request.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    pub fn is_running(&mut self) -> bool {
        self.peer.as_mut().is_some_and(|p| p.is_running())
    }

    pub fn log(&self) -> String {
        self.peer.as_ref().map(|p| std::fs::read_to_string(&p.log).unwrap_or_default()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.peer.as_ref().map(|p| p.log_tail(lines)).unwrap_or_default()
    }
}
