//! Finding a pod's network namespace by its address, for pods nobody told the ztunnel about
//! (`--netns-dir`).
//!
//! Container runtimes pin every pod's network namespace as a file in one directory
//! (containerd and CRI-O: `/var/run/netns`). A scan enters each of them in turn on a
//! dedicated thread (`setns`, then `getifaddrs` there: no `ip` process per namespace) and
//! maps every address to the namespaces holding it. Only addresses of a namespace's
//! non-loopback interfaces count (whatever a pod puts on `lo` is never a pod address), IPv6
//! link-local ones are skipped, and an address a namespace carries on more than one interface
//! does not count for it at all (a pod's address sits on its one primary interface). The
//! thread ends after the scan, so no other work ever runs in a pod's namespace by mistake.
//! The result is cached; a lookup that misses rescans, at most every [`RESCAN_INTERVAL`].
//!
//! A lookup leaves out the namespaces the caller names as taken (the reconciler: those it
//! already knows under another pod's UID) and reports them apart. Of the rest, an address
//! held by more than one namespace (a deleted pod's namespace not yet gone, or an unrelated
//! directory) is reported as such and never guessed at.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::net::if_::InterfaceFlags;
use nix::sched::{CloneFlags, setns};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Shortest time between two scans.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(3);

/// Where a pod's address was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// In exactly one namespace.
    One(PathBuf),
    /// In several: ambiguous.
    Several(Vec<PathBuf>),
    /// Nowhere (yet).
    None,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where the address is, among the namespaces not taken.
    pub located: Located,
    /// Namespaces holding the address that the caller said were taken (left out).
    pub taken: Vec<PathBuf>,
}

/// Labels of the skipped-namespace counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SkipLabels {
    /// Why (`known_pod`: the namespace is known under another pod's UID).
    pub reason: &'static str,
}

/// Scan metrics.
#[derive(Debug, Clone, Default)]
pub struct ScanMetrics {
    skipped: Family<SkipLabels, Counter>,
}

impl ScanMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "netns_scan_skipped",
            "Network namespaces holding a mesh workload's address that the --netns-dir scan did not enroll it into, by reason (known_pod: the namespace is known under another pod's UID)",
            m.skipped.clone(),
        );
        m
    }

    /// Counts a namespace left out for `reason`.
    pub fn skipped(&self, reason: &'static str) {
        self.skipped.get_or_create(&SkipLabels { reason }).inc();
    }
}

/// Addresses of the namespaces in one directory, scanned on demand.
#[derive(Debug)]
pub struct NetnsScanner {
    dir: PathBuf,
    by_ip: HashMap<IpAddr, Vec<PathBuf>>,
    scanned: Option<Instant>,
    metrics: ScanMetrics,
}

// === impl NetnsScanner ===

impl NetnsScanner {
    /// A scanner of the namespaces pinned in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            by_ip: HashMap::new(),
            scanned: None,
            metrics: ScanMetrics::default(),
        }
    }

    /// Counts into `metrics` (registered by the caller).
    #[must_use]
    pub fn with_metrics(mut self, metrics: ScanMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The scan's metrics.
    pub fn metrics(&self) -> &ScanMetrics {
        &self.metrics
    }

    /// The namespace holding any of `ips`, leaving out those `taken` says are (reported in
    /// [`Found::taken`]); rescans first when none is found and the last scan is older than
    /// [`RESCAN_INTERVAL`].
    pub async fn locate(&mut self, ips: &[IpAddr], taken: impl Fn(&Path) -> bool) -> Found {
        if ips.is_empty() {
            return Found {
                located: Located::None,
                taken: Vec::new(),
            };
        }
        let found = self.lookup(ips, &taken);
        let stale = self
            .scanned
            .is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL);
        if matches!(found.located, Located::One(_)) || !stale {
            return found;
        }
        self.rescan().await;
        self.lookup(ips, &taken)
    }

    fn lookup(&self, ips: &[IpAddr], taken: &impl Fn(&Path) -> bool) -> Found {
        let mut paths: Vec<PathBuf> = ips
            .iter()
            .filter_map(|ip| self.by_ip.get(ip))
            .flatten()
            .filter(|p| p.exists())
            .cloned()
            .collect();
        paths.sort();
        paths.dedup();
        let (taken, mut free): (Vec<PathBuf>, Vec<PathBuf>) =
            paths.into_iter().partition(|p| taken(p));
        let located = match free.len() {
            0 => Located::None,
            1 => Located::One(free.remove(0)),
            _ => Located::Several(free),
        };
        Found { located, taken }
    }

    /// Scans the directory again (on a thread of its own, which ends afterwards).
    pub async fn rescan(&mut self) {
        self.scanned = Some(Instant::now());
        let dir = self.dir.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("netns-scan".into())
            .spawn(move || {
                let _ = tx.send(scan_blocking(&dir));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the namespace scan");
            return;
        }
        match rx.await {
            Ok(Ok(by_ip)) => {
                tracing::debug!(
                    dir = %self.dir.display(),
                    addresses = by_ip.len(),
                    "network namespaces scanned"
                );
                self.by_ip = by_ip;
            }
            Ok(Err(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot scan the network namespaces")
            }
            Err(_) => tracing::warn!("the namespace scan thread ended early"),
        }
    }
}

/// Enters every namespace file of `dir` on the calling thread and reads its addresses. The
/// thread is left in the last namespace: call it only on a thread that ends afterwards.
fn scan_blocking(dir: &Path) -> std::io::Result<HashMap<IpAddr, Vec<PathBuf>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    paths.sort();
    let mut by_ip: HashMap<IpAddr, Vec<PathBuf>> = HashMap::new();
    for path in paths {
        // Never blocks (a FIFO), never the ztunnel's own namespace, only nsfs files.
        let file: File = match crate::netns::open_netns_file(&path) {
            Ok(file) => file,
            Err(e) => {
                tracing::debug!(netns = %path.display(), error = %e, "not scanned");
                continue;
            }
        };
        // Not a network namespace (or gone meanwhile): skipped.
        if setns(&file, CloneFlags::CLONE_NEWNET).is_err() {
            continue;
        }
        let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
            continue;
        };
        let addresses = addresses.filter_map(|a| {
            let address = a.address?;
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = address.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                return None;
            };
            let loopback = a.flags.contains(InterfaceFlags::IFF_LOOPBACK);
            Some((a.interface_name, loopback, ip))
        });
        for ip in pod_addresses(addresses) {
            let holders = by_ip.entry(ip).or_default();
            if !holders.contains(&path) {
                holders.push(path.clone());
            }
        }
    }
    Ok(by_ip)
}

/// The addresses a pod can be found by among one namespace's `(interface, loopback, address)`
/// entries: those of non-loopback interfaces (never `lo`), neither loopback, unspecified nor
/// IPv6 link-local, each on exactly one interface (an address also on a second interface is
/// not a pod's primary address: it does not count).
fn pod_addresses(entries: impl IntoIterator<Item = (String, bool, IpAddr)>) -> Vec<IpAddr> {
    let mut interfaces: HashMap<IpAddr, Vec<String>> = HashMap::new();
    for (interface, loopback, ip) in entries {
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
        if loopback || interface == "lo" || ip.is_loopback() || ip.is_unspecified() || link_local_v6
        {
            continue;
        }
        let on = interfaces.entry(ip).or_default();
        if !on.contains(&interface) {
            on.push(interface);
        }
    }
    let mut ips: Vec<IpAddr> = interfaces
        .into_iter()
        .filter(|(_, on)| on.len() == 1)
        .map(|(ip, _)| ip)
        .collect();
    ips.sort();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_without_namespaces_finds_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("not-a-netns"), b"").expect("file");
        let mut scanner = NetnsScanner::new(dir.path());
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let free = |_: &Path| false;
        assert_eq!(scanner.locate(&[ip], free).await.located, Located::None);
        assert!(scanner.scanned.is_some());
        assert_eq!(scanner.locate(&[], free).await.located, Located::None);
    }

    #[test]
    fn only_an_address_on_one_non_loopback_interface_counts() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let entries = [
            ("lo".to_owned(), true, ip("127.0.0.1")),
            // Another pod's address put on loopback (or on an interface named lo).
            ("lo".to_owned(), true, ip("10.0.0.9")),
            ("lo".to_owned(), false, ip("10.0.0.8")),
            ("dummy0".to_owned(), true, ip("10.0.0.7")),
            ("eth0".to_owned(), false, ip("10.0.0.1")),
            ("eth0".to_owned(), false, ip("fe80::1")),
            ("eth0".to_owned(), false, ip("fd00::1")),
            // The same address on two interfaces: not a primary address.
            ("eth0".to_owned(), false, ip("10.0.0.5")),
            ("eth1".to_owned(), false, ip("10.0.0.5")),
        ];
        assert_eq!(pod_addresses(entries), vec![ip("10.0.0.1"), ip("fd00::1")]);
    }

    #[test]
    fn lookups_report_ambiguity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for p in [&a, &b] {
            std::fs::write(p, b"").expect("file");
        }
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let mut scanner = NetnsScanner::new(dir.path());
        let free = |_: &Path| false;
        scanner.by_ip.insert(ip, vec![a.clone()]);
        assert_eq!(
            scanner.lookup(&[ip], &free).located,
            Located::One(a.clone())
        );
        scanner.by_ip.insert(other, vec![b.clone()]);
        assert_eq!(
            scanner.lookup(&[ip, other], &free).located,
            Located::Several(vec![a.clone(), b.clone()])
        );
        // A namespace taken by another pod is left out (and reported), not ambiguous.
        let b_taken = |p: &Path| p == b.as_path();
        assert_eq!(
            scanner.lookup(&[ip, other], &b_taken),
            Found {
                located: Located::One(a.clone()),
                taken: vec![b.clone()],
            }
        );
        std::fs::remove_file(&a).expect("rm");
        assert_eq!(
            scanner.lookup(&[ip], &free).located,
            Located::None,
            "gone namespaces do not count"
        );
    }
}
