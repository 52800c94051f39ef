//! The record layer against rustls itself (each side against the other) and against itself:
//! data both ways across key updates, close_notify, truncation, tampering, and content that
//! arrives with the handshake's last flight.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, duplex};

use super::*;
use crate::hbone::handshake::{accept, connect};
use crate::hbone::test_pki::{CLIENT, SERVER, TestCa};

struct Pki {
    ca: TestCa,
}

impl Pki {
    fn new() -> Self {
        Self { ca: TestCa::new() }
    }

    fn server(&self, extract: bool) -> Arc<rustls::ServerConfig> {
        let svid = self.ca.svid(SERVER, Duration::from_secs(3600));
        let mut cfg = TestCa::server_config(&svid, self.ca.bundle());
        cfg.enable_secret_extraction = extract;
        Arc::new(cfg)
    }

    fn client(&self, extract: bool) -> Arc<rustls::ClientConfig> {
        let mut cfg = self
            .ca
            .client_config(&self.ca.svid(CLIENT, Duration::from_secs(3600)));
        cfg.enable_secret_extraction = extract;
        Arc::new(cfg)
    }
}

fn name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Both sides on the record layer, over an in-memory pipe.
async fn pair(pki: &Pki) -> (TlsStream<DuplexStream>, TlsStream<DuplexStream>) {
    let (a, b) = duplex(1 << 20);
    let (client, server) = tokio::join!(
        connect(a, pki.client(true), name()),
        accept(b, pki.server(true))
    );
    (client.expect("client"), server.expect("server"))
}

/// A payload whose every byte depends on its position.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` in uneven pieces (small ones gathered into records, large ones sealed
/// straight from the caller's buffer) and flushes.
async fn send<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) {
    let mut at = 0;
    for piece in [1, 9, 100, 16_384, 40_000, 3].iter().cycle() {
        if at == data.len() {
            break;
        }
        let end = (at + piece).min(data.len());
        w.write_all(&data[at..end]).await.expect("write");
        at = end;
    }
    w.flush().await.expect("flush");
}

async fn receive<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Vec<u8> {
    let mut got = vec![0; len];
    r.read_exact(&mut got).await.expect("read");
    got
}

#[tokio::test]
async fn negotiates_hybrid_post_quantum_key_exchange_and_carries_data_both_ways() {
    let pki = Pki::new();
    let (client, server) = pair(&pki).await;
    assert_eq!(
        client.session().kx_group,
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(client.session().alpn.as_deref(), Some(&b"h2"[..]));
    let presented = membrane_identity::peer_spiffe_id(server.session().peer_certificates())
        .expect("client identity");
    assert_eq!(presented.to_string(), CLIENT);

    let up = payload(1 << 20, 1);
    let down = payload(300_000, 2);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let (_, got_up, _, got_down) = tokio::join!(
        send(&mut client_tx, &up),
        receive(&mut server_rx, up.len()),
        send(&mut server_tx, &down),
        receive(&mut client_rx, down.len()),
    );
    assert!(got_up == up, "client to server intact");
    assert!(got_down == down, "server to client intact");
}

#[tokio::test]
async fn against_rustls_both_ways_across_key_updates() {
    let pki = Pki::new();
    // Membrane client, rustls server.
    let (a, b) = duplex(1 << 20);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server(false));
    let (client, server) = tokio::join!(connect(a, pki.client(true), name()), acceptor.accept(b));
    let (mut client, mut server) = (client.expect("client"), server.expect("rustls server"));
    // A KeyUpdate every 3 records from here, and one asked of rustls.
    client.set_key_update_after(3);
    let data = payload(200_000, 3);
    let (_, got) = tokio::join!(send(&mut client, &data), receive(&mut server, data.len()));
    assert!(got == data);
    assert!(client.tx_seq() <= 3, "rekeyed: {}", client.tx_seq());
    client.request_key_update().expect("request");
    client.flush().await.expect("flush");
    // rustls answers with its own KeyUpdate before its next data.
    let (_, got) = tokio::join!(
        async {
            server.write_all(b"after the update").await.expect("write");
            server.flush().await.expect("flush");
        },
        receive(&mut client, 16)
    );
    assert_eq!(&got, b"after the update");
    assert_eq!(client.rx_seq(), 1, "one record under rustls' next key");
    // rustls updates its sending key on its own too.
    server.get_mut().1.refresh_traffic_keys().expect("refresh");
    let (_, got) = tokio::join!(send(&mut server, &data), receive(&mut client, data.len()));
    assert!(got == data);
    // close_notify from rustls is a clean end of stream here.
    server.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.expect("clean end");
    assert!(rest.is_empty());

    // rustls client, Membrane server.
    let (a, b) = duplex(1 << 20);
    let connector = tokio_rustls::TlsConnector::from(pki.client(false));
    let (client, server) = tokio::join!(connector.connect(name(), a), accept(b, pki.server(true)));
    let (mut client, mut server) = (client.expect("rustls client"), server.expect("server"));
    server.set_key_update_after(2);
    let (_, got) = tokio::join!(send(&mut server, &data), receive(&mut client, data.len()));
    assert!(got == data);
    client.get_mut().1.refresh_traffic_keys().expect("refresh");
    let (_, got) = tokio::join!(send(&mut client, &data), receive(&mut server, data.len()));
    assert!(got == data);
    server.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    client
        .read_to_end(&mut rest)
        .await
        .expect("rustls sees close_notify");
    assert!(rest.is_empty());
}

#[tokio::test]
async fn answers_a_requested_key_update_from_its_own_kind() {
    let pki = Pki::new();
    let (mut client, mut server) = pair(&pki).await;
    client.request_key_update().expect("request");
    send(&mut client, b"ping").await;
    assert_eq!(receive(&mut server, 4).await, b"ping");
    // The server answered (its KeyUpdate leaves with its next write).
    send(&mut server, b"pong").await;
    assert_eq!(receive(&mut client, 4).await, b"pong");
    assert_eq!(client.rx_seq(), 1, "pong came under the server's next key");
}

/// A peer's KeyUpdates in a row are bounded: 32 without application data between them are
/// taken, the 33rd ends the connection.
#[tokio::test]
async fn key_updates_without_data_between_them_are_bounded() {
    let pki = Pki::new();
    let (mut client, mut server) = pair(&pki).await;
    for _ in 0..MAX_KEY_UPDATES_IN_A_ROW {
        client.request_key_update().expect("request");
    }
    send(&mut client, b"ok").await;
    assert_eq!(
        receive(&mut server, 2).await,
        b"ok",
        "32 in a row are taken"
    );
    for _ in 0..=MAX_KEY_UPDATES_IN_A_ROW {
        client.request_key_update().expect("request");
    }
    send(&mut client, b"no").await;
    let err = server.read(&mut [0; 2]).await.expect_err("33 in a row");
    assert!(err.to_string().contains("too many KeyUpdates"), "{err}");
}

/// A peer that asks for KeyUpdates and never reads the answers does not grow the queue of
/// records to send without bound: the connection ends once the answers fill the room kept
/// for them past the send buffer.
#[tokio::test]
async fn unread_key_update_answers_are_bounded() {
    let pki = Pki::new();
    let (mut client, mut server) = pair(&pki).await;
    let answers = (TLS_SEND_BUFFER + KEY_UPDATE_ANSWER_ROOM) / 20;
    let reader = tokio::spawn(async move {
        let mut byte = [0; 1];
        let mut read = 0usize;
        loop {
            match server.read(&mut byte).await {
                Ok(1) => read += 1,
                Ok(_) => return (read, None, server.pending_out()),
                Err(e) => return (read, Some(e), server.pending_out()),
            }
        }
    });
    for _ in 0..answers {
        client.request_key_update().expect("request");
        if client.write_all(b"x").await.is_err() || client.flush().await.is_err() {
            break;
        }
    }
    drop(client);
    let (read, err, pending) = reader.await.expect("reader");
    let err = err.expect("the server refuses the requests it cannot answer");
    assert!(
        err.to_string().contains("faster than their answers"),
        "{err}"
    );
    assert!(
        read < answers,
        "refused before the last request ({read} of {answers})"
    );
    assert!(
        pending <= TLS_SEND_BUFFER + KEY_UPDATE_ANSWER_ROOM,
        "queued {pending} bytes"
    );
}

#[tokio::test]
async fn the_end_of_the_stream_without_close_notify_is_an_error() {
    let pki = Pki::new();
    let (mut client, server) = pair(&pki).await;
    drop(server);
    let err = client.read(&mut [0; 16]).await.expect_err("truncated");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    // Final: asking again gives the same answer.
    let again = client
        .read(&mut [0; 16])
        .await
        .expect_err("still truncated");
    assert_eq!(again.kind(), io::ErrorKind::UnexpectedEof);
}

/// A server's side of the pipe that can flip one bit of what it reads (once armed), delay
/// each read (so the client's Finished and first data arrive together) and cut reads short
/// (so records arrive in pieces).
struct Peer {
    inner: DuplexStream,
    tamper: bool,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    max_read: Option<usize>,
}

impl crate::hbone::frame_wait::LowWater for Peer {}

impl Peer {
    fn new(inner: DuplexStream) -> Self {
        Self {
            inner,
            tamper: false,
            delay: None,
            sleep: None,
            max_read: None,
        }
    }
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(delay) = self.delay {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(std::future::Future::poll(sleep.as_mut(), cx));
            self.sleep = None;
        }
        let before = buf.filled().len();
        if let Some(max) = self.max_read {
            let mut piece = vec![0; max.min(buf.remaining())];
            let mut limited = ReadBuf::new(&mut piece);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
            buf.put_slice(limited.filled());
        } else {
            ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        }
        if self.tamper && buf.filled().len() > before {
            let last = buf.filled().len() - 1;
            buf.filled_mut()[last] ^= 0x10;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Both sides on the record layer, the server's socket a [`Peer`].
async fn peer_pair(pki: &Pki) -> (TlsStream<DuplexStream>, TlsStream<Peer>) {
    let (a, b) = duplex(1 << 20);
    let (client, server) = tokio::join!(
        connect(a, pki.client(true), name()),
        accept(Peer::new(b), pki.server(true))
    );
    (client.expect("client"), server.expect("server"))
}

#[tokio::test]
async fn a_tampered_record_ends_the_connection() {
    let pki = Pki::new();
    let (mut client, mut server) = peer_pair(&pki).await;
    server.io.tamper = true;
    let refused = records_refused().get();
    send(&mut client, b"will be changed on the way").await;
    let err = server.read(&mut [0; 64]).await.expect_err("tampered");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("bad_record_mac"), "{err}");
    assert!(records_refused().get() > refused, "counted");
    // The sender is told why (bad_record_mac) before the connection closes.
    let told = client.read(&mut [0; 64]).await.expect_err("alert");
    assert_eq!(told.kind(), io::ErrorKind::ConnectionAborted);
    assert!(told.to_string().contains("alert 20"), "{told}");
    server.io.tamper = false;
    assert!(
        server.read(&mut [0; 64]).await.is_err(),
        "the error is final"
    );
    assert!(
        server.write(b"x").await.is_err(),
        "and nothing more is sent"
    );
}

/// A server whose socket hands over what the client sent in pieces of `max_read` bytes.
async fn cut_pair(pki: &Pki, max_read: usize) -> (TlsStream<DuplexStream>, TlsStream<Peer>) {
    let (client, mut server) = peer_pair(pki).await;
    server.io.max_read = Some(max_read);
    (client, server)
}

#[tokio::test]
async fn records_split_across_reads_are_opened_in_the_readers_buffer() {
    let pki = Pki::new();
    // Pieces shorter than a record, longer than one, and a prime length, so a record's
    // header, body and tag each end up cut somewhere.
    for max_read in [7_001, 40_000, 100_003] {
        let (mut client, mut server) = cut_pair(&pki, max_read).await;
        client.set_key_update_after(3);
        let data = payload(1 << 20, 7);
        let (_, got) = tokio::join!(send(&mut client, &data), receive(&mut server, data.len()));
        assert!(got == data, "intact with reads of {max_read} bytes");
        assert!(
            server.direct_reads() > 0,
            "large reads go to the reader's buffer"
        );
        assert_eq!(
            server.receive_buffer_len(),
            RECEIVE_BUFFER,
            "one record kept"
        );
        assert!(
            server.rx_seq() <= 3,
            "and cross key updates: {}",
            server.rx_seq()
        );
        // Small reads (no room for a whole record) take the buffered path, in order.
        send(&mut client, &data[..50_000]).await;
        let mut small = Vec::new();
        while small.len() < 50_000 {
            let mut chunk = [0; 1_000];
            let n = server.read(&mut chunk).await.expect("small read");
            small.extend_from_slice(&chunk[..n]);
        }
        assert!(small == data[..50_000], "small reads intact");
        // close_notify after data, read with room for all of it: the data, then the end of
        // the stream.
        send(&mut client, &data[..20_000]).await;
        client.shutdown().await.expect("shutdown");
        let direct = server.direct_reads();
        let mut rest = Vec::with_capacity(1 << 20);
        server.read_to_end(&mut rest).await.expect("clean end");
        assert!(rest == data[..20_000], "the last data before close_notify");
        assert!(
            server.direct_reads() > direct,
            "read into the reader's buffer"
        );
    }
}

#[tokio::test]
async fn a_record_that_trickles_in_is_gathered_not_carried_through_the_readers_buffer() {
    let pki = Pki::new();
    let (mut client, mut server) = cut_pair(&pki, 7).await;
    let data = payload(100_000, 11);
    let (_, got) = tokio::join!(send(&mut client, &data), receive(&mut server, data.len()));
    assert!(got == data, "intact, 7 bytes per read");
    // About 14,000 reads for a handful of records: once a read into the reader's buffer
    // completes no record, the rest of that record is gathered in the TLS layer's buffer.
    assert!(
        (1..50).contains(&server.direct_reads()),
        "{} reads into the reader's buffer",
        server.direct_reads()
    );
}

#[tokio::test]
async fn a_tampered_record_read_into_the_readers_buffer_keeps_what_came_before_it() {
    let pki = Pki::new();
    let (mut client, mut server) = peer_pair(&pki).await;
    // Two full records and a short one, written out together; the last byte read (the
    // third record's tag) is flipped.
    let data = payload(40_000, 9);
    client.write_all(&data).await.expect("write");
    client.flush().await.expect("flush");
    server.io.tamper = true;
    let refused = records_refused().get();
    let mut got = vec![0; 1 << 20];
    let n = server.read(&mut got).await.expect("the intact records");
    assert_eq!(n, 2 * MAX_PLAINTEXT);
    assert!(got[..n] == data[..n]);
    assert_eq!(server.direct_reads(), 1);
    let err = server.read(&mut got).await.expect_err("then the refusal");
    assert!(err.to_string().contains("bad_record_mac"), "{err}");
    assert!(records_refused().get() > refused, "counted");
    let told = client.read(&mut [0; 64]).await.expect_err("alert");
    assert!(told.to_string().contains("alert 20"), "{told}");
}

#[tokio::test]
async fn content_that_arrives_with_the_last_handshake_flight_is_kept() {
    let pki = Pki::new();
    let (a, b) = duplex(1 << 20);
    let late = Peer {
        delay: Some(Duration::from_millis(50)),
        ..Peer::new(b)
    };
    let greeting = payload(40_000, 5);
    let client = async {
        let mut client = connect(a, pki.client(true), name()).await.expect("client");
        send(&mut client, &greeting).await;
        client
    };
    let (_client, server) = tokio::join!(client, accept(late, pki.server(true)));
    let mut server = server.expect("server");
    assert!(
        server.early_len() > 0,
        "data came with the client's Finished"
    );
    assert!(receive(&mut server, greeting.len()).await == greeting);
}

#[tokio::test]
async fn rustls_hears_why_its_record_was_refused() {
    let pki = Pki::new();
    let (a, b) = duplex(1 << 20);
    let connector = tokio_rustls::TlsConnector::from(pki.client(false));
    let (client, server) = tokio::join!(
        connector.connect(name(), a),
        accept(Peer::new(b), pki.server(true))
    );
    let (mut client, mut server) = (client.expect("rustls client"), server.expect("server"));
    server.io.tamper = true;
    send(&mut client, b"changed on the way").await;
    // rustls sends each write as its own record: what arrived intact is read first.
    let mut intact = 0;
    loop {
        match server.read(&mut [0; 64]).await {
            Ok(n) => {
                assert!(n > 0, "no clean end");
                intact += n;
                assert!(intact < 18, "a tampered record was delivered");
            }
            Err(e) => {
                assert!(e.to_string().contains("bad_record_mac"), "{e}");
                break;
            }
        }
    }
    let told = client.read(&mut [0; 64]).await.expect_err("alert");
    assert!(told.to_string().contains("BadRecordMac"), "{told}");
}

/// A certificate our verifier refused is reported in the verifier's words, not rustls' `Debug`.
#[test]
fn a_refused_certificate_says_why() {
    let why = std::io::Error::other("trust domain b.example is not federated with this mesh");
    let e = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        std::sync::Arc::new(why),
    )));
    assert_eq!(
        super::tls_error(e).to_string(),
        "invalid peer certificate: trust domain b.example is not federated with this mesh"
    );
    let alert = super::tls_error(rustls::Error::AlertReceived(
        rustls::AlertDescription::BadCertificate,
    ));
    assert_eq!(alert.to_string(), "received fatal alert: BadCertificate");
}
