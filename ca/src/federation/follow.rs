//! One federation's bundle fetcher: fetches at the peer's refresh hint, keeps the last good
//! bundle (held, published, saved), and never commits once its federation is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use membrane_identity::{TrustBundle, TrustDomain};
use tokio::sync::watch;

use super::{
    DEFAULT_REFRESH, FederationMetrics, FetchLabels, Held, HeldMap, REFRESH_BOUNDS, RETRY_BOUNDS,
    SAVE_INTERVAL, TrustDomainLabels, TrustFederation, fetch, persist, publish,
};

/// One federation's fetcher: what it fetches for, where it keeps and publishes the result.
pub(super) struct Fetcher {
    /// The federation.
    pub fed: TrustFederation,
    /// The bundles held, by trust domain.
    pub held: HeldMap,
    /// Cleared (under `held`'s lock) when the federation goes: nothing is committed after.
    pub alive: Arc<AtomicBool>,
    /// Where the bundles held are published.
    pub out: watch::Sender<Arc<Vec<TrustBundle>>>,
    /// Where the last good bundle is kept across restarts.
    pub store: persist::Store,
    /// Fetch outcomes, sequence, store errors.
    pub metrics: FederationMetrics,
}

/// Makes `bundle` the one held for `td`, unless `alive` was cleared: checked under the lock
/// the removal of the federation clears it under, so a fetch that completes as its
/// federation goes never puts the removed trust domain's bundle back. Whether it was
/// committed.
fn commit(held: &HeldMap, alive: &AtomicBool, td: &TrustDomain, bundle: Held) -> bool {
    let mut held = membrane_runtime::lock(held);
    if !alive.load(Ordering::Acquire) {
        return false;
    }
    held.insert(td.clone(), bundle);
    true
}

/// Fetches one federation's bundle at its refresh hint, forever (the task is aborted when the
/// federation goes away, and its flag cleared first: see [`commit`]).
pub(super) async fn follow(fetcher: Fetcher) {
    let Fetcher {
        fed,
        held,
        alive,
        out,
        store,
        metrics,
    } = fetcher;
    let td = fed.trust_domain.to_string();
    let mut retry = RETRY_BOUNDS.0;
    let mut saved_at: Option<Instant> = None;
    loop {
        let Some(current) = membrane_runtime::lock(&held)
            .get(&fed.trust_domain)
            .cloned()
        else {
            return;
        };
        let wait = match fetch::fetch(&fed, &current.bundle, current.sequence).await {
            Ok(fetched) => {
                metrics
                    .fetches
                    .get_or_create(&FetchLabels {
                        trust_domain: td.clone(),
                        result: "ok",
                    })
                    .inc();
                if let Some(seq) = fetched.sequence {
                    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                    metrics
                        .sequence
                        .get_or_create(&TrustDomainLabels {
                            trust_domain: td.clone(),
                        })
                        .set(seq);
                }
                let changed = fetched.bundle != current.bundle;
                if changed {
                    tracing::info!(trust_domain = %td, roots = fetched.bundle.roots().len(), sequence = ?fetched.sequence, "federated trust bundle changed");
                }
                let sequence = fetched.sequence.or(current.sequence);
                // Saved when it changed, else at most once a minute (the age a restart
                // resumes with is that fresh).
                // (Not for a federation already gone: its record was deleted; one written
                // while it goes is deleted at the next start, as its trust domain is no
                // longer named.)
                if alive.load(Ordering::Acquire)
                    && (changed
                        || sequence != current.sequence
                        || saved_at.is_none_or(|at| at.elapsed() >= SAVE_INTERVAL))
                {
                    // Off the runtime's threads: the write is synced to disk.
                    let (store, saving, bundle) =
                        (store.clone(), fed.clone(), fetched.bundle.clone());
                    let saved =
                        tokio::task::spawn_blocking(move || store.save(&saving, &bundle, sequence))
                            .await;
                    match saved {
                        Ok(Ok(())) => saved_at = Some(Instant::now()),
                        Ok(Err(e)) => {
                            metrics.store_error(&fed.trust_domain, "save");
                            tracing::warn!(trust_domain = %td, error = %e, "cannot save the federated bundle; a restart would start from an older one")
                        }
                        Err(e) => {
                            metrics.store_error(&fed.trust_domain, "save");
                            tracing::warn!(trust_domain = %td, error = %e, "saving the federated bundle failed")
                        }
                    }
                }
                let fresh = Held {
                    bundle: fetched.bundle,
                    sequence,
                    since: Instant::now(),
                };
                if !commit(&held, &alive, &fed.trust_domain, fresh) {
                    tracing::debug!(trust_domain = %td, "federation removed while fetching; the fetched bundle is dropped");
                    return;
                }
                publish(&held, &out);
                retry = RETRY_BOUNDS.0;
                fetched
                    .refresh_hint
                    .unwrap_or(DEFAULT_REFRESH)
                    .clamp(REFRESH_BOUNDS.0, REFRESH_BOUNDS.1)
            }
            Err(e) => {
                let result = match &e {
                    fetch::FetchError::Connect { .. } => "connect",
                    fetch::FetchError::Tls { .. } => "tls",
                    fetch::FetchError::Http { .. } => "http",
                    fetch::FetchError::Document { .. } => "document",
                    fetch::FetchError::Rollback { .. } => "rollback",
                    fetch::FetchError::Timeout { .. } => "timeout",
                };
                metrics
                    .fetches
                    .get_or_create(&FetchLabels {
                        trust_domain: td.clone(),
                        result,
                    })
                    .inc();
                tracing::warn!(trust_domain = %td, error = %e, age_s = current.since.elapsed().as_secs(), "federated bundle fetch failed; the last good bundle stays in force");
                let wait = retry;
                retry = (retry * 2).min(RETRY_BOUNDS.1);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn bundle(td: &TrustDomain) -> TrustBundle {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::SigningAuthority::load_or_create(dir.path(), td, std::time::Duration::from_secs(60))
            .expect("root")
            .bundle()
            .clone()
    }

    /// A fetch that completes after its federation was removed (flag cleared) changes
    /// nothing held; while the federation is there, it replaces the bundle.
    #[test]
    fn a_cleared_flag_leaves_the_held_bundles_untouched() {
        let td = membrane_identity::spiffe_id::parse_trust_domain("cluster-b.example").expect("td");
        let other =
            membrane_identity::spiffe_id::parse_trust_domain("cluster-c.example").expect("td");
        let held: HeldMap = Arc::default();
        let entry = |b: TrustBundle, sequence| Held {
            bundle: b,
            sequence: Some(sequence),
            since: Instant::now(),
        };
        let kept = entry(bundle(&other), 1);
        membrane_runtime::lock(&held).insert(other.clone(), kept.clone());
        let alive = AtomicBool::new(true);
        assert!(commit(&held, &alive, &td, entry(bundle(&td), 1)));
        assert_eq!(membrane_runtime::lock(&held).len(), 2);
        // The federation goes: its bundle is removed and the flag cleared.
        membrane_runtime::lock(&held).remove(&td);
        alive.store(false, Ordering::Release);
        let before: BTreeMap<TrustDomain, Held> = membrane_runtime::lock(&held).clone();
        assert!(!commit(&held, &alive, &td, entry(bundle(&td), 2)));
        assert_eq!(*membrane_runtime::lock(&held), before);
        assert_eq!(membrane_runtime::lock(&held).get(&other), Some(&kept));
    }
}
