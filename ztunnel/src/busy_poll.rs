//! Busy polling after forwarded traffic (`--busy-poll`, off by default).
//!
//! A request/response exchange through two node proxies wakes six sleeping processes per
//! round trip (client, both proxies twice, server), and on a virtual machine waking an idle
//! vCPU is a hypervisor exit. With a window set, the proxy thread that has just forwarded
//! bytes keeps polling its sockets instead of sleeping until the window passes with no
//! further traffic, so the answer finds it awake: the sender's `sendto` wakes nobody and the
//! proxy skips the return from sleep. Each poll also yields the CPU (`sched_yield`), giving a
//! runnable thread on the same CPU — often the application the answer is for — the chance to
//! run first.
//!
//! The price is CPU: after every forwarded message the thread spins for up to the window, so
//! a node whose messages come closer together than the window keeps one core per ztunnel
//! busy (and under a container CPU limit, spends the quota: the kernel then throttles the
//! proxy). A quiet node sleeps as before. The trade and its measurement are in
//! docs/design.md ("busy polling after forwarded traffic").
//!
//! Mechanism: the runtime calls [`before_park`] before it would block in `epoll_wait`; inside
//! the window that wakes [`spinner`], a task that does nothing, so the runtime polls its
//! driver with a zero timeout instead and comes back. [`note_traffic`] (called by the relay
//! for every read that carried bytes) opens or extends the window. State is per thread: only
//! the single-threaded runtime (one worker, the default on nodes with up to three CPUs) is
//! supported.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The longest window `--busy-poll` accepts: beyond it a spinning proxy costs a core for
/// traffic far sparser than a wake-up is slow.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);

thread_local! {
    static WINDOW: Cell<Option<Duration>> = const { Cell::new(None) };
    static UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    static SPINNER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Non-blocking polls made instead of sleeping.
static POLLS: AtomicU64 = AtomicU64::new(0);
/// Windows that passed with no traffic (the thread then slept).
static EXPIRED: AtomicU64 = AtomicU64::new(0);

/// Non-blocking polls made instead of sleeping, process-wide (for the metrics and tests).
pub fn polls() -> u64 {
    POLLS.load(Ordering::Relaxed)
}

/// Windows that passed with no traffic, process-wide (for the metrics and tests).
pub fn expired() -> u64 {
    EXPIRED.load(Ordering::Relaxed)
}

/// Turns busy polling on for the calling thread (the runtime's), `window` after each read
/// that carried bytes. A zero window leaves it off.
pub fn enable(window: Duration) {
    WINDOW.with(|w| w.set((!window.is_zero()).then_some(window)));
    UNTIL.with(|u| u.set(None));
    SPINNER.with(|s| s.borrow_mut().take());
}

/// Traffic was forwarded on this thread: stay awake for the window.
#[inline]
pub fn note_traffic() {
    if let Some(window) = WINDOW.with(Cell::get) {
        UNTIL.with(|u| u.set(Some(Instant::now() + window)));
    }
}

/// The runtime's park hook (`on_thread_park`): inside the window, turns the coming park into
/// a non-blocking poll of the driver by waking [`spinner`], and yields the CPU.
pub fn before_park() {
    let Some(until) = UNTIL.with(Cell::get) else {
        return;
    };
    if Instant::now() >= until {
        UNTIL.with(|u| u.set(None));
        EXPIRED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let woken = SPINNER.with(|s| match s.borrow().as_ref() {
        Some(waker) => {
            waker.wake_by_ref();
            true
        }
        None => false,
    });
    if woken {
        POLLS.fetch_add(1, Ordering::Relaxed);
        std::thread::yield_now();
    }
}

/// The task [`before_park`] wakes: it only leaves its waker where the hook finds it. Spawn it
/// once on the runtime's thread after [`enable`].
pub fn spinner() -> impl Future<Output = ()> {
    Spinner
}

struct Spinner;

impl Future for Spinner {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        SPINNER.with(|s| {
            let mut s = s.borrow_mut();
            match s.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *s = Some(cx.waker().clone()),
            }
        });
        Poll::Pending
    }
}

/// `membrane_busy_poll_polls_total` and `membrane_busy_poll_expired_total`, read at every
/// scrape.
#[derive(Debug)]
pub struct Collector;

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        ConstCounter::new(polls()).encode(encoder.encode_descriptor(
            "busy_poll_polls",
            "Non-blocking polls the proxy made instead of sleeping, inside the --busy-poll window after forwarded traffic",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(expired()).encode(encoder.encode_descriptor(
            "busy_poll_expired",
            "Busy-poll windows that passed with no traffic (the proxy then slept)",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(before_park)
            .build()
            .expect("runtime")
    }

    #[test]
    fn the_runtime_polls_inside_the_window_and_sleeps_after_it() {
        runtime().block_on(async {
            enable(Duration::from_millis(300));
            tokio::spawn(spinner());
            tokio::task::yield_now().await;
            // Within the window a 10 ms timer is waited for by polling (a runtime without the
            // window parks once for it, making no poll), and the polls drive the timers: it
            // fires long before the window ends.
            let before = polls();
            note_traffic();
            let started = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let took = started.elapsed();
            assert!(polls() >= before + 2, "no polls inside the window");
            assert!(
                took < Duration::from_millis(200),
                "the timer waited for the window: {took:?}"
            );
            // Once the window has passed the thread sleeps: no poll while a timer runs.
            tokio::time::sleep(Duration::from_millis(350)).await;
            let (after, gone) = (polls(), expired());
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(polls(), after, "polled after the window");
            assert!(gone >= 1, "the window's end was not counted");
        });
    }

    #[test]
    fn without_a_window_traffic_changes_nothing() {
        runtime().block_on(async {
            enable(Duration::ZERO);
            note_traffic();
            assert_eq!(UNTIL.with(Cell::get), None);
            before_park();
            assert_eq!(UNTIL.with(Cell::get), None);
        });
    }
}
