//! [`relay`]: the bidirectional byte copy between two connections, with TCP semantics. Every
//! path uses it: outbound through a tunnel or passed through, inbound HBONE and plaintext.
//!
//! Each direction runs independently: end-of-stream on one side becomes a write shutdown
//! (half-close) on the other, and the opposite direction keeps flowing until it ends too. An
//! error on either side ends the relay and resets *both* sides through [`ResetOnError`], so an
//! abort on one end is seen as an abort (RST, RST_STREAM) at the other end, never as a clean
//! close of a truncated stream.
//!
//! Both directions are polled by one future (no extra task per connection). Buffers start at
//! 16 KiB and grow to 256 KiB once a read fills them: idle connections stay small, bulk
//! transfers make few large writes, which is what the tunnel's cost depends on.

use std::future::Future;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// First buffer size of each direction.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest buffer of each direction.
const MAX_BUFFER: usize = 256 * 1024;
/// Read/write rounds one direction may do before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 64;

/// A connection that can be torn down so its peer sees an abort rather than an orderly close.
///
/// [`relay`] calls it on both sides when either side fails. Implemented for
/// [`tokio::net::TcpStream`] (zero linger, then close: the peer gets an RST) and for
/// [`crate::hbone::H2Stream`] (RST_STREAM CANCEL).
pub trait ResetOnError {
    /// Aborts the connection.
    fn reset(self);
}

impl ResetOnError for TcpStream {
    fn reset(self) {
        // SO_LINGER 0: close() discards unsent data and sends RST instead of FIN. With a zero
        // timeout close never blocks.
        if let Err(e) = self.set_zero_linger() {
            tracing::debug!(error = %e, "could not set zero linger; closing without reset");
        }
        drop(self);
    }
}

/// One side of a relay: `A` is the first argument of [`relay`], `B` the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first connection passed to [`relay`].
    A,
    /// The second connection passed to [`relay`].
    B,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::A => "a",
            Side::B => "b",
        })
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached end-of-stream and were shut down in order.
    Closed,
    /// `Side` aborted (connection reset or aborted, broken pipe); the other side was reset in
    /// turn.
    Reset(Side),
    /// Any other I/O error on `side`; both sides were reset.
    Error {
        /// The side whose read, write or shutdown failed.
        side: Side,
        /// The error.
        error: io::Error,
    },
}

/// What a relay carried and how it ended.
#[derive(Debug)]
pub struct RelayResult {
    /// Bytes read from A and written to B.
    pub a_to_b: u64,
    /// Bytes read from B and written to A.
    pub b_to_a: u64,
    /// How it ended.
    pub end: RelayEnd,
}

// === impl RelayResult ===

impl RelayResult {
    /// Whether both directions closed in order.
    pub fn is_clean(&self) -> bool {
        matches!(self.end, RelayEnd::Closed)
    }

    /// A short result word for logs and metrics (`closed`, `reset`, `error`) and, unless the
    /// relay ended cleanly, what happened.
    pub fn summary(&self) -> (&'static str, Option<String>) {
        match &self.end {
            RelayEnd::Closed => ("closed", None),
            RelayEnd::Reset(side) => ("reset", Some(format!("side {side} reset the connection"))),
            RelayEnd::Error { side, error } => ("error", Some(format!("side {side}: {error}"))),
        }
    }
}

/// Copies bytes both ways between `a` and `b` until both directions have ended, then returns
/// the byte counts and how it ended.
///
/// End-of-stream read from one side shuts down the write half of the other; the relay goes on
/// in the other direction. The first error ends the relay and resets both sides
/// ([`ResetOnError`]); it is attributed to the side whose operation failed. Dropping the future
/// drops both connections without a reset.
///
/// One known blind spot, shared with TCP proxies: once a direction has ended, an abort of its
/// source is noticed only when the other direction next reads or writes.
pub async fn relay<A, B>(a: A, b: B) -> RelayResult
where
    A: AsyncRead + AsyncWrite + ResetOnError + Unpin,
    B: AsyncRead + AsyncWrite + ResetOnError + Unpin,
{
    relay_inner(a, b, None).await
}

/// [`relay`], ended early when `cancel` fires: both sides are reset and the result is an
/// error on side A saying the connection is no longer authorized.
pub async fn relay_until<A, B>(
    a: A,
    b: B,
    cancel: tokio_util::sync::CancellationToken,
) -> RelayResult
where
    A: AsyncRead + AsyncWrite + ResetOnError + Unpin,
    B: AsyncRead + AsyncWrite + ResetOnError + Unpin,
{
    relay_inner(a, b, Some(cancel)).await
}

async fn relay_inner<A, B>(
    mut a: A,
    mut b: B,
    cancel: Option<tokio_util::sync::CancellationToken>,
) -> RelayResult
where
    A: AsyncRead + AsyncWrite + ResetOnError + Unpin,
    B: AsyncRead + AsyncWrite + ResetOnError + Unpin,
{
    let mut a_to_b = Pipe::new();
    let mut b_to_a = Pipe::new();
    let mut cancelled = cancel.map(|c| Box::pin(c.cancelled_owned()));
    let outcome = poll_fn(|cx| {
        if let Some(cancelled) = cancelled.as_mut()
            && cancelled.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err((
                Side::A,
                io::Error::other("closed: the connection is no longer authorized"),
            )));
        }
        if !a_to_b.done {
            match a_to_b.poll_copy(cx, &mut a, &mut b) {
                Poll::Ready(Ok(())) => a_to_b.done = true,
                Poll::Ready(Err(PipeError::Read(e))) => return Poll::Ready(Err((Side::A, e))),
                Poll::Ready(Err(PipeError::Write(e))) => return Poll::Ready(Err((Side::B, e))),
                Poll::Pending => {}
            }
        }
        if !b_to_a.done {
            match b_to_a.poll_copy(cx, &mut b, &mut a) {
                Poll::Ready(Ok(())) => b_to_a.done = true,
                Poll::Ready(Err(PipeError::Read(e))) => return Poll::Ready(Err((Side::B, e))),
                Poll::Ready(Err(PipeError::Write(e))) => return Poll::Ready(Err((Side::A, e))),
                Poll::Pending => {}
            }
        }
        if a_to_b.done && b_to_a.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let end = match outcome {
        Ok(()) => RelayEnd::Closed,
        Err((side, error)) => {
            a.reset();
            b.reset();
            if is_abort(&error) {
                RelayEnd::Reset(side)
            } else {
                RelayEnd::Error { side, error }
            }
        }
    };
    RelayResult {
        a_to_b: a_to_b.copied,
        b_to_a: b_to_a.copied,
        end,
    }
}

fn is_abort(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

enum PipeError {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of a relay.
struct Pipe {
    buf: Vec<u8>,
    /// Bytes `buf[start..end]` are read and not yet written.
    start: usize,
    end: usize,
    /// The last read filled the buffer: grow it before the next read.
    grow: bool,
    /// The reader reached end-of-stream.
    eof: bool,
    /// Written since the last flush.
    need_flush: bool,
    /// End-of-stream was passed on (writer shut down).
    done: bool,
    copied: u64,
}

impl Pipe {
    fn new() -> Self {
        Self {
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            grow: false,
            eof: false,
            need_flush: false,
            done: false,
            copied: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), PipeError>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut rounds = 0;
        loop {
            while self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))
                        .map_err(PipeError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.start += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(PipeError::Write)?;
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(PipeError::Write)?;
                return Poll::Ready(Ok(()));
            }
            rounds += 1;
            if rounds > ROUNDS_PER_POLL {
                // The reader may never say Pending (fast peer, no coop budget): let others run.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.grow {
                self.grow = false;
                let size = (self.buf.len() * 4).min(MAX_BUFFER);
                self.buf = vec![0; size];
            }
            let mut read = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(PipeError::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Read(e))),
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        self.eof = true;
                    } else {
                        self.grow = n == self.buf.len() && self.buf.len() < MAX_BUFFER;
                        self.start = 0;
                        self.end = n;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
