//! Closing a connection whose peer went silent.
//!
//! Owns [`IdleTimeout`], a stream wrapper that fails reads with `TimedOut` once nothing moved
//! for a while. It must not decide what counts as a live peer beyond bytes moving: servers
//! that need keepalives (HTTP/2 PINGs) send them themselves.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A stream that fails with `TimedOut` once nothing was read (and, if `writes_count`, nothing
/// written) for `idle`. The clock only runs while the stream is being read, which is when a
/// server waits for its peer.
#[derive(Debug)]
pub struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    writes_count: bool,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
    expired: Option<Counter>,
}

impl<T> IdleTimeout<T> {
    /// Wraps `inner`; `expired` is incremented when the timeout fires.
    pub fn new(inner: T, idle: Duration, writes_count: bool, expired: Counter) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle,
            writes_count,
            last: now,
            sleep: Box::pin(tokio::time::sleep_until(now + idle)),
            expired: Some(expired),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last + self.idle;
            if Instant::now() < deadline {
                self.sleep.as_mut().reset(deadline);
                continue;
            }
            if let Some(counter) = self.expired.take() {
                counter.inc();
            }
            return Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection idle for too long",
            ));
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if this.writes_count && matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last = Instant::now();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if this.writes_count && matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last = Instant::now();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn idle_stream_times_out_and_activity_extends_it() {
        let (a, mut b) = tokio::io::duplex(64);
        let counter = Counter::default();
        let mut a = IdleTimeout::new(a, Duration::from_millis(200), false, counter.clone());
        let mut buf = [0u8; 4];
        b.write_all(b"x").await.expect("write");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(a.read(&mut buf).await.expect("read"), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        b.write_all(b"y").await.expect("write");
        assert_eq!(a.read(&mut buf).await.expect("still open"), 1);
        let err = a.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(counter.get(), 1);
    }
}
