//! Key exchange: which groups every TLS session Membrane opens or serves offers, hybrid
//! post-quantum first.
//!
//! The provider is aws-lc-rs (it has ML-KEM; ring has not). `X25519MLKEM768` is the hybrid
//! group Istio's ztunnel offers in its post-quantum mode and Linkerd uses by default; a peer
//! that lacks it falls back to X25519 unless the operator chose [`KeyExchange::PqOnly`].
//! Whatever the choice, the cipher suites and signature schemes are the provider's defaults
//! (TLS 1.3 AES-GCM and ChaCha20-Poly1305; ECDSA P-256 SVIDs).
//!
//! The choice is process-wide: a binary sets it once at start ([`set_key_exchange`]) and every
//! configuration built through [`crate::crypto_provider`] afterwards follows it. Fixing it
//! also installs its provider as rustls' process default, which libraries that build their
//! own TLS (the Kubernetes client) use: a process must fix it (or call [`key_exchange`])
//! before it creates such a client.

use std::sync::{Arc, OnceLock};

use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};

/// Which key-exchange groups TLS offers and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyExchange {
    /// `X25519MLKEM768` preferred, then X25519, P-256 and P-384 for peers without it.
    #[default]
    PqPreferred,
    /// `X25519MLKEM768` only: a peer without it cannot complete a handshake.
    PqOnly,
    /// X25519, P-256 and P-384 only (no post-quantum group is offered or accepted).
    Classical,
}

impl KeyExchange {
    /// Every choice, in the spelling of [`KeyExchange::as_str`].
    pub const ALL: [KeyExchange; 3] = [Self::PqPreferred, Self::PqOnly, Self::Classical];

    /// The operator's spelling: `pq-preferred`, `pq-only` or `classical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PqPreferred => "pq-preferred",
            Self::PqOnly => "pq-only",
            Self::Classical => "classical",
        }
    }

    /// The groups offered, most preferred first.
    pub fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        let classical = [kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
        match self {
            Self::PqPreferred => std::iter::once(kx_group::X25519MLKEM768)
                .chain(classical)
                .collect(),
            Self::PqOnly => vec![kx_group::X25519MLKEM768],
            Self::Classical => classical.to_vec(),
        }
    }

    /// The provider every TLS configuration with this choice is built on.
    pub fn provider(self) -> CryptoProvider {
        CryptoProvider {
            kx_groups: self.groups(),
            ..aws_lc_rs::default_provider()
        }
    }
}

impl std::fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--tls-kx` value that is none of the three choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key exchange {0:?}: expected pq-preferred, pq-only or classical")]
pub struct UnknownKeyExchange(pub String);

impl std::str::FromStr for KeyExchange {
    type Err = UnknownKeyExchange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kx| kx.as_str() == s)
            .ok_or_else(|| UnknownKeyExchange(s.to_string()))
    }
}

/// The process-wide choice and its provider, fixed by the first [`set_key_exchange`] or
/// [`key_exchange`] call.
static CHOICE: OnceLock<(KeyExchange, Arc<CryptoProvider>)> = OnceLock::new();

/// Fixes the choice and installs its provider as rustls' process default too, for the
/// libraries that build their own configurations without naming a provider (with two
/// providers compiled in, rustls cannot pick one itself and would panic).
fn choice(kx: KeyExchange) -> (KeyExchange, Arc<CryptoProvider>) {
    let provider = Arc::new(kx.provider());
    // An error means another default was installed first; it stays.
    let _ = CryptoProvider::install_default(kx.provider());
    (kx, provider)
}

/// Fixes the process-wide key exchange. Returns `false` (and changes nothing) if it was
/// already fixed, by an earlier call or by a configuration built before this one.
pub fn set_key_exchange(kx: KeyExchange) -> bool {
    let mut fresh = false;
    let fixed = CHOICE.get_or_init(|| {
        fresh = true;
        choice(kx)
    });
    fresh || fixed.0 == kx
}

/// The process-wide key exchange ([`KeyExchange::PqPreferred`] unless set).
pub fn key_exchange() -> KeyExchange {
    CHOICE.get_or_init(|| choice(KeyExchange::default())).0
}

/// The provider of the process-wide key exchange.
pub(crate) fn process_provider() -> Arc<CryptoProvider> {
    CHOICE
        .get_or_init(|| choice(KeyExchange::default()))
        .1
        .clone()
}

/// The name of the group a finished handshake agreed on (`X25519MLKEM768`, `X25519`, …), if
/// any: what logs and tests report.
pub fn negotiated_group(conn: &rustls::CommonState) -> Option<String> {
    conn.negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for kx in KeyExchange::ALL {
            assert_eq!(kx.as_str().parse::<KeyExchange>(), Ok(kx));
        }
        let err = "pq".parse::<KeyExchange>().expect_err("unknown");
        assert!(err.to_string().contains("pq-preferred"), "{err}");
    }

    #[test]
    fn groups_follow_the_choice() {
        let names = |kx: KeyExchange| {
            kx.groups()
                .iter()
                .map(|g| format!("{:?}", g.name()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(KeyExchange::PqPreferred)[0], "X25519MLKEM768");
        assert!(names(KeyExchange::PqPreferred).contains(&"X25519".to_string()));
        assert_eq!(names(KeyExchange::PqOnly), ["X25519MLKEM768"]);
        assert!(
            !names(KeyExchange::Classical)
                .iter()
                .any(|n| n.contains("MLKEM"))
        );
    }
}
