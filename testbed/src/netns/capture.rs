//! In-memory packet capture on one interface (or all interfaces) of a namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::socket::LinkAddr;
use socket2::{Domain, Protocol, SockFilter, Socket, Type};

use super::error::{Error, Result};
use super::sys;

/// Most bytes a capture keeps in memory; frames beyond it are only counted.
pub const MAX_CAPTURE_BYTES: usize = 256 << 20;

/// `ETH_P_ALL`: every protocol. The socket call wants it in network byte order.
const ETH_P_ALL: u16 = 0x0003;
/// Large enough for a GSO super-frame on a veth (64 KiB) with room to spare.
const READ_BUFFER: usize = 256 << 10;
/// How often the reader checks whether it should stop.
const POLL: Duration = Duration::from_millis(20);
/// After `stop`, how long the reader keeps draining frames already queued.
const DRAIN: Duration = Duration::from_millis(500);

/// A running capture: an `AF_PACKET` raw socket inside a network namespace, read by a
/// background thread that appends every frame (link-layer header included) to memory.
///
/// Frames are recorded from the moment [`Capture::start`] returns until [`Capture::stop`].
/// Dropping a capture without stopping it discards what it saw.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Captured>>,
    netns_path: PathBuf,
    interface: Option<String>,
}

/// What a [`Capture`] saw.
#[derive(Debug, Default)]
pub struct Captured {
    /// Every kept frame, concatenated in arrival order (link-layer header included).
    pub bytes: Vec<u8>,
    /// Number of frames kept in `bytes`.
    pub packets: usize,
    /// Frames not kept because `bytes` had reached [`MAX_CAPTURE_BYTES`].
    pub overflow_packets: usize,
    /// Bytes of the frames counted in `overflow_packets`.
    pub overflow_bytes: usize,
    /// Frames longer than the read buffer (256 KiB), kept truncated.
    pub truncated_packets: usize,
    /// The error that ended the capture early, if any (timeouts are not errors).
    pub error: Option<std::io::Error>,
    /// The (source, destination) addresses of every Ethernet frame carrying IPv4 or IPv6,
    /// overflowing ones included.
    pub ip_pairs: std::collections::BTreeSet<(std::net::IpAddr, std::net::IpAddr)>,
}

impl Captured {
    /// Whether `needle` occurs in the captured bytes.
    ///
    /// The search runs over the concatenation of frames, so a match could in theory straddle
    /// two frames (a false positive, never a false negative for data carried in one frame).
    /// Data split across frames (e.g. by TCP segmentation) is not matched.
    pub fn contains(&self, needle: &[u8]) -> bool {
        needle.is_empty() || self.bytes.windows(needle.len()).any(|w| w == needle)
    }
}

impl Capture {
    /// Starts capturing every frame received or sent on interface `ifname` of the network
    /// namespace at `netns_path` (e.g. a node's fabric port in the fabric namespace).
    ///
    /// The socket is open and filtered when this returns, so frames sent afterwards are seen.
    pub fn start(netns_path: impl AsRef<Path>, ifname: &str) -> Result<Capture> {
        Self::spawn(netns_path.as_ref(), Some(ifname))
    }

    /// Starts capturing frames of every interface of the namespace at `netns_path` (a frame
    /// crossing a bridge is seen once per port it passes).
    pub fn start_any(netns_path: impl AsRef<Path>) -> Result<Capture> {
        Self::spawn(netns_path.as_ref(), None)
    }

    fn spawn(netns_path: &Path, ifname: Option<&str>) -> Result<Capture> {
        let file = File::open(netns_path)
            .map_err(|e| Error::sys(format!("open {}", netns_path.display()), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let thread_stop = Arc::clone(&stop);
        let thread_path = netns_path.to_owned();
        let thread_ifname = ifname.map(str::to_owned);
        let reader = std::thread::Builder::new()
            .name("netns-capture".to_owned())
            .spawn(
                move || match open(&file, &thread_path, thread_ifname.as_deref()) {
                    Ok((socket, ifindex)) => {
                        drop(file);
                        let _ = ready_tx.send(Ok(()));
                        read_loop(&socket, ifindex, &thread_stop)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Captured::default()
                    }
                },
            )
            .map_err(|e| Error::sys("spawn capture thread", e))?;
        let describe = || {
            format!(
                "capture on {} in {}",
                ifname.unwrap_or("all interfaces"),
                netns_path.display()
            )
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Capture {
                stop,
                reader: Some(reader),
                netns_path: netns_path.to_owned(),
                interface: ifname.map(str::to_owned),
            }),
            Ok(Err(e)) => {
                let _ = reader.join();
                Err(e)
            }
            Err(_) => Err(match reader.join() {
                Err(payload) => sys::panicked(payload.as_ref()),
                Ok(_) => Error::Panicked(format!("{} exited before starting", describe())),
            }),
        }
    }

    /// The namespace this capture runs in.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The captured interface, `None` for all interfaces.
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// Stops the capture and returns what it saw. Frames already queued on the socket are
    /// drained first (for at most half a second), so everything sent before `stop` and
    /// already delivered by the kernel is included.
    pub fn stop(mut self) -> Captured {
        self.stop.store(true, Ordering::SeqCst);
        match self.reader.take().map(JoinHandle::join) {
            Some(Ok(captured)) => captured,
            Some(Err(payload)) => Captured {
                error: Some(std::io::Error::other(sys::panicked(payload.as_ref()))),
                ..Captured::default()
            },
            None => Captured::default(),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// On the capture thread: enters the namespace and opens the filtered packet socket.
fn open(file: &File, path: &Path, ifname: Option<&str>) -> Result<(Socket, Option<usize>)> {
    nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| Error::sys(format!("setns into {}", path.display()), e))?;
    let ifindex = match ifname {
        Some(name) => {
            let index = nix::net::if_::if_nametoindex(name)
                .map_err(|e| Error::sys(format!("interface {name} in {}", path.display()), e))?;
            Some(index)
        }
        None => None,
    };
    let protocol = Protocol::from(i32::from(ETH_P_ALL.to_be()));
    let socket = Socket::new(Domain::PACKET, Type::RAW, Some(protocol))
        .map_err(|e| Error::sys("open AF_PACKET socket", e))?;
    if let Some(index) = ifindex {
        // Neither socket2 nor nix can build the `sockaddr_ll` that `bind(2)` wants without
        // `unsafe`, and SO_BINDTODEVICE (`Socket::bind_device`) is not consulted on a packet
        // socket's receive path. A classic BPF program matching the frame's interface index
        // does the binding in the kernel instead; frames queued before it was attached are
        // filtered again in `read_loop`.
        socket
            .attach_filter(&ifindex_filter(index))
            .map_err(|e| Error::sys("attach capture filter", e))?;
    }
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(8 << 20);
    socket
        .set_read_timeout(Some(POLL))
        .map_err(|e| Error::sys("set capture read timeout", e))?;
    Ok((socket, ifindex.map(|i| i as usize)))
}

/// `ld ifindex; jeq #index, accept, drop`.
fn ifindex_filter(index: u32) -> [SockFilter; 4] {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    // SKF_AD_OFF (-0x1000) + SKF_AD_IFINDEX (8), as the unsigned immediate.
    const SKF_AD_IFINDEX: u32 = 0xffff_f000 + 8;
    [
        SockFilter::new(BPF_LD_W_ABS, 0, 0, SKF_AD_IFINDEX),
        SockFilter::new(BPF_JMP_JEQ_K, 0, 1, index),
        SockFilter::new(BPF_RET_K, 0, 0, u32::MAX),
        SockFilter::new(BPF_RET_K, 0, 0, 0),
    ]
}

fn read_loop(socket: &Socket, ifindex: Option<usize>, stop: &AtomicBool) -> Captured {
    let mut captured = Captured::default();
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && stop.load(Ordering::SeqCst) {
            drain_until = Some(Instant::now() + DRAIN);
        }
        if drain_until.is_some_and(|deadline| Instant::now() >= deadline) {
            break;
        }
        match nix::sys::socket::recvfrom::<LinkAddr>(socket.as_raw_fd(), &mut buffer) {
            Ok((len, from)) => {
                let wanted = match (ifindex, from) {
                    (None, _) => true,
                    (Some(want), Some(from)) => from.ifindex() == want,
                    (Some(_), None) => false,
                };
                if wanted {
                    record(&mut captured, &buffer[..len], len == buffer.len());
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                // Nothing queued: once stopping, the queue is drained.
                if drain_until.is_some() || stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            Err(e) => {
                captured.error = Some(e.into());
                break;
            }
        }
    }
    captured
}

/// The source and destination of an Ethernet frame carrying IPv4 or IPv6.
fn ip_pair(frame: &[u8]) -> Option<(std::net::IpAddr, std::net::IpAddr)> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let at = |from: usize, len: usize| frame.get(from..from + len);
    match at(12, 2)? {
        [0x08, 0x00] => {
            let src: [u8; 4] = at(26, 4)?.try_into().ok()?;
            let dst: [u8; 4] = at(30, 4)?.try_into().ok()?;
            Some((Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into()))
        }
        [0x86, 0xdd] => {
            let src: [u8; 16] = at(22, 16)?.try_into().ok()?;
            let dst: [u8; 16] = at(38, 16)?.try_into().ok()?;
            Some((Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into()))
        }
        _ => None,
    }
}

fn record(captured: &mut Captured, frame: &[u8], truncated: bool) {
    if let Some(pair) = ip_pair(frame) {
        captured.ip_pairs.insert(pair);
    }
    if captured.bytes.len() + frame.len() > MAX_CAPTURE_BYTES {
        captured.overflow_packets += 1;
        captured.overflow_bytes += frame.len();
        return;
    }
    captured.bytes.extend_from_slice(frame);
    captured.packets += 1;
    if truncated {
        captured.truncated_packets += 1;
    }
}
