//! How long the listening side keeps an established HBONE connection: no new tunnel once the
//! peer's certificate expired or its root was removed from the trust bundle (open ones run
//! on), and closed after the idle timeout without a tunnel; and how long a handshake keeps
//! its turn while others wait for one. Its own test binary: the process-wide limits are set
//! short here.
//!
//! Real loopback sockets, a throwaway CA, a raw HTTP/2 client over mutual TLS; every test is
//! bounded by a timeout.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_identity::verify::{mtls_client_config, mtls_server_config};
use membrane_identity::{
    PeerCheck, SharedTrustBundle, SpiffeId, TrustBundle, TrustDomain, WorkloadSvid, crypto_provider,
};
use membrane_testbed::OfflineCa;
use membrane_ztunnel::hbone::{
    ALPN_H2, Accepted, ConnectFuture, ConnectHandler, ConnectRefusal, ConnectRequest,
    HandshakeLimits, serve_connection, set_handshake_limits,
};
use membrane_ztunnel::relay::RelayResult;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/frontend/sa/web";
const IDLE: Duration = Duration::from_secs(1);
/// Handshakes in progress at once in this process (one peer address: an eighth, 8).
const MAX_PENDING: usize = 64;

/// The limits of this process: a one-second idle timeout, 64 handshakes in progress, a turn
/// taken back after 300 ms when another connection waits for one.
fn limits() -> &'static HandshakeLimits {
    static LIMITS: OnceLock<HandshakeLimits> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let limits = HandshakeLimits {
            idle_timeout: IDLE,
            max_pending: MAX_PENDING,
            evict_after: Duration::from_millis(300),
            ..HandshakeLimits::default()
        };
        assert!(set_handshake_limits(limits.clone()), "limits set once");
        limits
    })
}

fn td() -> TrustDomain {
    parse_trust_domain("cluster.local").expect("trust domain")
}

/// Forwards every tunnel to an application; checks peers against the bundles again after
/// they change.
struct Forward(SocketAddr, SharedTrustBundle);

impl ConnectHandler for Forward {
    type Admission = ();
    type App = TcpStream;

    fn trust_bundles(&self) -> Option<SharedTrustBundle> {
        Some(self.1.clone())
    }

    fn connect(&self, _req: ConnectRequest) -> ConnectFuture<'_, ()> {
        Box::pin(async move {
            TcpStream::connect(self.0)
                .await
                .map(Accepted::from)
                .map_err(|e| ConnectRefusal::Unreachable(e.to_string()))
        })
    }

    fn finished(&self, _req: &ConnectRequest, _result: &RelayResult, (): ()) {}
}

/// An echo application and an HBONE server in front of it; the server's address.
async fn echo_server(ca: &OfflineCa, bundle: &SharedTrustBundle) -> (SocketAddr, SocketAddr) {
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app_addr = app.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut tcp, _)) = app.accept().await {
            conns.spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let tls = Arc::new(
        mtls_server_config(
            &ca.svid(SERVER_ID, &[]).expect("svid"),
            bundle.clone(),
            PeerCheck::TrustDomain(td()),
            crypto_provider(),
        )
        .expect("server config"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handler: Arc<dyn ConnectHandler<Admission = (), App = TcpStream>> =
        Arc::new(Forward(app_addr, bundle.clone()));
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, handler) = (tls.clone(), handler.clone());
            conns.spawn(async move {
                let _ = serve_connection(tcp, tls, handler).await;
            });
        }
    });
    (addr, app_addr)
}

/// A throwaway root, its bundle, and [`echo_server`] under it: (root, bundle, server, app).
async fn one_root_echo_server() -> (OfflineCa, SharedTrustBundle, SocketAddr, SocketAddr) {
    let ca = OfflineCa::root("root").expect("root");
    let bundle =
        SharedTrustBundle::new(TrustBundle::new(td(), [ca.der().clone()]).expect("bundle"));
    let (server, app) = echo_server(&ca, &bundle).await;
    (ca, bundle, server, app)
}

type Driver = tokio::task::JoinHandle<Result<(), h2::Error>>;

/// A mutual-TLS connection presenting `svid`, from `tcp` (connected to `server`).
async fn tls(
    tcp: TcpStream,
    server: SocketAddr,
    svid: &WorkloadSvid,
    bundle: &SharedTrustBundle,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut cfg = mtls_client_config(
        svid,
        bundle.clone(),
        PeerCheck::Exact(SpiffeId::new(SERVER_ID).expect("id")),
        crypto_provider(),
    )
    .expect("client config");
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::IpAddress(server.ip().into()), tcp)
        .await
        .expect("tls")
}

/// A raw HTTP/2 client connection presenting `svid`.
async fn client(
    server: SocketAddr,
    svid: &WorkloadSvid,
    bundle: &SharedTrustBundle,
) -> (h2::client::SendRequest<Bytes>, Driver) {
    let tcp = TcpStream::connect(server).await.expect("connect");
    let tls = tls(tcp, server, svid, bundle).await;
    let (sender, connection) = h2::client::handshake(tls).await.expect("h2");
    (sender, tokio::spawn(connection))
}

/// Opens a tunnel to `app`: its status, and its streams if it opened.
async fn tunnel(
    sender: &h2::client::SendRequest<Bytes>,
    app: SocketAddr,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), String> {
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(app.to_string())
        .body(())
        .expect("request");
    let mut ready = sender.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, send) = ready
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    Ok((send, response.into_body()))
}

/// Sends `byte` through an open tunnel and reads it back.
async fn echo(send: &mut h2::SendStream<Bytes>, recv: &mut h2::RecvStream, byte: u8) {
    send.send_data(Bytes::copy_from_slice(&[byte]), false)
        .expect("send");
    let data = timeout(Duration::from_secs(5), recv.data())
        .await
        .expect("echo in time")
        .expect("data")
        .expect("no error");
    assert_eq!(&data[..], &[byte]);
    let _ = recv.flow_control().release_capacity(data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_takes_no_new_tunnel_once_the_peers_certificate_expired() {
    let _ = limits();
    timeout(Duration::from_secs(60), async {
        let (ca, bundle, server, app) = one_root_echo_server().await;
        let lifetime = Duration::from_secs(3);
        let short = ca
            .svid_valid_for(CLIENT_ID, &[], lifetime)
            .expect("short-lived svid");
        let (sender, driver) = client(server, &short, &bundle).await;
        // Open before the expiry: keeps running after it (and keeps the connection busy, so
        // the idle timeout does not apply).
        let (mut send, mut recv) = tunnel(&sender, app).await.expect("tunnel before expiry");
        echo(&mut send, &mut recv, 1).await;
        tokio::time::sleep(lifetime + Duration::from_millis(1500)).await;
        let refused = tunnel(&sender, app).await;
        assert!(
            refused.is_err(),
            "a new tunnel after the peer's certificate expired"
        );
        echo(&mut send, &mut recv, 2).await;
        send.send_data(Bytes::new(), true).expect("end");
        drop((send, recv, sender));
        // With its last tunnel gone the connection ends.
        let ended = timeout(Duration::from_secs(20), driver).await;
        assert!(ended.is_ok(), "the expired connection closes");
    })
    .await
    .expect("within the test's time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed() {
    let limits = limits();
    timeout(Duration::from_secs(60), async {
        let (ca, bundle, server, app) = one_root_echo_server().await;
        let svid = ca.svid(CLIENT_ID, &[]).expect("svid");
        let (sender, driver) = client(server, &svid, &bundle).await;
        let before = limits.idle_closed.get();
        // A tunnel that stays open longer than the idle timeout keeps the connection.
        let (mut send, mut recv) = tunnel(&sender, app).await.expect("tunnel");
        tokio::time::sleep(IDLE * 2).await;
        echo(&mut send, &mut recv, 7).await;
        send.send_data(Bytes::new(), true).expect("end");
        let mut rest = Vec::new();
        while let Some(chunk) = recv.data().await {
            rest.extend_from_slice(&chunk.expect("data"));
        }
        assert!(rest.is_empty());
        assert!(!driver.is_finished(), "busy, not idle");
        // Without a tunnel it is closed after the idle timeout.
        let ended = timeout(IDLE * 10, driver).await;
        assert!(ended.is_ok(), "the idle connection closes");
        assert!(limits.idle_closed.get() > before, "counted");
    })
    .await
    .expect("within the test's time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_takes_no_new_tunnel_once_the_peers_root_is_removed() {
    let _ = limits();
    timeout(Duration::from_secs(60), async {
        let old = OfflineCa::root("old root").expect("root");
        let new = OfflineCa::root("new root").expect("root");
        // Mid-rotation: both roots trusted; the server already has a certificate of the new.
        let both = TrustBundle::new(td(), [old.der().clone(), new.der().clone()]).expect("bundle");
        let bundle = SharedTrustBundle::new(both);
        let (server, app) = echo_server(&new, &bundle).await;
        let old_svid = old.svid(CLIENT_ID, &[]).expect("svid");
        let (sender, driver) = client(server, &old_svid, &bundle).await;
        let (mut send, mut recv) = tunnel(&sender, app).await.expect("tunnel under both roots");
        echo(&mut send, &mut recv, 1).await;
        let before = membrane_ztunnel::hbone::peers_untrusted().get();

        // The old root is removed (a rotation's end, or a compromise).
        bundle.store(TrustBundle::new(td(), [new.der().clone()]).expect("bundle"));
        let refused = tunnel(&sender, app).await;
        assert_eq!(refused.err().as_deref(), Some("status 401 Unauthorized"));
        assert!(
            membrane_ztunnel::hbone::peers_untrusted().get() > before,
            "counted"
        );
        // The open tunnel runs on; with it gone the connection ends.
        echo(&mut send, &mut recv, 2).await;
        send.send_data(Bytes::new(), true).expect("end");
        drop((send, recv, sender));
        let ended = timeout(Duration::from_secs(20), driver).await;
        assert!(ended.is_ok(), "the untrusted connection closes");

        // A peer with a certificate of the remaining root connects and tunnels as before.
        let new_svid = new.svid(CLIENT_ID, &[]).expect("svid");
        let (sender, _driver) = client(server, &new_svid, &bundle).await;
        let (mut send, mut recv) = tunnel(&sender, app)
            .await
            .expect("tunnel under the new root");
        echo(&mut send, &mut recv, 3).await;
    })
    .await
    .expect("within the test's time");
}

/// Eight addresses, each within its share, fill every handshake turn with connections that
/// stop speaking — half after completing TLS (held in the HTTP/2 preface), half before the
/// ClientHello; a real peer arriving then is not made to wait out the 10 s handshake
/// timeout: it takes the turn of the oldest silent one, whatever step that one is at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_many_addresses_do_not_hold_every_turn() {
    let limits = limits();
    timeout(Duration::from_secs(60), async {
        let (ca, bundle, server, app) = one_root_echo_server().await;
        let before = limits.evicted.get();
        let svid = ca.svid(CLIENT_ID, &[]).expect("svid");
        let (mut after_tls, mut raw) = (Vec::new(), Vec::new());
        for host in 2..10u8 {
            for _ in 0..MAX_PENDING / 8 {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket
                    .bind(SocketAddr::from(([127, 0, 0, host], 0)))
                    .expect("bind");
                let tcp = socket.connect(server).await.expect("connect");
                // The oldest turns: TLS completed, then silence.
                if host < 6 {
                    after_tls.push(tls(tcp, server, &svid, &bundle).await);
                } else {
                    raw.push(tcp);
                }
            }
        }
        // Every turn is now held, the oldest for longer than a turn may be held.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (sender, _driver) = timeout(Duration::from_secs(3), client(server, &svid, &bundle))
            .await
            .expect("a real peer's handshake waited for the silent ones' timeout");
        let (mut send, mut recv) = tunnel(&sender, app).await.expect("tunnel");
        echo(&mut send, &mut recv, 9).await;
        assert!(limits.evicted.get() > before, "no turn was taken back");
        drop((after_tls, raw));
    })
    .await
    .expect("within the test's time");
}
