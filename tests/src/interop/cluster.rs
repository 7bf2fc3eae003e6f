//! A real Kubernetes control plane, as small as the sidecar allows: etcd and
//! kube-apiserver on loopback ports, authorization by RBAC, a signing key
//! for service-account tokens (TokenRequest, TokenReview), an admin token,
//! no controllers (nothing here needs them: the test binds snapshots
//! itself). `kubectl` (built with the apiserver) does everything else.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use super::{free_ports, peer_file, write_file, Peer};
use crate::{
    accuracy::{run_with_timeout, CtlOut},
    sh,
};

/// The admin's static token (`--token-auth-file`, group system:masters).
const ADMIN_TOKEN: &str = "cbt-interop-admin";

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub admin_kubeconfig: PathBuf,
    /// The apiserver's self-signed serving certificate (and its CA).
    pub ca: PathBuf,
    // Dropped in this order: the apiserver before its etcd.
    apiserver: Peer,
    etcd: Peer,
    applied: AtomicU64,
}

impl Cluster {
    /// Starts etcd and kube-apiserver in `dir` and waits for /readyz.
    pub fn start(dir: &Path) -> Self {
        let dir = dir.join("cluster");
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let [client_port, peer_port, port] = free_ports();

        let mut etcd_cmd = Command::new(peer_file("etcd"));
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        etcd_cmd
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut etcd = Peer::spawn("etcd", etcd_cmd, dir.join("etcd.log"));
        etcd.wait_for("its client port", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", client_port)).is_ok());

        let key = dir.join("sa.key");
        let public = dir.join("sa.pub");
        sh(&format!("openssl genrsa -out {} 2048 2>/dev/null && openssl rsa -in {} -pubout -out {} 2>/dev/null", key.display(), key.display(), public.display()));
        let tokens = dir.join("tokens.csv");
        write_file(&tokens, &format!("{ADMIN_TOKEN},cbt-interop-admin,cbt-interop-admin,system:masters\n"));
        let certs = dir.join("certs");
        let mut api_cmd = Command::new(peer_file("kube-apiserver"));
        api_cmd
            .arg(format!("--etcd-servers={client_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", certs.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", public.display()))
            .arg(format!("--service-account-signing-key-file={}", key.display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // The "kubernetes" Service's endpoints would be 127.0.0.1,
            // which Endpoints reject: nothing here needs them.
            .arg("--endpoint-reconciler-type=none")
            .arg("--v=1");
        let apiserver = Peer::spawn("kube-apiserver", api_cmd, dir.join("kube-apiserver.log"));

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        let ca = certs.join("apiserver.crt");
        let mut cluster = Self { dir, port, admin_kubeconfig, ca, apiserver, etcd, applied: AtomicU64::new(0) };
        cluster.write_kubeconfig(&cluster.admin_kubeconfig, ADMIN_TOKEN);
        let probe = cluster.kubectl_cmd(&cluster.admin_kubeconfig);
        cluster.apiserver.wait_for("/readyz ok", Duration::from_secs(120), || {
            let mut cmd = probe.clone_cmd();
            cmd.args(["get", "--raw", "/readyz"]);
            cmd.output().is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "ok")
        });
        assert!(cluster.etcd.is_running(), "etcd exited\n{}", cluster.etcd.log_tail(40));
        cluster
    }

    /// A kubeconfig for `token`, verifying the apiserver's certificate.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        write_file(
            path,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: interop\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\n\
                 users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: interop\n  context: {{cluster: interop, user: user}}\n\
                 current-context: interop\n",
                self.port,
                self.ca.display()
            ),
        );
    }

    fn kubectl_cmd(&self, kubeconfig: &Path) -> KubectlCmd {
        KubectlCmd { kubeconfig: kubeconfig.to_path_buf(), cache: self.dir.join("kube-cache") }
    }

    /// `kubectl ARGS` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> CtlOut {
        let mut cmd = self.kubectl_cmd(&self.admin_kubeconfig).clone_cmd();
        cmd.args(args);
        run_with_timeout(&mut cmd, Duration::from_secs(120))
    }

    /// `kubectl ARGS` as the admin; must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert_eq!(out.code, 0, "{out}\n{}", self.apiserver.log_tail(20));
        out.stdout
    }

    /// `kubectl apply` of a YAML text (kept in the cluster dir).
    pub fn apply(&self, yaml: &str) {
        let n = self.applied.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("apply-{n}.yaml"));
        write_file(&path, yaml);
        self.kubectl_ok(&["apply", "-f", &path.display().to_string()]);
    }

    /// The VolumeSnapshot, VolumeSnapshotContent and VolumeSnapshotClass
    /// CRDs (external-snapshotter) and SnapshotMetadataService
    /// (external-snapshot-metadata), from the Go modules the peers were
    /// built from; waits until they are served.
    pub fn install_crds(&self) {
        let mut args = vec!["apply".to_string()];
        for f in [
            "snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
            "snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
            "snapshot.storage.k8s.io_volumesnapshots.yaml",
            "cbt.storage.k8s.io_snapshotmetadataservices.yaml",
        ] {
            args.push("-f".into());
            args.push(peer_file(&format!("crds/{f}")).display().to_string());
        }
        self.kubectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        self.kubectl_ok(&["wait", "--for=condition=established", "--timeout=60s", "crd", "--all"]);
    }

    /// A token for a ServiceAccount (TokenRequest), for its kubeconfig.
    pub fn token(&self, namespace: &str, service_account: &str) -> String {
        self.kubectl_ok(&["create", "token", "-n", namespace, service_account, "--duration=2h"]).trim().to_string()
    }

    /// A kubeconfig acting as `namespace/service_account`.
    pub fn kubeconfig_for(&self, namespace: &str, service_account: &str, path: &Path) {
        let token = self.token(namespace, service_account);
        self.write_kubeconfig(path, &token);
    }

    /// A default VolumeSnapshotClass for `driver` (the sidecar loads it).
    pub fn add_snapshot_class(&self, name: &str, driver: &str) {
        self.apply(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata:\n  name: {name}\n  annotations:\n    \
             snapshot.storage.kubernetes.io/is-default-class: \"true\"\ndriver: {driver}\ndeletionPolicy: Retain\n"
        ));
    }

    /// What the snapshot controller and the CSI snapshotter would have
    /// made for a snapshot the storage system took: a VolumeSnapshot bound
    /// to a VolumeSnapshotContent of `driver` whose `status.snapshotHandle`
    /// is `handle`, both ready to use (statuses written through the status
    /// subresource, as controllers do). The content names its handle in
    /// `spec.source.snapshotHandle`, as for a pre-provisioned snapshot.
    pub fn add_snapshot(&self, namespace: &str, name: &str, class: &str, driver: &str, handle: &str, size: u64) {
        let content = format!("snapcontent-{name}");
        self.apply(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotContent\nmetadata:\n  name: {content}\nspec:\n  driver: {driver}\n  \
             deletionPolicy: Retain\n  volumeSnapshotClassName: {class}\n  source:\n    snapshotHandle: {handle}\n  volumeSnapshotRef:\n    \
             name: {name}\n    namespace: {namespace}\n---\napiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  \
             name: {name}\n  namespace: {namespace}\nspec:\n  volumeSnapshotClassName: {class}\n  source:\n    volumeSnapshotContentName: {content}\n"
        ));
        let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let content_status = format!(
            r#"{{"status":{{"snapshotHandle":"{handle}","readyToUse":true,"restoreSize":{size},"creationTime":{now_ns}}}}}"#
        );
        self.kubectl_ok(&["patch", "volumesnapshotcontent", &content, "--subresource=status", "--type=merge", "-p", &content_status]);
        let snapshot_status = format!(r#"{{"status":{{"boundVolumeSnapshotContentName":"{content}","readyToUse":true,"restoreSize":"{size}"}}}}"#);
        self.kubectl_ok(&["patch", "volumesnapshot", "-n", namespace, name, "--subresource=status", "--type=merge", "-p", &snapshot_status]);
    }

    /// The apiserver's log tail (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        self.apiserver.log_tail(lines)
    }
}

/// `kubectl` with a kubeconfig and a discovery cache of this cluster's own.
struct KubectlCmd {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl KubectlCmd {
    fn clone_cmd(&self) -> Command {
        let mut cmd = Command::new(peer_file("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display())).arg(format!("--cache-dir={}", self.cache.display()));
        cmd
    }
}
