//! Giving memory back to the system after a connection flood.
//!
//! glibc keeps the memory of freed connection buffers in its arenas for reuse: after 10,000
//! connections came and went, the ztunnel's resident size stayed at the flood's peak (about
//! 6× the idle size, docs/design.md, "Listener limits"). This module owns one task that
//! watches how many connections the listeners hold and, once that number has fallen by
//! [`TRIM_AFTER_DROP`] from its high-water mark, asks the allocator to return its free pages
//! (`malloc_trim`). It must not trim on every tick or while connections keep arriving: a trim
//! walks every arena, and freshly returned pages would only be faulted in again.
//!
//! [`tune_allocator`] fixes glibc's thresholds at start so the large buffers of bulk
//! transfers come from the arenas and are reused, not mapped and unmapped per refill.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Connections that must have closed since the high-water mark before a trim.
pub const TRIM_AFTER_DROP: usize = 256;
/// How often the connection count is looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Memory metrics.
#[derive(Debug, Clone, Default)]
pub struct MemoryMetrics {
    trims: Counter,
}

impl MemoryMetrics {
    /// Registers the memory metrics on `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "memory_trims",
            "Times free allocator memory was returned to the system after many connections closed",
            m.trims.clone(),
        );
        m
    }
}

/// Whether to trim now, given the high-water mark and the current count (a pure decision).
pub fn should_trim(high: usize, now: usize) -> bool {
    high.saturating_sub(now) >= TRIM_AFTER_DROP
}

/// After a flood's trim, trims again this many times, [`FOLLOW_UP_INTERVAL`] apart, while no
/// new flood arrives: what the flood left behind (pooled tunnels reaped when idle, handshakes
/// that time out) is freed after the first trim.
pub const FOLLOW_UPS: u32 = 3;
/// Time between follow-up trims.
pub const FOLLOW_UP_INTERVAL: Duration = Duration::from_secs(8);

/// Watches [`membrane_runtime::listener::open_connections`] until `cancel` fires, trimming
/// after each flood.
pub async fn run_trimmer(metrics: MemoryMetrics, cancel: CancellationToken) {
    let mut high = membrane_runtime::listener::open_connections();
    let mut follow_ups = 0;
    let mut next_follow_up = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        let now = membrane_runtime::listener::open_connections();
        high = high.max(now);
        let flood_ended = should_trim(high, now);
        let follow_up = follow_ups > 0 && tokio::time::Instant::now() >= next_follow_up;
        if !(flood_ended || follow_up) {
            continue;
        }
        let started = std::time::Instant::now();
        let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
        metrics.trims.inc();
        tracing::info!(
            high_water = high,
            connections = now,
            follow_up = !flood_ended,
            released,
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "connections fell after a flood; free memory returned to the system"
        );
        follow_ups = if flood_ended {
            FOLLOW_UPS
        } else {
            follow_ups - 1
        };
        next_follow_up = tokio::time::Instant::now() + FOLLOW_UP_INTERVAL;
        high = now;
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    // SAFETY: malloc_trim takes a plain integer, has no preconditions and is thread-safe (it
    // locks each arena it walks).
    unsafe { nix::libc::malloc_trim(0) == 1 }
}

/// Largest allocation glibc serves from its arenas rather than with its own `mmap`.
pub const MMAP_THRESHOLD: usize = 2 << 20;
/// Free memory at the top of an arena that glibc keeps instead of returning it at once.
pub const TRIM_THRESHOLD: usize = 4 << 20;

/// Fixes glibc's allocation thresholds; call at the start of `main`, before the runtime.
///
/// HTTP/2 reads a DATA frame (up to 1 MiB) into a fresh buffer whenever the previous one is
/// still referenced by frames the relay has not written yet. With glibc's defaults such
/// buffers were `mmap`ed, faulted in page by page and unmapped again on every refill: page
/// faults were ~2 % of a bulk transfer's samples and the copies into fresh pages twice as
/// slow. Served from the arena, a freed buffer's pages are reused. What stays resident is
/// bounded by [`TRIM_THRESHOLD`] per arena, and [`run_trimmer`] still returns free memory
/// after a connection flood (docs/design.md, "Data-plane performance decisions").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    for (param, value, name) in [
        (
            nix::libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
            "M_MMAP_THRESHOLD",
        ),
        (
            nix::libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
            "M_TRIM_THRESHOLD",
        ),
    ] {
        let value = i32::try_from(value).unwrap_or(i32::MAX);
        // SAFETY: mallopt takes two integers, has no preconditions and locks the allocator
        // itself.
        if unsafe { nix::libc::mallopt(param, value) } != 1 {
            tracing::warn!(
                param = name,
                value,
                "the allocator refused a tuning parameter"
            );
        }
    }
}

/// Other allocators: nothing to tune.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_large_enough_drop() {
        assert!(!should_trim(0, 0));
        assert!(!should_trim(300, 100));
        assert!(should_trim(10_000, 20));
        assert!(should_trim(TRIM_AFTER_DROP, 0));
        assert!(!should_trim(5, 10));
    }
}
