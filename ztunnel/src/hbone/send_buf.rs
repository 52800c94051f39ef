//! Where sealed records are written before the socket takes them.
//!
//! [`RecordBuf`] is what [`super::record::RecordKey`] seals into: a growable byte buffer.
//! [`SendBuf`], a connection's send buffer, keeps its memory initialized up to the most it
//! has ever held, so making room for a record sealed out of place costs nothing: a `Vec`'s
//! room must be zeroed first (safe Rust hands out no uninitialized memory), one more pass
//! over every byte sent. The room handed out still holds earlier records' bytes (ciphertext
//! already sent); every byte of it is overwritten before it is part of a record.

use std::ops::{Deref, DerefMut};

/// A growable buffer records are sealed into; derefs to the bytes it holds.
pub(crate) trait RecordBuf: DerefMut<Target = [u8]> {
    /// Appends `bytes`.
    fn extend_from_slice(&mut self, bytes: &[u8]);

    /// Appends one byte.
    fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    /// Shortens the buffer to `len` bytes (no-op if it is not longer).
    fn truncate(&mut self, len: usize);

    /// Lengthens the buffer by `n` bytes of unspecified content, which the caller overwrites,
    /// and returns them.
    fn grow(&mut self, n: usize) -> &mut [u8];
}

impl RecordBuf for Vec<u8> {
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        Vec::extend_from_slice(self, bytes);
    }

    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }

    fn grow(&mut self, n: usize) -> &mut [u8] {
        let start = self.len();
        self.resize(start + n, 0);
        &mut self[start..]
    }
}

/// A connection's send buffer: `len` bytes in use, memory initialized up to `buf.len()`.
#[derive(Debug, Default)]
pub(crate) struct SendBuf {
    buf: Vec<u8>,
    len: usize,
}

impl SendBuf {
    /// An empty buffer with room for `capacity` bytes (none of it touched yet).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            len: 0,
        }
    }

    /// Drops the first `start` bytes, moving the rest to the front.
    pub(crate) fn discard_front(&mut self, start: usize) {
        let start = start.min(self.len);
        self.buf.copy_within(start..self.len, 0);
        self.len -= start;
    }
}

impl Deref for SendBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl DerefMut for SendBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl RecordBuf for SendBuf {
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn grow(&mut self, n: usize) -> &mut [u8] {
        let start = self.len;
        let end = start + n;
        if self.buf.len() < end {
            // Only memory never used before is zeroed, once.
            self.buf.resize(end, 0);
        }
        self.len = end;
        &mut self.buf[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_room_is_reported_by_length_and_overwritten_by_extend() {
        let mut buf = SendBuf::with_capacity(8);
        buf.extend_from_slice(b"abcdef");
        buf.push(b'g');
        assert_eq!(&buf[..], b"abcdefg");
        buf.discard_front(5);
        assert_eq!(&buf[..], b"fg");
        buf.truncate(0);
        assert!(buf.is_empty());
        // The room handed out again has the length asked for; extend writes every byte.
        assert_eq!(buf.grow(3).len(), 3);
        buf.truncate(1);
        buf.extend_from_slice(b"xyz123456");
        assert_eq!(buf.len(), 10);
        assert_eq!(&buf[1..], b"xyz123456");
        buf.discard_front(100);
        assert!(buf.is_empty());
    }

    #[test]
    fn vec_grows_zeroed() {
        let mut v = vec![7u8];
        assert_eq!(RecordBuf::grow(&mut v, 3), &[0, 0, 0]);
        assert_eq!(v, [7, 0, 0, 0]);
    }
}
