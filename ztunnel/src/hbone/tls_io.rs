//! [`super::TlsStream`] as tokio's `AsyncRead` and `AsyncWrite`: records written out in as few
//! writes as the socket takes, fatal alerts, and the read and write halves' errors.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::*;

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Writes sealed records until none are pending or the socket would block.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let end = self.staged.unwrap_or(self.out.len());
            if self.out_pos == end {
                // Everything sealed is out: keep only a record still gathering plaintext.
                let start = self.staged.map_or(self.out.len(), |s| s);
                self.out.discard_front(start);
                self.staged = self.staged.map(|_| 0);
                self.out_pos = 0;
                return Poll::Ready(Ok(()));
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
    }

    /// Queues a fatal alert and closes the sending side; the alert is written now if the
    /// socket takes it, else with the next flush.
    fn send_fatal_alert(&mut self, description: u8, cx: &mut Context<'_>) {
        if self.write_error.is_some() {
            return;
        }
        let sealed = self.seal_staged_record().and_then(|()| {
            self.tx
                .seal(Content::Alert, &[2, description], &mut self.out)
                .map_err(record_error)
        });
        if sealed.is_ok() {
            // Best effort: the connection is ending either way.
            let _ = self.poll_write_out(cx);
        }
        self.write_error = Some((
            io::ErrorKind::ConnectionAborted,
            format!("TLS connection closed after sending alert {description}"),
        ));
    }

    fn write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some((kind, msg)) = &self.write_error {
            return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
        }
        if self.pending_out() >= TLS_SEND_BUFFER
            && let Err(e) = ready!(self.poll_write_out(cx))
        {
            return Poll::Ready(Err(self.fail_write(e)));
        }
        let mut room = TLS_SEND_BUFFER.saturating_sub(self.pending_out());
        let mut taken = 0;
        for buf in bufs {
            if room == 0 {
                break;
            }
            let n = match self.encrypt(buf, room) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.fail_write(e))),
            };
            taken += n;
            room -= n;
            if n < buf.len() {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }
}

impl<T: AsyncRead + AsyncWrite + LowWater + Unpin> AsyncRead for TlsStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        let read = this.poll_read_content(cx, buf);
        // Whether this read delivered content or is about to wait, the socket's mark follows
        // the frame the reader is in.
        this.frame_wait.delivered(&buf.filled()[start..]);
        let held =
            this.plain.len() + (this.in_end - this.in_start) + (this.early.len() - this.early_pos);
        this.frame_wait.update(&this.io, held);
        read
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Delivers content: what is held here, else records opened from the socket's bytes.
    fn poll_read_content(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        let mut delivered = 0;
        loop {
            delivered += this.take_plain(buf);
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match &this.read {
                ReadState::Open => {}
                ReadState::Closed => return Poll::Ready(Ok(())),
                ReadState::Failed(kind, msg) => {
                    return Poll::Ready(if delivered > 0 {
                        Ok(())
                    } else {
                        Err(io::Error::new(*kind, msg.clone()))
                    });
                }
            }
            match this.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    this.read_failed(e, cx);
                    continue;
                }
            }
            if delivered > 0 {
                return Poll::Ready(Ok(()));
            }
            // Need more ciphertext. A reader with room for a whole record beyond the partial
            // one held gets the socket's bytes in its own buffer, decrypted there — unless the
            // last such read completed no record: the held part would be copied there and back
            // with every read of a record that trickles in.
            let pending = this.in_end - this.in_start;
            if !this.direct_stalled && buf.remaining() >= pending + HEADER_LEN + MAX_CIPHERTEXT {
                match ready!(this.poll_read_direct(cx, buf)) {
                    Ok(n) => delivered += n,
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            // Otherwise read here: move the partial record to the front, and read at most
            // one whole record more, so the next, larger read can go to the reader directly.
            if this.in_start > 0 {
                this.inbuf.copy_within(this.in_start..this.in_end, 0);
                this.in_end -= this.in_start;
                this.in_start = 0;
            }
            // (What is held is less than a record, so there is room: a full buffer would
            // read nothing and end as a truncated stream, not overrun.)
            let limit = RECEIVE_BUFFER.clamp(this.in_end, this.inbuf.len());
            let mut space = ReadBuf::new(&mut this.inbuf[this.in_end..limit]);
            match Pin::new(&mut this.io).poll_read(cx, &mut space) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = space.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(this.truncated()));
                    }
                    this.in_end += n;
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    /// Reads the socket into `buf` after the partial record held here, then opens every
    /// complete record where it is, each one's content moved back to follow the previous
    /// one's (in the decrypting pass with ring's AES-GCM; aws-lc moves after decrypting in
    /// place). What is left of an incomplete record is kept here. Returns
    /// how much content `buf` gained.
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        let base = buf.filled().len();
        buf.put_slice(&self.inbuf[self.in_start..self.in_end]);
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        let received = buf.filled().len() - before;
        if !matches!(read, Poll::Ready(Ok(()))) || received == 0 {
            // Nothing of it reaches the reader; the partial record is still held here.
            buf.set_filled(base);
            return match read {
                Poll::Ready(Ok(())) => Poll::Ready(Err(self.truncated())),
                other => other.map_ok(|()| 0),
            };
        }
        (self.in_start, self.in_end) = (0, 0);
        self.direct_reads += 1;
        let region = &mut buf.filled_mut()[base..];
        let (mut at, mut to) = (0, 0);
        while matches!(self.read, ReadState::Open) {
            match self.open_record(region, at, to) {
                Ok(Some((end, n))) => (at, to) = (end, to + n),
                Ok(None) => {
                    let tail = region.len() - at;
                    self.inbuf[..tail].copy_from_slice(&region[at..]);
                    self.in_end = tail;
                    break;
                }
                Err(e) => self.read_failed(e, cx),
            }
        }
        self.direct_stalled = at == 0;
        buf.set_filled(base + to);
        Poll::Ready(Ok(to))
    }

    /// The receive side's end: a refused record is answered with its alert.
    fn read_failed(&mut self, e: io::Error, cx: &mut Context<'_>) {
        if let Some(alert) = alert_of(&e) {
            records_refused().inc();
            tracing::warn!(error = %e, alert, "refused a TLS record from the HBONE peer; closing the connection");
            self.send_fatal_alert(alert, cx);
        } else {
            tracing::debug!(error = %e, "HBONE peer ended the TLS connection");
        }
        self.read = ReadState::Failed(e.kind(), e.to_string());
    }

    /// The stream ended without close_notify (the receive side's end).
    fn truncated(&mut self) -> io::Error {
        let e = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the TLS connection without close_notify",
        );
        self.read = ReadState::Failed(e.kind(), e.to_string());
        e
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.seal_staged_record() {
            return Poll::Ready(Err(this.fail_write(e)));
        }
        if let Err(e) = ready!(this.poll_write_out(cx)) {
            return Poll::Ready(Err(this.fail_write(e)));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_error.is_none() {
            let sealed = this.seal_staged_record().and_then(|()| {
                this.tx
                    .seal(Content::Alert, &[1, CLOSE_NOTIFY], &mut this.out)
                    .map_err(record_error)
            });
            if let Err(e) = sealed {
                return Poll::Ready(Err(this.fail_write(e)));
            }
            // Sent once: later calls only finish writing and shut the socket down.
            this.write_error = Some((io::ErrorKind::BrokenPipe, "TLS connection closed".into()));
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
