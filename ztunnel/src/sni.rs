//! The TLS server name a connection asks for, read from its ClientHello *without consuming
//! it*: the bytes are peeked from the socket, parsed by rustls' server-side acceptor on a
//! copy, and left in place for the relay to carry unchanged.
//!
//! It never delays a connection more than it must: on TLS ports ([`TLS_PORTS`]) it waits up
//! to [`TLS_WAIT`] for the ClientHello (a TLS client sends it at once, and the wait overlaps
//! the connect to the destination); on any other port it reads only what has already arrived
//! when the destination's connect completes.

use std::time::Duration;

use tokio::net::TcpStream;

/// Ports where a ClientHello is waited for.
pub const TLS_PORTS: [u16; 1] = [443];
/// Longest wait for a ClientHello on a TLS port.
pub const TLS_WAIT: Duration = Duration::from_secs(1);
/// Most bytes peeked (a ClientHello with a post-quantum key share and padding fits).
pub const MAX_PEEK: usize = 16 * 1024 + 5;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello with this server name.
    Sni(String),
    /// A complete ClientHello without a server name.
    NoSni,
    /// Not a TLS handshake (or a malformed one).
    NotTls,
    /// Could be a ClientHello; more bytes are needed.
    Incomplete,
}

/// Classifies `bytes`, the start of a connection.
pub fn client_hello(bytes: &[u8]) -> Hello {
    match bytes.first() {
        None => return Hello::Incomplete,
        Some(0x16) => {}
        Some(_) => return Hello::NotTls,
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    while !reader.is_empty() {
        if acceptor.read_tls(&mut reader).is_err() {
            return Hello::NotTls;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .server_name()
            .map_or(Hello::NoSni, |name| Hello::Sni(name.to_ascii_lowercase())),
        Ok(None) => Hello::Incomplete,
        Err(_) => Hello::NotTls,
    }
}

/// Peeks at the start of `stream` until it is classified or `wait` has passed.
pub async fn peek(stream: &TcpStream, wait: Duration) -> Hello {
    let mut buf = vec![0u8; MAX_PEEK];
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Hello::Incomplete,
        };
        if n == 0 {
            return Hello::Incomplete;
        }
        let hello = client_hello(&buf[..n]);
        if hello != Hello::Incomplete || n == buf.len() {
            return hello;
        }
        if n == last && tokio::time::Instant::now() >= deadline {
            return Hello::Incomplete;
        }
        last = n;
        // Peeking again returns at once while the same bytes are queued: wait a little.
        tokio::time::sleep(Duration::from_millis(1)).await;
        if tokio::time::Instant::now() >= deadline {
            return Hello::Incomplete;
        }
    }
}

/// A real ClientHello for `name`, as rustls' client writes it (for tests).
#[cfg(test)]
pub(crate) fn hello_for(name: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), server).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_read_from_a_real_client_hello() {
        let bytes = hello_for("HuggingFace.co");
        assert_eq!(client_hello(&bytes), Hello::Sni("huggingface.co".into()));
        // An IP address is never sent as SNI.
        assert_eq!(client_hello(&hello_for("198.51.100.10")), Hello::NoSni);
        // Cut short, it may still become a ClientHello.
        assert_eq!(client_hello(&bytes[..bytes.len() / 2]), Hello::Incomplete);
        assert_eq!(client_hello(&[]), Hello::Incomplete);
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(client_hello(b"SSH-2.0-OpenSSH_9.6\r\n"), Hello::NotTls);
        assert_eq!(
            client_hello(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0]),
            Hello::NotTls
        );
    }

    #[tokio::test]
    async fn peeking_leaves_the_bytes_for_the_relay() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bytes = hello_for("cdn.hf.co");
        let sent = bytes.clone();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            // In two pieces, as a slow client might send it.
            c.write_all(&sent[..10]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(&sent[10..]).await.expect("write");
            c
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        assert_eq!(
            peek(&server, TLS_WAIT).await,
            Hello::Sni("cdn.hf.co".into())
        );
        let mut got = vec![0; bytes.len()];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, bytes, "every byte is still there, unchanged");
        drop(client.await.expect("client"));
        // A silent client: the wait ends at its bound.
        let quiet = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (server, _) = listener.accept().await.expect("accept");
        let started = std::time::Instant::now();
        assert_eq!(
            peek(&server, Duration::from_millis(50)).await,
            Hello::Incomplete
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(quiet);
    }
}
