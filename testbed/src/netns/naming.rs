//! Namespace naming, the in-process registry of live testbeds, and the stale sweep.
//!
//! Generated testbed ids are `mbt-<pid>-<n>` (decimal pid of the creating process, decimal
//! per-process counter). Every namespace of such a testbed is named `mbt-<pid>-<n>-<suffix>`,
//! so a later process can tell whose it was and whether that process is gone.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::error::{Error, Result};
use super::sys;

/// Start of every generated testbed id.
pub const GENERATED_PREFIX: &str = "mbt-";

/// Longest accepted namespace name (well below `NAME_MAX`, short enough to read).
pub const MAX_NETNS_NAME: usize = 64;

/// Per-process counter and the counters of this process's testbeds that are still alive (or
/// detached). Both live under one lock so that a sweep never races a testbed being built.
struct Registry {
    next: u64,
    live: BTreeSet<u64>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    live: BTreeSet::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allocates a fresh generated id (`mbt-<pid>-<n>`) and marks it live.
pub(crate) fn allocate() -> (String, u64) {
    let mut registry = registry();
    let n = registry.next;
    registry.next += 1;
    registry.live.insert(n);
    (format!("{GENERATED_PREFIX}{}-{n}", std::process::id()), n)
}

/// Marks a generated id dead: its leftovers (if deletion failed) become sweepable.
pub(crate) fn release(n: u64) {
    registry().live.remove(&n);
}

/// Splits a generated namespace name into (pid, counter). `None` for any other name.
pub(crate) fn parse_generated(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix(GENERATED_PREFIX)?;
    let (pid, rest) = rest.split_once('-')?;
    let (n, suffix) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) || suffix.is_empty() {
        return None;
    }
    Some((pid.parse().ok()?, n.parse().ok()?))
}

/// Checks a namespace (or prefix, node, pod) name: 1..=64 bytes of `[A-Za-z0-9._-]`,
/// starting with a letter or digit.
pub(crate) fn validate(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_name(name, "empty"));
    }
    if name.len() > MAX_NETNS_NAME {
        return Err(Error::invalid_name(name, "longer than 64 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(Error::invalid_name(
            name,
            "allowed characters: A-Z a-z 0-9 . _ -",
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(Error::invalid_name(
            name,
            "must start with a letter or digit",
        ));
    }
    Ok(())
}

/// Deletes namespaces left behind by testbeds whose process is gone: names of the generated
/// form `mbt-<pid>-<n>-*` where no process `<pid>` exists, or where `<pid>` is this process
/// but `<n>` is not one of its live testbeds (a previous process that had the same pid).
/// Processes still running inside them are killed first. Everything else is left alone.
/// Returns the names it deleted.
pub(crate) fn sweep_stale() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sys::NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let own = std::process::id();
    let registry = registry();
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some((pid, n)) = parse_generated(&name) else {
            continue;
        };
        let stale = if pid == own {
            !registry.live.contains(&n)
        } else {
            !sys::pid_alive(pid)
        };
        if !stale {
            continue;
        }
        if let Some(id) = sys::ns_id(&sys::netns_path(&name)) {
            sys::kill_all_in(&[id]);
        }
        // Another process may be sweeping the same leftovers; losing that race is fine.
        if sys::netns_del(&name).is_ok() || !sys::netns_path(&name).exists() {
            swept.push(name);
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_generated_names() {
        assert_eq!(parse_generated("mbt-123-4-node-a"), Some((123, 4)));
        assert_eq!(parse_generated("mbt-123-4-fabric"), Some((123, 4)));
        assert_eq!(parse_generated("mbt-123-4-"), None);
        assert_eq!(parse_generated("mbt-123-4"), None);
        assert_eq!(parse_generated("mbt-12a-4-x"), None);
        assert_eq!(parse_generated("mbt--4-x"), None);
        assert_eq!(parse_generated("local-node-a"), None);
        assert_eq!(parse_generated("xmbt-1-2-x"), None);
    }

    #[test]
    fn validates_names() {
        assert!(validate("training-trainer-0").is_ok());
        assert!(validate("a.b_c").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
    }
}
