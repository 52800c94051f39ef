//! HBONE over real loopback sockets: a throwaway CA, a server with a scriptable handler in
//! front of small TCP applications, and the pooled client.
//!
//! Every test is bounded by a timeout and owns the tasks it spawns (aborted on drop).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::verify::{SpiffeServerVerifier, mtls_client_config, mtls_server_config};
use membrane_identity::{
    PeerCheck, SharedTrustBundle, SpiffeId, TrustBundle, TrustDomain, WorkloadSvid, crypto_provider,
};
use membrane_testbed::OfflineCa;
use membrane_ztunnel::hbone::{
    ALPN_H2, Accepted, ConnectFuture, ConnectHandler, ConnectHeaders, ConnectRefusal,
    ConnectRequest, Dial, H2Stream, HboneError, HbonePool, PoolConfig, PoolKey, serve_connection,
};
use membrane_ztunnel::relay::{RelayEnd, RelayResult, Side};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const TEST_TIMEOUT: Duration = Duration::from_secs(90);
const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/frontend/sa/web";

// === certificates ===

fn td() -> TrustDomain {
    parse_trust_domain("cluster.local").expect("trust domain")
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).expect("spiffe id")
}

/// The shared offline CA, with what these tests build from it.
struct TestCa(OfflineCa);

impl TestCa {
    fn new(name: &str) -> Self {
        Self(OfflineCa::root(name).expect("root"))
    }

    fn bundle(&self) -> SharedTrustBundle {
        SharedTrustBundle::new(TrustBundle::new(td(), [self.0.der().clone()]).expect("bundle"))
    }

    fn svid(&self, uri: &str) -> WorkloadSvid {
        self.0.svid(uri, &[]).expect("svid")
    }

    /// What the inbound side builds: any peer of the trust domain, ALPN left to the module.
    fn server_tls(&self, svid: &WorkloadSvid) -> Arc<rustls::ServerConfig> {
        let cfg = mtls_server_config(
            svid,
            self.bundle(),
            PeerCheck::TrustDomain(td()),
            crypto_provider(),
        )
        .expect("server config");
        Arc::new(cfg)
    }

    /// What the outbound side builds: exactly `dst`.
    fn client_tls(&self, svid: &WorkloadSvid, dst: &str) -> Arc<rustls::ClientConfig> {
        let mut cfg = mtls_client_config(
            svid,
            self.bundle(),
            PeerCheck::Exact(id(dst)),
            crypto_provider(),
        )
        .expect("client config");
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(cfg)
    }
}

// === the HBONE server and its handler ===

enum Mode {
    /// Connect to this application.
    Forward(SocketAddr),
    /// Refuse with this.
    Refuse(ConnectRefusal),
}

struct TestHandler {
    mode: Mode,
    calls: Mutex<Vec<ConnectRequest>>,
    finished: mpsc::UnboundedSender<(ConnectRequest, String, u64, u64)>,
}

impl ConnectHandler for TestHandler {
    type Admission = ();
    type App = tokio::net::TcpStream;

    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, ()> {
        self.calls.lock().expect("lock").push(req);
        Box::pin(async move {
            match &self.mode {
                Mode::Forward(app) => TcpStream::connect(app)
                    .await
                    .map(Accepted::from)
                    .map_err(|e| ConnectRefusal::Unreachable(e.to_string())),
                Mode::Refuse(refusal) => Err(refusal.clone()),
            }
        })
    }

    fn finished(&self, req: &ConnectRequest, result: &RelayResult, (): ()) {
        let end = match &result.end {
            RelayEnd::Closed => "closed".to_string(),
            RelayEnd::Reset(Side::A) => "reset by app".to_string(),
            RelayEnd::Reset(Side::B) => "reset by tunnel".to_string(),
            RelayEnd::Error { side, error } => format!("error on {side}: {error}"),
            RelayEnd::Idle(period) => format!("idle for {period:?}"),
        };
        let _ = self
            .finished
            .send((req.clone(), end, result.a_to_b, result.b_to_a));
    }
}

struct Server {
    addr: SocketAddr,
    handler: Arc<TestHandler>,
    finished: mpsc::UnboundedReceiver<(ConnectRequest, String, u64, u64)>,
    /// Results of `serve_connection`, one per TCP connection.
    conn_results: mpsc::UnboundedReceiver<Result<(), HboneError>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

impl Server {
    async fn start(tls: Arc<rustls::ServerConfig>, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (finished_tx, finished) = mpsc::unbounded_channel();
        let (results_tx, conn_results) = mpsc::unbounded_channel();
        let handler = Arc::new(TestHandler {
            mode,
            calls: Mutex::new(Vec::new()),
            finished: finished_tx,
        });
        let dyn_handler: Arc<dyn ConnectHandler<Admission = (), App = tokio::net::TcpStream>> =
            handler.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (tls, handler, results) =
                    (tls.clone(), dyn_handler.clone(), results_tx.clone());
                conns.spawn(async move {
                    let _ = results.send(serve_connection(tcp, tls, handler).await);
                });
            }
        });
        Self {
            addr,
            handler,
            finished,
            conn_results,
            task,
        }
    }

    fn calls(&self) -> Vec<ConnectRequest> {
        self.handler.calls.lock().expect("lock").clone()
    }

    async fn next_finished(&mut self) -> (ConnectRequest, String, u64, u64) {
        timeout(Duration::from_secs(10), self.finished.recv())
            .await
            .expect("relay should finish")
            .expect("handler alive")
    }
}

// === the client side ===

#[derive(Default)]
struct TestDial {
    dials: AtomicUsize,
}

impl Dial for TestDial {
    fn dial(&self, addr: SocketAddr) -> membrane_ztunnel::hbone::DialFuture<'_> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            TcpStream::connect(addr)
                .await
                .map(membrane_ztunnel::hbone::Carrier::tcp)
        })
    }
}

fn key(src_ip: &str, src: &str, server: &Server) -> PoolKey {
    PoolKey {
        src_ip: src_ip.parse().expect("ip"),
        src: id(src),
        dst: id(SERVER_ID),
        dst_addr: server.addr,
        via: None,
    }
}

fn forwarded(ip: &str) -> ConnectHeaders {
    ConnectHeaders {
        forwarded_for: Some(ip.parse().expect("ip")),
        ..ConnectHeaders::default()
    }
}

/// An application listener; the destination the client asks for.
async fn app_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Accepts connections forever and echoes each until EOF.
fn spawn_echo(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            conns.spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// An echo application and an HBONE server (`SERVER_ID`'s SVID from `ca`) forwarding to it.
async fn echo_behind_server(ca: &TestCa) -> (SocketAddr, JoinHandle<()>, Server) {
    let (app, app_addr) = app_listener().await;
    let echo = spawn_echo(app);
    let server = Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
    (app_addr, echo, server)
}

// === payload with checksums ===

/// Deterministic bytes (xorshift64) and an FNV-1a checksum over them.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Writes `total` pattern bytes, shuts down; returns the checksum of what was sent.
async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, total: usize) -> u64 {
    let mut pattern = Pattern(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut left, mut sum) = (total, FNV_OFFSET);
    while left > 0 {
        let n = left.min(buf.len());
        pattern.fill(&mut buf[..n]);
        sum = fnv1a(sum, &buf[..n]);
        w.write_all(&buf[..n]).await.expect("write payload");
        left -= n;
    }
    w.shutdown().await.expect("shutdown");
    sum
}

/// Reads to EOF; returns length and checksum.
async fn read_checksum<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(usize, u64)> {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut len, mut sum) = (0, FNV_OFFSET);
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((len, sum));
        }
        len += n;
        sum = fnv1a(sum, &buf[..n]);
    }
}

async fn bounded<F: Future>(f: F) -> F::Output {
    timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

/// Waits until `cond` holds, checking every 20 ms, for at most `within`.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

// === tests ===

/// (a) 20 MB each way through the tunnel, checksummed, with the identity and headers the
/// handler sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_20_mb_each_way_intact() {
    bounded(async {
        const SIZE: usize = 20 * 1024 * 1024;
        let ca = TestCa::new("root");
        let (server_svid, client_svid) = (ca.svid(SERVER_ID), ca.svid(CLIENT_ID));
        let (app, app_addr) = app_listener().await;
        // The application reads everything while sending its own 20 MB, then closes.
        let app_task = tokio::spawn(async move {
            let (mut tcp, _) = app.accept().await.expect("accept");
            let (mut r, mut w) = tcp.split();
            let (received, sent) =
                tokio::join!(read_checksum(&mut r), send_pattern(&mut w, 0xA11CE, SIZE));
            (received.expect("app read"), sent)
        });
        let mut server = Server::start(ca.server_tls(&server_svid), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig::default());
        let dial = Arc::new(TestDial::default());
        let headers = ConnectHeaders {
            forwarded_for: Some("fd00::42".parse().expect("ip")),
            baggage: Some("k8s.namespace.name=frontend".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            host: None,
        };
        let stream = pool
            .connect(
                key("10.0.0.7", CLIENT_ID, &server),
                ca.client_tls(&client_svid, SERVER_ID),
                dial.clone(),
                app_addr,
                headers.clone(),
            )
            .await
            .expect("tunnel");

        let (mut r, mut w) = tokio::io::split(stream);
        let (received, sent) =
            tokio::join!(read_checksum(&mut r), send_pattern(&mut w, 0xB0B, SIZE));
        let (client_len, client_sum) = received.expect("client read");
        let ((app_len, app_sum), app_sent) = app_task.await.expect("app");
        assert_eq!(app_len, SIZE, "application received everything");
        assert_eq!(app_sum, sent, "client → app bytes intact");
        assert_eq!(client_len, SIZE, "client received everything");
        assert_eq!(client_sum, app_sent, "app → client bytes intact");
        drop(r.unsplit(w));

        let calls = server.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].peer,
            id(CLIENT_ID),
            "handler sees the client's SPIFFE ID"
        );
        assert_eq!(calls[0].authority, app_addr);
        assert_eq!(calls[0].forwarded_for, headers.forwarded_for);
        assert_eq!(calls[0].baggage, headers.baggage);
        assert_eq!(calls[0].traceparent, headers.traceparent);
        let (_, end, from_app, to_app) = server.next_finished().await;
        assert_eq!(end, "closed");
        assert_eq!((from_app, to_app), (SIZE as u64, SIZE as u64));
        assert_eq!(dial.dials.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// (b) The client half-closes and still receives what the application sends afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let app_task = tokio::spawn(async move {
            let (mut tcp, _) = app.accept().await.expect("accept");
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).await.expect("app read");
            // Only now, after the client's EOF, does the application answer.
            tcp.write_all(b"reply written after your EOF")
                .await
                .expect("app write");
            tcp.shutdown().await.expect("app shutdown");
            got
        });
        let mut server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig::default());
        let mut stream = pool
            .connect(
                key("10.0.0.7", CLIENT_ID, &server),
                ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID),
                Arc::new(TestDial::default()),
                app_addr,
                forwarded("10.0.0.7"),
            )
            .await
            .expect("tunnel");
        stream.write_all(b"request").await.expect("write");
        stream.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .await
            .expect("read after half-close");
        assert_eq!(reply, b"reply written after your EOF");
        assert_eq!(app_task.await.expect("app"), b"request");
        drop(stream);
        let (req, end, from_app, to_app) = server.next_finished().await;
        assert_eq!(
            req.forwarded_for,
            Some("10.0.0.7".parse::<IpAddr>().expect("ip"))
        );
        assert_eq!(end, "closed");
        assert_eq!((from_app, to_app), (28, 7));
    })
    .await;
}

/// (c) The application resets its connection: the client's read fails with a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_reset_reaches_the_client() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let app_task = tokio::spawn(async move {
            let (mut tcp, _) = app.accept().await.expect("accept");
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).await.expect("app read");
            tcp.set_zero_linger().expect("linger 0");
            drop(tcp);
        });
        let mut server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig::default());
        let mut stream = pool
            .connect(
                key("10.0.0.7", CLIENT_ID, &server),
                ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID),
                Arc::new(TestDial::default()),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect("tunnel");
        stream.write_all(b"hello").await.expect("write");
        app_task.await.expect("app");
        let mut buf = [0u8; 16];
        let err = stream
            .read(&mut buf)
            .await
            .expect_err("the application's reset must surface as an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let (_, end, _, _) = server.next_finished().await;
        assert_eq!(end, "reset by app");
    })
    .await;
}

/// Dropping the client's stream without a shutdown resets the application's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_resets_the_application() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let app_task = tokio::spawn(async move {
            let (mut tcp, _) = app.accept().await.expect("accept");
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).await.expect("app read");
            let mut rest = [0u8; 16];
            tcp.read(&mut rest).await
        });
        let mut server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig::default());
        let mut stream = pool
            .connect(
                key("10.0.0.7", CLIENT_ID, &server),
                ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID),
                Arc::new(TestDial::default()),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect("tunnel");
        stream.write_all(b"hello").await.expect("write");
        // Let the bytes reach the application before the abort.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stream);
        let read = app_task.await.expect("app");
        let err = read.expect_err("an aborted tunnel must not look like a clean EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let (_, end, _, _) = server.next_finished().await;
        assert_eq!(end, "reset by tunnel");
    })
    .await;
}

/// H2Stream reports its stream ID and is usable as a plain tokio byte stream type.
#[test]
fn h2_stream_is_send_and_unpin() {
    fn assert_traits<T: Send + Unpin + AsyncRead + AsyncWrite + 'static>() {}
    assert_traits::<H2Stream>();
}

#[path = "hbone/pool.rs"]
mod pool;
#[path = "hbone/refusals.rs"]
mod refusals;
