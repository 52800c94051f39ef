//! The listening side: terminate mutual TLS, accept CONNECT streams, hand each to a
//! [`ConnectHandler`], and relay the accepted ones.
//!
//! Nothing reaches the application before the handler accepted: the request's DATA is not read
//! until the handler returned a connection, and a refused stream is answered and ended without
//! its body ever being read.

use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use membrane_identity::{SpiffeId, peer_spiffe_id};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::headers::{BAGGAGE, FORWARDED, TRACEPARENT, parse_forwarded_for};
use super::stream::H2Stream;
use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, MAX_HEADER_LIST, MAX_SEND_BUFFER,
    SERVER_MAX_CONCURRENT_STREAMS, STREAM_WINDOW, require_h2, server_tls_with_h2,
};
use crate::relay::{RelayEnd, RelayResult, ResetOnError, Side, relay};

/// Bounds on the server's handshakes, for the whole process: how long the TLS and HTTP/2
/// handshakes of one connection may take, and how many run at once. A connection waits for its
/// turn within the same timeout and holds no buffer meanwhile, so a flood of half-open
/// connections costs `max_pending` handshake buffers at most. One peer address may have at
/// most an eighth of `max_pending` in progress (at least one): a pod that floods 15008 with
/// silent connections exhausts its own share, not the node's.
#[derive(Debug, Clone)]
pub struct HandshakeLimits {
    /// Bound on waiting for a turn plus the TLS and HTTP/2 handshakes.
    pub timeout: Duration,
    /// Handshakes in progress at once.
    pub max_pending: usize,
    /// Incremented for each handshake that timed out.
    pub timed_out: prometheus_client::metrics::counter::Counter,
    /// Incremented for each connection refused because its peer address had its share.
    pub peer_refused: prometheus_client::metrics::counter::Counter,
}

impl HandshakeLimits {
    /// Handshakes one peer address may have in progress (waiting or running).
    pub fn max_pending_per_peer(&self) -> usize {
        (self.max_pending / 8).max(1)
    }
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_pending: 256,
            timed_out: Default::default(),
            peer_refused: Default::default(),
        }
    }
}

struct Handshakes {
    limits: HandshakeLimits,
    pending: Arc<tokio::sync::Semaphore>,
    /// Handshakes in progress per peer address (entries at zero are removed).
    per_peer: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl Handshakes {
    fn new(limits: HandshakeLimits) -> Self {
        let pending = Arc::new(tokio::sync::Semaphore::new(limits.max_pending.max(1)));
        Self {
            limits,
            pending,
            per_peer: Default::default(),
        }
    }

    /// [`Handshakes::enter`], unless `peer` is `exempt` from the per-address share (then
    /// only the process-wide bound applies).
    fn share(
        &'static self,
        peer: IpAddr,
        exempt: bool,
    ) -> Result<Option<PeerHandshake>, HboneError> {
        if exempt {
            return Ok(None);
        }
        self.enter(peer).map(Some)
    }

    /// Counts a handshake for `peer`, or refuses it when that address has its share.
    fn enter(&'static self, peer: IpAddr) -> Result<PeerHandshake, HboneError> {
        let limit = self.limits.max_pending_per_peer();
        let mut counts = crate::lock(&self.per_peer);
        let n = counts.entry(peer).or_insert(0);
        if *n >= limit {
            self.limits.peer_refused.inc();
            return Err(HboneError::PeerHandshakes { peer, limit });
        }
        *n += 1;
        Ok(PeerHandshake { owner: self, peer })
    }
}

/// One peer's handshake in progress; released when dropped.
struct PeerHandshake {
    owner: &'static Handshakes,
    peer: IpAddr,
}

impl Drop for PeerHandshake {
    fn drop(&mut self) {
        let mut counts = crate::lock(&self.owner.per_peer);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

static HANDSHAKES: OnceLock<Handshakes> = OnceLock::new();

/// Sets the process's [`HandshakeLimits`]; only the first call counts (later ones return
/// `false`). Without a call, the defaults apply.
pub fn set_handshake_limits(limits: HandshakeLimits) -> bool {
    HANDSHAKES.set(Handshakes::new(limits)).is_ok()
}

fn handshakes() -> &'static Handshakes {
    HANDSHAKES.get_or_init(|| Handshakes::new(HandshakeLimits::default()))
}

/// A parsed, authenticated CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The peer's SPIFFE ID, from its verified certificate.
    pub peer: SpiffeId,
    /// The original destination (`:authority`). When the authority names a host
    /// ([`ConnectRequest::host`]) its address is unspecified (`0.0.0.0`) and only the port
    /// counts.
    pub authority: SocketAddr,
    /// The host of a `name:port` authority (lowercase): what an egress gateway resolves
    /// itself. Every other handler refuses such a request.
    pub host: Option<String>,
    /// The original source address, as the peer states it in `forwarded: for=` (a claim).
    pub forwarded_for: Option<IpAddr>,
    /// The TCP peer of the HBONE connection (what the destination can verify), if known.
    pub peer_addr: Option<SocketAddr>,
    /// The `baggage` header, if present and visible ASCII.
    pub baggage: Option<String>,
    /// The `traceparent` header, if present and visible ASCII.
    pub traceparent: Option<String>,
}

/// Why a handler refused a CONNECT; each variant is one response status. The reason is for
/// local logs only and is never sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// 400: the request makes no sense here (for example an authority this node does not own).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: the peer's identity is missing or unusable.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// 403: policy denies this peer this destination.
    #[error("denied: {0}")]
    Denied(String),
    /// 503: the destination could not be reached.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl ConnectRefusal {
    /// The status the peer receives from a handler answering denials with 403.
    pub fn status(&self) -> StatusCode {
        self.status_given(DenialStatus::Forbidden)
    }

    /// The status the peer receives when policy denials are answered with `denial`.
    pub fn status_given(&self, denial: DenialStatus) -> StatusCode {
        match self {
            ConnectRefusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConnectRefusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ConnectRefusal::Denied(_) => denial.status(),
            ConnectRefusal::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The local reason.
    pub fn reason(&self) -> &str {
        match self {
            ConnectRefusal::BadRequest(r)
            | ConnectRefusal::Unauthenticated(r)
            | ConnectRefusal::Denied(r)
            | ConnectRefusal::Unreachable(r) => r,
        }
    }
}

/// The status a policy denial is answered with. Both dialects are refusals to any HBONE
/// client (every status but 200 is); they differ only in what a peer's logs and metrics show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenialStatus {
    /// 403 Forbidden: Membrane's answer (RFC 9110: authenticated, and not allowed).
    #[default]
    Forbidden,
    /// 401 Unauthorized: what Istio's ztunnel answers for an authorization-policy denial.
    Unauthorized,
}

impl DenialStatus {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }
}

impl std::str::FromStr for DenialStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "403" => Ok(Self::Forbidden),
            "401" => Ok(Self::Unauthorized),
            other => Err(format!(
                "{other:?} is not a denial status: 403 (Membrane) or 401 (Istio's ztunnel)"
            )),
        }
    }
}

/// An accepted CONNECT: the connection to the destination, and the handler's admission — what
/// it keeps for the life of the tunnel (a registration, the connection's record…). The
/// admission is handed back to [`ConnectHandler::finished`] when the relay ends, or dropped
/// with the tunnel if the connection is torn down first.
pub struct Accepted<A = (), S = TcpStream> {
    /// The connection to the destination.
    pub app: S,
    /// Handler state for the life of the tunnel.
    pub admission: A,
    /// Cancelling it ends the tunnel at once: both sides are reset (for example when a policy
    /// change no longer allows the connection).
    pub cancel: Option<tokio_util::sync::CancellationToken>,
}

impl From<TcpStream> for Accepted {
    fn from(app: TcpStream) -> Self {
        Self {
            app,
            admission: (),
            cancel: None,
        }
    }
}

/// What [`ConnectHandler::connect`] returns: the admission decided, asynchronously.
pub type ConnectFuture<'a, A, S = TcpStream> =
    Pin<Box<dyn Future<Output = Result<Accepted<A, S>, ConnectRefusal>> + Send + 'a>>;

/// Decides what an authenticated CONNECT gets: a connection to the destination, or a refusal.
pub trait ConnectHandler: Send + Sync + 'static {
    /// What an admitted tunnel keeps until its relay ends.
    type Admission: Send + 'static;
    /// The connection to the destination ([`TcpStream`], or a wrapper that meters it).
    type App: tokio::io::AsyncRead + tokio::io::AsyncWrite + ResetOnError + Unpin + Send + 'static;

    /// Authorizes `req` and connects to its destination. Called once per well-formed CONNECT;
    /// the future is dropped if the peer resets the stream meanwhile.
    fn connect(&self, req: ConnectRequest) -> ConnectFuture<'_, Self::Admission, Self::App>;

    /// The status a [`ConnectRefusal::Denied`] is answered with: 403 unless the handler
    /// speaks Istio's dialect ([`DenialStatus`]).
    fn denial_status(&self) -> DenialStatus {
        DenialStatus::default()
    }

    /// Whether `peer` is exempt from one address's share of the pending handshakes (a relay
    /// of this cluster that carries many sources' tunnels and limits each source itself).
    /// The process-wide bound still applies. None is, unless the handler says so.
    fn handshake_share_exempt(&self, peer: IpAddr) -> bool {
        let _ = peer;
        false
    }

    /// Called once for every accepted request — when its relay ended, or when the tunnel could
    /// not be opened after all (an error on side B, nothing relayed) — with the admission
    /// `connect` returned. Only if the connection task is dropped (pod removed, drain grace
    /// over) is the admission dropped without it.
    fn finished(&self, req: &ConnectRequest, result: &RelayResult, admission: Self::Admission) {
        let _ = (req, result, admission);
    }
}

/// Serves one inbound HBONE connection until it closes.
///
/// `tls` is a config from `membrane_identity::verify::mtls_server_config`. If it does not
/// offer exactly ALPN `h2`, a copy that does is used for this connection — set
/// `alpn_protocols` to `[ALPN_H2]` once to avoid the per-connection copy. A client that does
/// not negotiate `h2` is refused. The TLS and HTTP/2 handshakes together are bounded by
/// [`HandshakeLimits`] (10 s and 256 at once unless [`set_handshake_limits`] said otherwise).
///
/// Each CONNECT stream runs in its own task, in a `hbone_stream` span. They are joined before
/// this returns, and aborted if this future is dropped.
pub async fn serve_connection<H: ConnectHandler + ?Sized>(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
) -> Result<(), HboneError> {
    let span = tracing::info_span!(
        "hbone_conn",
        peer_addr = tracing::field::Empty,
        peer = tracing::field::Empty,
    );
    let peer_addr = tcp.peer_addr().ok();
    if let Some(addr) = peer_addr {
        span.record("peer_addr", tracing::field::display(addr));
    }
    serve(tcp, peer_addr, tls, handler).instrument(span).await
}

async fn serve<H: ConnectHandler + ?Sized>(
    tcp: TcpStream,
    peer_addr: Option<SocketAddr>,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
) -> Result<(), HboneError> {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let tls = server_tls_with_h2(tls);
    let limits = handshakes();
    // A peer over its share is refused before it waits for a turn or costs a buffer.
    let _peer_turn = match peer_addr {
        Some(addr) => limits.share(addr.ip(), handler.handshake_share_exempt(addr.ip()))?,
        None => None,
    };
    let handshake = async {
        // The turn is taken before the read buffer is allocated. The semaphore is never
        // closed, so the error arm cannot happen.
        let _turn = limits.pending.clone().acquire_owned().await.ok();
        let tls = super::handshake::accept(tcp, tls)
            .await
            .map_err(|e| HboneError::Tls(Arc::new(e)))?;
        let session = tls.session();
        require_h2(session.alpn.as_deref())?;
        let peer = peer_spiffe_id(session.peer_certificates());
        let conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| HboneError::Handshake(Arc::new(e)))?;
        Ok::<_, HboneError>((conn, peer))
    };
    let timeout = limits.limits.timeout;
    let (mut conn, peer) = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            limits.limits.timed_out.inc();
            HboneError::Timeout {
                stage: "HBONE server handshake",
                after: timeout,
            }
        })??;
    // With a verifier that requires client certificates this cannot fail; if a caller's
    // config lets anonymous clients through, every request is answered 401.
    let peer = match peer {
        Ok(id) => {
            tracing::Span::current().record("peer", tracing::field::display(&id));
            tracing::debug!("HBONE connection established");
            Some(id)
        }
        Err(e) => {
            tracing::warn!(error = %e, "peer presented no usable SPIFFE ID; refusing its requests");
            None
        }
    };

    let mut streams = JoinSet::new();
    let result = loop {
        tokio::select! {
            joined = streams.join_next(), if !streams.is_empty() => {
                if let Some(Err(e)) = joined {
                    tracing::error!(error = %e, "HBONE stream task failed");
                }
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let span = tracing::info_span!(
                        "hbone_stream",
                        stream = respond.stream_id().as_u32(),
                        authority = tracing::field::Empty,
                    );
                    streams.spawn(
                        handle_stream(request, respond, peer.clone(), peer_addr, handler.clone())
                            .instrument(span),
                    );
                }
                Some(Err(e)) => break Err(HboneError::h2(e)),
                None => break Ok(()),
            },
        }
    };
    match &result {
        Ok(()) => tracing::debug!("HBONE connection closed"),
        Err(e) => tracing::debug!(error = %e, "HBONE connection ended with an error"),
    }
    // The connection is finished: its streams fail promptly, so this does not wait long.
    drop(conn);
    while let Some(joined) = streams.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "HBONE stream task failed");
        }
    }
    result
}

async fn handle_stream<H: ConnectHandler + ?Sized>(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: Option<SpiffeId>,
    peer_addr: Option<SocketAddr>,
    handler: Arc<H>,
) {
    let req = match parse_request(&request, peer, peer_addr) {
        Ok(req) => req,
        Err(refusal) => {
            tracing::info!(status = %refusal.status(), reason = refusal.reason(), "CONNECT refused");
            return answer(&mut respond, refusal.status());
        }
    };
    tracing::Span::current().record("authority", tracing::field::display(req.authority));
    tracing::debug!(peer = %req.peer, forwarded_for = ?req.forwarded_for, "CONNECT");

    let decision = tokio::select! {
        decision = handler.connect(req.clone()) => decision,
        reset = poll_fn(|cx| respond.poll_reset(cx)) => {
            match reset {
                Ok(reason) => tracing::debug!(%reason, "peer reset the stream before the handler answered"),
                Err(e) => tracing::debug!(error = %e, "connection failed before the handler answered"),
            }
            return;
        }
    };
    let Accepted {
        app,
        admission,
        cancel,
    } = match decision {
        Ok(accepted) => accepted,
        Err(refusal) => {
            let status = refusal.status_given(handler.denial_status());
            tracing::info!(%status, reason = refusal.reason(), "CONNECT refused");
            return answer(&mut respond, status);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(error = %e, "could not open the tunnel; resetting the application side");
            app.reset();
            // Nothing was relayed; the handler still finishes what it admitted, so its record
            // says what happened.
            let result = RelayResult {
                a_to_b: 0,
                b_to_a: 0,
                end: RelayEnd::Error {
                    side: Side::B,
                    error: std::io::Error::other(format!("could not open the tunnel: {e}")),
                },
            };
            return handler.finished(&req, &result, admission);
        }
    };
    let tunnel = H2Stream::new(send, request.into_body());
    let result = match cancel {
        None => relay(app, tunnel).await,
        Some(cancel) => crate::relay::relay_until(app, tunnel, cancel).await,
    };
    let (kind, reason) = result.summary();
    tracing::debug!(
        result = kind,
        reason,
        to_app = result.b_to_a,
        from_app = result.a_to_b,
        "HBONE tunnel ended"
    );
    handler.finished(&req, &result, admission);
}

/// Sends a final status with END_STREAM (no body).
fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(e) = respond.send_response(response, true) {
        tracing::debug!(error = %e, "could not send the refusal");
    }
}

fn parse_request(
    request: &Request<RecvStream>,
    peer: Option<SpiffeId>,
    peer_addr: Option<SocketAddr>,
) -> Result<ConnectRequest, ConnectRefusal> {
    let Some(peer) = peer else {
        return Err(ConnectRefusal::Unauthenticated(
            "the peer presented no usable SPIFFE ID".into(),
        ));
    };
    if request.method() != Method::CONNECT {
        return Err(ConnectRefusal::BadRequest(format!(
            "method {} is not CONNECT",
            request.method()
        )));
    }
    let text = request.uri().authority().map(|a| a.as_str());
    let (authority, host) = match parse_authority(text) {
        Ok(addr) => (addr, None),
        Err(refusal) => match text.and_then(parse_named_authority) {
            Some((host, port)) => (
                SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
                Some(host),
            ),
            None => return Err(refusal),
        },
    };
    let headers = request.headers();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Ok(ConnectRequest {
        peer,
        authority,
        host,
        forwarded_for: headers
            .get(FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for),
        peer_addr,
        baggage: text(BAGGAGE),
        traceparent: text(TRACEPARENT),
    })
}

/// Parses a CONNECT `:authority`: `ip:port` (IPv6 in brackets), port not 0. Never panics.
pub fn parse_authority(authority: Option<&str>) -> Result<SocketAddr, ConnectRefusal> {
    let Some(authority) = authority else {
        return Err(ConnectRefusal::BadRequest(
            "CONNECT without :authority".into(),
        ));
    };
    let bad = || {
        ConnectRefusal::BadRequest(format!(
            "authority {:?} is not ip:port",
            authority.chars().take(256).collect::<String>()
        ))
    };
    let addr: SocketAddr = authority.parse().map_err(|_| bad())?;
    if addr.port() == 0 {
        return Err(bad());
    }
    Ok(addr)
}

/// Longest host name of a `name:port` authority.
const MAX_HOST: usize = 253;

/// Parses a `name:port` CONNECT authority: a DNS name (letters, digits, `-` inside labels of
/// at most 63 characters, dots between; case folded, no trailing dot) and a port 1-65535.
/// `None` for anything else, an IP address included. Never panics.
pub fn parse_named_authority(authority: &str) -> Option<(String, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() || host.len() > MAX_HOST || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !host.split('.').all(label_ok) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_authorities_are_dns_names_with_a_port() {
        assert_eq!(
            parse_named_authority("HuggingFace.co:443"),
            Some(("huggingface.co".to_owned(), 443))
        );
        for bad in [
            "huggingface.co",
            "huggingface.co:0",
            "huggingface.co:70000",
            ":443",
            "10.0.0.1:443",
            "a..b:443",
            "-a.b:443",
            "a_b.c:443",
            "huggingface.co.:443",
            "[::1]:443",
        ] {
            assert_eq!(parse_named_authority(bad), None, "{bad}");
        }
        assert_eq!(
            parse_named_authority(&format!("{}:1", "a".repeat(64))),
            None
        );
    }

    #[test]
    fn one_peer_gets_only_its_share_of_pending_handshakes() {
        let limits = HandshakeLimits {
            max_pending: 16,
            ..HandshakeLimits::default()
        };
        let refused = limits.peer_refused.clone();
        let handshakes: &'static Handshakes = Box::leak(Box::new(Handshakes::new(limits)));
        let attacker: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = handshakes.enter(attacker).expect("first");
        let _second = handshakes.enter(attacker).expect("second");
        assert!(matches!(
            handshakes.enter(attacker),
            Err(HboneError::PeerHandshakes { limit: 2, .. })
        ));
        assert_eq!(refused.get(), 1);
        // Another peer is unaffected; a finished handshake frees its slot.
        let _other = handshakes.enter(other).expect("other peer");
        drop(first);
        let _third = handshakes.enter(attacker).expect("slot freed");
        // An exempt address (this cluster's east-west gateway) is not held to the share.
        assert!(handshakes.share(attacker, false).is_err());
        assert!(matches!(handshakes.share(attacker, true), Ok(None)));
    }

    #[test]
    fn authority_must_be_ip_and_port() {
        assert_eq!(
            parse_authority(Some("10.0.0.1:80")),
            Ok("10.0.0.1:80".parse().expect("addr"))
        );
        assert_eq!(
            parse_authority(Some("[fd00::1]:8080")),
            Ok("[fd00::1]:8080".parse().expect("addr"))
        );
        for bad in [
            None,
            Some("example.com:80"),
            Some("10.0.0.1"),
            Some("10.0.0.1:0"),
            Some("fd00::1:80"),
            Some("10.0.0.1:99999"),
            Some(""),
        ] {
            let err = parse_authority(bad).expect_err("refused");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn refusal_statuses() {
        assert_eq!(
            ConnectRefusal::Unauthenticated("x".into()).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ConnectRefusal::Denied("x".into()).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ConnectRefusal::Denied("x".into()).status_given(DenialStatus::Unauthorized),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!("401".parse(), Ok(DenialStatus::Unauthorized));
        assert_eq!("403".parse(), Ok(DenialStatus::Forbidden));
        assert!("200".parse::<DenialStatus>().is_err());
        let unreachable = ConnectRefusal::Unreachable("app down".into());
        assert_eq!(unreachable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unreachable.reason(), "app down");
    }
}
