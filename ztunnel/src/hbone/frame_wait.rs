//! Sleeping until an HTTP/2 frame can be whole: the receive side of an HBONE connection sets
//! the socket's receive low-water mark (`SO_RCVLOWAT`) to the bytes the frame being read still
//! lacks, so the kernel wakes the ztunnel once, not for every segment of a large DATA frame.
//!
//! HTTP/2 hands a frame on only when all of it is there, and the frames of a connection come
//! in order: while a frame is incomplete, reading what has arrived so far wakes the process for
//! nothing. On the two-node benchmark one stream's receiving ztunnel woke about four times per
//! 256 KiB frame (once per 64 KiB segment the sender's TCP released), ~20,000 times a second.
//!
//! The mark is a lower bound of what must still arrive: the frame's missing content, less
//! everything the TLS layer holds (decrypted content not yet read, ciphertext of an
//! incomplete record — which is never less than the content it carries). So the kernel is
//! never asked to wait for a byte the frame does not need. The frames are followed in the
//! content the TLS layer delivers (after the client's 24-byte connection preface on the server
//! side), exactly as HTTP/2 reads them. The end of the stream, an error or a reset wake the
//! reader whatever the mark. A frame missing less than [`MIN_WAIT`] leaves the mark at one
//! byte (small frames cost no system call), and the mark is only raised when that saves a
//! wake-up worth the call.

use std::io;
use std::os::fd::AsFd;

use tokio::io::DuplexStream;
use tokio::net::TcpStream;

use super::carrier::Carrier;

/// HTTP/2 frame head: 3 bytes of length, type, flags, stream id.
const FRAME_HEAD: usize = 9;
/// The client connection preface (RFC 9113 §3.4) a server reads before any frame.
pub(super) const CLIENT_PREFACE_LEN: usize = 24;
/// A frame missing fewer bytes than this is waited for byte by byte (mark 1).
const MIN_WAIT: usize = 32 * 1024;

/// A transport whose readiness can wait for a number of received bytes.
pub(crate) trait LowWater {
    /// Sets the bytes a read waits for (1: any). `Ok(false)`: this transport cannot, and is
    /// not asked again.
    fn set_low_water(&self, bytes: usize) -> io::Result<bool> {
        let _ = bytes;
        Ok(false)
    }
}

impl LowWater for TcpStream {
    fn set_low_water(&self, bytes: usize) -> io::Result<bool> {
        set_rcvlowat(self.as_fd(), bytes).map(|()| true)
    }
}

impl LowWater for Carrier {
    fn set_low_water(&self, bytes: usize) -> io::Result<bool> {
        match self {
            Carrier::Tcp(tcp) => tcp.set_low_water(bytes),
            // No socket of its own: the outer connection's socket carries that connection's
            // own mark.
            Carrier::Tunnel(_) => Ok(false),
        }
    }
}

impl LowWater for DuplexStream {}
impl<R, W> LowWater for tokio::io::Join<R, W> {}

/// `setsockopt(SO_RCVLOWAT)`; the kernel caps the value at half the receive buffer.
#[allow(unsafe_code)]
fn set_rcvlowat(fd: std::os::fd::BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open socket borrowed for the call; the option value is a `c_int`
    // on the stack that outlives the call, and its exact size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Follows the HTTP/2 frames in the content delivered to the reader and keeps the mark.
#[derive(Debug)]
pub(super) struct FrameWait {
    /// Preface bytes still to pass.
    preface: usize,
    head: [u8; FRAME_HEAD],
    head_len: usize,
    /// Content of the current frame not yet delivered.
    body_left: usize,
    /// The mark last set (1: the kernel's default).
    mark: usize,
    /// False once the transport said it has no mark, or setting it failed.
    enabled: bool,
}

impl FrameWait {
    /// For a connection whose content starts with `preface` bytes before the first frame.
    pub(super) fn new(preface: usize) -> Self {
        Self {
            preface,
            head: [0; FRAME_HEAD],
            head_len: 0,
            body_left: 0,
            mark: 1,
            enabled: true,
        }
    }

    /// Follows `content`, the next bytes delivered to the reader (nothing to follow once the
    /// mark is off for good).
    pub(super) fn delivered(&mut self, mut content: &[u8]) {
        if !self.enabled {
            return;
        }
        while !content.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(content.len());
                (self.preface, content) = (self.preface - n, &content[n..]);
            } else if self.body_left > 0 {
                let n = self.body_left.min(content.len());
                (self.body_left, content) = (self.body_left - n, &content[n..]);
            } else {
                let n = (FRAME_HEAD - self.head_len).min(content.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&content[..n]);
                (self.head_len, content) = (self.head_len + n, &content[n..]);
                if self.head_len == FRAME_HEAD {
                    self.head_len = 0;
                    let [a, b, c, ..] = self.head;
                    self.body_left = u32::from_be_bytes([0, a, b, c]) as usize;
                }
            }
        }
    }

    /// The mark to set now that the TLS layer holds `held` bytes (content and ciphertext not
    /// yet delivered), if it should change.
    pub(super) fn next_mark(&self, held: usize) -> Option<usize> {
        if !self.enabled {
            return None;
        }
        let missing = self.body_left.saturating_sub(held);
        let want = if missing >= MIN_WAIT { missing } else { 1 };
        // Lower at once (the reader must not wait for bytes the frame does not need); raise
        // only by enough to save a wake-up.
        let change = want < self.mark || want >= self.mark.saturating_add(MIN_WAIT);
        change.then_some(want)
    }

    /// Applies [`FrameWait::next_mark`] to `io`.
    pub(super) fn update<T: LowWater>(&mut self, io: &T, held: usize) {
        let Some(mark) = self.next_mark(held) else {
            return;
        };
        match io.set_low_water(mark) {
            Ok(true) => self.mark = mark,
            Ok(false) => self.enabled = false,
            Err(e) => {
                // Reading goes on byte by byte; a raised mark must not stay behind.
                self.enabled = false;
                if self.mark > 1 && io.set_low_water(1).is_err() {
                    tracing::warn!(error = %e, mark = self.mark, "could not lower the receive low-water mark of an HBONE connection; its reads may stall");
                } else {
                    tracing::debug!(error = %e, "could not set the receive low-water mark; reading without it");
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "frame_wait_tests.rs"]
mod tests;
