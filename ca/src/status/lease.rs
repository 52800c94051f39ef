//! A `coordination.k8s.io/v1` Lease as a lock, the way client-go's leader election uses it.
//!
//! Expiry is judged on the local clock, never on the holder's timestamps: a replica that sees
//! another holder notes *when it first saw* the current lease record and takes the Lease only
//! once that record has not changed for the holder's `leaseDurationSeconds`. Every write is an
//! optimistic update (the `resourceVersion` read), so two replicas cannot both win. A holder
//! that cannot renew keeps acting as holder only until its last successful renewal is
//! two thirds of a lease duration old, well before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

use super::StatusConfig;

/// The record a replica last saw, and when it first saw it.
#[derive(Debug)]
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<String>),
    since: Instant,
}

/// A Lease held (or wanted) by this replica.
#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    observed: Option<Observed>,
    renewed: Option<Instant>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    /// The Lease named in `config`.
    pub fn new(client: Client, config: &StatusConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.lease_namespace),
            name: config.lease_name.clone(),
            identity: config.identity.clone(),
            duration: config.lease_duration,
            observed: None,
            renewed: None,
        }
    }

    /// Takes or renews the Lease; `true` while this replica holds it.
    pub async fn try_acquire_or_renew(&mut self) -> bool {
        match self.attempt().await {
            Ok(held) => {
                self.renewed = held.then(Instant::now);
                held
            }
            Err(e) => {
                // Keep acting as holder for a while: nobody else may take over before the
                // full lease duration has passed without a renewal.
                let grace = self.duration * 2 / 3;
                let still = self.renewed.is_some_and(|at| at.elapsed() < grace);
                tracing::warn!(
                    lease = %self.name,
                    error = %e,
                    still_holder = still,
                    "cannot take or renew the status Lease"
                );
                if !still {
                    self.renewed = None;
                }
                still
            }
        }
    }

    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (
            spec.holder_identity,
            spec.renew_time,
            lease.metadata.resource_version.clone(),
        );
        if self.observed.as_ref().is_none_or(|o| o.record != record) {
            self.observed = Some(Observed {
                record,
                since: Instant::now(),
            });
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    async fn attempt(&mut self) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(&lease);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if let Some(holder) = &holder
            && !ours
        {
            let theirs = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            let since = self
                .observed
                .as_ref()
                .map_or_else(Instant::now, |o| o.since);
            if since.elapsed() < theirs {
                tracing::debug!(lease = %self.name, holder, "status Lease held by another replica");
                return Ok(false);
            }
            tracing::info!(lease = %self.name, previous = holder, "status Lease expired; taking it");
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mut next = lease;
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_secs()),
            acquire_time: if ours { spec.acquire_time } else { Some(now()) },
            renew_time: Some(now()),
            lease_transitions: Some(if ours {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        });
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(updated) => {
                self.observe(&updated);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (best effort, bounded), so another replica need not wait for it to
    /// expire.
    pub async fn release(&mut self) {
        let release = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(2), release).await {
            Ok(Ok(())) => tracing::info!(lease = %self.name, "status Lease released"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.name, error = %e, "cannot release the status Lease");
            }
            Err(_) => tracing::warn!(lease = %self.name, "releasing the status Lease timed out"),
        }
        self.renewed = None;
    }
}
