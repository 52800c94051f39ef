//! HBONE's TLS connection: rustls runs the handshake (`super::handshake`), then its TLS 1.3 traffic secrets are taken over and records are
//! opened and sealed here ([`super::record`]), so bytes are not copied through rustls' buffers:
//!
//! - receive: when the reader (HTTP/2) has room for a whole record beyond the partial one held
//!   here, the socket is read straight into the reader's buffer and every complete record is
//!   decrypted there, each one's content moved back over the headers and tags before it (in
//!   the decrypting pass with ring's AES-GCM, the implementation chosen on CPUs where it is the
//!   faster; aws-lc decrypts in place, then moves). Only the incomplete record a read ends in
//!   is kept here. When the reader has less room (the end of an HTTP/2 frame), or a read into
//!   its buffer completed no record (a record arriving in small pieces is then gathered here,
//!   not carried back and forth with every read), at most one record more is read here,
//!   decrypted in place and copied out. (rustls' buffered API copies every byte three times:
//!   into its deframer, into its plaintext queue, out to the reader.) While the HTTP/2 frame
//!   being read is incomplete, the socket's receive low-water mark asks the kernel to wake the
//!   reader only once the frame can be whole ([`super::frame_wait`]).
//! - send: plaintext is encrypted straight from HTTP/2's frames into the buffer the socket is
//!   written from (small writes are gathered into one record first), and up to
//!   [`TLS_SEND_BUFFER`](super::TLS_SEND_BUFFER) of records leave in one `write`.
//!
//! rustls stays the authority for what is negotiated and verified (certificates, ALPN, key
//! exchange) and computes the next secrets on a KeyUpdate (`rustls::kernel`). What this module
//! enforces after the handshake: only protected records (outer type application_data), at
//! most 2^14 + 256 bytes each and 2^14 + 1 once decrypted (content, type and padding),
//! authenticated with the next sequence number; inner types
//! application data, handshake (KeyUpdate both ways, NewSessionTicket to a client; anything
//! else ends the connection) and alert (close_notify is end of stream, any other alert an
//! error); the end of the TCP stream without close_notify is an error (truncation), as in
//! rustls. A KeyUpdate is sent before the cipher's confidentiality limit is near and whenever
//! the peer asks for one — at most 32 KeyUpdates in a row without application data, and a
//! request is answered only while the answers queued to send stay within 16 KiB past the send
//! buffer (a peer that asks and never reads would grow that queue without bound); past
//! either the connection ends with unexpected_message. A refused record is answered with the fatal alert RFC 8446 names
//! for it (bad_record_mac, record_overflow, unexpected_message, decode_error), then both
//! directions are closed; the error is final. A record that cannot be sealed (its sequence
//! numbers spent) leaves nothing of its plaintext in the send buffer.

use std::io;
use std::ops::Range;
use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::pki_types::CertificateDer;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::ReadBuf;

use super::TLS_SEND_BUFFER;
use super::frame_wait::{CLIENT_PREFACE_LEN, FrameWait, LowWater};
use super::record::{
    Content, HEADER_LEN, MAX_CIPHERTEXT, MAX_PLAINTEXT, RecordError, RecordKey, body_len,
};
use super::send_buf::{RecordBuf, SendBuf};

/// What an established connection keeps for received ciphertext: one whole record, the most
/// it holds at once (an incomplete record a read ended in, or one record read for a reader with
/// less room than that).
const RECEIVE_BUFFER: usize = HEADER_LEN + MAX_CIPHERTEXT;

/// Handshake message types handled after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// A post-handshake message larger than this ends the connection.
const MAX_POST_HANDSHAKE_MESSAGE: usize = 64 * 1024;
/// Alert description of a clean close.
const CLOSE_NOTIFY: u8 = 0;
/// KeyUpdates a peer may send without application data between them (each costs a key
/// derivation; rustls' own bound for requests).
const MAX_KEY_UPDATES_IN_A_ROW: u32 = 32;
/// How far records queued to send may grow past [`TLS_SEND_BUFFER`] with answers to the
/// peer's KeyUpdate requests. Writes stop at the buffer's size, but answers are queued by
/// reads: a peer that asks and never reads would grow the queue without bound.
const KEY_UPDATE_ANSWER_ROOM: usize = 16 * 1024;

/// Connections closed because the peer sent a record refused after the handshake (failed
/// authentication, over the size limit, an unexpected type or post-handshake message), for
/// the whole process; the app registers it as `hbone_tls_records_refused`.
pub fn records_refused() -> &'static Counter {
    static REFUSED: OnceLock<Counter> = OnceLock::new();
    REFUSED.get_or_init(Counter::default)
}

/// What the handshake settled.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The peer's certificate chain, leaf first.
    pub peer_certificates: Vec<CertificateDer<'static>>,
    /// The negotiated key exchange group.
    pub kx_group: Option<rustls::NamedGroup>,
}

impl Session {
    /// The peer's chain, as rustls reports it (`None` if it sent none).
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        (!self.peer_certificates.is_empty()).then_some(self.peer_certificates.as_slice())
    }

    /// When the peer's certificate expires, and its chain to check again against later
    /// bundles (`verified_at`: the bundle generation read before the handshake; `usage`: the
    /// role the peer's certificate was verified for). No new tunnel goes on a connection past
    /// either.
    pub(crate) fn peer_validity(
        &self,
        verified_at: Option<u64>,
        usage: membrane_identity::svid::Usage,
    ) -> (
        Option<std::time::SystemTime>,
        Option<membrane_identity::PeerTrust>,
    ) {
        let not_after = self
            .peer_certificates()
            .and_then(<[_]>::first)
            .and_then(|leaf| membrane_identity::svid::parse_leaf(leaf).ok())
            .map(|info| info.not_after);
        let trust = verified_at
            .zip(self.peer_certificates())
            .and_then(|(at, chain)| membrane_identity::PeerTrust::new(chain, usage, at).ok());
        (not_after, trust)
    }
}

/// rustls' state after the handshake: computes the next secrets on a KeyUpdate.
pub(super) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        // Only TLS 1.3 reaches here (checked after the handshake).
        suite
            .tls13()
            .map_or(u64::MAX, |s| s.common.confidentiality_limit)
    }
}

#[derive(Debug)]
enum ReadState {
    Open,
    /// close_notify received: end of stream.
    Closed,
    /// The receive side failed; every later read repeats it.
    Failed(io::ErrorKind, String),
}

/// An established TLS 1.3 connection over `T` (see the module docs).
pub(crate) struct TlsStream<T> {
    io: T,
    session: Session,
    kernel: Kernel,
    rx: RecordKey,
    tx: RecordKey,
    /// A KeyUpdate is sent before the sequence number reaches this.
    tx_limit: u64,
    /// Received ciphertext: `inbuf[in_start..in_end]`.
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Decrypted content in `inbuf` not yet read.
    plain: Range<usize>,
    /// Reads that went straight into the reader's buffer.
    direct_reads: u64,
    /// The last read into the reader's buffer completed no record: the rest of the partial one
    /// is gathered here until it opens.
    direct_stalled: bool,
    /// Content that arrived with the handshake, from `early_pos`.
    early: Vec<u8>,
    early_pos: usize,
    /// An incomplete post-handshake message.
    post_handshake: Vec<u8>,
    /// KeyUpdates received since the last application data.
    key_updates_in_a_row: u32,
    read: ReadState,
    /// Records to send: `out[out_pos..]` (up to `staged`, if set).
    out: SendBuf,
    out_pos: usize,
    /// Start of a record still gathering plaintext (header space reserved) at the end of `out`.
    staged: Option<usize>,
    write_error: Option<(io::ErrorKind, String)>,
    /// The socket's receive low-water mark, following the frame being read.
    frame_wait: FrameWait,
}

impl<T> TlsStream<T> {
    /// The connection a completed handshake left: `incoming[..filled]` is ciphertext that
    /// followed the handshake, `early` content that came with it.
    pub(super) fn established(
        io: T,
        session: Session,
        kernel: Kernel,
        secrets: ExtractedSecrets,
        incoming: Box<[u8]>,
        filled: usize,
        early: Vec<u8>,
    ) -> io::Result<Self> {
        // After the handshake only one record's worth is ever read here (see `poll_read`):
        // the handshake's large buffer is given back unless more than that followed it.
        let inbuf = if filled <= RECEIVE_BUFFER {
            let mut small = vec![0u8; RECEIVE_BUFFER].into_boxed_slice();
            small[..filled].copy_from_slice(&incoming[..filled]);
            small
        } else {
            incoming
        };
        let rx = RecordKey::new(secrets.rx.0, secrets.rx.1).map_err(record_error)?;
        let tx = RecordKey::new(secrets.tx.0, secrets.tx.1).map_err(record_error)?;
        let preface = match kernel {
            Kernel::Server(_) => CLIENT_PREFACE_LEN,
            Kernel::Client(_) => 0,
        };
        let tx_limit = kernel
            .confidentiality_limit()
            .saturating_sub(1 << 10)
            .max(1);
        Ok(Self {
            io,
            session,
            kernel,
            rx,
            tx,
            tx_limit,
            inbuf,
            in_start: 0,
            in_end: filled,
            plain: 0..0,
            direct_reads: 0,
            direct_stalled: false,
            early,
            early_pos: 0,
            post_handshake: Vec::new(),
            key_updates_in_a_row: 0,
            read: ReadState::Open,
            out: SendBuf::with_capacity(TLS_SEND_BUFFER + MAX_PLAINTEXT + 64),
            out_pos: 0,
            staged: None,
            write_error: None,
            frame_wait: FrameWait::new(preface),
        })
    }
}

impl<T> std::fmt::Debug for TlsStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("session", &self.session)
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .finish_non_exhaustive()
    }
}

impl<T> TlsStream<T> {
    /// What the handshake settled.
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// Lowers the point at which a KeyUpdate is sent (tests exercise key updates with it).
    #[cfg(test)]
    pub(crate) fn set_key_update_after(&mut self, records: u64) {
        self.tx_limit = self.tx.seq() + records;
    }

    /// Records received under the current key (tests observe key updates with it).
    #[cfg(test)]
    pub(crate) fn rx_seq(&self) -> u64 {
        self.rx.seq()
    }

    /// Records sent under the current key.
    #[cfg(test)]
    pub(crate) fn tx_seq(&self) -> u64 {
        self.tx.seq()
    }

    /// The size of the buffer kept for received ciphertext.
    #[cfg(test)]
    pub(crate) fn receive_buffer_len(&self) -> usize {
        self.inbuf.len()
    }

    /// Reads whose records were opened in the reader's buffer.
    #[cfg(test)]
    pub(crate) fn direct_reads(&self) -> u64 {
        self.direct_reads
    }

    /// Content that arrived with the handshake and was not read yet.
    #[cfg(test)]
    pub(crate) fn early_len(&self) -> usize {
        self.early.len() - self.early_pos
    }

    /// Sends KeyUpdate(update_requested) and switches keys; the peer must answer with its own.
    #[cfg(test)]
    pub(crate) fn request_key_update(&mut self) -> Result<(), io::Error> {
        self.seal_staged_record()?;
        self.send_key_update(true)
    }

    /// Seals `content` (at most 2^14 bytes) as one record of inner type `typ`, whatever it
    /// is, after anything already written: a peer's worst, for the fuzz target.
    pub(crate) fn queue_any_record(&mut self, typ: u8, content: &[u8]) -> io::Result<()> {
        self.seal_staged_record()?;
        let start = self.out.len();
        self.out.extend_from_slice(&[0; HEADER_LEN]);
        self.out
            .extend_from_slice(&content[..content.len().min(MAX_PLAINTEXT)]);
        self.tx
            .seal_staged_as(typ, &mut self.out, start)
            .map_err(record_error)
    }

    // === receive ===

    /// Decrypts the next complete record in `inbuf`, if there is one. Content lands in
    /// `plain`; post-handshake messages and alerts are handled here.
    fn open_next(&mut self) -> Result<bool, io::Error> {
        let mut inbuf = std::mem::take(&mut self.inbuf);
        let at = self.in_start;
        let opened = self.open_record(&mut inbuf[..self.in_end], at, at + HEADER_LEN);
        self.inbuf = inbuf;
        let Some((end, n)) = opened? else {
            return Ok(false);
        };
        self.in_start = end;
        self.plain = at + HEADER_LEN..at + HEADER_LEN + n;
        self.direct_stalled = false;
        Ok(true)
    }

    /// Opens the record at `region[at..]` if it is complete, writing its content to
    /// `region[to..]` (`to` at most the body's start: in place, or moved back over headers and
    /// tags already consumed). Returns where the record ended and how much application data
    /// is now at `to` (none for a post-handshake message or alert, both handled here), or
    /// `None` while the record is incomplete.
    fn open_record(
        &mut self,
        region: &mut [u8],
        at: usize,
        to: usize,
    ) -> Result<Option<(usize, usize)>, io::Error> {
        let available = region.len().saturating_sub(at);
        if available < HEADER_LEN {
            return Ok(None);
        }
        let header: [u8; HEADER_LEN] = region[at..at + HEADER_LEN]
            .try_into()
            .map_err(|_| record_error(RecordError::BadMac))?;
        let len = body_len(&header).map_err(record_error)?;
        if available < HEADER_LEN + len {
            return Ok(None);
        }
        let end = at + HEADER_LEN + len;
        let (content, n) = self
            .rx
            .open_within(&header, &mut region[to..end], at + HEADER_LEN - to)
            .map_err(record_error)?;
        let content_range = to..to + n;
        match content {
            Content::ApplicationData => {
                if !self.post_handshake.is_empty() {
                    return Err(unexpected("application data inside a handshake message"));
                }
                if n > 0 {
                    self.key_updates_in_a_row = 0;
                }
                return Ok(Some((end, n)));
            }
            Content::Handshake => {
                if n == 0 {
                    return Err(unexpected("empty handshake record"));
                }
                let bytes = region[content_range].to_vec();
                self.post_handshake_bytes(&bytes)?;
            }
            Content::Alert => match &region[content_range] {
                [_, CLOSE_NOTIFY] => self.read = ReadState::Closed,
                [level, description] => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("peer sent TLS alert {description} (level {level})"),
                    ));
                }
                _ => return Err(refused(DECODE_ERROR, "malformed TLS alert")),
            },
        }
        Ok(Some((end, 0)))
    }

    fn post_handshake_bytes(&mut self, bytes: &[u8]) -> Result<(), io::Error> {
        self.post_handshake.extend_from_slice(bytes);
        loop {
            let Some(&[typ, a, b, c]) = self.post_handshake.get(..4) else {
                return Ok(());
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            if len > MAX_POST_HANDSHAKE_MESSAGE {
                return Err(unexpected("post-handshake message too large"));
            }
            if self.post_handshake.len() < 4 + len {
                return Ok(());
            }
            let message: Vec<u8> = self.post_handshake.drain(..4 + len).collect();
            let body = &message[4..];
            match (typ, &self.kernel) {
                (KEY_UPDATE, _) => {
                    let request = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(refused(DECODE_ERROR, "malformed KeyUpdate")),
                    };
                    // The new key starts at the next record: nothing may follow in this one
                    // (records are opened one at a time, so anything after it is still here).
                    if !self.post_handshake.is_empty() {
                        return Err(unexpected("KeyUpdate not at the end of its record"));
                    }
                    self.key_updates_in_a_row += 1;
                    if self.key_updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                        return Err(unexpected("too many KeyUpdates without application data"));
                    }
                    if request && self.pending_out() > TLS_SEND_BUFFER + KEY_UPDATE_ANSWER_ROOM {
                        return Err(unexpected(
                            "KeyUpdate requests faster than their answers are read",
                        ));
                    }
                    let (seq, secrets) = self
                        .kernel
                        .next_rx()
                        .map_err(|e| refused(INTERNAL_ERROR, e))?;
                    self.rx = RecordKey::new(seq, secrets).map_err(record_error)?;
                    if request {
                        self.seal_staged_record()?;
                        self.send_key_update(false)?;
                    }
                }
                (NEW_SESSION_TICKET, Kernel::Client(_)) => {
                    if let Kernel::Client(k) = &mut self.kernel {
                        k.handle_new_session_ticket(body)
                            .map_err(|e| refused(DECODE_ERROR, e))?;
                    }
                }
                _ => return Err(unexpected("unexpected post-handshake message")),
            }
        }
    }

    /// Copies decrypted content into `buf`; returns how much.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let mut copied = 0;
        if self.early_pos < self.early.len() {
            let n = buf.remaining().min(self.early.len() - self.early_pos);
            buf.put_slice(&self.early[self.early_pos..self.early_pos + n]);
            self.early_pos += n;
            copied += n;
            if self.early_pos == self.early.len() {
                self.early = Vec::new();
                self.early_pos = 0;
            }
        }
        if !self.plain.is_empty() && buf.remaining() > 0 {
            let n = buf.remaining().min(self.plain.len());
            buf.put_slice(&self.inbuf[self.plain.start..self.plain.start + n]);
            self.plain.start += n;
            copied += n;
        }
        copied
    }

    // === send ===

    fn pending_out(&self) -> usize {
        self.staged.unwrap_or(self.out.len()) - self.out_pos
    }

    /// Seals the record still gathering plaintext, if any.
    fn seal_staged_record(&mut self) -> Result<(), io::Error> {
        if let Some(start) = self.staged.take() {
            self.tx
                .seal_staged(Content::ApplicationData, &mut self.out, start)
                .map_err(record_error)?;
        }
        Ok(())
    }

    /// Sends a KeyUpdate under the current key (asking the peer to update too if `request`)
    /// and switches to the next key.
    fn send_key_update(&mut self, request: bool) -> Result<(), io::Error> {
        debug_assert!(self.staged.is_none());
        self.tx
            .seal(
                Content::Handshake,
                &[KEY_UPDATE, 0, 0, 1, u8::from(request)],
                &mut self.out,
            )
            .map_err(record_error)?;
        let (seq, secrets) = self.kernel.next_tx().map_err(tls_error)?;
        self.tx = RecordKey::new(seq, secrets).map_err(record_error)?;
        Ok(())
    }

    /// Encrypts as much of `data` as `room` allows into `out`; returns how much.
    fn encrypt(&mut self, mut data: &[u8], mut room: usize) -> Result<usize, io::Error> {
        let mut taken = 0;
        while !data.is_empty() && room > 0 {
            if let Some(start) = self.staged {
                let have = self.out.len() - start - HEADER_LEN;
                let n = (MAX_PLAINTEXT - have).min(data.len()).min(room);
                self.out.extend_from_slice(&data[..n]);
                (data, taken, room) = (&data[n..], taken + n, room - n);
                if have + n == MAX_PLAINTEXT {
                    self.seal_staged_record()?;
                }
                continue;
            }
            if self.tx.seq() >= self.tx_limit {
                self.send_key_update(false)?;
            }
            if data.len() >= MAX_PLAINTEXT && room >= MAX_PLAINTEXT {
                self.tx
                    .seal(
                        Content::ApplicationData,
                        &data[..MAX_PLAINTEXT],
                        &mut self.out,
                    )
                    .map_err(record_error)?;
                (data, taken, room) = (
                    &data[MAX_PLAINTEXT..],
                    taken + MAX_PLAINTEXT,
                    room - MAX_PLAINTEXT,
                );
            } else {
                self.staged = Some(self.out.len());
                self.out.extend_from_slice(&[0; HEADER_LEN]);
            }
        }
        Ok(taken)
    }

    fn fail_write(&mut self, e: io::Error) -> io::Error {
        self.write_error = Some((e.kind(), e.to_string()));
        e
    }
}

#[path = "tls_alert.rs"]
mod alert;
#[path = "tls_io.rs"]
mod io_impl;

pub(super) use alert::tls_error;
use alert::{DECODE_ERROR, INTERNAL_ERROR, alert_of, record_error, refused, unexpected};

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
