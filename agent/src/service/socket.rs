//! The server's UNIX socket: binding it safely, and a registry of accepted
//! connections so a shutdown can cut the ones that outstay their grace.

use std::{
    collections::HashMap,
    ffi::OsString,
    io,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
};
use tonic::transport::server::{Connected, UdsConnectInfo};
use tracing::info;

use super::ServiceError;

/// A socket file this process bound, named by its directory (held open)
/// and its name there; removed when dropped, if the name still holds it.
pub(super) struct SocketFile {
    path: PathBuf,
    dir: OwnedFd,
    name: OsString,
    identity: (u64, u64),
}

impl SocketFile {
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if identity(&self.dir, &self.name).ok() == Some(self.identity) {
            let _ = rustix::fs::unlinkat(&self.dir, &self.name, AtFlags::empty());
        }
    }
}

/// Binds and listens on `socket` with `mode`.
///
/// Its directory is created (0755) if missing, and must belong to this
/// process's user (root) and be writable by nobody else: whoever can write
/// there could swap the socket for a symlink between bind and chmod (and
/// have root chmod any file), or squat the name while the agent is down. A
/// DaemonSet's hostPath `/run/cbt` (DirectoryOrCreate: root, 0755) or a
/// kubelet plugin directory qualifies; an emptyDir (0777) does not, a
/// directory the agent creates inside one does. Everything after the
/// check goes through the directory's descriptor, so renaming the path's
/// ancestors cannot redirect it.
///
/// An existing socket file is replaced only when nothing accepts on it (a
/// dead process's leftover); a live one, or a file that is not a socket, is
/// an error.
pub(super) async fn bind(socket: &Path, mode: u32) -> Result<(UnixListener, SocketFile), ServiceError> {
    let io_err = |what: &'static str| {
        let path = socket.to_path_buf();
        move |source: io::Error| ServiceError::Io { what, path, source }
    };
    let name = socket.file_name().ok_or_else(|| ServiceError::NoFileName { path: socket.into() })?.to_owned();
    let dir_path = socket.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = open_private_dir(dir_path)?;
    // The path as this process resolves it from here on: through the
    // checked directory's descriptor. Linux's sun_path holds 107 bytes.
    let via_dir = Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(&name);
    match identity_and_type(&dir, &name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting")(e)),
        Ok((_, file_type)) if file_type != FileType::Socket => {
            return Err(ServiceError::NotASocket { path: socket.into() });
        }
        Ok(_) => match UnixStream::connect(&via_dir).await {
            Ok(_) => return Err(ServiceError::SocketInUse { path: socket.into() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(socket = %socket.display(), "removing a stale socket");
                rustix::fs::unlinkat(&dir, &name, AtFlags::empty())
                    .map_err(|e| io_err("removing the stale socket")(e.into()))?;
            }
            Err(e) => return Err(io_err("probing the existing socket")(e)),
        },
    }
    let listener = UnixListener::bind(&via_dir).map_err(|e| match e.kind() {
        // Another process bound it since the check above.
        io::ErrorKind::AddrInUse => ServiceError::SocketInUse { path: socket.into() },
        _ => io_err("binding")(e),
    })?;
    let bound = identity(&dir, &name).map_err(io_err("inspecting the bound socket"))?;
    let file = SocketFile { path: socket.into(), dir, name, identity: bound };
    // Only this process can write the directory: the name still holds the
    // socket bound above, so chmod cannot be led to another file.
    rustix::fs::chmodat(&file.dir, &file.name, Mode::from_raw_mode(mode), AtFlags::empty())
        .map_err(|e| io_err("setting the mode of")(e.into()))?;
    Ok((listener, file))
}

/// Opens the socket's directory, creating it (0755) if missing, and checks
/// that only this process's user can write it.
fn open_private_dir(dir: &Path) -> Result<OwnedFd, ServiceError> {
    let io_err = |what: &'static str| {
        let path = dir.to_path_buf();
        move |source: io::Error| ServiceError::Io { what, path, source }
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_err("creating the socket directory"))?;
    }
    let fd = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| io_err("opening the socket directory")(e.into()))?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_err("inspecting the socket directory")(e.into()))?;
    let (uid, euid) = (stat.st_uid, rustix::process::geteuid().as_raw());
    let unsafe_dir = |why: String| ServiceError::UnsafeDirectory { path: dir.into(), why };
    if uid != euid {
        return Err(unsafe_dir(format!("belongs to uid {uid}, not to this process's uid {euid}")));
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(format!("is writable by group or others (mode {mode:04o})")));
    }
    Ok(fd)
}

/// The (dev, inode) of `name` in `dir`, not following a symlink.
fn identity(dir: &OwnedFd, name: &OsString) -> io::Result<(u64, u64)> {
    identity_and_type(dir, name).map(|(id, _)| id)
}

fn identity_and_type(dir: &OwnedFd, name: &OsString) -> io::Result<((u64, u64), FileType)> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(((stat.st_dev, stat.st_ino), FileType::from_raw_mode(stat.st_mode)))
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
