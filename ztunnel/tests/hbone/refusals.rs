//! What the listening side refuses, and with which status: a handler's refusals, untrusted or
//! anonymous clients, a server with the wrong identity, malformed requests — and what a
//! peer's handshake share does not refuse (its established connections).

use super::*;

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
            let failed = membrane_ztunnel::hbone::handshakes_failed().get();
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
            assert!(
                membrane_ztunnel::hbone::handshakes_failed().get() > failed,
                "counted"
            );
        }
        assert!(server.calls().is_empty(), "handler never called");
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

        let malformed = membrane_ztunnel::hbone::requests_malformed().get();
        let requests = [
            (http::Method::CONNECT, "bad_name.example:80"),
            (http::Method::CONNECT, "example.com:0"),
            (http::Method::CONNECT, "10.0.0.1:0"),
            (http::Method::GET, "https://10.0.0.1:80/"),
        ];
        for (method, uri) in requests.clone() {
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
        assert_eq!(
            membrane_ztunnel::hbone::requests_malformed().get() - malformed,
            requests.len() as u64,
            "each counted"
        );
        // A well-formed request on the same connection still works.
        let (status, mut send) = connect_to(&sender, app_addr).await;
        assert_eq!(status, http::StatusCode::OK);
        send.send_data(Bytes::from_static(b""), true).expect("end");
        assert_eq!(
            server.calls().len(),
            1,
            "only the well-formed request reached the handler"
        );
        drop((send, sender));
        driver.abort();
    })
    .await;
}

/// The per-address share bounds handshakes in progress, not connections: one address holds
/// more established connections than its share (an eighth of the default 256 pending
/// handshakes: 32), each still carrying tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_leave_the_handshake_share() {
    bounded(async {
        const CONNECTIONS: usize = 40;
        let ca = TestCa::new("root");
        let (app, app_addr) = app_listener().await;
        let _echo = spawn_echo(app);
        let server =
            Server::start(ca.server_tls(&ca.svid(SERVER_ID)), Mode::Forward(app_addr)).await;
        let connector =
            tokio_rustls::TlsConnector::from(ca.client_tls(&ca.svid(CLIENT_ID), SERVER_ID));
        let mut held = Vec::new();
        for n in 0..CONNECTIONS {
            let tcp = TcpStream::connect(server.addr).await.expect("connect");
            let tls = connector
                .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
                .await
                .unwrap_or_else(|e| panic!("connection {n}: TLS: {e}"));
            let (sender, connection) = h2::client::handshake(tls)
                .await
                .unwrap_or_else(|e| panic!("connection {n}: HTTP/2: {e}"));
            held.push((sender, tokio::spawn(connection)));
        }
        // Every connection, the last ones included, still opens a tunnel.
        for (n, (sender, _)) in held.iter().enumerate() {
            let (status, mut send) = connect_to(sender, app_addr).await;
            assert_eq!(status, http::StatusCode::OK, "connection {n}");
            send.send_data(Bytes::from_static(b""), true).expect("end");
        }
        assert_eq!(server.calls().len(), CONNECTIONS);
        for (_, driver) in held {
            driver.abort();
        }
    })
    .await;
}

/// A raw CONNECT to `app` on `sender`: the status, and the request's stream.
async fn connect_to(
    sender: &h2::client::SendRequest<Bytes>,
    app: SocketAddr,
) -> (http::StatusCode, h2::SendStream<Bytes>) {
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(app.to_string())
        .body(())
        .expect("request");
    let mut ready = sender.clone().ready().await.expect("ready");
    let (response, send) = ready.send_request(request, false).expect("send");
    (response.await.expect("response").status(), send)
}
