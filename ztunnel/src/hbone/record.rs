//! TLS 1.3 records after the handshake (RFC 8446 §5): one direction's traffic key, sealing
//! plaintext into records and opening records in place.
//!
//! rustls runs every HBONE handshake; once it is complete its traffic secrets are taken over
//! ([`super::tls`]) so records are opened and sealed where the bytes already are: a received
//! record is decrypted in the buffer the socket was read into (no copy through rustls'
//! deframer and plaintext queue), and plaintext is encrypted into the buffer the socket is
//! written from ([`super::send_buf`]) — by aws-lc straight from where the caller holds it (out
//! of place), by ring, which only seals in place, after a copy. Only TLS 1.3's AEAD suites
//! exist here (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305), the only suites HBONE's
//! configurations allow.
//!
//! The AEAD comes from aws-lc or ring, whichever seals faster on this CPU ([`implementation`],
//! measured once per process): their AES-GCM code paths differ by CPU generation (aws-lc has
//! an AVX-512 path, ring a VAES/AVX2 one), and on a given machine one is about twice as fast
//! as the other. The bytes on the wire are the same.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustls::ConnectionTrafficSecrets;
use rustls::crypto::cipher::{Iv, Nonce};

use super::send_buf::RecordBuf;

/// Record header: type (1), legacy version (2), length (2).
pub(crate) const HEADER_LEN: usize = 5;
/// Largest plaintext in one record (2^14).
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest encrypted record body a peer may send (2^14 + 256).
pub(crate) const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Every suite here has a 16-byte tag.
pub(crate) const TAG_LEN: usize = 16;
/// The outer type of every protected record.
const APPLICATION_DATA: u8 = 23;
/// `legacy_record_version` we send (TLS 1.2, as RFC 8446 requires).
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// Inner content types (RFC 8446 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Content {
    Alert,
    Handshake,
    ApplicationData,
}

impl Content {
    fn byte(self) -> u8 {
        match self {
            Content::Alert => 21,
            Content::Handshake => 22,
            Content::ApplicationData => 23,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            21 => Some(Content::Alert),
            22 => Some(Content::Handshake),
            23 => Some(Content::ApplicationData),
            _ => None,
        }
    }
}

/// Why a record was refused. Every one ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("unexpected TLS record type {0} after the handshake")]
    OuterType(u8),
    #[error("TLS record of {0} bytes is over the limit")]
    Overflow(usize),
    #[error("TLS record failed authentication (bad_record_mac)")]
    BadMac,
    #[error("TLS record with no or an unknown inner content type")]
    InnerType,
    #[error("TLS sequence number exhausted")]
    SequenceExhausted,
    #[error("unsupported negotiated cipher suite")]
    UnsupportedSuite,
}

/// A parsed record header: how long the body is.
pub(crate) fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, RecordError> {
    if header[0] != APPLICATION_DATA {
        return Err(RecordError::OuterType(header[0]));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow(len));
    }
    if len < TAG_LEN + 1 {
        // Not even a tag and the inner type byte.
        return Err(RecordError::BadMac);
    }
    Ok(len)
}

/// Which library's AEAD the record layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Implementation {
    AwsLc,
    Ring,
}

impl Implementation {
    /// Its name in logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Implementation::AwsLc => "aws-lc",
            Implementation::Ring => "ring",
        }
    }
}

/// The implementation this process uses: the faster of the two at sealing 16 KiB records with
/// AES-256-GCM, measured on first use (a few milliseconds) and logged.
pub(crate) fn implementation() -> Implementation {
    static CHOSEN: OnceLock<Implementation> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let (aws_lc, ring) = calibrate();
        let chosen = if ring < aws_lc {
            Implementation::Ring
        } else {
            Implementation::AwsLc
        };
        tracing::info!(
            chosen = chosen.name(),
            aws_lc_us = aws_lc.as_micros() as u64,
            ring_us = ring.as_micros() as u64,
            "TLS record encryption: measured both AES-GCM implementations on 1 MiB, using the faster"
        );
        chosen
    })
}

/// Time to seal 1 MiB in 16 KiB records with each implementation: the best of three runs,
/// alternating, after a warm-up.
fn calibrate() -> (Duration, Duration) {
    let secrets = || ConnectionTrafficSecrets::Aes256Gcm {
        key: rustls::crypto::cipher::AeadKey::from([0x5a; 32]),
        iv: Iv::new([0xa5; 12]),
    };
    let mut best = [Duration::MAX; 2];
    let mut buf = vec![0u8; MAX_PLAINTEXT];
    for round in 0..4 {
        for (slot, which) in [Implementation::AwsLc, Implementation::Ring]
            .into_iter()
            .enumerate()
        {
            let Ok(mut key) = RecordKey::with(which, 0, secrets()) else {
                return (Duration::ZERO, Duration::MAX);
            };
            let start = Instant::now();
            for _ in 0..64 {
                if key.aead.seal(key.seq, &[0; HEADER_LEN], &mut buf).is_err() {
                    return (Duration::ZERO, Duration::MAX);
                }
                key.seq += 1;
            }
            if round > 0 {
                best[slot] = best[slot].min(start.elapsed());
            }
        }
    }
    (best[0], best[1])
}

/// A traffic key of either implementation.
enum Aead {
    AwsLc(aws_lc_rs::aead::LessSafeKey, Iv),
    // ring's key schedule is held inline (~550 bytes): boxed, like aws-lc's.
    Ring(Box<ring::aead::LessSafeKey>, Iv),
}

impl Aead {
    fn new(which: Implementation, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        use ConnectionTrafficSecrets as S;
        let (key, iv, aws, ring) = match secrets {
            S::Aes128Gcm { key, iv } => (
                key,
                iv,
                &aws_lc_rs::aead::AES_128_GCM,
                &ring::aead::AES_128_GCM,
            ),
            S::Aes256Gcm { key, iv } => (
                key,
                iv,
                &aws_lc_rs::aead::AES_256_GCM,
                &ring::aead::AES_256_GCM,
            ),
            S::Chacha20Poly1305 { key, iv } => (
                key,
                iv,
                &aws_lc_rs::aead::CHACHA20_POLY1305,
                &ring::aead::CHACHA20_POLY1305,
            ),
            _ => return Err(RecordError::UnsupportedSuite),
        };
        Ok(match which {
            Implementation::AwsLc => {
                let unbound = aws_lc_rs::aead::UnboundKey::new(aws, key.as_ref())
                    .map_err(|_| RecordError::UnsupportedSuite)?;
                Aead::AwsLc(aws_lc_rs::aead::LessSafeKey::new(unbound), iv)
            }
            Implementation::Ring => {
                let unbound = ring::aead::UnboundKey::new(ring, key.as_ref())
                    .map_err(|_| RecordError::UnsupportedSuite)?;
                Aead::Ring(Box::new(ring::aead::LessSafeKey::new(unbound)), iv)
            }
        })
    }

    /// Encrypts `in_out` in place; returns the tag.
    fn seal(
        &self,
        seq: u64,
        header: &[u8; HEADER_LEN],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], RecordError> {
        let mut out = [0u8; TAG_LEN];
        match self {
            Aead::AwsLc(key, iv) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0);
                let tag = key
                    .seal_in_place_separate_tag(nonce, aws_lc_rs::aead::Aad::from(*header), in_out)
                    .map_err(|_| RecordError::BadMac)?;
                out.copy_from_slice(tag.as_ref());
            }
            Aead::Ring(key, iv) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0);
                let tag = key
                    .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(*header), in_out)
                    .map_err(|_| RecordError::BadMac)?;
                out.copy_from_slice(tag.as_ref());
            }
        }
        Ok(out)
    }

    /// Encrypts `plaintext` followed by the inner type byte `content` into `out` (exactly
    /// their length plus the tag's), leaving `plaintext` as it is. aws-lc reads the plaintext
    /// where it lies; ring, which only seals in place, copies it into `out` first (so
    /// [`RecordKey::seal`] takes its in-place path for ring instead).
    fn seal_into(
        &self,
        seq: u64,
        header: &[u8; HEADER_LEN],
        plaintext: &[u8],
        content: u8,
        out: &mut [u8],
    ) -> Result<(), RecordError> {
        let n = plaintext.len();
        debug_assert_eq!(out.len(), n + 1 + TAG_LEN);
        match self {
            Aead::AwsLc(key, iv) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0);
                let (ciphertext, rest) = out.split_at_mut(n);
                key.seal_out_of_place_scatter(
                    nonce,
                    aws_lc_rs::aead::Aad::from(*header),
                    plaintext,
                    ciphertext,
                    &[content],
                    rest,
                )
                .map_err(|_| RecordError::BadMac)
            }
            Aead::Ring(..) => {
                out[..n].copy_from_slice(plaintext);
                out[n] = content;
                let tag = self.seal(seq, header, &mut out[..=n])?;
                out[n + 1..].copy_from_slice(&tag);
                Ok(())
            }
        }
    }

    /// Decrypts the ciphertext and tag at `in_out[src..]`, writing the plaintext to the start
    /// of `in_out` (`src` = 0: in place); returns the plaintext's length. ring's AES-GCM
    /// decrypts and moves in one pass; aws-lc decrypts in place, then moves.
    fn open(
        &self,
        seq: u64,
        header: &[u8; HEADER_LEN],
        in_out: &mut [u8],
        src: usize,
    ) -> Result<usize, RecordError> {
        let len = match self {
            Aead::AwsLc(key, iv) => {
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0);
                key.open_within(nonce, aws_lc_rs::aead::Aad::from(*header), in_out, src..)
                    .map_err(|_| RecordError::BadMac)?
                    .len()
            }
            Aead::Ring(key, iv) => {
                let nonce = ring::aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0);
                key.open_within(nonce, ring::aead::Aad::from(*header), in_out, src..)
                    .map_err(|_| RecordError::BadMac)?
                    .len()
            }
        };
        Ok(len)
    }
}

/// One direction's traffic key and sequence number.
pub(crate) struct RecordKey {
    aead: Aead,
    seq: u64,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKey").field("seq", &self.seq).finish()
    }
}

impl RecordKey {
    /// The key for `secrets`, whose next record has sequence number `seq`.
    pub(crate) fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        Self::with(implementation(), seq, secrets)
    }

    fn with(
        which: Implementation,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<Self, RecordError> {
        Ok(Self {
            aead: Aead::new(which, secrets)?,
            seq,
        })
    }

    /// Records sealed or opened with this key so far.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The sequence number for the next record.
    fn take_seq(&mut self) -> Result<u64, RecordError> {
        if self.seq == u64::MAX {
            return Err(RecordError::SequenceExhausted);
        }
        self.seq += 1;
        Ok(self.seq - 1)
    }

    /// Appends one record carrying `plaintext` (at most [`MAX_PLAINTEXT`] bytes) to `out`.
    pub(crate) fn seal(
        &mut self,
        content: Content,
        plaintext: &[u8],
        out: &mut impl RecordBuf,
    ) -> Result<(), RecordError> {
        debug_assert!(plaintext.len() <= MAX_PLAINTEXT);
        let start = out.len();
        if matches!(self.aead, Aead::Ring(..)) {
            // ring seals only in place: the plaintext is copied into the record first.
            out.extend_from_slice(&[0; HEADER_LEN]);
            out.extend_from_slice(plaintext);
            return self.seal_staged(content, out, start);
        }
        let header = record_header(plaintext.len());
        let seq = self.take_seq()?;
        // aws-lc encrypts from where the plaintext lies into the record's room (a `SendBuf`
        // hands out room it has used before without zeroing it again).
        let record = out.grow(HEADER_LEN + plaintext.len() + 1 + TAG_LEN);
        record[..HEADER_LEN].copy_from_slice(&header);
        let sealed = self.aead.seal_into(
            seq,
            &header,
            plaintext,
            content.byte(),
            &mut record[HEADER_LEN..],
        );
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }

    /// Seals in place a record whose plaintext was already written at
    /// `out[start + HEADER_LEN..]` (the end of `out`), header space reserved.
    pub(crate) fn seal_staged(
        &mut self,
        content: Content,
        out: &mut impl RecordBuf,
        start: usize,
    ) -> Result<(), RecordError> {
        self.seal_staged_as(content.byte(), out, start)
    }

    /// [`Self::seal_staged`] with any inner type byte (the fuzz target sends what a peer could).
    pub(crate) fn seal_staged_as(
        &mut self,
        content: u8,
        out: &mut impl RecordBuf,
        start: usize,
    ) -> Result<(), RecordError> {
        let len = out.len() - start - HEADER_LEN;
        debug_assert!(len <= MAX_PLAINTEXT);
        let header = record_header(len);
        let sealed = self.take_seq().and_then(|seq| {
            out[start..start + HEADER_LEN].copy_from_slice(&header);
            out.push(content);
            self.aead.seal(seq, &header, &mut out[start + HEADER_LEN..])
        });
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(e) => {
                // The staged plaintext never stays where the socket is written from.
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Opens the record `header` + `body` in place. Returns the inner content type and the
    /// content's length at the start of `body`.
    #[cfg(test)]
    pub(crate) fn open_in_place(
        &mut self,
        header: &[u8; HEADER_LEN],
        body: &mut [u8],
    ) -> Result<(Content, usize), RecordError> {
        self.open_within(header, body, 0)
    }

    /// Opens the record `header` + `in_out[src..]` (its body), writing the content to the start
    /// of `in_out`, `src` bytes earlier: a record can be decrypted to right after the previous
    /// one's content, in the buffer it was received into. Returns the inner content type and
    /// the content's length.
    pub(crate) fn open_within(
        &mut self,
        header: &[u8; HEADER_LEN],
        in_out: &mut [u8],
        src: usize,
    ) -> Result<(Content, usize), RecordError> {
        let seq = self.take_seq()?;
        let len = self.aead.open(seq, header, in_out, src)?;
        inner(&in_out[..len])
    }
}

/// The header of a protected record carrying `plaintext_len` bytes of content.
fn record_header(plaintext_len: usize) -> [u8; HEADER_LEN] {
    // Content, the type byte and the tag: at most 2^14 + 17, well inside a u16.
    let len = (plaintext_len + 1 + TAG_LEN) as u16;
    let [hi, lo] = len.to_be_bytes();
    [
        APPLICATION_DATA,
        LEGACY_VERSION[0],
        LEGACY_VERSION[1],
        hi,
        lo,
    ]
}

/// Splits a decrypted `TLSInnerPlaintext` (content, type, zero padding). RFC 8446 §5.4 bounds
/// the whole of it, padding included, to 2^14 + 1 bytes.
fn inner(plain: &[u8]) -> Result<(Content, usize), RecordError> {
    if plain.len() > MAX_PLAINTEXT + 1 {
        return Err(RecordError::Overflow(plain.len()));
    }
    let at = plain
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(RecordError::InnerType)?;
    let content = Content::from_byte(plain[at]).ok_or(RecordError::InnerType)?;
    if at > MAX_PLAINTEXT {
        return Err(RecordError::Overflow(at));
    }
    Ok((content, at))
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
