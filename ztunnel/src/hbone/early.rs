//! Early data: the bytes an application already sent when its tunnel is being opened.
//!
//! A client that speaks first (HTTP, gRPC, most database protocols) writes its request as soon
//! as `connect` returns — before the source ztunnel has opened the tunnel. Waiting for the
//! CONNECT's 200 before relaying them costs every new connection one round trip between the
//! two ztunnels (and one more TLS record and wake-up on each side). [`EarlyData`] takes what
//! the application's socket already holds (at most [`EARLY_DATA_MAX`] bytes, one non-blocking
//! `recv`, never a wait) right before the CONNECT request is sent, and the request carries
//! them as its first DATA frame, in the same write as its headers.
//!
//! They reach the destination's ztunnel — the peer the TLS handshake verified as the
//! destination's identity — and nothing else: the destination decides policy and connects to
//! the application before it reads the stream, so a refused tunnel's early data is dropped
//! there with the stream, never delivered. A CONNECT retried on another pooled connection
//! (the first one turned out closed) sends the same bytes again; they are kept until the tunnel
//! is open.

use std::io::{self, Read};

use bytes::Bytes;

/// The most bytes taken from the application's socket before the tunnel is open: one TLS
/// record's worth, well inside any peer's initial stream window (64 KiB by HTTP/2's default).
pub const EARLY_DATA_MAX: usize = 16 * 1024;

/// The early data of one connection: taken from `source` at most once, kept for a retry.
#[derive(Debug, Default)]
pub struct EarlyData<'a> {
    source: Option<&'a tokio::net::TcpStream>,
    taken: Option<Bytes>,
    error: Option<io::Error>,
}

impl<'a> EarlyData<'a> {
    /// Takes early data from `source` when the tunnel's request is sent.
    pub fn from_socket(source: &'a tokio::net::TcpStream) -> Self {
        Self {
            source: Some(source),
            taken: None,
            error: None,
        }
    }

    /// No early data (the tunnel's first bytes are relayed after the 200).
    pub fn none() -> Self {
        Self::default()
    }

    /// The early data: read from the socket the first time (without waiting), the same bytes
    /// afterwards. Empty when the socket held nothing, had ended, or failed — the relay then
    /// finds the end or the error itself, except for an error the read consumed, which
    /// [`Self::take_error`] reports.
    pub fn take(&mut self) -> Bytes {
        if let Some(taken) = &self.taken {
            return taken.clone();
        }
        let taken = match self.source {
            None => Bytes::new(),
            Some(source) => match read_now(source) {
                Ok(bytes) => bytes,
                Err(e) => {
                    self.error = Some(e);
                    Bytes::new()
                }
            },
        };
        self.taken = Some(taken.clone());
        taken
    }

    /// How many bytes were taken (and so sent ahead of the relay).
    pub fn len(&self) -> usize {
        self.taken.as_ref().map_or(0, Bytes::len)
    }

    /// Whether no bytes were taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The error the read returned (a reset by the application, say). A socket reports a
    /// pending error once, so the caller must act on it: the relay would see a clean end.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }
}

/// One `recv` on the non-blocking socket, straight through the kernel: tokio's readiness
/// cache of a just-accepted socket says "not readable" until its driver has run, but what
/// counts here is what the kernel holds now. Read on the stack and kept at its own size: a
/// socket with nothing yet costs no allocation, and a short request does not hold a whole
/// [`EARLY_DATA_MAX`] buffer until the tunnel is open.
fn read_now(source: &tokio::net::TcpStream) -> io::Result<Bytes> {
    let socket = socket2::SockRef::from(source);
    let mut buf = [0u8; EARLY_DATA_MAX];
    loop {
        match (&*socket).read(&mut buf) {
            Ok(n) => return Ok(Bytes::copy_from_slice(&buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Bytes::new()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// What the socket holds is taken at once (no wait for tokio's readiness), kept for a
    /// retry, and what follows is left to the relay in order.
    #[tokio::test]
    async fn takes_what_is_there_once_and_leaves_the_rest() {
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        // Let loopback deliver; the accepted socket's readiness was never polled.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut early = EarlyData::from_socket(&server);
        assert_eq!(&early.take()[..], b"GET / HTTP/1.1\r\n");
        client.write_all(b"Host: a\r\n").await.expect("write");
        assert_eq!(
            &early.take()[..],
            b"GET / HTTP/1.1\r\n",
            "the same bytes again"
        );
        assert_eq!(early.len(), 16);
        assert!(early.take_error().is_none());
        let mut rest = [0; 9];
        server.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b"Host: a\r\n");
    }

    #[tokio::test]
    async fn nothing_sent_yet_is_empty_without_waiting() {
        let (_client, server) = pair().await;
        let mut early = EarlyData::from_socket(&server);
        assert!(early.take().is_empty());
        assert!(early.is_empty());
        assert!(EarlyData::none().take().is_empty());
    }

    /// At most one record's worth is taken; the rest stays in the socket.
    #[tokio::test]
    async fn takes_at_most_the_limit() {
        let (mut client, mut server) = pair().await;
        let sent = vec![7u8; EARLY_DATA_MAX + 1000];
        client.write_all(&sent).await.expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut early = EarlyData::from_socket(&server);
        assert_eq!(early.take().len(), EARLY_DATA_MAX);
        let mut rest = vec![0; 1000];
        server.read_exact(&mut rest).await.expect("read");
    }

    /// A reset consumed by the early read is reported, not lost.
    #[tokio::test]
    async fn a_reset_is_reported() {
        let (client, server) = pair().await;
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(client);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut early = EarlyData::from_socket(&server);
        assert!(early.take().is_empty());
        let error = early.take_error().expect("the reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
