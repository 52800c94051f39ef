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

/// (d) A refusing handler: the client gets the status, the application nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_refusal_maps_to_status() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let client_tls = ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID);
        for (refusal, status) in [
            (ConnectRefusal::Denied("policy says no".into()), 403),
            (ConnectRefusal::Unreachable("nobody home".into()), 503),
            (ConnectRefusal::Unauthenticated("who are you".into()), 401),
        ] {
            let server =
                Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Refuse(refusal)).await;
            let pool = HbonePool::new(PoolConfig::default());
            let result = pool
                .connect(
                    key("10.0.0.7", CLIENT_ID, &server),
                    client_tls.clone(),
                    Arc::new(TestDial::default()),
                    app_addr,
                    ConnectHeaders::default(),
                )
                .await;
            match result {
                Err(HboneError::Refused(s)) => assert_eq!(s.as_u16(), status),
                other => panic!("expected Refused({status}), got {other:?}"),
            }
            assert_eq!(server.calls().len(), 1);
            // The refused stream released its slot: the connection stays pooled and idle.
            assert_eq!(pool.connection_count(), 1);
        }
        let accepted = timeout(Duration::from_millis(300), app.accept()).await;
        assert!(accepted.is_err(), "the application must receive nothing");
    })
    .await;
}

/// (e) A client with an SVID from another CA, or with no certificate, is refused during TLS;
/// the handler is never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_or_anonymous_clients_are_refused() {
    bounded(async {
        let ca = TestCa::new("root");
        let rogue = TestCa::new("rogue root");
        let (_app, app_addr) = app_listener().await;
        let mut server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;

        // Signed by another CA, but trusting the real one (so only the server can refuse).
        let rogue_svid = rogue.svid(CLIENT_ID);
        let rogue_tls = ca.client_tls(&rogue_svid, SERVER_ID);
        // No client certificate at all.
        let anonymous_tls = {
            let verifier = Arc::new(SpiffeServerVerifier::new(
                ca.bundle(),
                PeerCheck::Exact(id(SERVER_ID)),
                crypto_provider(),
            ));
            let cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Arc::new(cfg)
        };
        for tls in [rogue_tls, anonymous_tls] {
            let pool = HbonePool::new(PoolConfig::default());
            let result = pool
                .connect(
                    key("10.0.0.7", CLIENT_ID, &server),
                    tls,
                    Arc::new(TestDial::default()),
                    app_addr,
                    ConnectHeaders::default(),
                )
                .await;
            let err = result.expect_err("refused");
            assert!(
                !matches!(err, HboneError::Refused(_)),
                "refused at TLS level, not by a status: {err:?}"
            );
            let served = timeout(Duration::from_secs(5), server.conn_results.recv())
                .await
                .expect("server result")
                .expect("server alive");
            assert!(
                matches!(served, Err(HboneError::Tls(_))),
                "server must fail the TLS handshake: {served:?}"
            );
        }
        assert!(server.calls().is_empty(), "handler never called");
    })
    .await;
}

/// (f) Without spreading, 200 concurrent tunnels with one key share exactly two connections
/// (100 streams each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_multiplexes_up_to_max_streams() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let echo = spawn_echo(app);
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig {
            spread_connections: 1,
            ..PoolConfig::default()
        });
        let dial = Arc::new(TestDial::default());
        let tls = ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID);
        let pool_key = key("10.0.0.7", CLIENT_ID, &server);

        let mut opening = JoinSet::new();
        for _ in 0..200 {
            let (pool, key, tls, dial) =
                (pool.clone(), pool_key.clone(), tls.clone(), dial.clone());
            opening.spawn(async move {
                pool.connect(key, tls, dial, app_addr, ConnectHeaders::default())
                    .await
            });
        }
        let mut streams = Vec::new();
        while let Some(joined) = opening.join_next().await {
            streams.push(joined.expect("task").expect("tunnel"));
        }
        assert_eq!(streams.len(), 200);
        assert_eq!(
            pool.connection_count(),
            2,
            "200 streams / 100 per connection"
        );
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2, "no redundant dials");

        // Every tunnel works.
        let mut checks = JoinSet::new();
        for (i, mut stream) in streams.into_iter().enumerate() {
            checks.spawn(async move {
                let msg = format!("tunnel {i}");
                stream.write_all(msg.as_bytes()).await.expect("write");
                stream.shutdown().await.expect("shutdown");
                let mut echoed = Vec::new();
                stream.read_to_end(&mut echoed).await.expect("read");
                assert_eq!(echoed, msg.as_bytes());
            });
        }
        while let Some(joined) = checks.join_next().await {
            joined.expect("echo check");
        }
        // All streams are done: a new tunnel reuses a pooled connection.
        let again = pool
            .connect(
                pool_key,
                tls,
                dial.clone(),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect("tunnel");
        drop(again);
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2);
        echo.abort();
    })
    .await;
}

/// (f) Different source identities never share a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_never_share_a_connection() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let echo = spawn_echo(app);
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        // No spreading: any second connection would come from the identity split alone.
        let pool = HbonePool::new(PoolConfig {
            spread_connections: 1,
            ..PoolConfig::default()
        });
        let dial = Arc::new(TestDial::default());
        let other_id = "spiffe://cluster.local/ns/batch/sa/trainer";
        // One SVID per identity, as the certificate manager hands out (the pool reuses a
        // connection only for the certificate it presents).
        let client_tls = ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID);
        let other_tls = ca.client_tls(&ca.svid(other_id), SERVER_ID);
        let mut streams = Vec::new();
        for (src_ip, src, tls) in [
            ("10.0.0.7", CLIENT_ID, &client_tls),
            ("10.0.0.8", other_id, &other_tls),
            ("10.0.0.7", CLIENT_ID, &client_tls),
        ] {
            let stream = pool
                .connect(
                    key(src_ip, src, &server),
                    tls.clone(),
                    dial.clone(),
                    app_addr,
                    forwarded(src_ip),
                )
                .await
                .expect("tunnel");
            streams.push(stream);
        }
        assert_eq!(pool.connection_count(), 2, "one connection per identity");
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2);
        let peers: Vec<_> = server.calls().into_iter().map(|c| c.peer).collect();
        assert_eq!(peers, vec![id(CLIENT_ID), id(other_id), id(CLIENT_ID)]);
        drop(streams);
        echo.abort();
    })
    .await;
}

/// (f) Idle connections are reaped after `idle_timeout`; busy ones are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_reaped() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let echo = spawn_echo(app);
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig {
            idle_timeout: Duration::from_millis(200),
            ..PoolConfig::default()
        });
        let shutdown = CancellationToken::new();
        let reaper = tokio::spawn(pool.run_reaper(shutdown.clone()));

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
        // Busy for longer than the idle timeout: kept.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            pool.connection_count(),
            1,
            "a connection with a stream is not idle"
        );

        stream.write_all(b"bye").await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await.expect("read");
        drop(stream);
        assert!(
            eventually(Duration::from_secs(5), || pool.connection_count() == 0).await,
            "idle connection reaped"
        );

        shutdown.cancel();
        timeout(Duration::from_secs(5), reaper)
            .await
            .expect("reaper stops when cancelled")
            .expect("reaper task");
        echo.abort();
    })
    .await;
}

/// A connection the server closes leaves the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_the_peer_leave_the_pool() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let echo = spawn_echo(app);
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig::default());
        let dial = Arc::new(TestDial::default());
        let tls = ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID);
        let pool_key = key("10.0.0.7", CLIENT_ID, &server);
        let stream = pool
            .connect(
                pool_key.clone(),
                tls.clone(),
                dial.clone(),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect("tunnel");
        drop(stream);
        assert_eq!(pool.connection_count(), 1);
        let addr = server.addr;
        drop(server); // aborts every server connection task: the TCP connection closes
        assert!(
            eventually(Duration::from_secs(5), || pool.connection_count() == 0).await,
            "dead connection removed"
        );
        // A fresh server on the same address is dialled anew.
        let listener = TcpListener::bind(addr).await.expect("rebind");
        let tls_server = ca.server_tls(&ca.svid(SERVER_ID));
        let handler: Arc<dyn ConnectHandler<Admission = (), App = tokio::net::TcpStream>> =
            Arc::new(TestHandler {
                mode: Mode::Forward(app_addr),
                calls: Mutex::new(Vec::new()),
                finished: mpsc::unbounded_channel().0,
            });
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            serve_connection(tcp, tls_server, handler).await
        });
        let stream = pool
            .connect(
                pool_key,
                tls,
                dial.clone(),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect("tunnel on a new connection");
        drop(stream);
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2);
        serving.abort();
        echo.abort();
    })
    .await;
}

/// A client dialling a peer with another identity than the key's is refused by its verifier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_identity_is_refused() {
    bounded(async {
        let ca = TestCa::new("root");
        let (_app, app_addr) = app_listener().await;
        let impostor = "spiffe://cluster.local/ns/backend/sa/impostor";
        let server =
            Server::start(ca.server_tls(&ca.svid(impostor)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig::default());
        let err = pool
            .connect(
                key("10.0.0.7", CLIENT_ID, &server),
                ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID),
                Arc::new(TestDial::default()),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect_err("impostor refused");
        assert!(matches!(err, HboneError::Tls(_)), "{err:?}");
        assert_eq!(pool.connection_count(), 0);
        assert!(server.calls().is_empty());
    })
    .await;
}

/// (g) Malformed requests (authority neither ip:port nor a DNS name and port, method not
/// CONNECT) get 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400() {
    bounded(async {
        let ca = TestCa::new("root");
        let (_app, app_addr) = app_listener().await;
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;

        // A raw HTTP/2 client over the same mutual TLS.
        let tcp = TcpStream::connect(server.addr).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID))
            .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
            .await
            .expect("tls");
        let (sender, connection) = h2::client::handshake(tls).await.expect("h2");
        let driver = tokio::spawn(connection);

        let requests = [
            (http::Method::CONNECT, "bad_name.example:80"),
            (http::Method::CONNECT, "example.com:0"),
            (http::Method::CONNECT, "10.0.0.1:0"),
            (http::Method::GET, "https://10.0.0.1:80/"),
        ];
        for (method, uri) in requests {
            let request = http::Request::builder()
                .method(method.clone())
                .uri(uri)
                .body(())
                .expect("request");
            let mut sender = sender.clone().ready().await.expect("ready");
            let (response, _send) = sender.send_request(request, false).expect("send");
            let response = response.await.expect("response");
            assert_eq!(
                response.status(),
                http::StatusCode::BAD_REQUEST,
                "{method} {uri}"
            );
        }
        // A well-formed request on the same connection still works.
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(app_addr.to_string())
            .body(())
            .expect("request");
        let mut ready = sender.clone().ready().await.expect("ready");
        let (response, mut send) = ready.send_request(request, false).expect("send");
        let response = response.await.expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        send.send_data(Bytes::from_static(b""), true).expect("end");
        assert_eq!(
            server.calls().len(),
            1,
            "only the well-formed request reached the handler"
        );
        drop((send, response, sender));
        driver.abort();
    })
    .await;
}

/// H2Stream reports its stream ID and is usable as a plain tokio byte stream type.
#[test]
fn h2_stream_is_send_and_unpin() {
    fn assert_traits<T: Send + Unpin + AsyncRead + AsyncWrite + 'static>() {}
    assert_traits::<H2Stream>();
}

/// Concurrent tunnels of one key first spread over `spread_connections` connections, then
/// share the least-loaded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_spreads_busy_tunnels_over_connections() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let echo = spawn_echo(app);
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let pool = HbonePool::new(PoolConfig {
            spread_connections: 3,
            ..PoolConfig::default()
        });
        let dial = Arc::new(TestDial::default());
        let tls = ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID);
        let pool_key = key("10.0.0.7", CLIENT_ID, &server);
        let mut open = Vec::new();
        for expected in [1, 2, 3, 3, 3] {
            let stream = pool
                .connect(
                    pool_key.clone(),
                    tls.clone(),
                    dial.clone(),
                    app_addr,
                    ConnectHeaders::default(),
                )
                .await
                .expect("tunnel");
            open.push(stream);
            assert_eq!(pool.connection_count(), expected);
        }
        assert_eq!(dial.dials.load(Ordering::SeqCst), 3);
        drop(open);
        // Idle connections are reused before anything new is dialled.
        let _again = pool
            .connect(
                pool_key,
                tls,
                dial.clone(),
                app_addr,
                ConnectHeaders::default(),
            )
            .await
            .expect("tunnel");
        assert_eq!(dial.dials.load(Ordering::SeqCst), 3);
        echo.abort();
    })
    .await;
}
