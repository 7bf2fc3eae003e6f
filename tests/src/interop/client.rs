//! A backup client: its own namespace and ServiceAccount with the RBAC of
//! `deploy/backup-client.yaml`, running the upstream
//! snapshot-metadata-lister and snapshot-metadata-verifier with a
//! kubeconfig of that ServiceAccount (so each creates its token for
//! itself, and the sidecar authorizes exactly that identity).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{peer_file, sidecar::deploy_file, sidecar::fill, Cluster};
use crate::accuracy::{run_with_timeout, CtlOut, Ranges};

pub const SERVICE_ACCOUNT: &str = "cbt-backup-client";

/// Which metadata to ask for.
#[derive(Clone, Copy, Debug)]
pub enum Base<'a> {
    /// GetMetadataAllocated of the snapshot.
    Allocated,
    /// GetMetadataDelta from an earlier VolumeSnapshot named here (`-p`).
    Name(&'a str),
    /// GetMetadataDelta from an earlier snapshot's CSI handle (`-P`).
    Handle(&'a str),
}

pub struct BackupClient {
    pub namespace: String,
    pub kubeconfig: PathBuf,
}

impl BackupClient {
    /// Creates the namespace, applies `deploy/backup-client.yaml` for it and
    /// writes a kubeconfig acting as its ServiceAccount.
    pub fn create(cluster: &Cluster, dir: &Path, namespace: &str) -> Self {
        cluster.kubectl_ok(&["create", "namespace", namespace]);
        let yaml = std::fs::read_to_string(deploy_file("backup-client.yaml")).expect("reading deploy/backup-client.yaml");
        cluster.apply(&fill(&yaml, "BACKUP_NAMESPACE", namespace, "deploy/backup-client.yaml"));
        let kubeconfig = dir.join(format!("backup-client-{namespace}.kubeconfig"));
        cluster.kubeconfig_for(namespace, SERVICE_ACCOUNT, &kubeconfig);
        Self { namespace: namespace.to_string(), kubeconfig }
    }

    fn tool(&self, name: &str, snapshot: &str, base: Base) -> Command {
        let mut cmd = Command::new(peer_file(name));
        cmd.arg("-kubeconfig").arg(&self.kubeconfig).args(["-n", &self.namespace, "-s", snapshot]);
        match base {
            Base::Allocated => {}
            Base::Name(n) => {
                cmd.args(["-p", n]);
            }
            Base::Handle(h) => {
                cmd.args(["-P", h]);
            }
        }
        cmd
    }

    /// `snapshot-metadata-lister -o json ...`, whatever its outcome.
    pub fn lister(&self, snapshot: &str, base: Base, extra: &[&str]) -> CtlOut {
        let mut cmd = self.tool("snapshot-metadata-lister", snapshot, base);
        cmd.args(["-o", "json"]).args(extra);
        run_with_timeout(&mut cmd, Duration::from_secs(120))
    }

    /// The lister's answer; fails the test unless it exits 0 with JSON.
    pub fn list(&self, snapshot: &str, base: Base, extra: &[&str]) -> Listing {
        let out = self.lister(snapshot, base, extra);
        assert_eq!(out.code, 0, "the lister failed: {out}");
        Listing::parse(&out.stdout).unwrap_or_else(|e| panic!("{out}: cannot parse the lister's JSON: {e}"))
    }

    /// `snapshot-metadata-verifier -src SOURCE -tgt TARGET ...`: copies the
    /// reported ranges from SOURCE onto TARGET, then compares them whole.
    pub fn verifier(&self, snapshot: &str, base: Base, source: &str, target: &str, extra: &[&str]) -> CtlOut {
        let mut cmd = self.tool("snapshot-metadata-verifier", snapshot, base);
        cmd.args(["-src", source, "-tgt", target]).args(extra);
        run_with_timeout(&mut cmd, Duration::from_secs(300))
    }
}

/// One message of the stream, as the lister prints it.
#[derive(Clone, Debug)]
pub struct Record {
    /// `BlockMetadataType` as a number (1 FIXED_LENGTH, 2 VARIABLE_LENGTH).
    pub metadata_type: i64,
    pub capacity: u64,
    pub tuples: Vec<(u64, u64)>,
}

/// The lister's `-o json` output: one entry per message received.
#[derive(Clone, Debug)]
pub struct Listing {
    pub records: Vec<Record>,
}

impl Listing {
    /// Parses `[{"block_metadata_type":2,"volume_capacity_bytes":N,
    /// "block_metadata":[{"byte_offset":N,"size_bytes":N},...]},...]`
    /// (Go's encoding of the protobuf messages: zero fields are omitted).
    pub fn parse(json: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(json.trim()).map_err(|e| format!("not JSON ({e}): {json:.400}"))?;
        let items = v.as_array().ok_or("not a JSON list")?;
        let mut records = Vec::new();
        for item in items {
            let metadata_type = item["block_metadata_type"].as_i64().unwrap_or(0);
            let capacity = item["volume_capacity_bytes"].as_u64().unwrap_or(0);
            let tuples = match &item["block_metadata"] {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(b) => b
                    .iter()
                    .map(|t| (t["byte_offset"].as_u64().unwrap_or(0), t["size_bytes"].as_u64().unwrap_or(0)))
                    .collect(),
                other => return Err(format!("block_metadata is not a list: {other:.200}")),
            };
            records.push(Record { metadata_type, capacity, tuples });
        }
        Ok(Self { records })
    }

    /// The whole stream as one answer. Every message must carry the same
    /// type and capacity (the spec's rule); an empty stream is a legal
    /// empty answer for a volume of `volume_len` bytes.
    pub fn ranges(&self, volume_len: u64) -> Result<Ranges, String> {
        let Some(first) = self.records.first() else {
            return Ok(Ranges { metadata_type: "VARIABLE_LENGTH".into(), capacity: volume_len, list: Vec::new() });
        };
        for (i, r) in self.records.iter().enumerate() {
            if r.metadata_type != first.metadata_type || r.capacity != first.capacity {
                return Err(format!("message {i} has type {} / capacity {}, the first {} / {}", r.metadata_type, r.capacity, first.metadata_type, first.capacity));
            }
        }
        let metadata_type = match first.metadata_type {
            1 => "FIXED_LENGTH".to_string(),
            2 => "VARIABLE_LENGTH".to_string(),
            n => format!("UNKNOWN({n})"),
        };
        Ok(Ranges { metadata_type, capacity: first.capacity, list: self.records.iter().flat_map(|r| r.tuples.iter().copied()).collect() })
    }

    /// The largest number of tuples in one message.
    pub fn max_per_record(&self) -> usize {
        self.records.iter().map(|r| r.tuples.len()).max().unwrap_or(0)
    }

    pub fn tuples(&self) -> usize {
        self.records.iter().map(|r| r.tuples.len()).sum()
    }
}
