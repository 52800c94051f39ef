//! The last good bundle of each federated trust domain, kept in the controller's state
//! directory (`<state>/federation/<trust domain>.json`, 0600 in a 0700 directory), so a
//! controller restarted while a peer's bundle endpoint is unreachable resumes with the bundle
//! it last fetched — and that bundle's `spiffe_sequence`, so a replayed older document is
//! still refused — instead of falling back to the bootstrap bundle, which a peer that has
//! rotated its root no longer matches.
//!
//! A record is bound to the federation's trust settings (trust domain, endpoint URL and
//! SPIFFE ID, bootstrap bundle): when an operator changes any of them the record is not
//! used, and the bootstrap bundle is in force until the first fetch, as for a new federation.
//! A record that cannot be read or parsed is ignored with a log line (never trusted in part);
//! a failed write is logged and the bundle held in memory is unaffected.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use membrane_identity::{TrustBundle, TrustDomain};
use serde::{Deserialize, Serialize};

use super::spec::TrustFederation;
use crate::fsutil;

/// Version of the record format.
const FORMAT: u32 = 1;
/// Largest record read (a bundle holds a few roots).
const MAX_RECORD: u64 = 1 << 20;

/// Why a record could not be used or kept.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    File(#[from] fsutil::FileError),
    /// The file is not a record this controller wrote.
    #[error("{path}: not a federated bundle record: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// A bundle restored from disk.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The roots last fetched.
    pub bundle: TrustBundle,
    /// Their `spiffe_sequence`, when the peer gave one.
    pub sequence: Option<u64>,
    /// How long ago they were fetched (or last confirmed by a fetch).
    pub age: Duration,
}

/// What is written for one trust domain.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    format: u32,
    /// [`trust_fingerprint`] of the federation that fetched the bundle.
    trust: String,
    sequence: Option<u64>,
    /// Seconds since the Unix epoch of the fetch.
    fetched_unix: u64,
    /// The roots, PEM.
    roots_pem: String,
}

/// Where the records live ([`Store::default`] keeps nothing on disk).
#[derive(Debug, Clone, Default)]
pub struct Store {
    dir: Option<PathBuf>,
}

impl Store {
    /// Records under `<state_dir>/federation`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: Some(state_dir.join("federation")),
        }
    }

    fn path(&self, td: &TrustDomain) -> Option<PathBuf> {
        // Trust domain names are lower-case letters, digits, `.`, `-` and `_`: a file name.
        Some(self.dir.as_ref()?.join(format!("{td}.json")))
    }

    /// The bundle last fetched for `fed`, if a record of the same trust settings exists.
    pub fn load(&self, fed: &TrustFederation) -> Result<Option<Restored>, PersistError> {
        let Some(path) = self.path(&fed.trust_domain) else {
            return Ok(None);
        };
        let bytes = match read_bounded(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(fsutil::FileError::at(&path)(e).into()),
        };
        let corrupt = |message: String| PersistError::Corrupt {
            path: path.clone(),
            message,
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if record.format != FORMAT {
            return Err(corrupt(format!("format {}", record.format)));
        }
        if record.trust != trust_fingerprint(fed) {
            tracing::info!(trust_domain = %fed.trust_domain, path = %path.display(), "the federation's trust settings changed since its bundle was saved; the saved bundle is not used");
            return Ok(None);
        }
        let bundle = TrustBundle::from_pem(fed.trust_domain.clone(), record.roots_pem.as_bytes())
            .map_err(|e| corrupt(e.to_string()))?;
        let now = unix_now();
        Ok(Some(Restored {
            bundle,
            sequence: record.sequence,
            age: Duration::from_secs(now.saturating_sub(record.fetched_unix)),
        }))
    }

    /// Saves `bundle` (fetched now, with `sequence`) as `fed`'s last good bundle.
    pub fn save(
        &self,
        fed: &TrustFederation,
        bundle: &TrustBundle,
        sequence: Option<u64>,
    ) -> Result<(), PersistError> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.path(&fed.trust_domain)) else {
            return Ok(());
        };
        fsutil::ensure_private_dir(dir).map_err(fsutil::FileError::at(dir))?;
        let record = Record {
            format: FORMAT,
            trust: trust_fingerprint(fed),
            sequence,
            fetched_unix: unix_now(),
            roots_pem: bundle.to_pem(),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| PersistError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        fsutil::write_atomic(&path, &json, 0o600).map_err(fsutil::FileError::at(&path))?;
        Ok(())
    }

    /// Forgets `td`'s record (its federation is gone or no longer trusts the same way).
    pub fn remove(&self, td: &TrustDomain) {
        let Some(path) = self.path(td) else {
            return;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(trust_domain = %td, "saved federated bundle removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(trust_domain = %td, path = %path.display(), error = %e, "cannot remove the saved federated bundle")
            }
        }
    }

    /// Removes the records of trust domains not in `keep` (federations deleted while the
    /// controller was down).
    pub fn retain(&self, keep: &[&TrustDomain]) {
        let Some(dir) = self.dir.as_ref() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(td) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if keep.iter().any(|k| k.to_string() == td) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(trust_domain = %td, "no federation names this trust domain any more; its saved bundle is removed")
                }
                Err(e) => {
                    tracing::warn!(trust_domain = %td, error = %e, "cannot remove a saved federated bundle")
                }
            }
        }
    }
}

/// Reads at most [`MAX_RECORD`] bytes of `path` (a larger file is refused as corrupt).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_RECORD + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_RECORD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "record larger than 1 MiB",
        ));
    }
    Ok(bytes)
}

/// SHA-256 over the settings that decide what a federation trusts, hex.
fn trust_fingerprint(fed: &TrustFederation) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        fed.trust_domain.to_string(),
        fed.url.to_string(),
        fed.endpoint_id.to_string(),
        fed.bootstrap.to_pem(),
    ] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    ctx.finish()
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[path = "persist_tests.rs"]
mod tests;
