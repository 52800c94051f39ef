//! When to renew a workload certificate, and how long to wait after a failed attempt.
//!
//! Pure functions of the certificate's validity, a jitter sample and the failure count, so the
//! spread and the backoff can be tested without a clock or a controller.
//!
//! - **Renewal point.** The controller's suggestion (`refresh_at_unix`: its renewal fraction
//!   of the lifetime, no jitter), taken as sent when it falls inside the part of the validity
//!   this node holds the certificate for (from its receipt, or `not_before` if later, to
//!   `not_after` — the *lifetime* below). No suggestion, or one outside that window (a
//!   controller that measured from its backdated `not_before` puts a few-second
//!   certificate's point in the past): half the lifetime.
//! - **Jitter.** In `[0, JITTER_FRACTION × lifetime]` after the renewal point, so identities
//!   issued in the same second do not all come back in the same second; the result is clamped
//!   to `LATEST_FRACTION` of the lifetime, so there is always time left to retry. The samples
//!   come from [`Jitter`]: a golden-ratio sequence from a random start, i.e. uniform, but
//!   evenly spread by construction among the identities of one node (a restarted ztunnel
//!   issues all of them at once; independent draws put more than 5 % of 500 renewals in some
//!   10-second bucket in about 7 % of restarts, this sequence never more than 3 %), while the
//!   random start keeps nodes apart.
//! - **Backoff.** After `n` failed attempts in a row the next one waits `1 s × 2^(n-1)`,
//!   capped at `min(30 s, remaining validity / 4)` but at least 250 ms — retries speed up as
//!   expiry nears. Once the certificate has expired (or there is none) the cap is 5 s: the
//!   identity is out of service, but a recovering controller is not hammered either
//!   (connections that need the certificate also ask for it, at most once a second).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Jitter: at most this fraction of the lifetime is added to the renewal point.
pub const JITTER_FRACTION: f64 = 0.1;
/// A renewal is never planned later than this fraction of the lifetime.
pub const LATEST_FRACTION: f64 = 0.9;
/// Fraction of the lifetime at which to renew when the controller suggests nothing usable.
pub const DEFAULT_FRACTION: f64 = 0.5;
/// First retry delay after a failed renewal.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest retry delay while the certificate is valid.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Shortest cap of the retry delay (near expiry).
pub const BACKOFF_FLOOR: Duration = Duration::from_millis(250);
/// Longest retry delay once the certificate expired, or before the first one was issued.
pub const BACKOFF_UNAVAILABLE: Duration = Duration::from_secs(5);

/// What a renewal plan is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// When this node received the certificate.
    pub received: SystemTime,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    /// The controller's suggested renewal time, if any.
    pub refresh_at: Option<SystemTime>,
}

impl Validity {
    /// Start of the part of the validity this node holds the certificate for.
    pub fn start(&self) -> SystemTime {
        self.received.max(self.not_before).min(self.not_after)
    }

    /// Length of that part.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.start())
            .unwrap_or_default()
    }

    /// The renewal point before jitter: the controller's, if it lies within the lifetime,
    /// else half the lifetime; never later than `LATEST_FRACTION` of it.
    pub fn renewal_point(&self) -> SystemTime {
        let point = match self.refresh_at {
            Some(at) if self.start() < at && at < self.not_after => at,
            _ => self.start() + self.lifetime().mul_f64(DEFAULT_FRACTION),
        };
        point.min(self.latest())
    }

    /// The latest a renewal may be planned.
    pub fn latest(&self) -> SystemTime {
        self.start() + self.lifetime().mul_f64(LATEST_FRACTION)
    }
}

/// Jitter samples in `[0, 1)`: `frac(start + k × (√5 − 1) / 2)` for the k-th sample. Any
/// `n` consecutive samples split `[0, 1)` into gaps of at most three lengths (the three-gap
/// theorem), so they are as even as a sequence can be without knowing `n` in advance.
#[derive(Debug)]
pub struct Jitter {
    start: f64,
    next: AtomicU64,
}

/// The golden ratio's fractional part.
const GOLDEN: f64 = 0.618_033_988_749_894_9;

impl Jitter {
    /// A sequence starting at `start` (taken modulo 1).
    pub fn new(start: f64) -> Self {
        Self {
            start: if start.is_finite() {
                start.rem_euclid(1.0)
            } else {
                0.0
            },
            next: AtomicU64::new(0),
        }
    }

    /// A sequence from a random start.
    pub fn random() -> Self {
        Self::new(rand::random::<f64>())
    }

    /// The next sample.
    pub fn sample(&self) -> f64 {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        // k × GOLDEN loses precision past 2^52; wrap k first (the sequence stays spread).
        let k = (k % (1 << 40)) as f64;
        (self.start + k * GOLDEN).rem_euclid(1.0)
    }
}

/// When to renew: the renewal point plus `jitter` (a sample in `[0, 1)`) × `JITTER_FRACTION`
/// × the lifetime, no later than `LATEST_FRACTION` of the lifetime.
pub fn renewal_time(validity: &Validity, jitter: f64) -> SystemTime {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let planned =
        validity.renewal_point() + validity.lifetime().mul_f64(JITTER_FRACTION).mul_f64(jitter);
    planned.min(validity.latest())
}

/// How long to wait before attempt `failures + 1`, after `failures` (≥ 1) failed attempts in
/// a row, when the certificate in hand has `remaining` validity left (zero: expired or none).
pub fn retry_delay(failures: u32, remaining: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let delay = BACKOFF_INITIAL.saturating_mul(1 << exponent);
    let cap = if remaining.is_zero() {
        BACKOFF_UNAVAILABLE
    } else {
        BACKOFF_MAX.min((remaining / 4).max(BACKOFF_FLOOR))
    };
    delay.min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn issued_at(t: SystemTime, lifetime: Duration, refresh_at: Option<SystemTime>) -> Validity {
        Validity {
            received: t,
            not_before: t,
            not_after: t + lifetime,
            refresh_at,
        }
    }

    /// 500 identities issued at the same instant with a 1 h lifetime: their renewals spread
    /// over more than 5 minutes, no 10 s bucket holds more than 5 % of them, all between the
    /// controller's point and 90 % of the lifetime — for any start of the sequence: a fixed
    /// grid of 64 starts over [0, 1) plus the edges, so every run checks the same cases.
    #[test]
    fn five_hundred_identities_do_not_renew_in_the_same_second() {
        let grid = (0..64).map(|i| f64::from(i) / 64.0);
        for start in grid.chain([0.5, 0.618_033_988_749_895, 0.999_999]) {
            spread_from(&Jitter::new(start), start);
        }
    }

    fn spread_from(jitter: &Jitter, start: f64) {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // The controller's point at half the lifetime, as it sends it.
        let validity = issued_at(t0, HOUR, Some(t0 + HOUR / 2));
        let refresh_at = t0 + HOUR / 2;
        let latest = t0 + HOUR.mul_f64(0.9);
        let times: Vec<SystemTime> = (0..500)
            .map(|_| renewal_time(&validity, jitter.sample()))
            .collect();
        let (first, last) = (
            *times.iter().min().expect("times"),
            *times.iter().max().expect("times"),
        );
        assert!(
            first >= refresh_at,
            "no renewal before the controller's point"
        );
        assert!(last <= latest, "no renewal after 90 % of the lifetime");
        let spread = last.duration_since(first).expect("ordered");
        assert!(
            spread >= Duration::from_secs(5 * 60),
            "renewals spread over {spread:?} (start {start})"
        );
        let mut buckets = std::collections::BTreeMap::<u64, usize>::new();
        for t in &times {
            let offset = t.duration_since(refresh_at).expect("after").as_secs();
            *buckets.entry(offset / 10).or_default() += 1;
        }
        let busiest = buckets.values().copied().max().expect("buckets");
        assert!(
            busiest * 20 <= times.len(),
            "busiest 10 s bucket holds {busiest} of {} renewals (start {start}): {buckets:?}",
            times.len()
        );
    }

    #[test]
    fn jitter_samples_are_uniform_in_the_unit_interval() {
        let jitter = Jitter::new(1.25);
        let samples: Vec<f64> = (0..10_000).map(|_| jitter.sample()).collect();
        assert!(samples.iter().all(|u| (0.0..1.0).contains(u)));
        assert!((samples[0] - 0.25).abs() < 1e-12);
        // Every tenth of the interval gets its tenth of the samples, give or take a few.
        for decile in 0..10 {
            let lo = f64::from(decile) / 10.0;
            let n = samples
                .iter()
                .filter(|u| (lo..lo + 0.1).contains(*u))
                .count();
            assert!((995..=1005).contains(&n), "decile {decile}: {n}");
        }
        assert!((Jitter::new(f64::NAN).sample()).abs() < 1e-12);
    }

    #[test]
    fn jitter_stays_within_its_window() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let v = issued_at(t0, HOUR, None);
        assert_eq!(renewal_time(&v, 0.0), t0 + HOUR / 2);
        assert_eq!(renewal_time(&v, 1.0), t0 + HOUR.mul_f64(0.6));
        assert_eq!(renewal_time(&v, f64::NAN), t0 + HOUR / 2);
        // A late controller point is clamped to 90 %.
        let late = issued_at(t0, HOUR, Some(t0 + HOUR.mul_f64(0.95)));
        assert_eq!(renewal_time(&late, 0.5), t0 + HOUR.mul_f64(0.9));
    }

    #[test]
    fn the_controller_point_is_used_when_it_lies_within_the_lifetime() {
        // Backdated by 10 s, as the controller does; its point at 70 % of the lifetime.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let v = Validity {
            received: now,
            not_before: now - Duration::from_secs(10),
            not_after: now + day,
            refresh_at: Some(now + day.mul_f64(0.7)),
        };
        assert_eq!(v.lifetime(), day);
        assert_eq!(v.renewal_point(), now + day.mul_f64(0.7));
        assert_eq!(renewal_time(&v, 0.5), now + day.mul_f64(0.75));
        // A point in the past (measured from the backdated not_before, for a 4 s certificate)
        // or after expiry: half of what is held here.
        let short = Duration::from_secs(4);
        for refresh_at in [now - Duration::from_secs(3), now + short, now + day] {
            let v = Validity {
                received: now,
                not_before: now - Duration::from_secs(10),
                not_after: now + short,
                refresh_at: Some(refresh_at),
            };
            assert_eq!(v.renewal_point(), now + Duration::from_secs(2));
            let at = renewal_time(&v, 0.99);
            assert!(at > now + Duration::from_secs(2) && at < now + Duration::from_millis(2400));
        }
    }

    #[test]
    fn expired_or_empty_validity_renews_at_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(50);
        let v = Validity {
            received: now,
            not_before: now - Duration::from_secs(20),
            not_after: now - Duration::from_secs(1),
            refresh_at: None,
        };
        assert_eq!(v.lifetime(), Duration::ZERO);
        assert!(renewal_time(&v, 0.7) <= now);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let plenty = HOUR * 24;
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n, plenty).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX, plenty), BACKOFF_MAX);
        // Near expiry the cap is a quarter of what is left…
        assert_eq!(
            retry_delay(5, Duration::from_secs(20)),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_delay(1, Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        // …but never below 250 ms.
        assert_eq!(
            retry_delay(3, Duration::from_millis(100)),
            Duration::from_millis(250)
        );
        // Expired or none: every 5 s at most.
        assert_eq!(retry_delay(1, Duration::ZERO), Duration::from_secs(1));
        assert_eq!(retry_delay(9, Duration::ZERO), BACKOFF_UNAVAILABLE);
    }
}
