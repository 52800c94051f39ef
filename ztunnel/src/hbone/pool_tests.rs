//! Tests of the pool against a real HBONE server on loopback: certificate renewal and
//! expiry decide which connection a new tunnel rides.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::*;
use crate::hbone::test_pki::{CLIENT, SERVER, TestCa};
use crate::hbone::{Accepted, ConnectFuture, ConnectHandler, ConnectRefusal, ConnectRequest};
use membrane_identity::WorkloadSvid;

/// Forwards every tunnel to the echo application.
struct Forward(SocketAddr);

impl ConnectHandler for Forward {
    type Admission = ();
    type App = tokio::net::TcpStream;

    fn connect(&self, _req: ConnectRequest) -> ConnectFuture<'_, ()> {
        Box::pin(async move {
            TcpStream::connect(self.0)
                .await
                .map(Accepted::from)
                .map_err(|e| ConnectRefusal::Unreachable(e.to_string()))
        })
    }

    fn finished(&self, _req: &ConnectRequest, _result: &crate::relay::RelayResult, (): ()) {}
}

/// An echo application and an HBONE server presenting whatever `server_svid` holds when a
/// connection arrives (as the inbound side does). Tasks end with the returned set.
async fn serve(
    ca: &TestCa,
    server_svid: Arc<Mutex<WorkloadSvid>>,
) -> (SocketAddr, SocketAddr, JoinSet<()>) {
    let mut tasks = JoinSet::new();
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app_addr = app.local_addr().expect("addr");
    tasks.spawn(async move {
        while let Ok((mut tcp, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bundle = ca.bundle();
    tasks.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svid = lock(&server_svid).clone();
            let tls = TestCa::server_config(&svid, bundle.clone());
            let handler: Arc<dyn ConnectHandler<Admission = (), App = tokio::net::TcpStream>> =
                Arc::new(Forward(app_addr));
            tokio::spawn(crate::hbone::serve_connection(tcp, Arc::new(tls), handler));
        }
    });
    (addr, app_addr, tasks)
}

#[derive(Default)]
struct CountingDial(AtomicU64);

impl Dial for CountingDial {
    fn dial(&self, addr: SocketAddr) -> super::client::DialFuture<'_> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            TcpStream::connect(addr)
                .await
                .map(crate::hbone::Carrier::tcp)
        })
    }
}

fn key(addr: SocketAddr) -> PoolKey {
    PoolKey {
        src_ip: "10.0.0.7".parse().expect("ip"),
        src: SpiffeId::new(CLIENT).expect("id"),
        dst: SpiffeId::new(SERVER).expect("id"),
        dst_addr: addr,
        via: None,
    }
}

async fn echoes(stream: &mut H2Stream, text: &[u8]) {
    stream.write_all(text).await.expect("write");
    let mut buf = vec![0; text.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(buf, text);
}

/// After a renewal new tunnels ride a new connection presenting the new certificate; the
/// tunnel on the old connection keeps working; the old connection leaves once idle.
#[tokio::test]
async fn a_renewed_certificate_gets_a_new_connection_and_old_tunnels_stay() {
    let ca = TestCa::new();
    let server_svid = Arc::new(Mutex::new(ca.svid(SERVER, Duration::from_secs(3600))));
    let (addr, app, _tasks) = serve(&ca, server_svid).await;
    let pool = HbonePool::new(PoolConfig {
        spread_connections: 1,
        ..PoolConfig::default()
    });
    let dial = Arc::new(CountingDial::default());
    let old = ca.client_tls(&ca.svid(CLIENT, Duration::from_secs(3600)));
    let open = |tls: &Arc<rustls::ClientConfig>| {
        pool.connect(
            key(addr),
            tls.clone(),
            dial.clone(),
            app,
            ConnectHeaders::default(),
        )
    };
    let mut first = open(&old).await.expect("tunnel");
    let mut second = open(&old).await.expect("tunnel");
    assert_eq!(dial.0.load(Ordering::SeqCst), 1, "same certificate: shared");
    let renewed = ca.client_tls(&ca.svid(CLIENT, Duration::from_secs(3600)));
    let mut third = open(&renewed).await.expect("tunnel");
    assert_eq!(
        dial.0.load(Ordering::SeqCst),
        2,
        "renewed: a new connection"
    );
    let mut fourth = open(&renewed).await.expect("tunnel");
    assert_eq!(dial.0.load(Ordering::SeqCst), 2, "renewed: shared again");
    for stream in [&mut first, &mut second, &mut third, &mut fourth] {
        echoes(stream, b"still here").await;
    }
    assert_eq!(pool.connection_count(), 2);
    // Once the old connection is idle, the next tunnel retires it.
    drop((first, second));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _sixth = open(&renewed).await.expect("tunnel");
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(dial.0.load(Ordering::SeqCst), 2);
}

/// No new tunnel rides a connection whose peer certificate has expired; the tunnel it
/// carries keeps working.
#[tokio::test]
async fn an_expired_peer_certificate_is_not_reused() {
    let ca = TestCa::new();
    // X.509 times are whole seconds: this one expires within 1–2 s.
    let short = ca.svid(SERVER, Duration::from_secs(2));
    let expiry = short.info().not_after;
    let server_svid = Arc::new(Mutex::new(short));
    let (addr, app, _tasks) = serve(&ca, server_svid.clone()).await;
    let pool = HbonePool::new(PoolConfig::default());
    let dial = Arc::new(CountingDial::default());
    let tls = ca.client_tls(&ca.svid(CLIENT, Duration::from_secs(3600)));
    let mut first = pool
        .connect(
            key(addr),
            tls.clone(),
            dial.clone(),
            app,
            ConnectHeaders::default(),
        )
        .await
        .expect("tunnel");
    *lock(&server_svid) = ca.svid(SERVER, Duration::from_secs(3600));
    let wait = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let mut second = pool
        .connect(key(addr), tls, dial.clone(), app, ConnectHeaders::default())
        .await
        .expect("tunnel");
    assert_eq!(
        dial.0.load(Ordering::SeqCst),
        2,
        "expired peer: a new connection"
    );
    echoes(&mut first, b"established tunnels survive").await;
    echoes(&mut second, b"new ones use the new connection").await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        pool.idle_sweep(),
        1,
        "the expired connection leaves once idle"
    );
    assert_eq!(pool.connection_count(), 1);
}

/// A retired key's connection takes no new tunnel (the next one dials); its open tunnel runs
/// on; keys the predicate does not select keep theirs.
#[tokio::test]
async fn retired_connections_take_no_new_tunnel_and_open_ones_stay() {
    let ca = TestCa::new();
    let server_svid = Arc::new(Mutex::new(ca.svid(SERVER, Duration::from_secs(3600))));
    let (addr, app, _tasks) = serve(&ca, server_svid).await;
    let pool = HbonePool::new(PoolConfig {
        spread_connections: 1,
        ..PoolConfig::default()
    });
    let dial = Arc::new(CountingDial::default());
    let tls = ca.client_tls(&ca.svid(CLIENT, Duration::from_secs(3600)));
    let open = || {
        pool.connect(
            key(addr),
            tls.clone(),
            dial.clone(),
            app,
            ConnectHeaders::default(),
        )
    };
    let mut first = open().await.expect("tunnel");
    assert_eq!(pool.retire(|k| k.dst_addr != addr), 0, "other keys only");
    let _shared = open().await.expect("tunnel");
    assert_eq!(dial.0.load(Ordering::SeqCst), 1, "not retired: shared");
    assert_eq!(pool.retire(|k| k.dst_addr == addr), 1);
    assert_eq!(pool.connection_count(), 0);
    let mut after = open().await.expect("tunnel");
    assert_eq!(dial.0.load(Ordering::SeqCst), 2, "retired: a new dial");
    echoes(&mut first, b"the retired connection's tunnel runs on").await;
    echoes(&mut after, b"the new connection works").await;
}
