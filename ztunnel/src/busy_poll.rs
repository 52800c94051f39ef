//! Busy polling after forwarded traffic (`--busy-poll`: `auto`, the default, a fixed window,
//! or `off`).
//!
//! A request/response exchange through two node proxies wakes six sleeping processes per
//! round trip (client, both proxies twice, server), and on a virtual machine waking an idle
//! vCPU is a hypervisor exit. With a window open, the proxy thread that has just forwarded
//! bytes keeps polling its sockets instead of sleeping until the window passes with no
//! further traffic, so the answer finds it awake: the sender's `sendto` wakes nobody and the
//! proxy skips the return from sleep. Each poll also yields the CPU (`sched_yield`), giving a
//! runnable thread on the same CPU — often the application the answer is for — the chance to
//! run first.
//!
//! **Adaptive (`auto`).** The window is learnt per thread the way Linux's `cpuidle-haltpoll`
//! governor learns its poll time, from how long the thread sat idle (polling or asleep)
//! before traffic came: it starts closed; idle longer than the window but no longer than
//! [`ADAPTIVE_CEILING`] (a wider window would have caught it), it doubles from [`GROW_START`]
//! up to the ceiling; idle longer than the ceiling, it halves (below the start it closes).
//! A proxy idle for more than the ceiling between messages therefore never keeps it open, and
//! a quiet node sleeps as before. Spinning is also capped by a budget per [`BUDGET_PERIOD`]:
//! at most [`BUDGET_RATIO`] times as long as the thread worked in the previous period (scaled
//! to the period's length), and never more than [`BUDGET_CAP`] of it; once the period's
//! budget is spent the thread sleeps between events until the next one. A thread that barely
//! works barely polls, and a period of sleep leaves the next one nothing to poll with.
//!
//! **Fixed (`--busy-poll 100us`).** The window is what the operator set (at most
//! [`MAX_WINDOW`]), with no budget: a node whose messages come closer together than the
//! window keeps one core per ztunnel busy (under a container CPU limit it spends the quota,
//! and the kernel then throttles the proxy). The trades and their measurements are in
//! docs/design.md ("busy polling after forwarded traffic").
//!
//! Mechanism: the runtime calls [`before_park`] before it would block in `epoll_wait`; inside
//! the window that wakes [`spinner`], a task that does nothing, so the runtime polls its
//! driver with a zero timeout instead and comes back. [`note_traffic`] (called by the relay
//! for every read that carried bytes) opens or extends the window. State is per thread: only
//! the single-threaded runtime (one worker, the default on nodes with up to three CPUs) is
//! supported.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The longest window `--busy-poll` accepts: beyond it a spinning proxy costs a core for
/// traffic far sparser than a wake-up is slow.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);
/// The widest window the adaptive mode grows to.
pub const ADAPTIVE_CEILING: Duration = Duration::from_micros(100);
/// The first window the adaptive mode opens (then doubled).
pub const GROW_START: Duration = Duration::from_micros(10);
/// The adaptive mode's accounting period.
pub const BUDGET_PERIOD: Duration = Duration::from_millis(10);
/// How many times the previous period's work the adaptive mode may spin.
pub const BUDGET_RATIO: f64 = 4.0;
/// The most the adaptive mode spins in one [`BUDGET_PERIOD`] (nine tenths of it).
pub const BUDGET_CAP: Duration = Duration::from_millis(9);

/// What `--busy-poll` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyPoll {
    /// Never poll instead of sleeping (`off`, or a zero duration).
    Off,
    /// A window learnt from the traffic, under a CPU budget (`auto`).
    Adaptive,
    /// The same window after every read that carried bytes, with no budget.
    Fixed(Duration),
}

/// A `--busy-poll` value that is neither `auto`, `off` nor a duration of at most
/// [`MAX_WINDOW`].
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not a duration.
    #[error("{0:?} is not auto, off or a duration such as 100us: {1}")]
    Syntax(String, humantime::DurationError),
    /// Longer than [`MAX_WINDOW`].
    #[error("a busy-poll window of {0:?} is longer than the longest, {MAX_WINDOW:?}")]
    TooLong(Duration),
}

impl FromStr for BusyPoll {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.trim() {
            "auto" => Ok(Self::Adaptive),
            "off" => Ok(Self::Off),
            other => {
                let window = humantime::parse_duration(other)
                    .map_err(|e| ParseError::Syntax(other.to_owned(), e))?;
                if window.is_zero() {
                    Ok(Self::Off)
                } else if window > MAX_WINDOW {
                    Err(ParseError::TooLong(window))
                } else {
                    Ok(Self::Fixed(window))
                }
            }
        }
    }
}

impl std::fmt::Display for BusyPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Adaptive => f.write_str("auto"),
            Self::Fixed(window) => write!(f, "{}", humantime::format_duration(*window)),
        }
    }
}

/// One runtime thread's polling state.
#[derive(Clone, Copy, Debug)]
struct State {
    mode: BusyPoll,
    /// The window opened after traffic (adaptive: the one learnt so far).
    window: Duration,
    /// The open window's end.
    until: Option<Instant>,
    /// When the current run of polls began (none while not polling).
    polling_since: Option<Instant>,
    /// When the thread went idle after its last traffic — its first park since, polling or
    /// not (cleared by the next traffic).
    idle_since: Option<Instant>,
    /// When the thread went to sleep, until it wakes (for the budget).
    asleep_since: Option<Instant>,
    /// The adaptive budget's current period, what was spent polling and sleeping in it, and
    /// what it may spend polling (from the previous period's work).
    period_start: Option<Instant>,
    spent: Duration,
    slept: Duration,
    allowance: Duration,
}

impl State {
    const OFF: State = State {
        mode: BusyPoll::Off,
        window: Duration::ZERO,
        until: None,
        polling_since: None,
        idle_since: None,
        asleep_since: None,
        period_start: None,
        spent: Duration::ZERO,
        slept: Duration::ZERO,
        allowance: Duration::ZERO,
    };

    /// Adds a run of polls that ended at `now` to the period's spending.
    fn charge(&mut self, now: Instant) {
        if self.polling_since.is_some() {
            // Rolling first charges the part of the run before a period boundary to the
            // period that ended.
            self.roll_period(now);
            if let Some(since) = self.polling_since.take() {
                self.spent += now.saturating_duration_since(since);
            }
        }
    }

    /// Starts a new budget period if the current one is over: its allowance is
    /// [`BUDGET_RATIO`] times the time the thread worked (neither polled nor slept) in the one
    /// that ended, scaled to a period's length, and at most [`BUDGET_CAP`].
    fn roll_period(&mut self, now: Instant) {
        let Some(start) = self.period_start else {
            self.period_start = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < BUDGET_PERIOD {
            return;
        }
        // A run of polls still going belongs to the period that ends up to now, and goes on
        // in the new one.
        if let Some(since) = self.polling_since.replace(now) {
            self.spent += now.saturating_duration_since(since);
        }
        let worked = elapsed.saturating_sub(self.spent + self.slept);
        let scaled = worked.as_secs_f64() * BUDGET_PERIOD.as_secs_f64() / elapsed.as_secs_f64();
        self.allowance = Duration::from_secs_f64(scaled * BUDGET_RATIO).min(BUDGET_CAP);
        self.period_start = Some(now);
        self.spent = Duration::ZERO;
        self.slept = Duration::ZERO;
    }

    /// Whether the period's allowance is spent, counting a run of polls still going.
    fn over_budget(&mut self, now: Instant) -> bool {
        self.roll_period(now);
        let running = self
            .polling_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        self.spent + running >= self.allowance
    }

    /// Adaptive: learns from how long the thread was idle before this traffic. Idle longer
    /// than the ceiling: the window halves (below [`GROW_START`] it closes). Idle longer than
    /// the window but within the ceiling — a wider window would have caught the traffic — it
    /// doubles. Caught by the window: it stays.
    fn learn(&mut self, idle: Duration) {
        let window = if idle > ADAPTIVE_CEILING {
            let half = self.window / 2;
            if half < GROW_START {
                Duration::ZERO
            } else {
                half
            }
        } else if idle > self.window {
            if self.window.is_zero() {
                GROW_START
            } else {
                (self.window * 2).min(ADAPTIVE_CEILING)
            }
        } else {
            self.window
        };
        if window != self.window {
            self.window = window;
            WINDOW_NANOS.store(window.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State::OFF) };
    static SPINNER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Non-blocking polls made instead of sleeping.
static POLLS: AtomicU64 = AtomicU64::new(0);
/// Windows that passed with no traffic (the thread then slept).
static EXPIRED: AtomicU64 = AtomicU64::new(0);
/// Windows cut short because the period's budget was spent.
static OVER_BUDGET: AtomicU64 = AtomicU64::new(0);
/// The window most recently learnt or set, in nanoseconds.
static WINDOW_NANOS: AtomicU64 = AtomicU64::new(0);

/// Non-blocking polls made instead of sleeping, process-wide (for the metrics and tests).
pub fn polls() -> u64 {
    POLLS.load(Ordering::Relaxed)
}

/// Windows that passed with no traffic, process-wide (for the metrics and tests).
pub fn expired() -> u64 {
    EXPIRED.load(Ordering::Relaxed)
}

/// Windows cut short by the adaptive budget, process-wide (for the metrics and tests).
pub fn over_budget() -> u64 {
    OVER_BUDGET.load(Ordering::Relaxed)
}

/// The window most recently learnt (adaptive) or set (fixed).
pub fn window() -> Duration {
    Duration::from_nanos(WINDOW_NANOS.load(Ordering::Relaxed))
}

/// Turns busy polling on for the calling thread (the runtime's) as `mode` asks.
pub fn enable(mode: BusyPoll) {
    let window = match mode {
        BusyPoll::Fixed(window) => window,
        BusyPoll::Off | BusyPoll::Adaptive => Duration::ZERO,
    };
    WINDOW_NANOS.store(window.as_nanos() as u64, Ordering::Relaxed);
    STATE.with(|s| {
        *s.borrow_mut() = State {
            mode,
            window,
            ..State::OFF
        }
    });
    SPINNER.with(|s| s.borrow_mut().take());
}

/// Traffic was forwarded on this thread: stay awake for the window.
#[inline]
pub fn note_traffic() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.mode == BusyPoll::Off {
            return;
        }
        let now = Instant::now();
        s.charge(now);
        if let Some(idle_since) = s.idle_since.take()
            && s.mode == BusyPoll::Adaptive
        {
            s.learn(now.saturating_duration_since(idle_since));
        }
        // An adaptive thread whose period's budget is spent sleeps until the next period.
        let spent = s.mode == BusyPoll::Adaptive && s.over_budget(now);
        s.until = (!s.window.is_zero() && !spent).then(|| now + s.window);
    });
}

/// The runtime's park hook (`on_thread_park`): inside the window (and, adaptive, the budget),
/// turns the coming park into a non-blocking poll of the driver by waking [`spinner`], and
/// yields the CPU.
pub fn before_park() {
    let poll = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.mode == BusyPoll::Off {
            return false;
        }
        let now = Instant::now();
        s.idle_since.get_or_insert(now);
        let Some(until) = s.until else {
            s.asleep_since = Some(now);
            return false;
        };
        let expired = now >= until;
        if expired || (s.mode == BusyPoll::Adaptive && s.over_budget(now)) {
            s.charge(now);
            s.until = None;
            s.asleep_since = Some(now);
            let counter = if expired { &EXPIRED } else { &OVER_BUDGET };
            counter.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        s.polling_since.get_or_insert(now);
        true
    });
    if !poll {
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

/// The runtime's unpark hook (`on_thread_unpark`): a sleep that [`before_park`] let happen
/// is over; the adaptive budget counts it as neither work nor polling.
pub fn after_unpark() {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.mode != BusyPoll::Adaptive {
            return;
        }
        if let Some(since) = s.asleep_since.take() {
            // The whole sleep belongs to the period it began in: a long one leaves the next
            // period no allowance until the thread has worked for a period.
            let now = Instant::now();
            s.slept += now.saturating_duration_since(since);
            s.roll_period(now);
        }
    });
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

/// `membrane_busy_poll_{polls,expired,over_budget}_total` and
/// `membrane_busy_poll_window_seconds`, read at every scrape.
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
        use prometheus_client::metrics::gauge::ConstGauge;
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
        ConstCounter::new(over_budget()).encode(encoder.encode_descriptor(
            "busy_poll_over_budget",
            "Busy-poll windows cut short because the adaptive mode's CPU budget for the period was spent",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(window().as_secs_f64()).encode(encoder.encode_descriptor(
            "busy_poll_window_seconds",
            "The busy-poll window the proxy opens after forwarded traffic (adaptive: the one learnt so far)",
            None,
            MetricType::Gauge,
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
            .on_thread_unpark(after_unpark)
            .build()
            .expect("runtime")
    }

    fn state() -> State {
        STATE.with(|s| *s.borrow())
    }

    #[test]
    fn the_runtime_polls_inside_the_window_and_sleeps_after_it() {
        runtime().block_on(async {
            enable(BusyPoll::Fixed(Duration::from_millis(300)));
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
            // A fixed window is not learnt: traffic after a long sleep keeps it.
            note_traffic();
            assert_eq!(state().window, Duration::from_millis(300));
        });
    }

    #[test]
    fn off_changes_nothing() {
        runtime().block_on(async {
            enable(BusyPoll::Off);
            note_traffic();
            before_park();
            let s = state();
            assert_eq!((s.until, s.idle_since), (None, None));
        });
    }

    #[test]
    fn the_adaptive_window_grows_when_too_short_and_shrinks_after_long_idles() {
        let us = Duration::from_micros;
        let mut s = State {
            mode: BusyPoll::Adaptive,
            ..State::OFF
        };
        let mut learn = |idle: Duration| {
            s.learn(idle);
            s.window.as_micros()
        };
        // Traffic 100 µs into each idle spell, longer than the window: 10, 20, 40, 80, then
        // the ceiling, which catches it.
        let grown: Vec<u128> = (0..6).map(|_| learn(us(100))).collect();
        assert_eq!(grown, [10, 20, 40, 80, 100, 100]);
        // Traffic the window caught leaves it as it is.
        assert_eq!(learn(us(30)), 100);
        // Idle longer than the ceiling halves it, down to closed.
        let shrunk: Vec<u128> = (0..5).map(|_| learn(us(101))).collect();
        assert_eq!(shrunk, [50, 25, 12, 0, 0]);
    }

    #[test]
    fn the_relay_hooks_learn_a_window_and_open_it() {
        enable(BusyPoll::Adaptive);
        let ms = Duration::from_millis;
        let budget = |s: &mut State| {
            s.period_start = Some(Instant::now());
            s.allowance = ms(5);
        };
        STATE.with(|s| budget(&mut s.borrow_mut()));
        assert_eq!(state().window, Duration::ZERO, "the window starts closed");
        // Traffic right after the thread went idle: a window is learnt and opened (retried:
        // a thread preempted for over 100 µs between the two calls learns the opposite).
        for _ in 0..100 {
            note_traffic();
            before_park();
            note_traffic();
            if state().window == GROW_START {
                break;
            }
        }
        let s = state();
        assert_eq!(s.window, GROW_START);
        assert!(s.until.is_some(), "the learnt window did not open");
        // Traffic after a long idle spell closes a 10 µs window, and nothing opens.
        before_park();
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.idle_since = s.idle_since.map(|t| t - ms(1));
            budget(&mut s);
        });
        note_traffic();
        let s = state();
        assert_eq!((s.window, s.until), (Duration::ZERO, None));
    }

    #[test]
    fn the_adaptive_budget_stops_polling_for_the_rest_of_its_period() {
        enable(BusyPoll::Adaptive);
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.window = ADAPTIVE_CEILING;
            s.period_start = Some(Instant::now());
            s.allowance = Duration::from_millis(2);
        });
        // Traffic every 50 µs keeps a 100 µs window open, so the thread polls between the
        // messages until the period's allowance is spent, and then sleeps between them.
        let cut = over_budget();
        note_traffic();
        let started = Instant::now();
        let mut polled = Duration::ZERO;
        while over_budget() == cut && started.elapsed() < BUDGET_PERIOD * 100 {
            let gap = Instant::now();
            while gap.elapsed() < Duration::from_micros(50) {
                before_park();
            }
            if state().polling_since.is_some() {
                polled += gap.elapsed();
            }
            note_traffic();
        }
        assert!(over_budget() > cut, "the budget never cut a window short");
        assert!(
            polled >= Duration::from_millis(1),
            "too little polled before the cut: {polled:?}"
        );
        // While the allowance is spent, traffic opens no window.
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.period_start = Some(Instant::now());
            s.spent = s.allowance;
        });
        note_traffic();
        assert_eq!(state().until, None, "a window opened over budget");
        // The next period polls again.
        STATE.with(|s| s.borrow_mut().period_start = Some(Instant::now() - BUDGET_PERIOD));
        note_traffic();
        assert!(state().until.is_some(), "the new period did not poll");
    }

    #[test]
    fn the_allowance_is_four_times_the_last_periods_work_up_to_the_cap() {
        let (ms, us) = (Duration::from_millis, Duration::from_micros);
        let allowance = |elapsed: Duration, spent: Duration, slept: Duration| {
            let now = Instant::now();
            let mut s = State {
                mode: BusyPoll::Adaptive,
                period_start: Some(now - elapsed),
                spent,
                slept,
                ..State::OFF
            };
            s.roll_period(now);
            s.allowance.as_micros()
        };
        // 10 ms: 6.5 polled, 3 asleep, 0.5 worked: four times the work.
        assert_eq!(allowance(ms(10), us(6_500), ms(3)), 2_000);
        // 10 ms: 3 polled, 4 asleep, 3 worked: four times that is over the cap.
        assert_eq!(allowance(ms(10), ms(3), ms(4)), 9_000);
        // A second with 10 ms of work: 0.4 ms per 10 ms period.
        assert_eq!(allowance(ms(1000), ms(0), ms(990)), 400);
        // Asleep throughout: nothing.
        assert_eq!(allowance(ms(10), ms(0), ms(10)), 0);
        // A period not yet over keeps its allowance.
        assert_eq!(allowance(ms(5), ms(0), ms(0)), 0);
    }

    #[test]
    fn a_run_of_polls_is_charged_to_the_periods_it_spans() {
        let ms = Duration::from_millis;
        let now = Instant::now();
        // A period that began 12 ms ago: 7 ms asleep, 1 ms of work, then 4 ms of polls that
        // end now.
        let mut s = State {
            mode: BusyPoll::Adaptive,
            period_start: Some(now - ms(12)),
            polling_since: Some(now - ms(4)),
            slept: ms(7),
            ..State::OFF
        };
        s.charge(now);
        // The polls are the ended period's, not its work: 4 × 1 ms per 12 ms, scaled to 10 ms.
        assert_eq!(s.allowance.as_micros(), 3_333);
        assert_eq!((s.spent, s.polling_since), (Duration::ZERO, None));
    }

    #[test]
    fn a_sleep_counts_against_the_period_it_began_in() {
        enable(BusyPoll::Adaptive);
        // A period that began 2 ms before a one-second sleep.
        let now = Instant::now();
        let start = now - Duration::from_millis(1002);
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            s.period_start = Some(start);
            s.asleep_since = Some(now - Duration::from_secs(1));
            s.allowance = BUDGET_CAP;
        });
        after_unpark();
        let s = state();
        assert!(s.period_start.is_some_and(|p| p > start), "no new period");
        // 2 ms of work in a second: 4 × 0.02 ms per period (1 ms allows for a slow machine;
        // the sleep counted as work would give the whole cap).
        assert!(
            s.allowance < Duration::from_millis(1),
            "a long sleep left an allowance of {:?}",
            s.allowance
        );
    }

    #[test]
    fn the_flag_takes_auto_off_or_a_short_duration() {
        let parse = |s: &str| s.parse::<BusyPoll>();
        assert_eq!(parse("auto").ok(), Some(BusyPoll::Adaptive));
        assert_eq!(parse("off").ok(), Some(BusyPoll::Off));
        assert_eq!(parse("0s").ok(), Some(BusyPoll::Off));
        assert_eq!(
            parse("100us").ok(),
            Some(BusyPoll::Fixed(Duration::from_micros(100)))
        );
        let long = parse("1001us").expect_err("too long");
        assert!(long.to_string().contains("longer than"), "{long}");
        let junk = parse("soon").expect_err("junk");
        assert!(
            junk.to_string().contains("auto, off or a duration"),
            "{junk}"
        );
        for mode in [
            BusyPoll::Off,
            BusyPoll::Adaptive,
            BusyPoll::Fixed(Duration::from_micros(100)),
        ] {
            assert_eq!(parse(&mode.to_string()).ok(), Some(mode));
        }
    }
}
