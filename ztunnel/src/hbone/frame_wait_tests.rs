//! The frame follower against frames cut at every place, the mark's rules, and the mark on a
//! real socket under TLS: raised while a large frame is incomplete, back to one byte after
//! it, and never waiting for bytes the frame does not need.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::hbone::handshake::{accept, connect};
use crate::hbone::test_pki::{CLIENT, SERVER, TestCa};

/// A frame head announcing `len` bytes of payload.
fn head(len: usize) -> [u8; FRAME_HEAD] {
    let [_, a, b, c] = u32::try_from(len).expect("frame length").to_be_bytes();
    [a, b, c, 0, 0, 0, 0, 0, 1]
}

/// The preface, then frames of these payload lengths.
fn stream(lens: &[usize]) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for &len in lens {
        out.extend_from_slice(&head(len));
        out.extend(std::iter::repeat_n(7u8, len));
    }
    out
}

#[test]
fn follows_frames_whatever_the_pieces() {
    let lens = [100_000, 0, 5, 70_000];
    let bytes = stream(&lens);
    for piece in [1, 2, 8, 9, 10, 4096, 65_536, bytes.len()] {
        let mut wait = FrameWait::new(CLIENT_PREFACE_LEN);
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + piece).min(bytes.len());
            wait.delivered(&bytes[at..end]);
            at = end;
        }
        assert_eq!(wait.body_left, 0, "piece {piece}");
        assert_eq!(wait.head_len, 0, "piece {piece}");
    }
    // Part-way: the preface, the first head and 10 bytes of its payload.
    let mut wait = FrameWait::new(CLIENT_PREFACE_LEN);
    wait.delivered(&bytes[..CLIENT_PREFACE_LEN + FRAME_HEAD + 10]);
    assert_eq!(wait.body_left, 99_990);
    // A client reads no preface: the same bytes would be frames from the first one.
    let mut wait = FrameWait::new(0);
    wait.delivered(&head(3)[..5]);
    assert_eq!((wait.head_len, wait.body_left), (5, 0));
    wait.delivered(&head(3)[5..]);
    assert_eq!((wait.head_len, wait.body_left), (0, 3));
}

#[test]
fn the_mark_drops_at_once_and_rises_only_by_enough() {
    let mut wait = FrameWait::new(0);
    wait.delivered(&head(200_000));
    assert_eq!(wait.next_mark(0), Some(200_000));
    // What the TLS layer holds counts as arrived.
    assert_eq!(wait.next_mark(150_000), Some(50_000));
    assert_eq!(
        wait.next_mark(190_000),
        None,
        "a few bytes missing: one byte"
    );
    wait.mark = 200_000;
    assert_eq!(
        wait.next_mark(10_000),
        Some(190_000),
        "lowered by any amount"
    );
    assert_eq!(
        wait.next_mark(0),
        None,
        "raised by less than a wake-up is worth"
    );
    wait.mark = 100_000;
    assert_eq!(wait.next_mark(0), Some(200_000));
    // The frame ends: back to one byte.
    wait.delivered(&vec![0; 200_000]);
    assert_eq!(wait.next_mark(0), Some(1));
    wait.mark = 1;
    assert_eq!(wait.next_mark(0), None);
    wait.enabled = false;
    wait.mark = 5;
    assert_eq!(wait.next_mark(0), None, "off: never touched again");
}

/// The socket's receive low-water mark.
#[allow(unsafe_code)]
fn mark_of(fd: i32) -> usize {
    use nix::libc;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is the test's open socket; `value` and `len` outlive the call and `len`
    // holds `value`'s size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
    usize::try_from(value).expect("mark")
}

#[tokio::test]
async fn a_large_frame_raises_the_mark_and_the_next_small_one_is_not_held_back() {
    let ca = TestCa::new();
    let mut server_cfg =
        TestCa::server_config(&ca.svid(SERVER, Duration::from_secs(3600)), ca.bundle());
    server_cfg.enable_secret_extraction = true;
    let mut client_cfg = ca.client_config(&ca.svid(CLIENT, Duration::from_secs(3600)));
    client_cfg.enable_secret_extraction = true;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tcp, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let tcp = tcp.expect("connect");
    let fd = tcp.as_raw_fd();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let (client, server) = tokio::join!(
        connect(tcp, Arc::new(client_cfg), name),
        accept(accepted.expect("accept").0, Arc::new(server_cfg))
    );
    let (mut client, mut server) = (client.expect("client"), server.expect("server"));

    // The server sends a 300,000-byte frame's head and its first 100,000 bytes; the
    // client reads what it can (as HTTP/2 would, though HTTP/2 would not use it yet).
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut got = Vec::new();
    let (sent, ()) = tokio::join!(
        async {
            server.write_all(&head(body.len())).await?;
            server.write_all(&body[..100_000]).await?;
            server.flush().await
        },
        async {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await
            {
                assert!(n > 0, "end of stream");
                got.extend_from_slice(&buf[..n]);
            }
        }
    );
    sent.expect("first part sent");
    assert!(got.len() >= FRAME_HEAD, "the head arrived");
    let delivered = got.len() - FRAME_HEAD;
    assert!(delivered <= 100_000);
    // Asleep until the frame can be whole: never more than the frame still lacks, and at
    // least what was never sent less one record the TLS layer may hold.
    let mark = mark_of(fd);
    assert!(
        (200_000 - 17_000..=300_000 - delivered).contains(&mark),
        "mark {mark} with {delivered} bytes of the frame read"
    );

    // The rest trickles in (no piece alone reaches the mark); once it is read, a frame of 5
    // bytes sent later is not held back.
    let mut rest = vec![0; FRAME_HEAD + 300_000 - got.len()];
    let (sent, read) = tokio::join!(
        async {
            for part in body[100_000..].chunks(70_000) {
                server.write_all(part).await?;
                server.flush().await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, std::io::Error>(())
        },
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut rest))
    );
    sent.expect("rest sent");
    read.expect("the rest arrives").expect("read");
    got.extend_from_slice(&rest);
    assert_eq!(&got[FRAME_HEAD..], &body[..]);
    assert_eq!(mark_of(fd), 1, "between frames any byte wakes the reader");
    let mut small = [0; FRAME_HEAD + 5];
    let (sent, read) = tokio::join!(
        async {
            server.write_all(&head(5)).await?;
            server.write_all(b"hello").await?;
            server.flush().await
        },
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut small))
    );
    sent.expect("small frame sent");
    read.expect("the small frame arrives").expect("read");
    assert_eq!(&small[FRAME_HEAD..], b"hello");
}
