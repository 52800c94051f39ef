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
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use membrane_identity::{PeerTrust, SharedTrustBundle, SpiffeId, peer_spiffe_id};
use membrane_runtime::listener::LogLimiter;
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::UnixTime;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::limits::handshakes;
use super::request::{ConnectRefusal, ConnectRequest, DenialStatus, parse_request};
use super::stream::H2Stream;
use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME_SIZE, MAX_HEADER_LIST, MAX_SEND_BUFFER,
    SERVER_MAX_CONCURRENT_STREAMS, STREAM_WINDOW, require_h2, server_tls_with_h2,
};
use crate::relay::{RelayEnd, RelayResult, ResetOnError, Side, relay};

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

    /// Whether `peer` gets a relay's share of the pending handshakes (half of them) instead
    /// of one address's (an eighth): a relay of this cluster carries many sources' tunnels
    /// and limits each source itself. None does, unless the handler says so.
    fn handshake_relay_share(&self, peer: IpAddr) -> bool {
        let _ = peer;
        false
    }

    /// The bundles the server's TLS configuration verifies peers with. When given, a
    /// connection's peer chain is checked again against them before each new tunnel once they
    /// have changed ([`PeerTrust`]): a peer whose root was removed, or whose trust domain is no
    /// longer federated, gets 401 and the connection is closed (open tunnels run to their
    /// end, as at its certificate's expiry).
    fn trust_bundles(&self) -> Option<SharedTrustBundle> {
        None
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
/// [`HandshakeLimits`](super::HandshakeLimits) (10 s and 256 at once unless
/// [`set_handshake_limits`](super::set_handshake_limits) said otherwise).
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
    // A peer that vanished (its node gone, a partition) is found even while tunnels are open
    // on the connection: a minute of silence, then three probes ten seconds apart.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
    let tls = server_tls_with_h2(tls);
    let limits = handshakes();
    // Read before the handshake: a change while it runs is checked again at the first CONNECT.
    let bundles = handler.trust_bundles();
    let verified_at = bundles.as_ref().map(SharedTrustBundle::generation);
    // A peer over its share is refused before it waits for a turn or costs a buffer.
    let peer_turn = match peer_addr {
        Some(addr) => Some(limits.share(addr.ip(), handler.handshake_relay_share(addr.ip()))?),
        None => None,
    };
    let handshake = async {
        // The share counts handshakes in progress: released when this block ends (done or
        // timed out), not held for the connection's life.
        let _peer_turn = peer_turn;
        // The turn is taken before the read buffer is allocated; a connection waiting for
        // one takes it back from a handshake that has held it too long (`HandshakeLimits::
        // evict_after`).
        let turn = limits.turn().await;
        // Every step the turn covers (TLS, ALPN, the HTTP/2 preface and settings) can be
        // taken back: a peer that completed TLS and then stays silent holds it no longer.
        let steps = async {
            let tls = super::handshake::accept(tcp, tls)
                .await
                .map_err(|e| HboneError::Tls(Arc::new(e)))?;
            let session = tls.session();
            require_h2(session.alpn.as_deref())?;
            let peer = peer_spiffe_id(session.peer_certificates());
            let (peer_not_after, trust) =
                session.peer_validity(verified_at, membrane_identity::svid::Usage::Client);
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
            Ok::<_, HboneError>((conn, peer, peer_not_after, trust))
        };
        tokio::select! {
            done = steps => done,
            () = turn.evicted() => Err(HboneError::Evicted { after: limits.limits.evict_after }),
        }
    };
    let timeout = limits.limits.timeout;
    let established = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            limits.limits.timed_out.inc();
            HboneError::Timeout {
                stage: "HBONE server handshake",
                after: timeout,
            }
        })?;
    let (mut conn, peer, peer_not_after, trust) = established.inspect_err(|e| {
        // An evicted handshake is counted as such (`HandshakeLimits::evicted`), like a timeout.
        if !matches!(e, HboneError::Evicted { .. }) {
            handshakes_failed().inc();
        }
    })?;
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
    let mut life = Lifetime::new(peer_not_after, limits.limits.idle_timeout);
    let result = loop {
        let stop_at = life.next_stop(streams.is_empty());
        tokio::select! {
            joined = streams.join_next(), if !streams.is_empty() => {
                if let Some(Err(e)) = joined {
                    tracing::error!(error = %e, "HBONE stream task failed");
                }
                if streams.is_empty() {
                    life.idle_from(Instant::now());
                }
            }
            () = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => {
                match life.stop(Instant::now()) {
                    Stop::Expired => {
                        tracing::info!("peer certificate expired; the connection takes no new tunnel");
                        conn.graceful_shutdown();
                    }
                    Stop::Idle => {
                        limits.limits.idle_closed.inc();
                        tracing::debug!("HBONE connection idle; closing it");
                        conn.graceful_shutdown();
                    }
                    Stop::Unanswered => {
                        tracing::debug!("peer did not finish the GOAWAY exchange; dropping the connection");
                        break Ok(());
                    }
                }
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((_, mut respond))) if !still_trusted(trust.as_ref(), bundles.as_ref()) => {
                    answer(&mut respond, StatusCode::UNAUTHORIZED);
                    if life.close(Instant::now()) {
                        conn.graceful_shutdown();
                    }
                }
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

/// Whether the connection's peer is still trusted by the current bundles (always, without
/// bundles to check against); counts and logs the first refusal.
fn still_trusted(trust: Option<&PeerTrust>, bundles: Option<&SharedTrustBundle>) -> bool {
    let (Some(trust), Some(bundles)) = (trust, bundles) else {
        return true;
    };
    match trust.recheck(bundles, UnixTime::now()) {
        Ok(()) => true,
        Err(e) => {
            peers_untrusted().inc();
            if let Some(left_out) = UNTRUSTED_LOG.allow() {
                tracing::warn!(error = %e, left_out, "peer no longer trusted after a trust bundle change; refusing its tunnels and closing the connection");
            }
            false
        }
    }
}

/// Tunnels refused on an established connection because its peer's chain no longer verifies
/// against the changed trust bundles (a root removed, a trust domain no longer federated), for
/// the whole process; the app registers it as `hbone_peers_untrusted`.
pub fn peers_untrusted() -> &'static Counter {
    static UNTRUSTED: OnceLock<Counter> = OnceLock::new();
    UNTRUSTED.get_or_init(Counter::default)
}

/// CONNECT requests refused before any handler saw them (not CONNECT, an authority that is
/// neither `ip:port` nor `name:port`, no usable peer identity), for the whole process; the app
/// registers it as `hbone_requests_malformed`.
pub fn requests_malformed() -> &'static Counter {
    static MALFORMED: OnceLock<Counter> = OnceLock::new();
    MALFORMED.get_or_init(Counter::default)
}

/// Inbound connections whose TLS or HTTP/2 handshake failed (an untrusted or expired
/// certificate, no `h2`, garbage), for the whole process; the app registers it as
/// `hbone_handshakes_failed`. Timeouts and refused shares have their own counters.
pub fn handshakes_failed() -> &'static Counter {
    static FAILED: OnceLock<Counter> = OnceLock::new();
    FAILED.get_or_init(Counter::default)
}

/// A peer controls how often these lines would be written: one per 5 s, with the count left
/// out.
static MALFORMED_LOG: LogLimiter = LogLimiter::new();
static UNTRUSTED_LOG: LogLimiter = LogLimiter::new();

/// How long a closing connection with no tunnel left may take to finish the GOAWAY exchange
/// before it is dropped (a vanished peer never answers).
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Why a served connection stops taking tunnels, or is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The peer's certificate expired: no new tunnel on it (open ones run to their end).
    Expired,
    /// No tunnel for the idle timeout.
    Idle,
    /// Closing, no tunnel left, and the peer did not end the connection within the grace.
    Unanswered,
}

/// When a served connection stops taking tunnels: at its peer certificate's expiry (the
/// chain was verified once, at the handshake; a connection must not outlive the identity
/// it proved), or after the idle timeout without a tunnel.
#[derive(Debug)]
struct Lifetime {
    expires: Option<Instant>,
    idle_timeout: Duration,
    idle_since: Instant,
    closing_since: Option<Instant>,
}

impl Lifetime {
    fn new(peer_not_after: Option<SystemTime>, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            expires: peer_not_after.map(|t| {
                now + t
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            }),
            idle_timeout,
            idle_since: now,
            closing_since: None,
        }
    }

    /// The last tunnel ended at `at`.
    fn idle_from(&mut self, at: Instant) {
        self.idle_since = at;
    }

    /// When to call [`Lifetime::stop`] next (`quiet`: no tunnel open).
    fn next_stop(&self, quiet: bool) -> Option<Instant> {
        match self.closing_since {
            // The grace runs from the later of the close and the last tunnel's end: the
            // connection must first write that tunnel's last frames.
            Some(since) => quiet.then(|| since.max(self.idle_since) + CLOSE_GRACE),
            None => {
                let idle = quiet.then(|| self.idle_since + self.idle_timeout);
                match (idle, self.expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// Starts closing at `now` (the peer is no longer trusted); whether it was not closing yet.
    fn close(&mut self, now: Instant) -> bool {
        if self.closing_since.is_some() {
            return false;
        }
        self.closing_since = Some(now);
        true
    }

    /// What to do at `now`, a time [`Lifetime::next_stop`] gave.
    fn stop(&mut self, now: Instant) -> Stop {
        if self.closing_since.is_some() {
            return Stop::Unanswered;
        }
        self.closing_since = Some(now);
        if self.expires.is_some_and(|at| at <= now) {
            Stop::Expired
        } else {
            Stop::Idle
        }
    }
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
            requests_malformed().inc();
            if let Some(left_out) = MALFORMED_LOG.allow() {
                tracing::info!(status = %refusal.status(), reason = refusal.reason(), left_out, "CONNECT refused before policy");
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection closing because its peer's certificate expired, while a long tunnel runs
    /// on: it is dropped only a grace after that tunnel ends (its last frames written), never
    /// at once because the close began long before.
    #[test]
    fn the_close_grace_runs_from_the_last_tunnels_end() {
        let start = Instant::now();
        let mut life = Lifetime::new(
            Some(SystemTime::now() + Duration::from_secs(5)),
            Duration::from_secs(180),
        );
        // A tunnel is open: only the expiry is due.
        let expiry = life.next_stop(false).expect("expiry");
        assert!(expiry >= start + Duration::from_secs(4), "{expiry:?}");
        assert_eq!(life.stop(expiry), Stop::Expired);
        assert_eq!(life.next_stop(false), None, "open tunnels run on");
        // It ends 60 s later.
        let ended = expiry + Duration::from_secs(60);
        life.idle_from(ended);
        assert_eq!(life.next_stop(true), Some(ended + CLOSE_GRACE));
        assert_eq!(life.stop(ended + CLOSE_GRACE), Stop::Unanswered);
    }

    #[test]
    fn an_idle_connection_stops_after_the_idle_timeout() {
        let mut life = Lifetime::new(None, Duration::from_secs(180));
        assert_eq!(life.next_stop(false), None, "busy, no expiry");
        let at = life.next_stop(true).expect("idle");
        assert_eq!(life.stop(at), Stop::Idle);
        assert_eq!(life.next_stop(true), Some(at + CLOSE_GRACE));
    }
}
