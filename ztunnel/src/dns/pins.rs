//! Pins: which name a pod resolved to each address it learned, per pod, until the answer's
//! TTL plus a grace period. The DNS capture writes them before it releases the answer to the
//! pod (so the pod's first SYN always finds its pin); the outbound path reads them for
//! destinations outside the mesh.
//!
//! Bounded per pod (the oldest pin is evicted, counted), persisted in the state directory
//! (written by a background task whenever something changed, and at shutdown) and reloaded
//! at start, dropped when the pod leaves. Times are Unix seconds so that a restarted process
//! reads them back unchanged. One pod's pins are never consulted for another pod.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// The smallest grace period a pin outlives its answer's TTL by.
pub const MIN_GRACE: Duration = Duration::from_secs(30);
/// Names remembered per address (a shared CDN address resolved under several names).
pub const NAMES_PER_ADDRESS: usize = 4;

/// One name an address was learned under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedName {
    /// The name the pod asked for.
    pub name: String,
    /// The CNAME chain of the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cnames: Vec<String>,
    /// Unix seconds after which the pin is gone.
    pub expires: u64,
}

#[derive(Debug, Default)]
struct PodPins {
    /// Address → names (most recent first) and the entry's age stamp.
    by_addr: HashMap<IpAddr, (Vec<PinnedName>, u64)>,
    /// Age stamp → address: the oldest entry is evicted first.
    order: BTreeMap<u64, IpAddr>,
    next: u64,
}

impl PodPins {
    /// Pins `ip` to `name`; returns how many entries were evicted to stay within `max`.
    fn insert(&mut self, ip: IpAddr, pin: PinnedName, max: usize) -> u64 {
        let mut names = self
            .by_addr
            .remove(&ip)
            .map_or_else(Vec::new, |(names, stamp)| {
                self.order.remove(&stamp);
                names
            });
        names.retain(|n| n.name != pin.name && n.expires > 0);
        names.insert(0, pin);
        names.truncate(NAMES_PER_ADDRESS);
        let stamp = self.next;
        self.next += 1;
        self.by_addr.insert(ip, (names, stamp));
        self.order.insert(stamp, ip);
        let mut evicted = 0;
        while self.by_addr.len() > max.max(1) {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_addr.remove(&oldest);
            evicted += 1;
        }
        evicted
    }

    fn expire(&mut self, now: u64) -> usize {
        let before = self.by_addr.len();
        self.by_addr.retain(|_, (names, _)| {
            names.retain(|n| n.expires > now);
            !names.is_empty()
        });
        let live = &self.by_addr;
        self.order.retain(|_, ip| live.contains_key(ip));
        before - self.by_addr.len()
    }
}

/// Pin metrics.
#[derive(Debug, Clone, Default)]
pub struct PinMetrics {
    pins: Gauge,
    evicted: Counter,
    persist_failures: Counter,
}

impl PinMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_pins",
            "Address pins held for enrolled pods",
            m.pins.clone(),
        );
        registry.register(
            "dns_pins_evicted",
            "Pins evicted because their pod reached its pin limit (oldest first)",
            m.evicted.clone(),
        );
        registry.register(
            "dns_pins_persist_failures",
            "Failed writes of the pins file",
            m.persist_failures.clone(),
        );
        m
    }
}

/// Every enrolled pod's pins.
#[derive(Debug)]
pub struct PinTable {
    pods: Mutex<HashMap<String, PodPins>>,
    max_per_pod: usize,
    grace: Duration,
    file: Option<PathBuf>,
    dirty: AtomicBool,
    metrics: PinMetrics,
}

/// The persisted form: pod UID → address → names.
type Saved = BTreeMap<String, BTreeMap<IpAddr, Vec<PinnedName>>>;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PinTable {
    /// A table keeping at most `max_per_pod` addresses per pod, each for its TTL plus `grace`
    /// (at least [`MIN_GRACE`]), persisted to `file` if set.
    pub fn new(
        max_per_pod: usize,
        grace: Duration,
        file: Option<PathBuf>,
        metrics: PinMetrics,
    ) -> Self {
        Self {
            pods: Mutex::new(HashMap::new()),
            max_per_pod: max_per_pod.max(1),
            grace: grace.max(MIN_GRACE),
            file,
            dirty: AtomicBool::new(false),
            metrics,
        }
    }

    /// The pin limit per pod.
    pub fn max_per_pod(&self) -> usize {
        self.max_per_pod
    }

    /// Pins each of `addresses` to `name` (with `cnames`) for pod `uid`, for `ttl` seconds
    /// plus the grace period from `now`. Returns how many were pinned.
    pub fn pin(
        &self,
        uid: &str,
        name: &str,
        cnames: &[String],
        addresses: &[IpAddr],
        ttl: u32,
        now: SystemTime,
    ) -> usize {
        if addresses.is_empty() {
            return 0;
        }
        let expires = unix(now) + u64::from(ttl) + self.grace.as_secs();
        let mut pods = crate::lock(&self.pods);
        let pod = pods.entry(uid.to_owned()).or_default();
        let mut evicted = 0;
        for ip in addresses {
            let pin = PinnedName {
                name: name.to_owned(),
                cnames: cnames.to_vec(),
                expires,
            };
            evicted += pod.insert(*ip, pin, self.max_per_pod);
        }
        drop(pods);
        if evicted > 0 {
            self.metrics.evicted.inc_by(evicted);
            tracing::debug!(uid, evicted, "pins evicted at the pod's limit");
        }
        self.dirty.store(true, Ordering::Relaxed);
        self.update_gauge();
        addresses.len()
    }

    /// The names pod `uid` learned `ip` under (most recent first), if any pin is live at `now`.
    pub fn lookup(&self, uid: &str, ip: IpAddr, now: SystemTime) -> Option<Vec<PinnedName>> {
        let now = unix(now);
        let pods = crate::lock(&self.pods);
        let (names, _) = pods.get(uid)?.by_addr.get(&ip)?;
        let live: Vec<PinnedName> = names.iter().filter(|n| n.expires > now).cloned().collect();
        (!live.is_empty()).then_some(live)
    }

    /// How many addresses pod `uid` has pinned.
    pub fn count(&self, uid: &str) -> usize {
        crate::lock(&self.pods)
            .get(uid)
            .map_or(0, |p| p.by_addr.len())
    }

    /// Each pod's pin count, by UID.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        crate::lock(&self.pods)
            .iter()
            .map(|(uid, p)| (uid.clone(), p.by_addr.len()))
            .collect()
    }

    /// Forgets pod `uid` (it left the node or the mesh).
    pub fn forget(&self, uid: &str) {
        if crate::lock(&self.pods).remove(uid).is_some() {
            self.dirty.store(true, Ordering::Relaxed);
            self.update_gauge();
        }
    }

    /// Drops expired pins; returns how many addresses went.
    pub fn expire(&self, now: SystemTime) -> usize {
        let now = unix(now);
        let mut pods = crate::lock(&self.pods);
        let gone: usize = pods.values_mut().map(|p| p.expire(now)).sum();
        pods.retain(|_, p| !p.by_addr.is_empty());
        drop(pods);
        if gone > 0 {
            self.dirty.store(true, Ordering::Relaxed);
            self.update_gauge();
        }
        gone
    }

    fn update_gauge(&self) {
        let total: usize = crate::lock(&self.pods)
            .values()
            .map(|p| p.by_addr.len())
            .sum();
        self.metrics
            .pins
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// Loads the pins of a previous run (expired ones are dropped). A missing file is not an
    /// error; an unreadable one is logged and ignored.
    pub fn restore(&self, now: SystemTime) {
        let Some(path) = &self.file else { return };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let saved: Saved = match serde_json::from_str(&text) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable pins file");
                return;
            }
        };
        let now_s = unix(now);
        let mut pods = crate::lock(&self.pods);
        let mut restored = 0;
        for (uid, addrs) in saved {
            let pod = pods.entry(uid).or_default();
            for (ip, names) in addrs {
                for pin in names.into_iter().rev().filter(|n| n.expires > now_s) {
                    pod.insert(ip, pin, self.max_per_pod);
                }
            }
            restored += pod.by_addr.len();
        }
        drop(pods);
        self.update_gauge();
        tracing::info!(file = %path.display(), pins = restored, "pins of the previous run loaded");
    }

    /// Writes the table if it changed since the last write.
    pub fn persist(&self) {
        let Some(path) = &self.file else { return };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let saved: Saved = crate::lock(&self.pods)
            .iter()
            .map(|(uid, pod)| {
                let addrs = pod
                    .by_addr
                    .iter()
                    .map(|(ip, (names, _))| (*ip, names.clone()))
                    .collect();
                (uid.clone(), addrs)
            })
            .collect();
        if let Err(e) = write_file(path, &saved) {
            self.dirty.store(true, Ordering::Relaxed);
            self.metrics.persist_failures.inc();
            tracing::warn!(file = %path.display(), error = %e, "cannot write the pins file");
        }
    }
}

fn write_file(path: &Path, saved: &Saved) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(saved).map_err(std::io::Error::other)?;
    // What each pod resolved is the node's business only.
    membrane_runtime::fsutil::write_atomic(path, &bytes, 0o600)
}

/// How often pins are expired and, when changed, written.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Expires and persists the table every [`MAINTENANCE_INTERVAL`] until `cancel` fires, then
/// writes it a last time.
pub async fn maintain(
    table: std::sync::Arc<PinTable>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        table.expire(SystemTime::now());
        let t = table.clone();
        let _ = tokio::task::spawn_blocking(move || t.persist()).await;
    }
    table.persist();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn table(max: usize, file: Option<PathBuf>) -> PinTable {
        PinTable::new(max, MIN_GRACE, file, PinMetrics::default())
    }

    #[test]
    fn pins_are_per_pod_and_expire_after_ttl_plus_grace() {
        let t = table(100, None);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        t.pin(
            "a",
            "s3.example",
            &[],
            &[ip("198.51.100.30"), ip("198.51.100.31")],
            5,
            now,
        );
        let found = t.lookup("a", ip("198.51.100.31"), now).expect("pinned");
        assert_eq!(found[0].name, "s3.example");
        assert!(
            t.lookup("b", ip("198.51.100.31"), now).is_none(),
            "pod B never resolved it"
        );
        let just_before = now + Duration::from_secs(34);
        assert!(t.lookup("a", ip("198.51.100.30"), just_before).is_some());
        let after = now + Duration::from_secs(35);
        assert!(t.lookup("a", ip("198.51.100.30"), after).is_none());
        assert_eq!(t.expire(after), 2);
        assert_eq!(t.count("a"), 0);
    }

    #[test]
    fn the_grace_period_has_a_floor() {
        let t = PinTable::new(10, Duration::from_secs(1), None, PinMetrics::default());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        t.pin("a", "x.example", &[], &[ip("192.0.2.1")], 0, now);
        assert!(
            t.lookup("a", ip("192.0.2.1"), now + Duration::from_secs(29))
                .is_some()
        );
    }

    #[test]
    fn the_oldest_pin_is_evicted_at_the_limit_and_counted() {
        let metrics = PinMetrics::default();
        let t = PinTable::new(3, MIN_GRACE, None, metrics.clone());
        let now = SystemTime::now();
        for i in 1..=5u8 {
            t.pin(
                "a",
                &format!("n{i}.example"),
                &[],
                &[IpAddr::from([192, 0, 2, i])],
                60,
                now,
            );
        }
        assert_eq!(t.count("a"), 3);
        assert_eq!(metrics.evicted.get(), 2);
        assert!(t.lookup("a", ip("192.0.2.1"), now).is_none());
        assert!(t.lookup("a", ip("192.0.2.5"), now).is_some());
        // Refreshing an old pin makes it the newest.
        t.pin("a", "n3.example", &[], &[ip("192.0.2.3")], 60, now);
        t.pin("a", "n6.example", &[], &[ip("192.0.2.6")], 60, now);
        assert!(t.lookup("a", ip("192.0.2.3"), now).is_some());
        assert!(t.lookup("a", ip("192.0.2.4"), now).is_none());
    }

    #[test]
    fn a_shared_address_keeps_each_name_it_was_learned_under() {
        let t = table(10, None);
        let now = SystemTime::now();
        t.pin("a", "one.example", &[], &[ip("192.0.2.9")], 60, now);
        t.pin(
            "a",
            "two.example",
            &["edge.cdn".into()],
            &[ip("192.0.2.9")],
            60,
            now,
        );
        let names = t.lookup("a", ip("192.0.2.9"), now).expect("pinned");
        let names: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["two.example", "one.example"]);
    }

    #[test]
    fn pins_survive_a_restart_and_forgotten_pods_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pins.json");
        let now = SystemTime::now();
        let t = table(10, Some(file.clone()));
        t.pin("a", "huggingface.co", &[], &[ip("198.51.100.10")], 300, now);
        t.pin("b", "paste.example", &[], &[ip("198.51.100.20")], 300, now);
        t.forget("b");
        t.persist();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("saved")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "what pods resolved is readable by root only"
        );
        let again = table(10, Some(file.clone()));
        again.restore(now);
        assert_eq!(
            again.lookup("a", ip("198.51.100.10"), now).expect("kept")[0].name,
            "huggingface.co"
        );
        assert_eq!(again.count("b"), 0);
        // An expired pin is not restored; a corrupt file changes nothing.
        let later = now + Duration::from_secs(400);
        let third = table(10, Some(file.clone()));
        third.restore(later);
        assert_eq!(third.count("a"), 0);
        std::fs::write(&file, b"{not json").expect("write");
        let fourth = table(10, Some(file));
        fourth.restore(now);
        assert_eq!(fourth.count("a"), 0);
    }
}
