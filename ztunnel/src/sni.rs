//! The TLS server name a connection asks for, read from its ClientHello *without consuming
//! it*: the bytes are peeked from the socket, parsed by rustls' server-side acceptor on a
//! copy, and left in place for the relay to carry unchanged.
//!
//! It never delays a connection more than it must: on TLS ports ([`TLS_PORTS`]) it waits up
//! to [`TLS_WAIT`] for the ClientHello (a TLS client sends it at once, and the wait overlaps
//! the connect to the destination); on any other port it reads only what has already arrived
//! when the destination's connect completes.
//!
//! Nor does it work more than it must while it waits: the record and handshake headers say
//! how long the ClientHello is ([`needed`]), and bytes are parsed only once that many have
//! arrived; a stalled connection is peeked ever less often (1 ms doubling to
//! [`MAX_PAUSE`]).

use std::time::Duration;

use tokio::net::TcpStream;

/// Ports where a ClientHello is waited for.
pub const TLS_PORTS: [u16; 1] = [443];
/// Longest wait for a ClientHello on a TLS port.
pub const TLS_WAIT: Duration = Duration::from_secs(1);
/// Most bytes peeked (a ClientHello with a post-quantum key share and padding fits).
pub const MAX_PEEK: usize = 16 * 1024 + 5;
/// Longest pause between two peeks of a connection that sent nothing new.
pub const MAX_PAUSE: Duration = Duration::from_millis(16);

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A complete ClientHello with this server name.
    Sni(String),
    /// A complete ClientHello without a server name.
    NoSni,
    /// Starts like a TLS handshake record (`0x16`, version 3.x) but cannot be read as a
    /// ClientHello: malformed, refused by rustls (a TLS 1.2 hello without
    /// signature_algorithms), or longer than [`MAX_PEEK`]. TLS whose server name is unknown.
    UnreadableTls,
    /// Not a TLS handshake.
    NotTls,
    /// Could be a ClientHello; more bytes are needed.
    Incomplete,
}

/// How many bytes the start of a connection must hold before `bytes` can be read as a whole
/// ClientHello: the end of the record that completes the handshake message its headers
/// announce (a lower bound while the headers are still arriving). At most `bytes.len()` when
/// there is something to parse now — including bytes that are not a handshake record at all.
pub fn needed(bytes: &[u8]) -> usize {
    let mut at = 0;
    // Handshake bytes seen in the records before `at`, and the message's header.
    let mut carried = 0;
    let mut header = [0u8; 4];
    loop {
        let Some(record) = bytes.get(at..at + 5) else {
            return at + 5;
        };
        if record[0] != 0x16 {
            return 0;
        }
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        let start = at + 5;
        let end = start + len;
        let available = bytes.get(start..end.min(bytes.len())).unwrap_or_default();
        for (i, b) in available
            .iter()
            .enumerate()
            .take(4usize.saturating_sub(carried))
        {
            header[carried + i] = *b;
        }
        if len == 0 || carried + available.len() >= 4 {
            let body = u32::from_be_bytes([0, header[1], header[2], header[3]]);
            let message = 4 + usize::try_from(body).unwrap_or(usize::MAX);
            if len == 0 || carried + len >= message {
                // The message ends in this record (or the record is malformed): parse once
                // the record is whole.
                return end;
            }
        }
        if end > bytes.len() {
            return end;
        }
        carried += len;
        at = end;
    }
}

/// Classifies `bytes`, the start of a connection.
pub fn client_hello(bytes: &[u8]) -> Hello {
    match bytes {
        [] | [0x16] | [0x16, 0x03] => return Hello::Incomplete,
        // A handshake record of SSL 3.0 to TLS 1.3 (what a ClientHello's record layer says).
        [0x16, 0x03, minor, ..] if *minor <= 0x04 => {}
        _ => return Hello::NotTls,
    }
    let needed = needed(bytes);
    if needed > bytes.len() {
        // The headers say more is coming; more than the cap can never be read.
        return if needed > MAX_PEEK {
            Hello::UnreadableTls
        } else {
            Hello::Incomplete
        };
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    while !reader.is_empty() {
        if acceptor.read_tls(&mut reader).is_err() {
            return Hello::UnreadableTls;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .server_name()
            .map_or(Hello::NoSni, |name| Hello::Sni(name.to_ascii_lowercase())),
        // Cut off at the cap: it can never be read whole.
        Ok(None) if bytes.len() >= MAX_PEEK => Hello::UnreadableTls,
        Ok(None) => Hello::Incomplete,
        Err(_) => Hello::UnreadableTls,
    }
}

/// Peeks at the start of `stream` until it is classified or `wait` has passed.
pub async fn peek(stream: &TcpStream, wait: Duration) -> Hello {
    peek_counting(stream, wait, &mut 0).await
}

/// [`peek`], counting in `parses` how often the bytes were classified.
async fn peek_counting(stream: &TcpStream, wait: Duration, parses: &mut usize) -> Hello {
    let mut buf = vec![0u8; MAX_PEEK];
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    let mut pause = Duration::from_millis(1);
    loop {
        // A peek past the deadline still returns what is queued (the timeout polls it first).
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Hello::Incomplete,
        };
        if n == 0 {
            return Hello::Incomplete;
        }
        if n > seen {
            // Classified only when new bytes came, and then only parsed once the headers'
            // length is there (`client_hello` checks).
            seen = n;
            *parses += 1;
            let hello = client_hello(&buf[..n]);
            if hello != Hello::Incomplete {
                return hello;
            }
            pause = Duration::from_millis(1);
        } else {
            pause = (pause * 2).min(MAX_PAUSE);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Hello::Incomplete;
        }
        // Peeking again returns at once while the same bytes are queued: wait a little.
        tokio::time::sleep_until((now + pause).min(deadline)).await;
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

/// A ClientHello built byte by byte (TLS 1.2, one cipher suite), with `sni` as the
/// server_name extension's host name as given (rustls' client drops a trailing dot; a client
/// need not), and the signature_algorithms extension when `signature_algorithms` (for tests).
#[cfg(test)]
pub(crate) fn raw_hello(sni: Option<&str>, signature_algorithms: bool) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        u16::try_from(n).expect("u16").to_be_bytes()
    }
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&u16be(name.len()));
        entry.extend_from_slice(name.as_bytes());
        ext.extend_from_slice(&[0, 0]);
        ext.extend_from_slice(&u16be(entry.len() + 2));
        ext.extend_from_slice(&u16be(entry.len()));
        ext.extend_from_slice(&entry);
    }
    if signature_algorithms {
        // rsa_pkcs1_sha256, rsa_pss_rsae_sha256, ecdsa_secp256r1_sha256
        ext.extend_from_slice(&[0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x01, 0x08, 0x04]);
        ext.extend_from_slice(&[0x04, 0x03]);
    }
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2f]); // ECDHE_RSA_AES_128_GCM_SHA256
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&u16be(ext.len()));
    body.extend_from_slice(&ext);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&u16be(body.len()));
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16be(handshake.len()));
    record.extend_from_slice(&handshake);
    record
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
        // 0x16 without a TLS version after it.
        assert_eq!(client_hello(&[0x16, 0x20, 0x41, 0x42]), Hello::NotTls);
        assert_eq!(client_hello(&[0x16, 0x03]), Hello::Incomplete);
    }

    #[test]
    fn a_handshake_record_that_cannot_be_read_is_tls_of_unknown_name() {
        // A hello rustls refuses (TLS 1.2 without signature_algorithms) still is TLS.
        assert_eq!(
            client_hello(&raw_hello(Some("paste.example"), false)),
            Hello::UnreadableTls
        );
        // Another handshake message (a ServerHello) where a ClientHello belongs.
        assert_eq!(
            client_hello(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0, 0, 1, 0]),
            Hello::UnreadableTls
        );
        // A record that claims a whole ClientHello is on its way, cut off at the cap.
        let mut long = vec![
            0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x50, 0x00, 0x03, 0x03,
        ];
        long.resize(MAX_PEEK, 0);
        assert_eq!(client_hello(&long[..MAX_PEEK - 1]), Hello::Incomplete);
        assert_eq!(client_hello(&long), Hello::UnreadableTls);
    }

    #[test]
    fn the_headers_say_how_many_bytes_a_hello_needs() {
        let hello = hello_for("huggingface.co");
        assert_eq!(needed(&hello), hello.len());
        for cut in [0, 3, 5, 8, 9, hello.len() - 1] {
            let want = needed(&hello[..cut]);
            assert!(want > cut && want <= hello.len(), "{cut}: {want}");
        }
        assert_eq!(needed(&hello[..9]), hello.len());
        assert_eq!(needed(b"GET / HTTP/1.1"), 0);
        // One handshake message over two records: the second record's end.
        let body = &hello[5..];
        let mut split = vec![0x16, 0x03, 0x01, 0x00, 0x06];
        split.extend_from_slice(&body[..6]);
        let rest = &body[6..];
        split.extend_from_slice(&[0x16, 0x03, 0x01]);
        split.extend_from_slice(&u16::try_from(rest.len()).expect("len").to_be_bytes());
        split.extend_from_slice(rest);
        assert_eq!(needed(&split[..11]), 16);
        assert_eq!(needed(&split), split.len());
        assert_eq!(client_hello(&split), Hello::Sni("huggingface.co".into()));
    }

    #[tokio::test]
    async fn a_stalled_hello_is_parsed_only_when_bytes_arrive() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // A hello announcing 16,380 bytes of handshake, of which 16,000 arrive.
        let mut partial = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
        partial.resize(16_000, 0x41);
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        client.write_all(&partial).await.expect("write");
        let mut parses = 0;
        let started = std::time::Instant::now();
        let hello = peek_counting(&server, Duration::from_millis(500), &mut parses).await;
        assert_eq!(hello, Hello::Incomplete);
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert!(parses <= 20, "{parses} parses of a stalled hello");
        drop(client);
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
