//! How fast krea-batch talks to Krea: the governor rate limiter for submissions, the pause
//! while Krea cannot be reached, and the schedule on which each job is polled. What to do about
//! a 429 and how many jobs may be in flight is the controller's (`runner/controller.rs`).
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
pub(crate) struct TokioClock;

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
pub(crate) struct Pace {
    /// Steady rate, POSTs per second; `None` lets every POST through at once.
    pub per_second: Option<f64>,
    /// POSTs allowed at once before the rate applies (0 counts as 1).
    pub burst: u32,
}

impl Pace {
    /// The slowest pace a limiter is built for (one POST an hour): a lower or non-finite rate
    /// asked for is taken as this, never as "no limit".
    pub(crate) const SLOWEST_PER_SECOND: f64 = 1.0 / 3600.0;

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
/// or what the controller learned) and a cool-down while Krea cannot be reached.
pub(crate) struct Pacer {
    /// `None` while the pace sets no limit.
    limiter: Option<Limiter>,
    pace: Pace,
    cooldown_until: Option<Instant>,
    /// Failures to reach Krea in a row without an answer in between.
    unreachable_streak: u32,
    backoff_start: Duration,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("pace", &self.pace)
            .field("cooldown_until", &self.cooldown_until)
            .field("streak", &self.unreachable_streak)
            .finish_non_exhaustive()
    }
}

impl Pacer {
    /// A pacer at `pace` (its burst available at once), with `backoff_start` as the first
    /// pause while Krea cannot be reached.
    #[must_use]
    pub(crate) fn new(pace: Pace, backoff_start: Duration) -> Self {
        Self {
            limiter: pace.quota().map(|quota| RateLimiter::direct_with_clock(quota, TokioClock)),
            pace,
            cooldown_until: None,
            unreachable_streak: 0,
            backoff_start,
        }
    }

    /// The pace in force.
    #[must_use]
    pub(crate) fn pace(&self) -> Pace {
        self.pace
    }

    /// Changes the pace from now on: governor's limiter is built again with the new quota.
    /// The new bucket starts empty, so a change never hands out a burst on top of what the old
    /// limiter already let through (after a request-rate 429 that would earn another one).
    pub(crate) fn set_pace(&mut self, pace: Pace) {
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

    /// Takes a permit for one POST now, or says when to ask again. Call only when a job is ready
    /// to go and a slot is free: a granted permit is spent.
    pub(crate) fn try_acquire(&mut self) -> Result<(), Instant> {
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

    /// Krea could not be reached: every submission pauses, the pause growing while this goes
    /// on. Returns the pause.
    pub(crate) fn on_unreachable(&mut self) -> Duration {
        let wait = retry::rate_limit_delay(self.unreachable_streak, self.backoff_start, None);
        self.unreachable_streak = self.unreachable_streak.saturating_add(1);
        let until = Instant::now() + wait;
        self.cooldown_until = Some(self.cooldown_until.map_or(until, |current| current.max(until)));
        wait
    }

    /// Krea answered a submission (any answer): it can be reached again.
    pub(crate) fn on_answered(&mut self) {
        self.unreachable_streak = 0;
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
pub(crate) struct PollSchedule {
    /// The first delay.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl PollSchedule {
    /// The delay after `previous` (None for the first poll); `near_end` drops back to `first`.
    #[must_use]
    pub(crate) fn next_delay(&self, previous: Option<Duration>, near_end: bool) -> Duration {
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
        let mut pacer =
            Pacer::new(Pace { per_second: Some(1.0), burst: 3 }, Duration::from_secs(1));
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
    async fn unreachable_pauses_everything_and_grows_until_answered() {
        let mut pacer = Pacer::new(Pace { per_second: None, burst: 1 }, Duration::from_secs(2));
        let first = pacer.on_unreachable();
        assert!(first >= Duration::from_millis(1500) && first <= Duration::from_millis(2500));
        assert!(pacer.try_acquire().is_err(), "cooling down");
        let second = pacer.on_unreachable();
        assert!(second > first, "{second:?} after {first:?}");
        tokio::time::sleep(second).await;
        assert!(pacer.try_acquire().is_ok());
        pacer.on_answered();
        let again = pacer.on_unreachable();
        assert!(again <= Duration::from_millis(2500), "the streak starts over: {again:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_changes_at_runtime_without_a_fresh_burst() {
        let mut pacer =
            Pacer::new(Pace { per_second: Some(1.0), burst: 5 }, Duration::from_secs(1));
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
