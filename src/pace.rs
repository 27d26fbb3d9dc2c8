//! How fast krea-batch talks to Krea: the governor rate limiter for submissions, the shared
//! back-off after a 429, the cap on jobs in flight that adapts when Krea says it is full, and
//! the schedule on which each job is polled.
//!
//! The pace can change while the pacer runs ([`Pacer::set_pace`]): the controller
//! (`runner/controller.rs`) learns the account's request rate and sets it here, and governor
//! stays the one limiter every POST goes through.
//!
//! Everything here is owned by the engine loop (`runner.rs`) and touched through `&mut self`:
//! one pacer per engine, so every POST goes through the same limiter. Time is read from tokio's
//! clock, so tests can pause it.

use crate::retry;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;
use tokio::time::Instant;

/// governor's clock, read from tokio's timer so that paused-time tests move it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

/// How fast submissions may go: POSTs per second (`None`: no limit at all) and how many may go
/// at once before that rate applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pace {
    /// Steady rate, POSTs per second; `None` lets every POST through at once.
    pub per_second: Option<f64>,
    /// POSTs allowed at once before the rate applies (0 counts as 1).
    pub burst: u32,
}

impl Pace {
    /// The slowest pace a limiter is built for (one POST an hour): a lower or non-finite rate
    /// asked for is taken as this, never as "no limit".
    pub const SLOWEST_PER_SECOND: f64 = 1.0 / 3600.0;

    /// `per_minute` POSTs a minute with bursts of `burst`.
    #[must_use]
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        Self { per_second: Some(f64::from(per_minute.max(1)) / 60.0), burst }
    }

    /// governor's quota for this pace; `None` when there is no limit.
    fn quota(self) -> Option<Quota> {
        let per_second = self.per_second?;
        let per_second = if per_second.is_finite() {
            per_second.max(Self::SLOWEST_PER_SECOND)
        } else {
            Self::SLOWEST_PER_SECOND
        };
        // Above ~1e9 per second the period rounds to zero nanoseconds: no limit in effect.
        let period = Duration::try_from_secs_f64(1.0 / per_second).ok()?;
        let burst = NonZeroU32::new(self.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Some(Quota::with_period(period)?.allow_burst(burst))
    }
}

/// The submission pacer: a token bucket (a [`Pace`]: `submissions_per_minute` with a `burst`,
/// or what the controller learned), a cool-down after 429s, and the adaptive cap on jobs in
/// flight.
pub struct Pacer {
    /// `None` while the pace sets no limit.
    limiter: Option<Limiter>,
    pace: Pace,
    cooldown_until: Option<Instant>,
    /// 429s in a row without an accepted submission in between.
    rate_limited_streak: u32,
    backoff_start: Duration,
    cap: AdaptiveCap,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("pace", &self.pace)
            .field("cooldown_until", &self.cooldown_until)
            .field("streak", &self.rate_limited_streak)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Pacer {
    /// A pacer for `per_minute` submissions with bursts of `burst`, at most `max_in_flight` jobs
    /// in flight, and `backoff_start` as the first wait after a 429.
    #[must_use]
    pub fn new(per_minute: u32, burst: u32, max_in_flight: u32, backoff_start: Duration) -> Self {
        let pace = Pace::per_minute(per_minute, burst);
        Self {
            limiter: pace.quota().map(|quota| RateLimiter::direct_with_clock(quota, TokioClock)),
            pace,
            cooldown_until: None,
            rate_limited_streak: 0,
            backoff_start,
            cap: AdaptiveCap::new(max_in_flight.max(1) as usize),
        }
    }

    /// The pace in force.
    #[must_use]
    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// Changes the pace from now on: governor's limiter is built again with the new quota.
    /// The new bucket starts empty, so a change never hands out a burst on top of what the old
    /// limiter already let through (after a request-rate 429 that would earn another one).
    pub fn set_pace(&mut self, pace: Pace) {
        if pace == self.pace {
            return;
        }
        self.pace = pace;
        self.limiter = pace.quota().map(|quota| {
            let limiter = RateLimiter::direct_with_clock(quota, TokioClock);
            let _ = limiter.check_n(quota.burst_size());
            limiter
        });
    }

    /// How many jobs may be in flight now.
    #[must_use]
    pub fn in_flight_cap(&self) -> usize {
        self.cap.current()
    }

    /// Takes a permit for one POST now, or says when to ask again. Call only when a job is ready
    /// to go and a slot is free: a granted permit is spent.
    pub fn try_acquire(&mut self) -> Result<(), Instant> {
        let now = Instant::now();
        if let Some(until) = self.cooldown_until {
            if now < until {
                return Err(until);
            }
            self.cooldown_until = None;
        }
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter
            .check()
            .map(drop)
            .map_err(|not_until| now + not_until.wait_time_from(TokioClock.now()))
    }

    /// Krea answered 429 with `in_flight` of our jobs (not counting the refused one) in flight.
    /// The in-flight cap drops to what Krea evidently accepts. Every submission pauses for
    /// `Retry-After`, or an exponential back-off with jitter, except after a first 429 with jobs
    /// in flight: Krea's concurrency is full, and the lowered cap already holds the next
    /// submission back until one of them ends. Returns the pause.
    pub fn on_rate_limited(&mut self, retry_after: Option<Duration>, in_flight: usize) -> Duration {
        let concurrency_full =
            retry_after.is_none() && in_flight > 0 && self.rate_limited_streak == 0;
        let wait = if concurrency_full {
            Duration::ZERO
        } else {
            retry::rate_limit_delay(self.rate_limited_streak, self.backoff_start, retry_after)
        };
        self.rate_limited_streak = self.rate_limited_streak.saturating_add(1);
        self.pause(wait);
        self.cap.on_rate_limited(in_flight);
        wait
    }

    /// Krea could not be reached: every submission pauses, the pause growing while this goes
    /// on. Returns the pause.
    pub fn on_unreachable(&mut self) -> Duration {
        let wait = retry::rate_limit_delay(self.rate_limited_streak, self.backoff_start, None);
        self.rate_limited_streak = self.rate_limited_streak.saturating_add(1);
        self.pause(wait);
        wait
    }

    fn pause(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        self.cooldown_until = Some(self.cooldown_until.map_or(until, |current| current.max(until)));
    }

    /// Krea accepted a submission.
    pub fn on_accepted(&mut self) {
        self.rate_limited_streak = 0;
        self.cap.on_accepted();
    }
}

/// The cap on jobs in flight: the configured maximum, lowered to what Krea accepted when a 429
/// says its concurrency and backlog are full, then raised again by one after every two rounds of
/// accepted submissions (additive increase, multiplicative decrease). Krea publishes no limits,
/// so this is how krea-batch finds them without a 429 per job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptiveCap {
    configured: usize,
    current: usize,
    accepted_since_change: usize,
}

impl AdaptiveCap {
    /// Starts at the configured cap.
    #[must_use]
    pub fn new(configured: usize) -> Self {
        Self { configured, current: configured, accepted_since_change: 0 }
    }

    /// The cap now.
    #[must_use]
    pub fn current(&self) -> usize {
        self.current
    }

    /// A 429 arrived while `in_flight` jobs were in flight.
    pub fn on_rate_limited(&mut self, in_flight: usize) {
        self.current = in_flight.clamp(1, self.current);
        self.accepted_since_change = 0;
    }

    /// A submission was accepted.
    pub fn on_accepted(&mut self) {
        if self.current >= self.configured {
            return;
        }
        self.accepted_since_change += 1;
        if self.accepted_since_change >= 2 * self.current {
            self.current += 1;
            self.accepted_since_change = 0;
        }
    }
}

/// When to poll a job next.
///
/// The first poll comes `first` after submission (2 s for images, 5 s for video by default, as
/// Krea's own examples poll). Each later delay is 1.5 times the previous, up to `max`. When Krea
/// reports `sampling` or `intermediate-complete` the end is near, so the delay drops back to
/// `first`. For a job of length T the number of GETs is about log₁.₅(T/first) + 2 while the
/// delays are below `max`, then T/`max` more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollSchedule {
    /// The first delay.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl PollSchedule {
    /// The delay after `previous` (None for the first poll); `near_end` drops back to `first`.
    #[must_use]
    pub fn next_delay(&self, previous: Option<Duration>, near_end: bool) -> Duration {
        match previous {
            None => self.first.min(self.max),
            Some(_) if near_end => self.first.min(self.max),
            Some(previous) => previous.mul_f64(1.5).clamp(self.first.min(self.max), self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_paces_after_the_burst() {
        let mut pacer = Pacer::new(60, 3, 10, Duration::from_secs(1));
        for _ in 0..3 {
            assert!(pacer.try_acquire().is_ok(), "the burst goes at once");
        }
        let retry_at = pacer.try_acquire().expect_err("past the burst");
        let wait = retry_at - Instant::now();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        tokio::time::sleep_until(retry_at).await;
        assert!(pacer.try_acquire().is_ok());
        assert!(pacer.try_acquire().is_err(), "one permit per second");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_pauses_everything_and_grows() {
        let mut pacer = Pacer::new(6000, 100, 10, Duration::from_secs(2));
        let full = pacer.on_rate_limited(None, 4);
        assert_eq!(full, Duration::ZERO, "concurrency full: the lowered cap is the pause");
        assert_eq!(pacer.in_flight_cap(), 4);
        let first = pacer.on_rate_limited(None, 4);
        assert!(first >= Duration::from_millis(4500) && first <= Duration::from_millis(7500));
        assert!(pacer.try_acquire().is_err(), "cooling down");
        let second = pacer.on_rate_limited(None, 4);
        assert!(second > first, "{second:?} after {first:?}");
        tokio::time::sleep(second).await;
        assert!(pacer.try_acquire().is_ok());
        pacer.on_accepted();
        let after_success = pacer.on_rate_limited(Some(Duration::from_secs(9)), 4);
        assert_eq!(after_success, Duration::from_secs(9), "Retry-After is honoured");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_changes_at_runtime_without_a_fresh_burst() {
        let mut pacer = Pacer::new(60, 5, 10, Duration::from_secs(1));
        pacer.set_pace(Pace { per_second: Some(10.0), burst: 3 });
        let retry_at = pacer.try_acquire().expect_err("the new bucket starts empty");
        let wait = retry_at - Instant::now();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        tokio::time::sleep_until(retry_at).await;
        assert!(pacer.try_acquire().is_ok(), "ten a second");
        assert!(pacer.try_acquire().is_err());
        pacer.set_pace(Pace { per_second: None, burst: 1 });
        for _ in 0..100 {
            assert!(pacer.try_acquire().is_ok(), "no limit");
        }
        pacer.set_pace(Pace { per_second: Some(f64::NAN), burst: 1 });
        assert!(pacer.try_acquire().is_err(), "a rate that is no number is the slowest");
        assert_eq!(pacer.pace().per_second.map(f64::is_nan), Some(true));
    }

    #[test]
    fn adaptive_cap_finds_the_limit_and_probes_upwards() {
        let mut cap = AdaptiveCap::new(64);
        cap.on_rate_limited(8);
        assert_eq!(cap.current(), 8);
        for _ in 0..15 {
            cap.on_accepted();
        }
        assert_eq!(cap.current(), 8, "two rounds before probing");
        cap.on_accepted();
        assert_eq!(cap.current(), 9);
        cap.on_rate_limited(0);
        assert_eq!(cap.current(), 1, "never below one");
        let mut full = AdaptiveCap::new(3);
        full.on_accepted();
        assert_eq!(full.current(), 3, "never above the configured cap");
    }

    #[test]
    fn poll_schedule_backs_off_to_the_cap() {
        let schedule = PollSchedule { first: Duration::from_secs(2), max: Duration::from_secs(10) };
        let mut delay = None;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let next = schedule.next_delay(delay, false);
            delays.push(next.as_millis());
            delay = Some(next);
        }
        assert_eq!(delays, [2000, 3000, 4500, 6750, 10000, 10000]);
        assert_eq!(schedule.next_delay(delay, true), Duration::from_secs(2));
    }
}
