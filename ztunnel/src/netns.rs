//! Working inside a pod's network namespace.
//!
//! A socket belongs to the namespace it was created in, whichever thread uses it later. On the
//! hot path (every connection creates one) [`PodNetns`] creates sockets on the *calling*
//! thread: `setns` into the pod, `socket()`, `setns` back — three syscalls, no thread hop, and
//! nothing can run on the thread in between because the closure never awaits. If returning to
//! the node's namespace ever failed, the process aborts rather than run tasks in a pod's
//! namespace. Commands (`nft`) run on a std thread parked in the pod's namespace: a child
//! process inherits its parent thread's namespace, and spawning blocks.
//!
//! A namespace path that comes from outside (an enrollment request, the `--netns-dir` scan)
//! is opened by [`open_netns_file`] only: non-blocking (a FIFO put there must not hold the
//! caller, who may hold the pod registry's lock), close-on-exec, and refused unless it is an
//! nsfs file (`fstatfs`: `NSFS_MAGIC`) other than the ztunnel's own network namespace.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// The socket mark on every socket the ztunnel creates in a pod, exempting it from capture.
pub const ZTUNNEL_MARK: u32 = 0x539;

/// How long connecting to a pod's own application may take.
pub const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The path is not a namespace file (a regular file, a FIFO, a device, ...).
    #[error("{path} is not a network namespace (not an nsfs file)")]
    NotNetns {
        /// The path given.
        path: PathBuf,
    },
    /// The path is the ztunnel's own network namespace, which is never a pod's.
    #[error("{path} is the ztunnel's own network namespace, not a pod's")]
    OwnNetns {
        /// The path given.
        path: PathBuf,
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

/// What a socket made inside a pod talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Facing {
    /// The pod's own application, over its loopback.
    App,
    /// Something across the network: another node, a destination outside the mesh.
    Network,
}

/// A pod's network namespace: a handle to enter it briefly, and a thread parked in it.
#[derive(Debug)]
pub struct PodNetns {
    path: PathBuf,
    /// The process's own namespace ([`PodNetns::own`]): nothing to enter, no mark needed.
    own: bool,
    file: File,
    jobs: mpsc::Sender<Job>,
}

/// The node's own network namespace, opened once before any thread enters a pod.
fn host_netns() -> std::io::Result<&'static File> {
    static HOST: std::sync::OnceLock<File> = std::sync::OnceLock::new();
    if let Some(file) = HOST.get() {
        return Ok(file);
    }
    let file = File::open("/proc/thread-self/ns/net")?;
    Ok(HOST.get_or_init(|| file))
}

/// Opens the namespace file at `path` as one that came from outside: with `O_NONBLOCK` (a
/// FIFO does not block), `O_CLOEXEC` and `O_NOCTTY`, then refuses anything that is not an
/// nsfs file ([`NetnsError::NotNetns`]) and the ztunnel's own network namespace
/// ([`NetnsError::OwnNetns`], compared by device and inode with `/proc/self/ns/net`). Whether
/// it is a *network* namespace is left to `setns(CLONE_NEWNET)`, which refuses other kinds.
pub fn open_netns_file(path: &Path) -> Result<File, NetnsError> {
    let open_error = |source| NetnsError::Open {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(open_error)?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| open_error(std::io::Error::from(e)))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(NetnsError::NotNetns {
            path: path.to_owned(),
        });
    }
    let opened = file.metadata().map_err(open_error)?;
    let own = std::fs::metadata("/proc/self/ns/net").map_err(|source| NetnsError::Open {
        path: PathBuf::from("/proc/self/ns/net"),
        source,
    })?;
    if (opened.dev(), opened.ino()) == (own.dev(), own.ino()) {
        return Err(NetnsError::OwnNetns {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

// === impl PodNetns ===

impl PodNetns {
    /// Opens `path` (for example `/run/netns/<name>` or `/proc/<pid>/ns/net`) with
    /// [`open_netns_file`] and starts the worker. Fails if the path is not a namespace other
    /// than the ztunnel's own, or if it cannot be entered.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        host_netns().map_err(|source| NetnsError::Open {
            path: PathBuf::from("/proc/thread-self/ns/net"),
            source,
        })?;
        let file = open_netns_file(path)?;
        let thread_file = file.try_clone().map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let shown = path.to_owned();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                if let Err(e) = setns(&thread_file, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                drop(thread_file);
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
                own: false,
                file,
                jobs,
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                path: shown,
                source,
            }),
            Err(_) => Err(NetnsError::Stopped(shown)),
        }
    }

    /// The process's own network namespace (a gateway container's): sockets are created as
    /// usual, without entering anything or marking them (nothing captures there), so no
    /// privilege is needed.
    pub fn own() -> Result<Self, NetnsError> {
        let path = PathBuf::from("/proc/self/ns/net");
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .map_err(NetnsError::Spawn)?;
        Ok(Self {
            path,
            own: true,
            file,
            jobs,
        })
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

    /// Runs `f` on the calling thread inside the pod's namespace, then returns to the node's.
    /// `f` must not block or await.
    fn enter<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        if self.own {
            return f();
        }
        let host = host_netns()?;
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let out = f();
        if let Err(e) = setns(host, CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the node's network namespace; aborting");
            std::process::abort();
        }
        out
    }

    /// Binds a non-blocking TCP listener on `addr` inside the namespace; the connections it
    /// accepts come from `facing` (a listener for the network's gives them the node's
    /// congestion control, see [`crate::congestion`]).
    pub async fn listen(
        &self,
        addr: SocketAddr,
        facing: Facing,
    ) -> Result<tokio::net::TcpListener, std::io::Error> {
        self.listen_marked(addr, facing, false)
    }

    /// Binds the pod's HBONE listener on `addr`: as [`PodNetns::listen`] for the network, with
    /// the ztunnel's socket mark, which the connections it accepts (and the SYN-ACKs answering
    /// them) inherit. The capture rules leave marked sockets' tunnels untracked
    /// ([`crate::redirect`]); no other listener may carry the mark, since the connections
    /// the capture redirects to them need connection tracking to be answered.
    pub async fn listen_tunnel(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpListener, std::io::Error> {
        self.listen_marked(addr, Facing::Network, !self.own)
    }

    fn listen_marked(
        &self,
        addr: SocketAddr,
        facing: Facing,
        mark: bool,
    ) -> Result<tokio::net::TcpListener, std::io::Error> {
        let socket = self.enter(|| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            if mark {
                socket.set_mark(ZTUNNEL_MARK)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket)
        })?;
        if facing == Facing::Network {
            crate::congestion::network_socket(&socket);
        }
        tokio::net::TcpListener::from_std(socket.into())
    }

    /// Binds a non-blocking UDP socket on `addr` inside the namespace, with the ztunnel's mark.
    pub fn bind_udp(&self, addr: SocketAddr) -> Result<tokio::net::UdpSocket, std::io::Error> {
        let socket = self.enter(|| {
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            if !self.own {
                socket.set_mark(ZTUNNEL_MARK)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            Ok(socket)
        })?;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    /// A UDP socket inside the namespace, with the ztunnel's mark and an ephemeral port, for
    /// talking to `peer` (its address family).
    pub fn udp_socket(&self, peer: SocketAddr) -> Result<tokio::net::UdpSocket, std::io::Error> {
        let any: SocketAddr = match peer {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        self.bind_udp(any)
    }

    /// Connects to `addr` across the network from inside the namespace (a tunnel, a
    /// passthrough or a gateway's upstream), with the node's congestion control and the
    /// ztunnel's socket mark (not captured again).
    pub async fn connect(&self, addr: SocketAddr) -> Result<tokio::net::TcpStream, std::io::Error> {
        self.connect_facing(addr, Facing::Network).await
    }

    /// Connects to the pod's own application at `addr` (over the pod's loopback, with the
    /// pod's congestion control), with the ztunnel's socket mark, within
    /// [`APP_CONNECT_TIMEOUT`]: an application whose accept queue is full drops the SYNs, and
    /// the kernel alone would retry for about two minutes while the tunnel waits.
    pub async fn connect_app(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio::net::TcpStream, std::io::Error> {
        self.connect_app_within(addr, APP_CONNECT_TIMEOUT).await
    }

    async fn connect_app_within(
        &self,
        addr: SocketAddr,
        within: Duration,
    ) -> Result<tokio::net::TcpStream, std::io::Error> {
        self.connect_facing_within(addr, Facing::App, within).await
    }

    /// [`Self::connect`] within `within`: a destination that drops SYNs would otherwise hold
    /// the connection (and the application, whose own `connect` returned at the capture) for
    /// the kernel's two minutes of retries.
    pub async fn connect_within(
        &self,
        addr: SocketAddr,
        within: Duration,
    ) -> Result<tokio::net::TcpStream, std::io::Error> {
        self.connect_facing_within(addr, Facing::Network, within)
            .await
    }

    async fn connect_facing_within(
        &self,
        addr: SocketAddr,
        facing: Facing,
        within: Duration,
    ) -> Result<tokio::net::TcpStream, std::io::Error> {
        match tokio::time::timeout(within, self.connect_facing(addr, facing)).await {
            Ok(connected) => connected,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {within:?}"),
            )),
        }
    }

    /// Connects to `addr` from inside the namespace with the ztunnel's socket mark, so the
    /// connection is not captured again. The socket is created non-blocking
    /// (`SOCK_NONBLOCK`: no `fcntl` round trip per connection).
    async fn connect_facing(
        &self,
        addr: SocketAddr,
        facing: Facing,
    ) -> Result<tokio::net::TcpStream, std::io::Error> {
        let stream = Type::STREAM.nonblocking();
        let socket =
            self.enter(|| Socket::new(Domain::for_address(addr), stream, Some(Protocol::TCP)))?;
        if !self.own {
            socket.set_mark(ZTUNNEL_MARK)?;
        }
        socket.set_tcp_nodelay(true)?;
        if facing == Facing::Network {
            crate::congestion::network_socket(&socket);
        }
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket.connect(addr).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_another_namespace_file_is_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let started = std::time::Instant::now();
        assert!(
            matches!(PodNetns::open(&fifo), Err(NetnsError::NotNetns { .. })),
            "a FIFO"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "blocked on a FIFO"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"").expect("file");
        let err = PodNetns::open(&file).expect_err("a regular file");
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        assert!(err.to_string().contains("not a network namespace"), "{err}");
        assert!(matches!(
            open_netns_file(Path::new("/proc/self/ns/net")),
            Err(NetnsError::OwnNetns { .. })
        ));
        assert!(matches!(
            open_netns_file(&dir.path().join("absent")),
            Err(NetnsError::Open { .. })
        ));
    }

    /// An application whose accept queue is full drops the SYNs: connecting gives up within
    /// the bound instead of the kernel's two minutes of retries.
    #[tokio::test]
    async fn connecting_to_an_application_that_never_accepts_is_bounded() {
        // Backlog 0: the queue holds one connection, the next SYNs are dropped.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let socket = socket2::Socket::from(listener);
        socket.listen(0).expect("listen");
        let netns = PodNetns::own().expect("own namespace");
        let mut held = Vec::new();
        let mut timed_out = None;
        for _ in 0..8 {
            match netns
                .connect_app_within(addr, Duration::from_millis(300))
                .await
            {
                Ok(stream) => held.push(stream),
                Err(e) => {
                    timed_out = Some(e);
                    break;
                }
            }
        }
        let err = timed_out.expect("a connection over the full queue times out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(held.len() <= 2, "{} connections accepted", held.len());
    }
}
