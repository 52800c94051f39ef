//! [`H2Stream`]: one HTTP/2 stream as a tokio byte stream, with TCP close semantics.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::relay::{Chunks, ResetOnError};

/// An open HBONE tunnel: the DATA frames of one HTTP/2 stream, both ways.
///
/// - Reads return received DATA; flow-control capacity is given back to the peer only as the
///   reader consumes bytes, so a slow reader throttles the sender.
/// - Writes are chunked to the send capacity the connection grants, so memory stays bounded.
/// - `shutdown` sends an empty DATA frame with END_STREAM: a TCP half-close. Reads continue.
/// - A received RST_STREAM reads (or writes) as [`io::ErrorKind::ConnectionReset`].
/// - Dropping the stream before both directions closed cleanly, or after an I/O error, resets
///   it (RST_STREAM CANCEL), so the peer sees an abort rather than a truncated clean close.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read. Its flow-control capacity is still held.
    pending: Bytes,
    /// Staging for outgoing DATA. Frozen chunks go to h2; once h2 has written and dropped
    /// them, `reserve` reclaims the same allocation instead of allocating (and page-faulting)
    /// a fresh buffer per write — the largest cost of the send path before.
    out: BytesMut,
    /// The peer's END_STREAM was read.
    recv_done: bool,
    /// Our END_STREAM was queued.
    send_done: bool,
    /// An error was seen; the stream has been reset.
    failed: bool,
    /// Whatever must live as long as the stream (the pool's share of a connection); opaque
    /// here, dropped with the stream.
    _guard: Option<Box<dyn Send + Sync>>,
}

// === impl H2Stream ===

impl H2Stream {
    /// Wraps the two halves of an HTTP/2 stream whose CONNECT already succeeded.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            out: BytesMut::new(),
            recv_done: false,
            send_done: false,
            failed: false,
            _guard: None,
        }
    }

    /// The stream, keeping `guard` until it is dropped.
    pub(crate) fn holding(mut self, guard: Box<dyn Send + Sync>) -> Self {
        self._guard = Some(guard);
        self
    }

    /// The HTTP/2 stream ID (for logs).
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }

    /// Aborts the stream with `reason`; further reads and writes fail.
    pub fn abort(&mut self, reason: Reason) {
        self.failed = true;
        self.send.send_reset(reason);
    }

    /// Records an error: the stream is reset and the error converted for the caller.
    fn fail(&mut self, e: h2::Error) -> io::Error {
        self.abort(Reason::CANCEL);
        h2_to_io(e)
    }

    /// The error for a send side that h2 reports closed while we had not shut it down.
    fn send_closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        self.failed = true;
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("HBONE stream reset by peer ({reason})"),
            ),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => {
                io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed for sending")
            }
        }
    }
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.stream_id())
            .field("pending", &self.pending.len())
            .field("recv_done", &self.recv_done)
            .field("send_done", &self.send_done)
            .field("failed", &self.failed)
            .finish()
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "HBONE stream was reset",
                )));
            }
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                if let Err(e) = this.recv.flow_control().release_capacity(n) {
                    return Poll::Ready(Err(this.fail(e)));
                }
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                None => this.recv_done = true,
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(this.fail(e))),
            }
        }
    }
}

impl H2Stream {
    /// Sends a prefix of `len` bytes as one DATA frame once h2 grants capacity; `take(n)`
    /// produces the first `n` bytes as a chunk.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        take: impl FnOnce(&mut Self, usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        if self.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "HBONE stream was reset",
            )));
        }
        if self.send_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of the HBONE stream",
            )));
        }
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        // Ask for room for the whole buffer; h2 grants what the windows and its send buffer
        // allow, possibly in several steps.
        self.send.reserve_capacity(len);
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                let n = capacity.min(len);
                let chunk = take(self, n);
                if let Err(e) = self.send.send_data(chunk, false) {
                    return Poll::Ready(Err(self.fail(e)));
                }
                return Poll::Ready(Ok(n));
            }
            // `poll_capacity` is ready only when capacity grew since it was last ready, so this
            // loop polls again (registering the waker) at most once per growth.
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(self.fail(e))),
                None => return Poll::Ready(Err(self.send_closed_error(cx))),
            }
        }
    }
}

/// The relay trades DATA frames with a tunnel as they are: received frames go to the other
/// side without a copy into the relay's buffer, and what the relay read for the tunnel is sent
/// as the chunk it was read into.
impl Chunks for H2Stream {
    const READS_CHUNKS: bool = true;
    const WRITES_CHUNKS: bool = true;

    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        loop {
            if self.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "HBONE stream was reset",
                )));
            }
            if !self.pending.is_empty() {
                let chunk = std::mem::take(&mut self.pending);
                // The relay writes this chunk before it asks for the next one: what the peer
                // may send stays bounded by the stream window plus one chunk.
                if let Err(e) = self.recv.flow_control().release_capacity(chunk.len()) {
                    return Poll::Ready(Err(self.fail(e)));
                }
                return Poll::Ready(Ok(chunk));
            }
            if self.recv_done {
                return Poll::Ready(Ok(Bytes::new()));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => self.recv_done = true,
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(self.fail(e))),
            }
        }
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let len = chunk.len();
        self.poll_send(cx, len, |_, n| chunk.split_to(n))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf.len(), |this, n| {
            this.out.reserve(n);
            this.out.extend_from_slice(&buf[..n]);
            this.out.split().freeze()
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued DATA is written by the connection task; there is nothing to push here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.send_done {
            return Poll::Ready(Ok(()));
        }
        if this.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "HBONE stream was reset",
            )));
        }
        this.send_done = true;
        if let Err(e) = this.send.send_data(Bytes::new(), true) {
            return Poll::Ready(Err(this.fail(e)));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // A clean end needs both END_STREAMs. Anything else is an abort; without the reset the
        // peer could mistake a truncated stream for a complete one. (h2 ignores a reset of a
        // stream that is already closed or reset.)
        if self.failed || !(self.send_done && self.recv_done) {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}

impl ResetOnError for H2Stream {
    fn reset(mut self) {
        self.abort(Reason::CANCEL);
    }
}

/// Maps an h2 error onto the `io::Error` a TCP user would see.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_reset() {
        let reason = e.reason().unwrap_or(Reason::CANCEL);
        return io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("HBONE stream reset ({reason})"),
        );
    }
    if e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionAborted, e);
    }
    if e.is_io() {
        return match e.into_io() {
            Some(io) => io,
            None => io::Error::other("HTTP/2 connection I/O error"),
        };
    }
    io::Error::other(e)
}
