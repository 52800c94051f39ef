//! Replacing a plug-in CA's intermediate while the controller runs.
//!
//! The operator replaces the files of `--plugin-ca-dir` (a new `ca-cert.pem`/`ca-key.pem`,
//! and `cert-chain.pem` if used) under the *same* `root-cert.pem`. The controller checks the
//! directory every [`POLL`]; a changed directory is loaded and self-checked like at start
//! (the key must match, a probe leaf must verify against the root), and only then does
//! signing switch to it, and the serving certificate is re-issued under it. The trust bundle
//! does not change, so every ztunnel keeps verifying old and new leaves alike: nothing is
//! dropped. Half-written or inconsistent material is refused with a log line and a metric,
//! and the previous material keeps signing. A different root is refused the same way: trust
//! in a new root must be distributed first (the self-managed root's `rotate-root` does that).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use membrane_identity::TrustDomain;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::authority::SigningAuthority;
use crate::signer::Signer;

/// How often the plug-in directory is checked.
pub const POLL: Duration = Duration::from_secs(1);

const FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];

/// Labels of a reload counter (this one's, and the token file's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied`, `invalid` or `root_changed` here; `applied` or `refused` for the token file.
    pub result: &'static str,
}

/// Plug-in reload metrics.
#[derive(Debug, Clone, Default)]
pub struct PluginMetrics {
    reloads: Family<ReloadLabels, Counter>,
}

impl PluginMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "plugin_ca_reloads",
            "Changes of the plug-in CA directory, by result (applied, invalid, root_changed)",
            m.reloads.clone(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(dir: &std::path::Path) -> Stamp {
    FILES
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Watches a plug-in CA directory.
pub struct PluginReloader {
    /// The directory.
    pub dir: PathBuf,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The signer every service uses.
    pub signer: Signer,
    /// Called after signing switched (re-issues the serving certificate).
    pub on_switch: Arc<dyn Fn() + Send + Sync>,
    /// Metrics.
    pub metrics: PluginMetrics,
}

impl std::fmt::Debug for PluginReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginReloader")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PluginReloader {
    /// Tries the directory's current contents; returns the result label.
    pub fn reload(&self) -> &'static str {
        let fresh = match SigningAuthority::load_plugin(&self.dir, &self.trust_domain) {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "plug-in CA change refused; the previous CA keeps signing");
                return "invalid";
            }
        };
        if *fresh.bundle() != self.signer.bundle() {
            tracing::error!(
                dir = %self.dir.display(),
                "plug-in CA change refused: root-cert.pem changed; only the intermediate can be replaced in place (distribute trust in a new root first)"
            );
            return "root_changed";
        }
        self.signer.replace(fresh);
        (self.on_switch)();
        tracing::info!(dir = %self.dir.display(), "plug-in CA replaced; signing with the new intermediate");
        "applied"
    }

    /// Checks the directory every [`POLL`] until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut last = stamp(&self.dir);
        let mut ticker = tokio::time::interval(POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = stamp(&self.dir);
            if now == last {
                continue;
            }
            // Let a multi-file replacement settle before reading it.
            tokio::time::sleep(POLL / 4).await;
            last = stamp(&self.dir);
            let result = self.reload();
            self.metrics.count(result);
        }
    }
}
