//! The certificate template every certificate the controller signs starts from: the random
//! serial, the backdate that absorbs clock skew, and a leaf's key usages.
//!
//! Owns only certificate parameters; it must not sign anything nor know where the signing key
//! comes from (that is [`crate::authority`]) or how a request becomes a leaf ([`crate::signer`]).

use std::time::Duration;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType, SerialNumber};
use time::OffsetDateTime;

/// How far `not_before` is set in the past, to absorb clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 octets).
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    // A leading zero octet would be stripped by DER; keep the length fixed.
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn leaf_params(
    sans: Vec<SanType>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> (CertificateParams, String) {
    let serial = random_serial();
    let hex = serial
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(serial);
    params.use_authority_key_identifier_extension = true;
    (params, hex)
}
