//! The dialling side of one connection: dial through the caller, mutual TLS, HTTP/2, and the
//! CONNECT exchange on a stream. Pooling is the pool's job (`pool.rs`).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::carrier::Carrier;
use super::early::EarlyData;
use super::headers::{BAGGAGE, FORWARDED, TRACEPARENT, format_forwarded_for};
use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, MAX_HEADER_LIST, MAX_SEND_BUFFER, STREAM_WINDOW,
    client_tls_with_h2, handshake, require_h2, tls,
};
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use membrane_identity::{PeerTrust, SpiffeId, peer_spiffe_id};
use rustls_pki_types::ServerName;

/// What [`Dial::dial`] returns.
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Carrier>> + Send + 'a>>;

/// Creates the connections the pool runs HBONE over.
///
/// The pool never creates sockets itself: the caller's implementation creates them where they
/// must live (inside the source pod's network namespace, with the ztunnel's socket mark), or
/// opens an outer tunnel through a gateway for double HBONE ([`Carrier::Tunnel`]).
pub trait Dial: Send + Sync {
    /// Connects to `addr` (a peer's HBONE address).
    fn dial(&self, addr: SocketAddr) -> DialFuture<'_>;
}

/// The optional headers of a CONNECT request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// Sent as `forwarded: for="<ip>"`: the original source address.
    pub forwarded_for: Option<IpAddr>,
    /// W3C `baggage`, passed through.
    pub baggage: Option<String>,
    /// W3C `traceparent`, passed through.
    pub traceparent: Option<String>,
    /// Sent as the `:authority` host in place of the destination's address (`name:port`):
    /// the name an egress gateway resolves and pins itself.
    pub host: Option<String>,
}

/// The TLS stream HBONE connections run over.
pub(crate) type ClientIo = tls::TlsStream<Carrier>;

/// An established HBONE connection: the sender, the connection (which must be polled —
/// spawned — for the sender to make progress), when the peer's leaf certificate expires, and
/// its chain for checks after the bundles change (when the caller gave a generation).
pub(crate) type Established = (
    SendRequest<Bytes>,
    h2::client::Connection<ClientIo, Bytes>,
    Option<SystemTime>,
    Option<PeerTrust>,
);

/// Dials `addr`, completes mutual TLS and the HTTP/2 handshake, and checks the peer is
/// `expected`. `verified_at`: the bundle generation read before the dial, if the caller
/// checks the peer again after the bundles change.
pub(crate) async fn establish(
    addr: SocketAddr,
    expected: &SpiffeId,
    tls: Arc<rustls::ClientConfig>,
    dial: &dyn Dial,
    verified_at: Option<u64>,
) -> Result<Established, HboneError> {
    let carrier = dial.dial(addr).await.map_err(|e| HboneError::Dial {
        addr,
        source: Arc::new(e),
    })?;
    // The verifier ignores names (it checks the SPIFFE ID); an IP name also sends no SNI.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = handshake::connect(carrier, client_tls_with_h2(tls), name)
        .await
        .map_err(|e| HboneError::Tls(Arc::new(e)))?;
    let session = tls.session();
    require_h2(session.alpn.as_deref())?;
    // The verifier already required `expected`; checking again here keeps a misbuilt config
    // (or a resumed session) from ever carrying one identity's traffic to another.
    let presented =
        peer_spiffe_id(session.peer_certificates()).map_err(HboneError::PeerIdentity)?;
    if presented != *expected {
        return Err(HboneError::PeerMismatch {
            expected: expected.clone(),
            presented,
        });
    }
    // The pool puts no new tunnel on the connection once the peer's certificate expired.
    let (peer_not_after, trust) =
        session.peer_validity(verified_at, membrane_identity::svid::Usage::Server);
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake(tls)
        .await
        .map_err(|e| HboneError::Handshake(Arc::new(e)))?;
    Ok((sender, connection, peer_not_after, trust))
}

/// Why a CONNECT on an established connection failed.
#[derive(Debug)]
pub(crate) enum ConnectFailure {
    /// The connection could not take a new stream (closed, GOAWAY); nothing reached the peer,
    /// so another connection may be tried.
    ConnectionUnusable(HboneError),
    /// The request was sent, or cannot be built; do not retry.
    Final(HboneError),
}

/// Builds the CONNECT request for `authority`.
fn connect_request(
    authority: SocketAddr,
    headers: &ConnectHeaders,
) -> Result<Request<()>, HboneError> {
    let text = match &headers.host {
        Some(host) => format!("{host}:{}", authority.port()),
        None => authority.to_string(),
    };
    let uri = Uri::try_from(text).map_err(|_| HboneError::InvalidHeader { name: ":authority" })?;
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = uri;
    let map = request.headers_mut();
    if let Some(ip) = headers.forwarded_for {
        let value = HeaderValue::from_str(&format_forwarded_for(ip))
            .map_err(|_| HboneError::InvalidHeader { name: FORWARDED })?;
        map.insert(FORWARDED, value);
    }
    for (name, value) in [
        (BAGGAGE, &headers.baggage),
        (TRACEPARENT, &headers.traceparent),
    ] {
        if let Some(value) = value {
            let value =
                HeaderValue::from_str(value).map_err(|_| HboneError::InvalidHeader { name })?;
            map.insert(name, value);
        }
    }
    Ok(request)
}

/// Opens a CONNECT stream on `sender` and waits (at most `timeout`) for a 200. The stream's
/// first DATA frame, queued right behind the request's headers (one write), is `early`'s
/// bytes if the application already sent some (see [`EarlyData`]).
pub(crate) async fn open_tunnel(
    sender: &SendRequest<Bytes>,
    authority: SocketAddr,
    headers: &ConnectHeaders,
    early: &mut EarlyData<'_>,
    timeout: Duration,
) -> Result<(SendStream<Bytes>, RecvStream), ConnectFailure> {
    let request = connect_request(authority, headers).map_err(ConnectFailure::Final)?;
    let unusable = |e| ConnectFailure::ConnectionUnusable(HboneError::h2(e));
    let exchange = async {
        let mut sender = sender.clone().ready().await.map_err(unusable)?;
        let (response, mut send) = sender.send_request(request, false).map_err(unusable)?;
        let first = early.take();
        if !first.is_empty() {
            send.send_data(first, false).map_err(unusable)?;
        }
        let response = response
            .await
            .map_err(|e| ConnectFailure::Final(HboneError::h2(e)))?;
        Ok((response, send))
    };
    let (response, send) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            ConnectFailure::Final(HboneError::Timeout {
                stage: "HBONE CONNECT response",
                after: timeout,
            })
        })??;
    let status = response.status();
    if status != StatusCode::OK {
        // Dropping `send` with the stream still open resets it.
        return Err(ConnectFailure::Final(HboneError::Refused(status)));
    }
    Ok((send, response.into_body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_shape() {
        let headers = ConnectHeaders {
            forwarded_for: Some("fd00::7".parse().expect("ip")),
            baggage: Some("k8s.namespace.name=ml".into()),
            traceparent: None,
            host: None,
        };
        let req =
            connect_request("[fd00::1]:8080".parse().expect("addr"), &headers).expect("request");
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("[fd00::1]:8080")
        );
        assert_eq!(req.headers()[FORWARDED], r#"for="[fd00::7]""#);
        assert_eq!(req.headers()[BAGGAGE], "k8s.namespace.name=ml");
        assert!(req.headers().get(TRACEPARENT).is_none());
    }

    /// The application's first bytes ride with the request: a peer that reads them before it
    /// answers gets them (with a wait for the 200 first, neither side would move).
    #[tokio::test]
    async fn early_data_arrives_before_the_response() {
        use tokio::io::AsyncWriteExt;
        use tokio::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let peer = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(tcp).await.expect("h2 server");
            let (request, mut respond) = conn.accept().await.expect("a request").expect("h2");
            // The connection runs on (until the test's runtime ends) to deliver the 200.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = request.into_body();
            let first = body.data().await.expect("early data").expect("data");
            let response = http::Response::builder().status(200).body(()).expect("200");
            respond.send_response(response, false).expect("respond");
            first
        });
        let (sender, conn) = h2::client::handshake(TcpStream::connect(addr).await.expect("dial"))
            .await
            .expect("h2 client");
        tokio::spawn(conn);
        // The application's socket, holding its request.
        let app = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(app.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = app.accept().await.expect("accept");
        client.write_all(b"PING").await.expect("write");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut early = EarlyData::from_socket(&accepted);
        let opened = open_tunnel(
            &sender,
            "10.0.0.1:80".parse().expect("addr"),
            &ConnectHeaders::default(),
            &mut early,
            Duration::from_secs(5),
        )
        .await;
        if let Err(e) = opened {
            panic!("the tunnel did not open: {e:?}");
        }
        assert_eq!(early.len(), 4);
        assert_eq!(&peer.await.expect("peer")[..], b"PING");
    }

    #[test]
    fn refuses_unsendable_header_values() {
        let headers = ConnectHeaders {
            traceparent: Some("00-\n-01".into()),
            ..ConnectHeaders::default()
        };
        let err =
            connect_request("10.0.0.1:80".parse().expect("addr"), &headers).expect_err("newline");
        assert!(matches!(
            err,
            HboneError::InvalidHeader { name: TRACEPARENT }
        ));
    }
}
