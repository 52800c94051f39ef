//! The bootstrap token file (directory mode), reloaded while the controller runs.
//!
//! Removing a node's line is how an operator takes a node's credential away, so the file is
//! polled like the source directory (size, mtime and inode, every `--reload-interval`) and a
//! change that parses replaces the tokens in force at once: new calls with a removed token
//! are refused, and open discovery streams end at their next credential check
//! ([`crate::discovery`]). A change that does not parse (or a file that vanished) changes
//! nothing — the last good tokens stay — and is logged and counted in
//! `membrane_ca_token_file_reloads_total{result="refused"}`; applied ones count as
//! `result="applied"`. Edit the file by writing a new one and renaming it over the old (as
//! a ConfigMap or Secret volume does): a file truncated and rewritten in place may be read
//! half-written, and a half that parses is put in force until the next poll.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::node_auth::BootstrapTokens;
use crate::plugin_reload::ReloadLabels;

/// The bootstrap tokens in force, replaceable while calls look them up.
#[derive(Debug, Clone, Default)]
pub struct TokenSet(Arc<Mutex<Arc<BootstrapTokens>>>);

impl TokenSet {
    /// Tokens in force from the start.
    pub fn new(tokens: BootstrapTokens) -> Self {
        Self(Arc::new(Mutex::new(Arc::new(tokens))))
    }

    /// The tokens in force now.
    pub fn current(&self) -> Arc<BootstrapTokens> {
        membrane_runtime::lock(&self.0).clone()
    }

    /// Puts `tokens` in force.
    pub fn replace(&self, tokens: BootstrapTokens) {
        *membrane_runtime::lock(&self.0) = Arc::new(tokens);
    }
}

/// `membrane_ca_token_file_reloads_total{result}`.
#[derive(Debug, Clone, Default)]
pub struct TokenFileMetrics {
    reloads: Family<ReloadLabels, Counter>,
}

impl TokenFileMetrics {
    /// Registers the metric.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "token_file_reloads",
            "Changes of the bootstrap token file: applied, or refused (unreadable or invalid; the last good tokens stay)",
            m.reloads.clone(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}

/// What identifies one version of the file without reading it.
type Signature = (u64, Option<SystemTime>, u64);

fn signature(path: &Path) -> std::io::Result<Signature> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.len(), meta.modified().ok(), meta.ino()))
}

/// Polls `path` every `interval` until `cancel` fires and puts each valid change in force in
/// `tokens`.
pub async fn watch(
    path: PathBuf,
    tokens: TokenSet,
    interval: Duration,
    metrics: TokenFileMetrics,
    cancel: CancellationToken,
) {
    // Compared from the first tick: a change between the load at start and now is seen.
    let mut seen: Option<Signature> = None;
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(50)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = signature(&path);
        let changed = match (&now, &seen) {
            (Ok(now), Some(seen)) => now != seen,
            (Ok(_), None) => true,
            // Gone or unreadable: reported once, when it first happens.
            (Err(_), None) => false,
            (Err(_), Some(_)) => true,
        };
        if !changed {
            continue;
        }
        seen = now.as_ref().ok().copied();
        match BootstrapTokens::load(&path) {
            Ok(loaded) if loaded == *tokens.current() => {}
            Ok(loaded) => {
                let nodes = loaded.len();
                tokens.replace(loaded);
                metrics.count("applied");
                tracing::info!(path = %path.display(), nodes, "bootstrap token file reloaded");
            }
            Err(e) => {
                metrics.count("refused");
                tracing::warn!(path = %path.display(), error = %e, "bootstrap token file change refused; the last good tokens stay in force");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "node-a aaaaaaaaaaaaaaaaaaaa\n";
    const AB: &str = "node-a aaaaaaaaaaaaaaaaaaaa\nnode-b bbbbbbbbbbbbbbbbbbbb\n";

    async fn until(what: impl Fn() -> bool) -> bool {
        for _ in 0..200 {
            if what() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_valid_change_applies_and_an_invalid_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, AB).expect("write");
        let tokens = TokenSet::new(BootstrapTokens::load(&path).expect("valid"));
        let metrics = TokenFileMetrics::default();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(watch(
            path.clone(),
            tokens.clone(),
            Duration::from_millis(50),
            metrics.clone(),
            cancel.clone(),
        ));
        let b = "bbbbbbbbbbbbbbbbbbbb";
        assert_eq!(tokens.current().node_for(b), Some("node-b"));
        // node-b's line removed: its token is refused from then on.
        std::fs::write(&path, A).expect("write");
        assert!(until(|| tokens.current().node_for(b).is_none()).await);
        // A broken edit, then the file removed: node-a's token stays good.
        std::fs::write(&path, "node-a short\n").expect("write");
        let refused = || {
            metrics
                .reloads
                .get_or_create(&ReloadLabels { result: "refused" })
                .get()
        };
        assert!(until(|| refused() == 1).await);
        std::fs::remove_file(&path).expect("remove");
        assert!(until(|| refused() == 2).await);
        assert_eq!(
            tokens.current().node_for("aaaaaaaaaaaaaaaaaaaa"),
            Some("node-a")
        );
        cancel.cancel();
        task.await.expect("watch ends");
    }
}
