//! Finding a pod's network namespace by its address, for pods nobody told the ztunnel about
//! (`--netns-dir`).
//!
//! Container runtimes pin every pod's network namespace as a file in one directory
//! (containerd and CRI-O: `/var/run/netns`). A scan enters each of them in turn on a
//! dedicated thread (`setns`, then `getifaddrs` there: no `ip` process per namespace) and
//! maps every address to the namespaces holding it; loopback and IPv6 link-local addresses
//! are skipped. The thread ends after the scan, so no other work ever runs in a pod's
//! namespace by mistake. The result is cached; a lookup that misses rescans, at most every
//! [`RESCAN_INTERVAL`]. An address held by more than one namespace (a deleted pod's namespace
//! not yet gone, or an unrelated directory) is reported as such and never guessed at.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

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

/// Addresses of the namespaces in one directory, scanned on demand.
#[derive(Debug)]
pub struct NetnsScanner {
    dir: PathBuf,
    by_ip: HashMap<IpAddr, Vec<PathBuf>>,
    scanned: Option<Instant>,
}

// === impl NetnsScanner ===

impl NetnsScanner {
    /// A scanner of the namespaces pinned in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            by_ip: HashMap::new(),
            scanned: None,
        }
    }

    /// The namespace holding any of `ips`, rescanning first when none is known and the last
    /// scan is older than [`RESCAN_INTERVAL`].
    pub async fn locate(&mut self, ips: &[IpAddr]) -> Located {
        if ips.is_empty() {
            return Located::None;
        }
        let found = self.lookup(ips);
        let stale = self
            .scanned
            .is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL);
        if matches!(found, Located::One(_)) || !stale {
            return found;
        }
        self.rescan().await;
        self.lookup(ips)
    }

    fn lookup(&self, ips: &[IpAddr]) -> Located {
        let mut paths: Vec<PathBuf> = ips
            .iter()
            .filter_map(|ip| self.by_ip.get(ip))
            .flatten()
            .filter(|p| p.exists())
            .cloned()
            .collect();
        paths.sort();
        paths.dedup();
        match paths.len() {
            0 => Located::None,
            1 => Located::One(paths.remove(0)),
            _ => Located::Several(paths),
        }
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
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // Not a network namespace (or gone meanwhile): skipped.
        if setns(&file, CloneFlags::CLONE_NEWNET).is_err() {
            continue;
        }
        let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
            continue;
        };
        for address in addresses.filter_map(|a| a.address) {
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = address.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let link_local_v6 = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if ip.is_loopback() || ip.is_unspecified() || link_local_v6 {
                continue;
            }
            let holders = by_ip.entry(ip).or_default();
            if !holders.contains(&path) {
                holders.push(path.clone());
            }
        }
    }
    Ok(by_ip)
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
        assert_eq!(scanner.locate(&[ip]).await, Located::None);
        assert!(scanner.scanned.is_some());
        assert_eq!(scanner.locate(&[]).await, Located::None);
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
        scanner.by_ip.insert(ip, vec![a.clone()]);
        assert_eq!(scanner.lookup(&[ip]), Located::One(a.clone()));
        scanner.by_ip.insert(other, vec![b.clone()]);
        assert_eq!(
            scanner.lookup(&[ip, other]),
            Located::Several(vec![a.clone(), b])
        );
        std::fs::remove_file(&a).expect("rm");
        assert_eq!(
            scanner.lookup(&[ip]),
            Located::None,
            "gone namespaces do not count"
        );
    }
}
