//! The relay's tests: buffers taken only when readable and given back when idle, the
//! node-wide growth budget, half-close each way, resets, and a large transfer.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// A connected loopback pair (client, server).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), accepted.expect("accept").0)
}

/// Polls `pipe` once from `a` to `b`; whether it is still pending.
async fn poll_once(pipe: &mut Pipe, a: &mut TcpStream, b: &mut TcpStream) -> bool {
    poll_fn(|cx| Poll::Ready(pipe.poll_copy(cx, a, b).is_pending())).await
}

#[tokio::test]
async fn an_idle_direction_holds_no_buffer() {
    let (mut left, mut a) = pair().await;
    let (mut b, mut right) = pair().await;
    let mut pipe = Pipe::new();
    // Nothing to read yet: no buffer is taken.
    assert!(poll_once(&mut pipe, &mut a, &mut b).await);
    assert_eq!(pipe.buf.capacity(), 0);
    left.write_all(b"hello").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Read, written on, and the reader has nothing more: the buffer is given back.
    assert!(poll_once(&mut pipe, &mut a, &mut b).await);
    assert_eq!(pipe.buf.capacity(), 0);
    let mut got = [0u8; 5];
    right.read_exact(&mut got).await.expect("relayed");
    assert_eq!(&got, b"hello");
    assert_eq!(pipe.copied, 5);
}

#[tokio::test]
async fn a_grown_direction_shrinks_once_idle() {
    const N: usize = 1 << 20;
    let (mut left, mut a) = pair().await;
    let (mut b, mut right) = pair().await;
    let mut pipe = Pipe::new();
    let writer = tokio::spawn(async move {
        left.write_all(&vec![7u8; N]).await.expect("write");
        left
    });
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; N];
        right.read_exact(&mut got).await.expect("read");
        right
    });
    poll_fn(|cx| {
        let _ = pipe.poll_copy(cx, &mut a, &mut b);
        if pipe.copied >= N as u64 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    let (_left, _right) = (writer.await.expect("writer"), reader.await.expect("reader"));
    assert!(pipe.grown > 0, "a 1 MiB transfer grows the buffer");
    // Idle: still grown before the delay, given back after it.
    assert!(poll_once(&mut pipe, &mut a, &mut b).await);
    assert!(pipe.grown > 0);
    tokio::time::sleep(SHRINK_AFTER + Duration::from_millis(200)).await;
    assert!(poll_once(&mut pipe, &mut a, &mut b).await);
    assert_eq!(pipe.grown, 0);
    assert_eq!((pipe.buf.capacity(), pipe.staging.capacity()), (0, 0));
}

#[test]
fn growth_is_drawn_from_the_budget_and_given_back() {
    let mut pipe = Pipe::new();
    assert_eq!(pipe.grown_size(INITIAL_BUFFER), 4 * INITIAL_BUFFER);
    assert_eq!(pipe.grown_size(4 * INITIAL_BUFFER), MAX_BUFFER);
    assert_eq!(pipe.grown_size(MAX_BUFFER), MAX_BUFFER);
    assert_eq!(pipe.grown, MAX_BUFFER - INITIAL_BUFFER);
    assert!(grown_bytes() >= pipe.grown);
    // A spent budget refuses: asked for more than it holds, the size stays.
    assert!(!take_growth(GROWTH_BUDGET + 1));
    assert!(growth_refused() >= 1);
}

#[tokio::test]
async fn half_close_each_way_and_counts() {
    let (mut left, a) = pair().await;
    let (b, mut right) = pair().await;
    let relay = tokio::spawn(relay(a, b));

    left.write_all(b"ping").await.expect("write");
    left.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), right.read_to_end(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, b"ping");
    // The other direction still flows after the first one ended.
    right
        .write_all(b"pong after your EOF")
        .await
        .expect("write");
    right.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    left.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"pong after your EOF");

    let result = tokio::time::timeout(Duration::from_secs(5), relay)
        .await
        .expect("in time")
        .expect("join");
    assert!(result.is_clean(), "{result:?}");
    assert_eq!((result.a_to_b, result.b_to_a), (4, 19));
    assert_eq!(result.summary(), ("closed", None));
}

#[tokio::test]
async fn reset_propagates_to_the_other_side() {
    let (left, a) = pair().await;
    let (b, mut right) = pair().await;
    let relay = tokio::spawn(relay(a, b));

    left.set_zero_linger().expect("linger");
    drop(left);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), right.read(&mut buf))
        .await
        .expect("in time");
    let err = read.expect_err("the reset must reach the other side");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let result = relay.await.expect("join");
    assert!(matches!(result.end, RelayEnd::Reset(Side::A)), "{result:?}");
    assert_eq!(result.summary().0, "reset");
}

#[tokio::test]
async fn the_idle_limit_ends_a_silent_relay_and_spares_a_busy_one() {
    let period = Duration::from_millis(100);
    let limits = || Limits {
        revoked: None,
        idle: Some(period),
    };
    // Busy: a byte each way every 40 ms for 600 ms (six periods) and still open.
    let (mut left, a) = pair().await;
    let (b, mut right) = pair().await;
    let busy = tokio::spawn(relay_with(a, b, limits()));
    let mut buf = [0u8; 1];
    for i in 0..15u8 {
        let (from, to) = if i % 2 == 0 {
            (&mut left, &mut right)
        } else {
            (&mut right, &mut left)
        };
        from.write_all(&[i]).await.expect("write");
        to.read_exact(&mut buf).await.expect("carried");
        assert_eq!(buf, [i]);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(!busy.is_finished(), "a busy relay was ended");
    drop((left, right));
    let done = busy.await.expect("join");
    assert!(!done.is_idle(), "{done:?}");

    // Silent after one exchange: ended within two periods (plus slack), both sides reset.
    let (mut left, a) = pair().await;
    let (b, mut right) = pair().await;
    let started = std::time::Instant::now();
    let silent = tokio::spawn(relay_with(a, b, limits()));
    left.write_all(b"x").await.expect("write");
    right.read_exact(&mut buf).await.expect("carried");
    let result = tokio::time::timeout(Duration::from_secs(5), silent)
        .await
        .expect("ended in time")
        .expect("join");
    let took = started.elapsed();
    assert!(result.is_idle(), "{result:?}");
    assert!(
        took >= period && took < period * 2 + Duration::from_millis(400),
        "{took:?}"
    );
    assert_eq!(result.summary().0, "idle_timeout");
    assert_eq!((result.a_to_b, result.b_to_a), (1, 0));
    let err = left.read(&mut buf).await.expect_err("reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn large_transfer_grows_the_buffer() {
    let (mut left, a) = pair().await;
    let (b, mut right) = pair().await;
    let relay = tokio::spawn(relay(a, b));
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        left.write_all(&data).await.expect("write");
        left.shutdown().await.expect("shutdown");
        left
    });
    let mut got = Vec::new();
    right.read_to_end(&mut got).await.expect("read");
    assert!(got == expected, "payload corrupted");
    drop(right);
    drop(writer.await.expect("join"));
    let result = relay.await.expect("join");
    assert_eq!(result.a_to_b, 4_000_000);
}
