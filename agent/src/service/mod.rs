//! The CSI `Identity` and `SnapshotMetadata` gRPC services on a UNIX socket:
//! a thin adapter that encodes the [`MetadataSource`]'s answers. Generated
//! types stop here (and at the `cbtctl` client).
//!
//! What the sidecar (`external-snapshot-metadata`) needs: a plaintext gRPC
//! server on a UNIX socket, `GetPluginInfo` with a non-empty name equal to
//! the served driver's, `Probe` that never errors (`ready = false` while
//! loading), and `Service{SNAPSHOT_METADATA_SERVICE}` in the capabilities.

mod identity;
mod metadata;
mod socket;
mod tuples;

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::UnixListener;
use tokio_stream::{wrappers::UnixListenerStream, StreamExt};
use tonic::transport::{Channel, Endpoint, Server};
use tracing::{info, warn};

use crate::query::{MetadataSource, QueryError};

/// The `csi.v1` wire types, servers and clients generated from
/// `proto/csi.proto` (a wire-compatible subset of the CSI spec v1.12).
pub mod csi {
    tonic::include_proto!("csi.v1");

    // Requests carry the VolumeSnapshotClass secrets: their Debug output
    // (written here instead of derived, see build.rs) never shows them.
    struct Redacted(usize);

    impl std::fmt::Debug for Redacted {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "<{} redacted>", self.0)
        }
    }

    impl std::fmt::Debug for GetMetadataAllocatedRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GetMetadataAllocatedRequest")
                .field("snapshot_id", &self.snapshot_id)
                .field("starting_offset", &self.starting_offset)
                .field("max_results", &self.max_results)
                .field("secrets", &Redacted(self.secrets.len()))
                .finish()
        }
    }

    impl std::fmt::Debug for GetMetadataDeltaRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GetMetadataDeltaRequest")
                .field("base_snapshot_id", &self.base_snapshot_id)
                .field("target_snapshot_id", &self.target_snapshot_id)
                .field("starting_offset", &self.starting_offset)
                .field("max_results", &self.max_results)
                .field("secrets", &Redacted(self.secrets.len()))
                .finish()
        }
    }
}

/// Most tuples one stream message carries, whatever `max_results` asks.
///
/// The spec: "keep every message far below the 4 MiB default gRPC receive
/// limit of Go clients". An encoded `BlockMetadata` takes at most 24 bytes
/// (two int64 varints of at most 10 bytes with their tags, plus the repeated
/// field's tag and length), so 16384 tuples stay under 400 KiB.
pub const MAX_TUPLES_PER_MESSAGE: u32 = 16_384;

/// How long [`serve`] lets in-flight calls finish after `shutdown` resolves
/// before it cuts their connections (a stream whose reader stalls would
/// otherwise hold the shutdown forever).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Tuple layout of the metadata streams (`BlockMetadataType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetadataType {
    /// `VARIABLE_LENGTH`: each run of adjacent changed chunks is one tuple.
    #[default]
    Variable,
    /// `FIXED_LENGTH`: one tuple per chunk (the tracker's granularity); the
    /// last one is still clamped to the volume capacity.
    Fixed,
}

/// What the services answer besides the change log's data.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// `GetPluginInfo.name`: must be non-empty and equal the CSI driver name
    /// the add-on serves (the sidecar compares it with
    /// `VolumeSnapshotContent.spec.driver`).
    pub driver_name: String,
    /// `GetPluginInfo.vendor_version`.
    pub vendor_version: String,
    /// Tuple layout of both metadata streams.
    pub block_metadata_type: MetadataType,
    /// Tuples per message when a request's `max_results` is 0 ("plugin's
    /// choice"; hostpath uses 256). Must be > 0; capped by
    /// [`MAX_TUPLES_PER_MESSAGE`].
    pub default_max_results: u32,
}

impl ServiceOptions {
    /// Options for `driver_name` with the defaults: this crate's version,
    /// variable-length tuples, 256 tuples per message.
    pub fn new(driver_name: impl Into<String>) -> Self {
        ServiceOptions {
            driver_name: driver_name.into(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            block_metadata_type: MetadataType::Variable,
            default_max_results: 256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid service options: {0}")]
    InvalidOptions(String),
    #[error("{}: another process is serving on this socket", path.display())]
    SocketInUse { path: PathBuf },
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("socket path {} has no file name", path.display())]
    NoFileName { path: PathBuf },
    #[error(
        "socket directory {} {why}: refusing to serve there (whoever can write it could swap the socket for a \
         symlink or squat its name); use a directory only root can write, e.g. /run/cbt",
        path.display()
    )]
    UnsafeDirectory { path: PathBuf, why: String },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket path {} is not valid UTF-8", path.display())]
    NonUtf8Path { path: PathBuf },
    #[error("gRPC transport on {}", path.display())]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The one mapping from the change log's refusals to CSI status codes; the
/// message is the error's text, bounded (clients refuse huge status
/// messages, and ids in it come from clients).
impl From<QueryError> for tonic::Status {
    fn from(e: QueryError) -> Self {
        let message = crate::names::bound_message(e.to_string());
        match e {
            QueryError::NotFound(_) => tonic::Status::not_found(message),
            QueryError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            QueryError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            QueryError::Unavailable(_) => tonic::Status::unavailable(message),
        }
    }
}

/// The mode of the CSI socket: owner and group (the sidecar shares it).
pub const CSI_SOCKET_MODE: u32 = 0o660;

/// A bound, listening UNIX socket, not yet served.
///
/// The agent binds its sockets before it says it serves: a path it cannot
/// own (a file is there, another process serves it, its directory is not
/// root's alone) fails the start instead of leaving an agent that runs
/// without its service. Connections made before [`serve_on`] runs wait in
/// the listen backlog. Dropping it (served or not) removes the socket file
/// if the path still names it.
pub struct Listener {
    listener: UnixListener,
    file: socket::SocketFile,
}

impl Listener {
    /// Binds `socket` with `mode`: see [`serve`] for the rules on its
    /// directory and on a file already there.
    pub async fn bind(socket: &Path, mode: u32) -> Result<Listener, ServiceError> {
        let (listener, file) = socket::bind(socket, mode).await?;
        Ok(Listener { listener, file })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// The CSI `Identity` and `SnapshotMetadata` services over `source`,
/// checking `options`.
pub fn csi_routes(
    source: Arc<dyn MetadataSource>,
    options: &ServiceOptions,
) -> Result<tonic::service::Routes, ServiceError> {
    if options.driver_name.is_empty() {
        return Err(ServiceError::InvalidOptions("driver_name must not be empty".into()));
    }
    if options.default_max_results == 0 {
        return Err(ServiceError::InvalidOptions("default_max_results must be > 0".into()));
    }
    let identity = identity::IdentityService::new(source.clone(), options);
    let metadata = metadata::MetadataService::new(source, options);
    Ok(tonic::service::Routes::new(csi::identity_server::IdentityServer::new(identity))
        .add_service(csi::snapshot_metadata_server::SnapshotMetadataServer::new(metadata)))
}

/// Serves `Identity` and `SnapshotMetadata` on the UNIX socket `socket`
/// until `shutdown` resolves, then removes the socket.
///
/// The socket's directory is created (0755) if missing; it must belong to
/// this process's user and be writable by no one else (whoever can write it
/// could swap the socket for a symlink, or squat its name). An existing
/// socket file is replaced only when nothing accepts connections on it (a
/// leftover of a dead process); a live one, or a file that is not a socket,
/// is an error. The socket is made mode 0660 (owner and group: the sidecar
/// shares it).
///
/// Shutdown stops accepting, lets running calls finish for a grace period
/// (5 s), then cuts the connections still open (their clients
/// see a transport error, never a stream that ended OK) and returns.
pub async fn serve(
    socket: &Path,
    source: Arc<dyn MetadataSource>,
    options: ServiceOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let routes = csi_routes(source, &options)?;
    let listener = Listener::bind(socket, CSI_SOCKET_MODE).await?;
    info!(socket = %socket.display(), driver = %options.driver_name, "serving CSI Identity and SnapshotMetadata");
    serve_on(listener, routes, shutdown).await
}

/// Serves `routes` on the UNIX socket `socket` (created with `mode`) until
/// `shutdown` resolves, then removes the socket; see [`serve`] for the
/// socket and shutdown rules.
pub async fn serve_unix(
    socket: &Path,
    mode: u32,
    routes: tonic::service::Routes,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    serve_on(Listener::bind(socket, mode).await?, routes, shutdown).await
}

/// Serves `routes` on a bound [`Listener`] until `shutdown` resolves, then
/// removes its socket; see [`serve`] for the shutdown rules. Shared by
/// every gRPC API of the agent.
pub async fn serve_on(
    listener: Listener,
    routes: tonic::service::Routes,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let Listener { listener, file } = listener;
    let connections = socket::Connections::default();
    let incoming = {
        let connections = connections.clone();
        UnixListenerStream::new(listener).map(move |accepted| accepted.map(|stream| connections.track(stream)))
    };
    let server = Server::builder().add_routes(routes);
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = fired_tx.send(());
    };
    let grace_over = async move {
        if fired_rx.await.is_err() {
            // The server finished on its own.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let server = server.serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        () = grace_over => {
            let cut = connections.cut_all();
            warn!(connections = cut, "calls still running {SHUTDOWN_GRACE:?} after shutdown: cutting their connections");
            match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
                Ok(r) => r,
                Err(_) => {
                    warn!("server still not finished; leaving it");
                    Ok(())
                }
            }
        }
    };
    let path = file.path().to_path_buf();
    // Removes the socket, if the path still names the one bound here.
    drop(file);
    result.map_err(|source| ServiceError::Transport { path, source })
}

/// A client channel to the services on the UNIX socket `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, ServiceError> {
    let path = socket.to_str().ok_or_else(|| ServiceError::NonUtf8Path { path: socket.into() })?;
    let transport = |source| ServiceError::Transport { path: socket.into(), source };
    Endpoint::from_shared(format!("unix://{path}")).map_err(transport)?.connect().await.map_err(transport)
}

/// Runs a possibly slow [`MetadataSource`] call off the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, tonic::Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| tonic::Status::internal(format!("metadata source failed: {e}")))
}
