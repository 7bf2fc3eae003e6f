//! The server's UNIX socket: binding it safely, and a registry of accepted
//! connections so a shutdown can cut the ones that outstay their grace.

use std::{
    collections::HashMap,
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
};
use tonic::transport::server::{Connected, UdsConnectInfo};
use tracing::info;

use super::ServiceError;

/// Binds `socket`: creates its directory, replaces a stale socket file
/// (nothing accepting on it) but never a live one or a non-socket, and sets
/// `mode`. Returns the listener and the socket file's (dev, inode).
pub(super) async fn bind(socket: &Path, mode: u32) -> Result<(UnixListener, (u64, u64)), ServiceError> {
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ServiceError::Io { what, path, source }
    };
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err("creating the socket directory", dir))?;
    }
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", socket)(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServiceError::NotASocket { path: socket.into() });
        }
        Ok(_) => match UnixStream::connect(socket).await {
            Ok(_) => return Err(ServiceError::SocketInUse { path: socket.into() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(socket = %socket.display(), "removing a stale socket");
                std::fs::remove_file(socket).map_err(io_err("removing the stale socket", socket))?;
            }
            Err(e) => return Err(io_err("probing the existing socket", socket)(e)),
        },
    }
    let listener = UnixListener::bind(socket).map_err(io_err("binding", socket))?;
    let identity = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .and_then(|()| inode(socket))
        .map_err(io_err("setting the mode of", socket));
    match identity {
        Ok(identity) => Ok((listener, identity)),
        Err(e) => {
            let _ = std::fs::remove_file(socket);
            Err(e)
        }
    }
}

/// The (dev, inode) of a file, to tell whether a path still names it.
pub(super) fn inode(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// The live accepted connections.
#[derive(Clone, Default)]
pub(super) struct Connections(Arc<Mutex<Registry>>);

#[derive(Default)]
struct Registry {
    next: u64,
    fds: HashMap<u64, RawFd>,
}

impl Connections {
    pub(super) fn track(&self, stream: UnixStream) -> Tracked {
        let mut registry = self.0.lock().expect("not poisoned");
        let id = registry.next;
        registry.next += 1;
        registry.fds.insert(id, stream.as_raw_fd());
        Tracked { stream, id, connections: self.clone() }
    }

    /// Shuts every live connection down (both directions): its reads see
    /// end-of-file and its writes fail, so its task ends, dropping its
    /// streams (whose producers then stop). A client sees a broken
    /// connection, never a stream that ended OK.
    pub(super) fn cut_all(&self) -> usize {
        let registry = self.0.lock().expect("not poisoned");
        for &fd in registry.fds.values() {
            // SAFETY: the descriptor is open: a `Tracked` removes it from
            // the registry (under this lock) before its stream closes it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        registry.fds.len()
    }
}

/// An accepted connection that stays in [`Connections`] while it lives.
pub(super) struct Tracked {
    stream: UnixStream,
    id: u64,
    connections: Connections,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Runs before `stream` is dropped (and its descriptor closed).
        self.connections.0.lock().expect("not poisoned").fds.remove(&self.id);
    }
}

impl Connected for Tracked {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
