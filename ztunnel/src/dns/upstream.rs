//! Asking the upstream resolver, from inside the pod's network namespace with the ztunnel's
//! mark (so the query leaves with the pod's address, as the pod's own would, and is not
//! captured again). UDP queries go upstream over UDP, TCP ones over TCP; the pod's bytes are
//! forwarded unchanged (its EDNS size, flags and id) and the answer's bytes come back
//! unchanged, so TTLs, rcodes and truncation are the upstream's. One fresh socket per query:
//! the kernel picks a random source port, and only the upstream's address can answer a
//! connected socket.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::PodNetns;

/// Largest DNS message (a TCP length prefix is 16 bits).
pub const MAX_MESSAGE: usize = 65_535;

/// Why the upstream gave no usable answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No answer within the timeout.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The upstream.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// A socket error (unreachable, refused, reset).
    #[error("{addr}: {source}")]
    Io {
        /// The upstream.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl UpstreamError {
    /// A short label for the failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Io { .. } => "unreachable",
        }
    }
}

/// Sends `query` to `addr` over UDP and returns the first datagram whose id matches.
pub async fn udp(
    netns: &PodNetns,
    addr: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let io = |source| UpstreamError::Io { addr, source };
    let exchange = async {
        let socket = netns.udp_socket(addr).map_err(io)?;
        socket.connect(addr).await.map_err(io)?;
        socket.send(query).await.map_err(io)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = socket.recv(&mut buf).await.map_err(io)?;
            // A datagram for another id (a late answer to nothing we asked) is skipped.
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    };
    bounded(addr, timeout, exchange).await
}

/// Runs `exchange` for at most `timeout`.
async fn bounded(
    addr: SocketAddr,
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<Vec<u8>, UpstreamError>>,
) -> Result<Vec<u8>, UpstreamError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| UpstreamError::Timeout { addr, timeout })?
}

/// Sends `query` to `addr` over TCP (one connection per query) and returns the answer.
pub async fn tcp(
    netns: &PodNetns,
    addr: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let io = |source| UpstreamError::Io { addr, source };
    let exchange = async {
        let mut stream = netns.connect(addr).await.map_err(io)?;
        write_framed(&mut stream, query).await.map_err(io)?;
        read_framed(&mut stream).await.map_err(io)
    };
    bounded(addr, timeout, exchange).await
}

/// Reads one length-prefixed DNS message (RFC 1035 §4.2.2).
pub async fn read_framed<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let len = usize::from(r.read_u16().await?);
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one length-prefixed DNS message in a single write; a message over 65,535 bytes is an
/// error.
pub async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("DNS message longer than 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    w.write_all(&framed).await
}

/// The first `nameserver` of a resolv.conf text, on port 53.
pub fn from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_nameserver_is_the_upstream() {
        let text = "# generated\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver 8.8.8.8\noptions ndots:5\n";
        assert_eq!(
            from_resolv_conf(text),
            Some("10.96.0.10:53".parse().expect("addr"))
        );
        assert_eq!(
            from_resolv_conf("nameserver fe80::1%eth0\n"),
            Some("[fe80::1]:53".parse().expect("addr"))
        );
        assert_eq!(from_resolv_conf("nameserver nonsense\n"), None);
        assert_eq!(from_resolv_conf(""), None);
    }
}
