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
//! 16 KiB and grow to 256 KiB once a read fills them: bulk transfers make few large writes,
//! which is what the tunnel's cost depends on. A socket is read into a buffer only once it is
//! readable, and a 16 KiB buffer with nothing left to write is given back when its reader has
//! nothing more: an idle connection holds no relay buffer, so a pod opening thousands of idle
//! connections costs the ztunnel their sockets, not 32 KiB each. Growth past 16 KiB is drawn
//! from a node-wide budget ([`GROWTH_BUDGET`]); once it is spent, buffers stay at their size
//! (slower, never unbounded) and `membrane_relay_growth_refused_total` counts it. A grown
//! direction that carried nothing for 2 s gives its buffers and budget back.
//!
//! A side that holds its bytes in owned chunks ([`Chunks`]: an HBONE stream's DATA frames)
//! trades chunks with the relay instead of copying through its buffer: a tunnel's received
//! DATA is written to the other side as it is, and bytes read for a tunnel are handed to
//! HTTP/2 as the chunk they were read into. That is one copy less per byte each way.

use std::future::Future;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// First buffer size of each direction.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Largest buffer of each direction.
const MAX_BUFFER: usize = 256 * 1024;
/// Read/write rounds one direction may do before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 64;
/// A grown buffer whose direction carried nothing for this long is given back (with its share
/// of [`GROWTH_BUDGET`]): a connection that once carried a bulk transfer and then sits idle
/// does not keep 256 KiB.
const SHRINK_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
/// Bytes all relays of the process may hold in buffers beyond their first 16 KiB: 256
/// directions at the full 256 KiB (a quarter of the chart's memory limit).
pub const GROWTH_BUDGET: usize = 128 * 1024 * 1024;

/// Bytes held beyond [`INITIAL_BUFFER`] by all relays' buffers.
static GROWN: AtomicUsize = AtomicUsize::new(0);
/// Growths refused because [`GROWTH_BUDGET`] was spent.
static GROWTH_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Growths refused because the node-wide buffer budget was spent (for the metrics).
pub fn growth_refused() -> u64 {
    GROWTH_REFUSED.load(Ordering::Relaxed)
}

/// Bytes relay buffers hold beyond their first 16 KiB (for the metrics and tests).
pub fn grown_bytes() -> usize {
    GROWN.load(Ordering::Relaxed)
}

/// `membrane_relay_grown_bytes` and `membrane_relay_growth_refused_total`, read from the
/// node-wide buffer budget at every scrape.
#[derive(Debug)]
pub struct BudgetCollector;

impl prometheus_client::collector::Collector for BudgetCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        let grown = i64::try_from(grown_bytes()).unwrap_or(i64::MAX);
        prometheus_client::metrics::gauge::ConstGauge::new(grown).encode(
            encoder.encode_descriptor(
                "relay_grown_bytes",
                "Bytes relay buffers hold beyond their first 16 KiB, node-wide (bounded by a budget of 128 MiB)",
                None,
                MetricType::Gauge,
            )?,
        )?;
        prometheus_client::metrics::counter::ConstCounter::new(growth_refused()).encode(
            encoder.encode_descriptor(
                "relay_growth_refused",
                "Relay buffer growths refused because the node-wide budget was spent (the transfer goes on with the smaller buffer)",
                None,
                MetricType::Counter,
            )?,
        )?;
        Ok(())
    }
}

/// Takes `extra` bytes from the budget, if they are there.
fn take_growth(extra: usize) -> bool {
    let taken = GROWN
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            held.checked_add(extra).filter(|&sum| sum <= GROWTH_BUDGET)
        })
        .is_ok();
    if !taken {
        GROWTH_REFUSED.fetch_add(1, Ordering::Relaxed);
    }
    taken
}

fn return_growth(extra: usize) {
    GROWN.fetch_sub(extra, Ordering::Relaxed);
}

/// A connection that can be torn down so its peer sees an abort rather than an orderly close.
///
/// [`relay`] calls it on both sides when either side fails. Implemented for
/// [`tokio::net::TcpStream`] (zero linger, then close: the peer gets an RST) and for
/// [`crate::hbone::H2Stream`] (RST_STREAM CANCEL).
pub trait ResetOnError: Chunks {
    /// Aborts the connection.
    fn reset(self);
}

/// A side that can trade owned chunks with the relay instead of bytes copied through the
/// relay's buffer. The defaults say it cannot (a socket: the relay reads into and writes from
/// its own buffer).
pub trait Chunks {
    /// Ready once a read would find bytes (or the end, or an error): the relay takes a buffer
    /// only then. The default is always ready (the buffer is taken before the first read).
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }

    /// [`Chunks::poll_read_chunk`] works.
    const READS_CHUNKS: bool = false;
    /// [`Chunks::poll_write_chunk`] works.
    const WRITES_CHUNKS: bool = false;

    /// The next received chunk; empty at end-of-stream. Only called if
    /// [`Chunks::READS_CHUNKS`].
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let _ = cx;
        Poll::Ready(Err(io::Error::other("this stream does not read chunks")))
    }

    /// Takes a prefix of `chunk` (at least one byte once ready) to send, as
    /// `AsyncWrite::poll_write` would take a prefix of a slice. Only called if
    /// [`Chunks::WRITES_CHUNKS`].
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let _ = (cx, chunk);
        Poll::Ready(Err(io::Error::other("this stream does not write chunks")))
    }
}

impl Chunks for TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
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
    /// No byte moved either way for the relay's idle limit ([`Limits::idle`]); both sides
    /// were reset.
    Idle(Duration),
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
    /// A relay that never ran: `side` failed with `error` before it started (nothing copied).
    pub fn failed_before(side: Side, error: io::Error) -> Self {
        let end = if is_abort(&error) {
            RelayEnd::Reset(side)
        } else {
            RelayEnd::Error { side, error }
        };
        Self {
            a_to_b: 0,
            b_to_a: 0,
            end,
        }
    }

    /// Whether the idle limit ended it.
    pub fn is_idle(&self) -> bool {
        matches!(self.end, RelayEnd::Idle(_))
    }

    /// Whether both directions closed in order.
    pub fn is_clean(&self) -> bool {
        matches!(self.end, RelayEnd::Closed)
    }

    /// A short result word for logs and metrics (`closed`, `reset`, `error`, `idle_timeout`)
    /// and, unless the
    /// relay ended cleanly, what happened.
    pub fn summary(&self) -> (&'static str, Option<String>) {
        match &self.end {
            RelayEnd::Closed => ("closed", None),
            RelayEnd::Reset(side) => ("reset", Some(format!("side {side} reset the connection"))),
            RelayEnd::Error { side, error } => ("error", Some(format!("side {side}: {error}"))),
            RelayEnd::Idle(period) => (
                "idle_timeout",
                Some(format!("no byte either way for {period:?}")),
            ),
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
    relay_with(a, b, Limits::default()).await
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
    relay_with(
        a,
        b,
        Limits {
            revoked: Some(cancel),
            idle: None,
        },
    )
    .await
}

/// What may end a relay before its two sides do.
#[derive(Debug, Default)]
pub struct Limits {
    /// When it fires both sides are reset and the result is an error on side A saying the
    /// connection is no longer authorized.
    pub revoked: Option<tokio_util::sync::CancellationToken>,
    /// Once no byte has moved either way for at least this long both sides are reset and the
    /// relay ends as [`RelayEnd::Idle`].
    /// Checked once per period, so the end comes between one and two periods after the last
    /// byte (a busy relay never re-arms a timer per read).
    pub idle: Option<Duration>,
}

/// [`relay`] under `limits`.
pub async fn relay_with<A, B>(mut a: A, mut b: B, limits: Limits) -> RelayResult
where
    A: AsyncRead + AsyncWrite + ResetOnError + Unpin,
    B: AsyncRead + AsyncWrite + ResetOnError + Unpin,
{
    let mut a_to_b = Pipe::new();
    let mut b_to_a = Pipe::new();
    let mut cancelled = limits.revoked.map(|c| Box::pin(c.cancelled_owned()));
    let mut idle = limits.idle.map(|period| IdleCheck {
        period,
        timer: Box::pin(tokio::time::sleep(period)),
        seen: 0,
    });
    let outcome = poll_fn(|cx| {
        if let Some(cancelled) = cancelled.as_mut()
            && cancelled.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(Ended::Io(
                Side::A,
                io::Error::other("closed: the connection is no longer authorized"),
            )));
        }
        if !a_to_b.done {
            match a_to_b.poll_copy(cx, &mut a, &mut b) {
                Poll::Ready(Ok(())) => a_to_b.done = true,
                Poll::Ready(Err(PipeError::Read(e))) => {
                    return Poll::Ready(Err(Ended::Io(Side::A, e)));
                }
                Poll::Ready(Err(PipeError::Write(e))) => {
                    return Poll::Ready(Err(Ended::Io(Side::B, e)));
                }
                Poll::Pending => {}
            }
        }
        if !b_to_a.done {
            match b_to_a.poll_copy(cx, &mut b, &mut a) {
                Poll::Ready(Ok(())) => b_to_a.done = true,
                Poll::Ready(Err(PipeError::Read(e))) => {
                    return Poll::Ready(Err(Ended::Io(Side::B, e)));
                }
                Poll::Ready(Err(PipeError::Write(e))) => {
                    return Poll::Ready(Err(Ended::Io(Side::A, e)));
                }
                Poll::Pending => {}
            }
        }
        if a_to_b.done && b_to_a.done {
            return Poll::Ready(Ok(()));
        }
        if let Some(check) = idle.as_mut()
            && check.expired(cx, a_to_b.copied + b_to_a.copied)
        {
            return Poll::Ready(Err(Ended::Idle(check.period)));
        }
        Poll::Pending
    })
    .await;
    let end = match outcome {
        Ok(()) => RelayEnd::Closed,
        Err(Ended::Idle(period)) => {
            a.reset();
            b.reset();
            RelayEnd::Idle(period)
        }
        Err(Ended::Io(side, error)) => {
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

/// Why a relay ended before both directions did.
enum Ended {
    /// An error (or the revocation, as an error on side A) on a side.
    Io(Side, io::Error),
    /// [`Limits::idle`] passed with no byte moved.
    Idle(Duration),
}

/// The idle limit: a timer that fires once per period and the bytes moved when it last did.
struct IdleCheck {
    period: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    seen: u64,
}

impl IdleCheck {
    /// Whether a whole period passed without a byte moving (`moved`: bytes so far, both ways);
    /// else re-arms the timer when it fired.
    fn expired(&mut self, cx: &mut Context<'_>, moved: u64) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            if moved == self.seen {
                return true;
            }
            self.seen = moved;
            let next = tokio::time::Instant::now() + self.period;
            self.timer.as_mut().reset(next);
        }
        false
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
    /// Chunk paths: read (or received) and not yet written.
    chunk: Bytes,
    /// Chunk path to a chunk writer: what the reader reads into (its allocation comes back
    /// once the writer has sent and dropped the earlier chunks).
    staging: BytesMut,
    /// Size of the next read into `staging` (grows like `buf`).
    staging_size: usize,
    /// The last read filled the buffer: grow it before the next read.
    grow: bool,
    /// The reader reached end-of-stream.
    eof: bool,
    /// Written since the last flush.
    need_flush: bool,
    /// End-of-stream was passed on (writer shut down).
    done: bool,
    copied: u64,
    /// Bytes this direction holds from [`GROWTH_BUDGET`].
    grown: usize,
    /// Read something since the shrink timer was last armed.
    active: bool,
    /// Fires once a grown direction carried nothing for [`SHRINK_AFTER`].
    shrink: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        return_growth(self.grown);
    }
}

impl Pipe {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            chunk: Bytes::new(),
            staging: BytesMut::new(),
            staging_size: INITIAL_BUFFER,
            grow: false,
            eof: false,
            need_flush: false,
            done: false,
            copied: 0,
            grown: 0,
            active: false,
            shrink: None,
        }
    }

    /// With a grown buffer and nothing left to write: (re)arms the shrink timer after
    /// activity, and once it fires with none since, gives the buffers and their budget back.
    fn poll_shrink(&mut self, cx: &mut Context<'_>) {
        if self.grown == 0
            || self.start != self.end
            || !self.staging.is_empty()
            || !self.chunk.is_empty()
        {
            return;
        }
        let deadline = tokio::time::Instant::now() + SHRINK_AFTER;
        if std::mem::take(&mut self.active) {
            match &mut self.shrink {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.shrink = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let Some(timer) = &mut self.shrink else {
            return;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return;
        }
        self.shrink = None;
        self.buf = Vec::new();
        (self.start, self.end, self.grow) = (0, 0, false);
        self.staging = BytesMut::new();
        self.staging_size = INITIAL_BUFFER;
        return_growth(std::mem::take(&mut self.grown));
    }

    /// The next buffer size after a read filled `current`: larger if the budget has room.
    fn grown_size(&mut self, current: usize) -> usize {
        let want = (current * 4).min(MAX_BUFFER);
        let extra = want - current;
        if extra > 0 && take_growth(extra) {
            self.grown += extra;
            want
        } else {
            current
        }
    }

    /// Gives back a first-size buffer with nothing left to write (an idle direction holds
    /// none); grown ones stay for the bulk transfer they serve.
    fn release_idle(&mut self) {
        if self.start == self.end && self.buf.len() == INITIAL_BUFFER {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
        if self.staging_size == INITIAL_BUFFER && self.staging.is_empty() {
            self.staging = BytesMut::new();
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<Result<(), PipeError>>
    where
        R: AsyncRead + Chunks + Unpin,
        W: AsyncWrite + Chunks + Unpin,
    {
        let mut rounds = 0;
        loop {
            ready!(self.poll_write_pending(cx, writer))?;
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
            match self.poll_read_next(cx, reader, W::WRITES_CHUNKS) {
                Poll::Pending => {
                    self.release_idle();
                    self.poll_shrink(cx);
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(PipeError::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PipeError::Read(e))),
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {
                    self.active = true;
                    crate::busy_poll::note_traffic();
                }
            }
        }
    }

    /// Writes everything read and not yet written: the buffer's `start..end`, or the chunk
    /// (as a slice, or handed whole to a chunk writer).
    fn poll_write_pending<W>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<Result<(), PipeError>>
    where
        W: AsyncWrite + Chunks + Unpin,
    {
        loop {
            let n = if !self.chunk.is_empty() {
                if W::WRITES_CHUNKS {
                    // The writer takes `self.chunk[..n]` by splitting it off.
                    ready!(writer.poll_write_chunk(cx, &mut self.chunk))
                        .map_err(PipeError::Write)?
                } else {
                    let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.chunk))
                        .map_err(PipeError::Write)?;
                    self.chunk.advance(n.min(self.chunk.len()));
                    n
                }
            } else if self.start < self.end {
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))
                        .map_err(PipeError::Write)?;
                self.start += n;
                n
            } else {
                return Poll::Ready(Ok(()));
            };
            if n == 0 {
                return Poll::Ready(Err(PipeError::Write(io::ErrorKind::WriteZero.into())));
            }
            self.copied += n as u64;
            self.need_flush = true;
        }
    }

    /// Reads the next bytes: a chunk from a chunk reader, into `staging` (as a chunk) for a
    /// chunk writer, else into the buffer (grown once a read fills it). `Ok(0)` is
    /// end-of-stream.
    fn poll_read_next<R>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        to_chunks: bool,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + Chunks + Unpin,
    {
        if R::READS_CHUNKS {
            return reader.poll_read_chunk(cx).map_ok(|chunk| {
                self.chunk = chunk;
                self.chunk.len()
            });
        }
        if to_chunks {
            if self.staging.capacity() < self.staging_size {
                ready!(reader.poll_readable(cx))?;
                // Reclaims the allocation if every earlier chunk was sent and dropped.
                self.staging.reserve(self.staging_size);
            }
            return tokio_util::io::poll_read_buf(Pin::new(&mut *reader), cx, &mut self.staging)
                .map_ok(|n| {
                    if n == self.staging_size && self.staging_size < MAX_BUFFER {
                        self.staging_size = self.grown_size(self.staging_size);
                    }
                    self.chunk = self.staging.split().freeze();
                    n
                });
        }
        if self.buf.is_empty() {
            ready!(reader.poll_readable(cx))?;
            self.buf = vec![0; INITIAL_BUFFER];
        } else if self.grow {
            self.grow = false;
            let size = self.grown_size(self.buf.len());
            if size > self.buf.len() {
                self.buf = vec![0; size];
            }
        }
        let mut read = ReadBuf::new(&mut self.buf);
        ready!(Pin::new(&mut *reader).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.grow = n == self.buf.len() && self.buf.len() < MAX_BUFFER;
        self.start = 0;
        self.end = n;
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
