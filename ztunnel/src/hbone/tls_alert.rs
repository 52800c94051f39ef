//! The errors of [`super`]'s TLS layer: a rustls error in words, and a refused record with
//! the fatal alert RFC 8446 names for it.

use std::io;

use super::RecordError;

/// A rustls error as an I/O error. A certificate our verifier refused says why in its own
/// words ("trust domain … is not federated …"): rustls would print it with `Debug`.
pub(in crate::hbone) fn tls_error(e: rustls::Error) -> io::Error {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(why)) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("invalid peer certificate: {why}"),
        ),
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

// Alerts sent before closing on a refused record (RFC 8446 §6).
pub(super) const UNEXPECTED_MESSAGE: u8 = 10;
pub(super) const BAD_RECORD_MAC: u8 = 20;
pub(super) const RECORD_OVERFLOW: u8 = 22;
pub(super) const DECODE_ERROR: u8 = 50;
pub(super) const INTERNAL_ERROR: u8 = 80;

/// Why a record from the peer was refused, and the alert that says so.
#[derive(Debug)]
struct Refusal {
    alert: u8,
    reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Refusal {}

pub(super) fn refused(alert: u8, reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        Refusal {
            alert,
            reason: reason.to_string(),
        },
    )
}

/// The alert an error carries, if it refused a record.
pub(super) fn alert_of(e: &io::Error) -> Option<u8> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Refusal>())
        .map(|r| r.alert)
}

pub(super) fn record_error(e: RecordError) -> io::Error {
    let alert = match e {
        RecordError::BadMac => BAD_RECORD_MAC,
        RecordError::Overflow(_) => RECORD_OVERFLOW,
        RecordError::OuterType(_) | RecordError::InnerType => UNEXPECTED_MESSAGE,
        RecordError::SequenceExhausted | RecordError::UnsupportedSuite => INTERNAL_ERROR,
    };
    refused(alert, e)
}

pub(super) fn unexpected(what: &'static str) -> io::Error {
    refused(UNEXPECTED_MESSAGE, what)
}
