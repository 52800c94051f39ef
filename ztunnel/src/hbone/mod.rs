//! HBONE: TCP tunnelled in HTTP/2 CONNECT over mutual TLS, wire-compatible with Istio.
//!
//! This module owns the tunnel itself and nothing around it:
//!
//! - [`H2Stream`]: one HTTP/2 stream seen as a byte stream (`AsyncRead` + `AsyncWrite`), with
//!   TCP semantics: shutdown is a half-close (empty DATA frame with END_STREAM), dropping it
//!   without a clean close or an I/O error resets it (RST_STREAM CANCEL), a received reset
//!   reads as [`std::io::ErrorKind::ConnectionReset`].
//! - [`serve_connection`]: the listening side (TLS 1.3 with ALPN `h2`, verified peer SPIFFE ID,
//!   one task per CONNECT stream); what to do with a request is the caller's
//!   [`ConnectHandler`]'s decision.
//! - [`HbonePool`]: the dialling side, pooling and multiplexing connections per
//!   [`PoolKey`] (source address and identity, destination identity and address, gateway) —
//!   never mixing identities on one connection. A connection runs over a [`Carrier`]: TCP, or
//!   a stream of an outer tunnel (double HBONE through an east-west gateway).
//! - The TLS under both: rustls runs the handshake (`handshake`); the TLS 1.3 records after it
//!   are opened and sealed here (`tls`, `record`) with the traffic secrets rustls hands over,
//!   in the buffers the socket is read into and written from; while an HTTP/2 frame is
//!   incomplete the socket's receive low-water mark keeps the reader asleep until it can be
//!   whole (`frame_wait`).
//!
//! The byte copy between a tunnel and a socket is [`crate::relay`]'s, shared with the paths
//! that use no tunnel.
//!
//! What it must not do: decide policy (the handler does), choose identities or build TLS
//! configurations (callers pass configs made by `crate::certs::TlsConfigs`), or create sockets
//! on the dialling side (the caller's [`Dial`] does, inside the right network namespace and
//! with the right mark). It holds no global state and spawns only tasks whose lifetime is tied
//! to a connection it serves or pools.
//!
//! Wire contract: `:method CONNECT`, `:authority` = original destination `ip:port`, headers
//! `forwarded: for="<source ip>"` (IPv6 in brackets, RFC 7239), optional `baggage` and
//! `traceparent`. Responses: 200 tunnel open, 400 malformed request, 401 no/invalid identity,
//! 403 denied by policy (401 when the handler speaks Istio's dialect, [`DenialStatus`]), 503
//! destination unreachable. The dialling side may send the stream's first DATA frame with the
//! request, before the response ([`EarlyData`]); the listening side reads a stream only once
//! it has answered 200.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{SpiffeId, SvidError};

mod carrier;
mod client;
mod early;
mod frame_wait;
mod handshake;
mod headers;
mod limits;
mod pool;
mod record;
mod request;
mod send_buf;
mod server;
mod stream;
#[cfg(test)]
mod test_pki;
mod tls;

pub use carrier::Carrier;
pub use client::{ConnectHeaders, Dial, DialFuture};
pub use early::{EARLY_DATA_MAX, EarlyData};
pub use headers::{format_forwarded_for, parse_forwarded_for};
pub use limits::{HandshakeLimits, set_handshake_limits};
pub use pool::{HbonePool, PoolConfig, PoolKey};
pub use request::{
    ConnectRefusal, ConnectRequest, DenialStatus, parse_authority, parse_named_authority,
};
pub use server::{
    Accepted, ConnectFuture, ConnectHandler, handshakes_failed, peers_untrusted,
    requests_malformed, serve_connection,
};
pub use stream::H2Stream;
pub use tls::records_refused;

/// The port inbound HBONE listens on, in every enrolled pod's network namespace.
pub use membrane_api::ports::HBONE as HBONE_PORT;

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

// === HTTP/2 and TLS tuning ===
//
// Throughput is decided by copies, syscalls and flow control, not by HTTP/2 framing. Windows
// are large so one stream can fill a fast link without waiting for WINDOW_UPDATEs, and the
// stream window no larger than that needs: it bounds what a stream buffers before the
// application reads it. 2 MiB: with 1 MiB a single stream's sender sat idle waiting for
// WINDOW_UPDATEs (one stream 4.5 % slower); with 4 MiB the four-stream peak RSS was 28-32 MiB
// and one stream no faster (docs/design.md, "a 2 MiB stream window"). Frames are large so a
// 256 KiB read from the application becomes one DATA frame; up to 256 KiB of records leave in
// one write, and reads under TLS go straight into HTTP/2's buffer, as large as its frame (one
// `recvfrom` where rustls alone made ~16; see `tls`). Measured on the two-node benchmark
// (docs/design.md, "Data-plane performance decisions"): 1 MiB frames beat 16 KiB frames by
// ~10%; 256 KiB, 512 KiB and 1 MiB of per-stream send buffer made no measurable difference.

/// Per-stream receive window we advertise (SETTINGS_INITIAL_WINDOW_SIZE).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Connection-wide receive window we advertise.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept (h2 allows 16 KiB ..= 16 MiB - 1).
const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Bytes a stream may queue for sending before writes wait for the connection to drain (two
/// relay buffers).
const MAX_SEND_BUFFER: usize = 512 * 1024;
/// Largest header list we accept (CONNECT headers are small; W3C baggage is at most 8 KiB).
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams a server accepts at once on one connection: each is a socket to an application,
/// so a peer's tunnels are bounded by this times its connections (the pool opens at most 100
/// per connection, as Istio's does; HTTP/2 clients wait for a slot rather than exceed it).
const SERVER_MAX_CONCURRENT_STREAMS: u32 = 128;
/// Records queued for one socket write (see `tls`).
const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Why an HBONE connection or tunnel could not be established.
///
/// Cloneable so a failed connection attempt can be reported to every caller that waited for
/// it (the pool dials once per key at a time).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    /// The caller's [`Dial`] could not create the TCP connection.
    #[error("dialling {addr} failed: {source}")]
    Dial {
        /// The address dialled.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The TLS handshake failed: certificate refused by either side, alert, or connection lost.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] Arc<std::io::Error>),
    /// The peer did not negotiate ALPN `h2`.
    #[error("peer did not negotiate ALPN h2 (negotiated: {negotiated:?})")]
    Alpn {
        /// The protocol that was negotiated, if any (lossily decoded).
        negotiated: Option<String>,
    },
    /// The verified peer certificate does not carry a usable SPIFFE ID.
    #[error("peer identity unusable: {0}")]
    PeerIdentity(#[source] SvidError),
    /// The peer proved an identity other than the one this tunnel is for.
    #[error("peer is {presented}, expected {expected}")]
    PeerMismatch {
        /// The identity the pool key names.
        expected: SpiffeId,
        /// The identity the peer's certificate proves.
        presented: SpiffeId,
    },
    /// The HTTP/2 connection preface or SETTINGS exchange failed.
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[source] Arc<h2::Error>),
    /// An established HTTP/2 connection or stream failed (GOAWAY, reset, I/O error).
    #[error("HTTP/2 connection failed: {0}")]
    H2(#[source] Arc<h2::Error>),
    /// The peer answered the CONNECT with a status other than 200.
    #[error("CONNECT refused with status {0}")]
    Refused(http::StatusCode),
    /// A caller-supplied header value cannot be sent (for example a control character).
    #[error("invalid value for the {name} header")]
    InvalidHeader {
        /// The header's name.
        name: &'static str,
    },
    /// A stage did not complete in time.
    #[error("{stage} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        stage: &'static str,
        /// The bound that elapsed.
        after: Duration,
    },
    /// The handshake held its turn past `HandshakeLimits::evict_after` while another
    /// connection waited for one, and gave it up.
    #[error("HBONE server handshake gave up its turn to a waiting connection after {after:?}")]
    Evicted {
        /// How long a turn may be held while others wait.
        after: Duration,
    },
    /// One peer address already holds its share of the node's pending handshakes.
    #[error("{peer} already has {limit} HBONE handshakes in progress")]
    PeerHandshakes {
        /// The TCP peer's address.
        peer: IpAddr,
        /// Handshakes one peer address may have in progress.
        limit: usize,
    },
}

impl HboneError {
    fn h2(e: h2::Error) -> Self {
        HboneError::H2(Arc::new(e))
    }
}

/// A rustls configuration HBONE runs over (client or server): its ALPN list, and whether the
/// traffic secrets may be taken over after the handshake (`tls` opens and seals the records).
trait HboneConfig: Clone {
    fn alpn(&self) -> &[Vec<u8>];
    fn alpn_mut(&mut self) -> &mut Vec<Vec<u8>>;
    fn extraction(&self) -> bool;
    fn extraction_mut(&mut self) -> &mut bool;
}

impl HboneConfig for rustls::ServerConfig {
    fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn_protocols
    }
    fn extraction(&self) -> bool {
        self.enable_secret_extraction
    }
    fn alpn_mut(&mut self) -> &mut Vec<Vec<u8>> {
        &mut self.alpn_protocols
    }
    fn extraction_mut(&mut self) -> &mut bool {
        &mut self.enable_secret_extraction
    }
}

impl HboneConfig for rustls::ClientConfig {
    fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn_protocols
    }
    fn extraction(&self) -> bool {
        self.enable_secret_extraction
    }
    fn alpn_mut(&mut self) -> &mut Vec<Vec<u8>> {
        &mut self.alpn_protocols
    }
    fn extraction_mut(&mut self) -> &mut bool {
        &mut self.enable_secret_extraction
    }
}

/// The caller's config if it already offers exactly `h2` and allows secret extraction, else a
/// copy that does (the ztunnel's own configurations are built that way, so nothing is copied
/// per connection).
fn with_h2<C: HboneConfig>(mut cfg: Arc<C>) -> Arc<C> {
    if !offers_only_h2(cfg.alpn()) {
        *Arc::make_mut(&mut cfg).alpn_mut() = vec![ALPN_H2.to_vec()];
    }
    if !cfg.extraction() {
        *Arc::make_mut(&mut cfg).extraction_mut() = true;
    }
    cfg
}

/// The caller's server config if it already offers exactly `h2`, else a copy that does.
fn server_tls_with_h2(cfg: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    with_h2(cfg)
}

/// The caller's client config if it already offers exactly `h2`, else a copy that does.
fn client_tls_with_h2(cfg: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    with_h2(cfg)
}

fn offers_only_h2(alpn: &[Vec<u8>]) -> bool {
    matches!(alpn, [only] if only.as_slice() == ALPN_H2)
}

/// Checks the negotiated ALPN protocol after a handshake.
fn require_h2(negotiated: Option<&[u8]>) -> Result<(), HboneError> {
    match negotiated {
        Some(p) if p == ALPN_H2 => Ok(()),
        other => Err(HboneError::Alpn {
            negotiated: other.map(|p| String::from_utf8_lossy(p).into_owned()),
        }),
    }
}

/// Read buffer of a TLS handshake, in bytes: one `read` takes everything the kernel holds (up
/// to this). An established connection keeps one record's worth instead (see `tls`).
pub const SOCKET_BUFFER: usize = 256 * 1024;

/// For the TLS record fuzz target: a client and a server complete a handshake in memory with
/// these configurations, the server sends `records` (inner type, content) sealed under its
/// real traffic key and then `raw` bytes as they are, and the client reads until its stream
/// ends or fails, with large and small reads in turn. Returns how many bytes of content the
/// client read. Never panics on any input.
#[doc(hidden)]
pub async fn fuzz_tls_records(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    records: &[(u8, &[u8])],
    raw: &[u8],
) -> std::io::Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let (client, server) = tokio::join!(
        handshake::connect(a, client_tls_with_h2(client), name),
        async {
            let (mut rx, tx) = tokio::io::split(&mut b);
            // The server side's handshake over half of the pipe; records are written by hand.
            let io = tokio::io::join(&mut rx, tx);
            let mut server = handshake::accept(io, server_tls_with_h2(server)).await?;
            for (typ, content) in records {
                server.queue_any_record(*typ, content)?;
            }
            server.flush().await?;
            drop(server);
            b.write_all(raw).await?;
            b.shutdown().await
        }
    );
    let (mut client, ()) = (client?, server?);
    // Reads alternate between a reader with room for many records (opened in its buffer) and
    // one with less than a record (opened in the TLS layer's own), so both paths see the input.
    let mut total = 0;
    let (mut large, mut small) = (vec![0u8; 64 * 1024], [0u8; 1000]);
    for turn in 0usize.. {
        let read = if turn % 2 == 0 {
            client.read(&mut large).await
        } else {
            client.read(&mut small).await
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_check() {
        assert!(require_h2(Some(b"h2")).is_ok());
        assert!(matches!(
            require_h2(None),
            Err(HboneError::Alpn { negotiated: None })
        ));
        let err = require_h2(Some(b"http/1.1")).expect_err("not h2");
        assert!(err.to_string().contains("http/1.1"), "{err}");
        assert!(offers_only_h2(&[b"h2".to_vec()]));
        assert!(!offers_only_h2(&[b"h2".to_vec(), b"http/1.1".to_vec()]));
        assert!(!offers_only_h2(&[]));
    }

    #[test]
    fn a_config_offering_only_h2_is_used_as_is() {
        let provider = membrane_identity::crypto_provider();
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let other = Arc::new(cfg);
        let fixed = client_tls_with_h2(other.clone());
        assert!(!Arc::ptr_eq(&other, &fixed), "a copy offering h2");
        assert_eq!(fixed.alpn_protocols, vec![ALPN_H2.to_vec()]);
        assert_eq!(other.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(Arc::ptr_eq(&fixed, &client_tls_with_h2(fixed.clone())));
    }
}
