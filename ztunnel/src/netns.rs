//! Working inside a pod's network namespace.
//!
//! A [`PodNetns`] owns one std thread that entered the pod's namespace with `setns` and stays
//! there. Sockets are created on that thread (a socket belongs to the namespace it was created
//! in, whichever thread uses it later), and commands spawned from it (`nft`) run in the pod's
//! namespace too. The tokio runtime's threads never change namespace.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// The socket mark on every socket the ztunnel creates in a pod, exempting it from capture.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// Why an operation in a pod's namespace failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `setns` failed.
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// The namespace path.
        path: PathBuf,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// The worker thread is gone (the pod was removed).
    #[error("the namespace worker for {0} has stopped")]
    Stopped(PathBuf),
    /// The thread could not be started.
    #[error("cannot start a namespace worker thread: {0}")]
    Spawn(#[source] std::io::Error),
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread parked in a pod's network namespace, running jobs there.
#[derive(Debug)]
pub struct PodNetns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

// === impl PodNetns ===

impl PodNetns {
    /// Opens `path` (for example `/run/netns/<name>` or `/proc/<pid>/ns/net`) and starts the
    /// worker. Fails if the namespace cannot be entered.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let shown = path.to_owned();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                drop(file);
                let _ = ready_tx.send(Ok(()));
                // Runs until every sender is dropped (the pod is removed).
                for job in rx {
                    job();
                }
            })
            .map_err(NetnsError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                path: path.to_owned(),
                jobs,
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                path: shown,
                source,
            }),
            Err(_) => Err(NetnsError::Stopped(shown)),
        }
    }

    /// The namespace path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the worker thread (inside the namespace) and returns its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Stopped(self.path.clone()))?;
        rx.await.map_err(|_| NetnsError::Stopped(self.path.clone()))
    }

    /// Binds a non-blocking TCP listener on `addr` inside the namespace.
    pub async fn listen(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpListener, std::io::Error> {
        let std_listener = self
            .run(move || -> std::io::Result<std::net::TcpListener> {
                let socket =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_reuse_address(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&addr.into())?;
                socket.listen(1024)?;
                Ok(socket.into())
            })
            .await
            .map_err(std::io::Error::other)??;
        tokio::net::TcpListener::from_std(std_listener)
    }

    /// Connects to `addr` from inside the namespace with the ztunnel's socket mark, so the
    /// connection is not captured again.
    pub async fn connect(&self, addr: SocketAddr) -> Result<tokio::net::TcpStream, std::io::Error> {
        let socket = self
            .run(move || -> std::io::Result<socket2::Socket> {
                let socket =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_mark(ZTUNNEL_MARK)?;
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await
            .map_err(std::io::Error::other)??;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(addr).await
    }
}
