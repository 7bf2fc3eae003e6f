//! The local admin API: snapshot cut windows (begin before the backend cuts,
//! commit after) and status. Served on its own UNIX socket, root only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    changelog::{lock, LogError, OpenCut, Placement, SharedLog, SnapshotInfo},
    recorder::{Recorder, RecorderError},
    volumes::{VolumeError, Volumes},
};

pub mod proto {
    tonic::include_proto!("cbt.admin.v1");
}

use proto::{
    admin_server::{Admin, AdminServer},
    AbortSnapshotRequest, AbortSnapshotResponse, BeginSnapshotRequest, BeginSnapshotResponse, CommitSnapshotRequest,
    CommitSnapshotResponse, DeleteSnapshotRequest, DeleteSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    StatusRequest, StatusResponse,
};

/// Builds the status JSON; runs on the recorder thread with the tracker.
pub type StatusFn = Arc<dyn Fn(&crate::tracker::Tracker, &crate::changelog::ChangeLog) -> serde_json::Value + Send + Sync>;

pub struct AdminService {
    log: SharedLog,
    recorder: Arc<Recorder>,
    volumes: Volumes,
    status: StatusFn,
}

impl AdminService {
    pub fn new(log: SharedLog, recorder: Arc<Recorder>, volumes: Volumes, status: StatusFn) -> AdminServer<Self> {
        AdminServer::new(Self { log, recorder, volumes, status })
    }

    /// Where `volume` is now, as the log names device instances.
    fn placement(&self, volume: &str) -> Result<Placement, Status> {
        let extent = self.volumes.locate(volume).map_err(volume_status)?;
        Ok(lock(&self.log).placement(extent.disk.key, extent.offset_bytes, extent.size_bytes))
    }

    /// Runs a log operation (journal writes, fsync) off the async workers.
    async fn on_log<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::changelog::ChangeLog) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, Status> {
        let log = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || f(&mut lock(&log)))
            .await
            .map_err(|e| Status::internal(format!("log task failed: {e}")))?
            .map_err(log_status)
    }
}

/// Every admin status goes out through here: its message may repeat what
/// the client sent (a volume name, a handle), so it is bounded.
fn status(code: tonic::Code, message: String) -> Status {
    Status::new(code, crate::names::bound_message(message))
}

fn log_status(e: LogError) -> Status {
    use tonic::Code;
    match e {
        // The snapshot cannot be registered: a delta from or to it must be
        // a full backup.
        LogError::NoCutBegun(_)
        | LogError::CutNotOpen { .. }
        | LogError::CutsExpired(_)
        | LogError::PlacementChanged { .. }
        | LogError::PlacementUnknown(_) => status(Code::FailedPrecondition, e.to_string()),
        LogError::CutOfAnotherVolume { .. } => status(Code::InvalidArgument, e.to_string()),
        LogError::TooManyCuts { .. } => status(Code::ResourceExhausted, e.to_string()),
        LogError::SnapshotExists(_) => status(Code::AlreadyExists, e.to_string()),
        LogError::UnknownSnapshot(_) => status(Code::NotFound, e.to_string()),
        LogError::UnknownInstance(_) => status(Code::Unavailable, format!("{e}; retry in a second")),
        _ => status(Code::Internal, e.to_string()),
    }
}

fn volume_status(e: VolumeError) -> Status {
    match e {
        // The name is the client's: echoed cut.
        VolumeError::Unknown(name) => {
            status(tonic::Code::NotFound, format!("unknown volume {}", crate::names::Echo(&name)))
        }
        _ => status(tonic::Code::FailedPrecondition, e.to_string()),
    }
}

fn recorder_status(e: RecorderError) -> Status {
    status(tonic::Code::Internal, format!("sealing the change log: {e}"))
}

/// See [`crate::names::check_handle`]: no look-alikes, at most 1024 bytes.
fn validate_handle(handle: &str) -> Result<(), Status> {
    crate::names::check_handle(handle).map_err(|e| status(tonic::Code::InvalidArgument, e.to_string()))
}

pub fn snapshot_message(s: &SnapshotInfo) -> proto::Snapshot {
    proto::Snapshot {
        handle: s.handle.clone(),
        volume: s.volume.clone(),
        device: s.instance.to_string(),
        window_lo: s.lo,
        window_hi: s.hi,
        capacity_bytes: s.capacity_bytes,
        committed_unix_ns: s.committed_unix_ns,
        cut_id: s.cut_id.unwrap_or(0),
    }
}

fn open_cut_message(c: &OpenCut, now: crate::changelog::Stamp) -> proto::OpenCut {
    proto::OpenCut {
        cut_id: c.id,
        volume: c.volume.clone(),
        device: c.placement.map(|p| p.instance.to_string()).unwrap_or_default(),
        window_lo: c.lo,
        capacity_bytes: c.placement.map_or(0, |p| p.capacity_bytes),
        open_ns: now.saturating_sub(c.lo),
        taken: c.taken,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn begin_snapshot(
        &self,
        request: Request<BeginSnapshotRequest>,
    ) -> Result<Response<BeginSnapshotResponse>, Status> {
        let volume = request.into_inner().volume;
        // The device is the one the volume is on now, before the cut; a
        // commit finding it elsewhere is refused.
        let placement = self.placement(&volume)?;
        // Seal first, then open the window: the writes sealed here end
        // their segment before `lo`, so they stay out of deltas from this
        // snapshot (those still in flight are carried past it). The backend
        // cuts after this returns, so `lo` may be as late as now.
        self.recorder.seal().await.map_err(recorder_status)?;
        let name = volume.clone();
        let cut_id = self.on_log(move |log| log.begin_cut(&name, placement)).await?;
        tracing::info!(volume, cut_id, %placement, "snapshot cut window opened");
        Ok(Response::new(BeginSnapshotResponse { cut_id }))
    }

    async fn commit_snapshot(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<CommitSnapshotResponse>, Status> {
        let CommitSnapshotRequest { volume, handle, cut_id } = request.into_inner();
        validate_handle(&handle)?;
        // The snapshot exists now: the window closes here.
        let hi = lock(&self.log).now();
        let placement = self.placement(&volume)?;
        self.recorder.seal().await.map_err(recorder_status)?;
        let (name, id) = (volume.clone(), handle.clone());
        let (info, open_cuts) = self
            .on_log(move |log| {
                let info = log.commit_snapshot(&name, cut_id, &id, placement, hi)?;
                let now = log.now();
                let open = log.open_cuts().into_iter().filter(|c| c.volume == name).map(|c| open_cut_message(c, now));
                Ok((info, open.collect::<Vec<_>>()))
            })
            .await?;
        tracing::info!(volume, handle, cut_id = info.cut_id, lo = info.lo, hi = info.hi, "snapshot committed");
        let untaken: Vec<u64> = open_cuts.iter().filter(|c| !c.taken).map(|c| c.cut_id).collect();
        if !untaken.is_empty() {
            tracing::warn!(volume, ?untaken, "cuts of the volume still open after a commit");
        }
        Ok(Response::new(CommitSnapshotResponse { snapshot: Some(snapshot_message(&info)), open_cuts }))
    }

    async fn abort_snapshot(
        &self,
        request: Request<AbortSnapshotRequest>,
    ) -> Result<Response<AbortSnapshotResponse>, Status> {
        let AbortSnapshotRequest { volume, cut_id, all } = request.into_inner();
        if cut_id.is_some() == all {
            return Err(Status::invalid_argument("name one cut (cut_id) or all of the volume's (all), not both"));
        }
        let name = volume.clone();
        let aborted = self.on_log(move |log| log.abort_cuts(&name, cut_id)).await?;
        tracing::info!(volume, ?aborted, all, "snapshot cuts aborted");
        Ok(Response::new(AbortSnapshotResponse { aborted }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let handle = request.into_inner().handle;
        validate_handle(&handle)?;
        let id = handle.clone();
        self.on_log(move |log| log.delete_snapshot(&id)).await?;
        tracing::info!(handle, "snapshot deleted");
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let log = lock(&self.log);
        let snapshots = log.snapshots().map(snapshot_message).collect();
        let now = log.now();
        let open_cuts = log.open_cuts().into_iter().map(|c| open_cut_message(c, now)).collect();
        Ok(Response::new(ListSnapshotsResponse { snapshots, open_cuts }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let (log, status) = (Arc::clone(&self.log), Arc::clone(&self.status));
        let value = self
            .recorder
            .with_tracker(move |tracker| status(tracker, &lock(&log)))
            .await
            .map_err(recorder_status)?;
        let json = serde_json::to_string(&value).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(StatusResponse { json }))
    }
}

/// The admin socket's mode: root only.
pub const SOCKET_MODE: u32 = 0o600;

/// Serves the admin API on `listener` (bound with [`SOCKET_MODE`]) until
/// `shutdown` completes.
pub async fn serve(
    listener: crate::service::Listener,
    admin: AdminServer<AdminService>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), crate::service::ServiceError> {
    crate::service::serve_on(listener, tonic::service::Routes::new(admin), shutdown).await
}
