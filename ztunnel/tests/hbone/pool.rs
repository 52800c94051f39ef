//! The client's connection pool: streams multiplexed up to the limit, identities never sharing
//! a connection, idle and peer-closed connections leaving it, busy tunnels spread out.

use super::*;

/// (f) Without spreading, 200 concurrent tunnels with one key share exactly two connections
/// (100 streams each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_multiplexes_up_to_max_streams() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app_addr, echo, server) = echo_behind_server(&ca).await;
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
        let (app_addr, echo, server) = echo_behind_server(&ca).await;
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
        let (app_addr, echo, server) = echo_behind_server(&ca).await;
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
        let (app_addr, echo, server) = echo_behind_server(&ca).await;
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

/// Concurrent tunnels of one key first spread over `spread_connections` connections, then
/// share the least-loaded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_spreads_busy_tunnels_over_connections() {
    bounded(async {
        let ca = TestCa::new("root");
        let (app_addr, echo, server) = echo_behind_server(&ca).await;
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

/// A pooled connection whose peer's root was removed from the bundles takes no new tunnel: the
/// next one dials again, and that handshake refuses the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_peer_is_no_longer_trusted_leaves_the_pool() {
    bounded(async {
        let (old, new) = (TestCa::new("old root"), TestCa::new("new root"));
        // The server still presents a certificate of the old root.
        let (app_addr, echo, server) = echo_behind_server(&old).await;
        let roots = |cas: &[&TestCa]| {
            TrustBundle::new(td(), cas.iter().map(|ca| ca.0.der().clone())).expect("bundle")
        };
        let bundles = SharedTrustBundle::new(roots(&[&old, &new]));
        let pool = HbonePool::checking_trust(PoolConfig::default(), bundles.clone());
        let dial = Arc::new(TestDial::default());
        let mut cfg = mtls_client_config(
            &old.svid(CLIENT_ID),
            bundles.clone(),
            PeerCheck::Exact(id(SERVER_ID)),
            crypto_provider(),
        )
        .expect("client config");
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        let tls = Arc::new(cfg);
        let pool_key = key("10.0.0.7", CLIENT_ID, &server);
        let open = || {
            let (key, tls, dial) = (pool_key.clone(), tls.clone(), dial.clone());
            Box::pin(pool.connect(key, tls, dial, app_addr, ConnectHeaders::default()))
        };
        drop(open().await.expect("tunnel"));
        // A change that keeps the server's root: the connection is reused.
        let other = TestCa::new("unrelated root");
        bundles.store(roots(&[&old, &new, &other]));
        drop(open().await.expect("tunnel on the pooled connection"));
        assert_eq!(dial.dials.load(Ordering::SeqCst), 1);

        // The old root removed: the pooled connection is not used; the new dial fails at the
        // handshake, since the server's certificate no longer verifies.
        bundles.store(roots(&[&new]));
        let refused = open().await;
        assert!(
            matches!(refused, Err(HboneError::Tls(_))),
            "{:?}",
            refused.err()
        );
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2, "dialled again");
        assert_eq!(pool.connection_count(), 0, "the untrusted connection left");
        echo.abort();
    })
    .await;
}
