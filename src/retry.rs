//! The retry policy: how long to wait before trying a transient failure again, and when to stop.
//!
//! Built on the `backoff` crate (exponential back-off with jitter, sleeping on tokio's clock).
//! The crate carries an "unmaintained" advisory (RUSTSEC-2025-0012); it is kept because the design
//! card names it, and it is used only here, so a swap to another crate touches one file.
//!
//! What counts as transient is the caller's decision (`api::ApiError::is_transient`, download
//! errors): this module only waits. POSTs are never retried through here: a POST without an
//! answer may have created a job (see `runner.rs`).

use backoff::backoff::Backoff;
use std::future::Future;
use std::time::Duration;

/// How a failed attempt is to be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Try again after the back-off, or after the given wait if the server named one.
    Retry(Option<Duration>),
    /// Stop: retrying cannot help.
    GiveUp,
}

/// An exponential back-off: `first`, then ×2 with ±30 % jitter up to `max`, for at most
/// `attempts` tries in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// The first wait.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// Tries in all, the first included.
    pub attempts: u32,
}

impl RetryPolicy {
    /// The policy for GET requests and downloads with `first` as the first wait: up to 6 tries
    /// over about a minute at the default of 2 s.
    #[must_use]
    pub(crate) fn transient(first: Duration) -> Self {
        Self { first, max: first.saturating_mul(16), attempts: 6 }
    }

    fn backoff(&self) -> Limited {
        let exponential = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.first)
            .with_max_interval(self.max)
            .with_multiplier(2.0)
            .with_randomization_factor(0.3)
            // The attempt count bounds the retries; the crate's elapsed-time limit reads the
            // wall clock, which paused-time tests cannot move.
            .with_max_elapsed_time(None)
            .build();
        Limited { inner: exponential, retries_left: self.attempts.saturating_sub(1) }
    }
}

/// An exponential back-off that stops after a number of retries.
struct Limited {
    inner: backoff::ExponentialBackoff,
    retries_left: u32,
}

impl Backoff for Limited {
    fn next_backoff(&mut self) -> Option<Duration> {
        self.retries_left = self.retries_left.checked_sub(1)?;
        self.inner.next_backoff()
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Runs `operation` until it succeeds, `classify` says to give up, or the policy's tries are
/// spent; returns the last error then. `on_retry` hears about each failure that will be retried.
pub(crate) async fn retry<T, E, Op, Fut>(
    policy: &RetryPolicy,
    classify: impl Fn(&E) -> Verdict,
    on_retry: impl Fn(&E, Duration),
    mut operation: Op,
) -> Result<T, E>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let attempt = || {
        let result = operation();
        let classify = &classify;
        async move {
            result.await.map_err(|err| match classify(&err) {
                Verdict::Retry(Some(wait)) => backoff::Error::retry_after(err, wait),
                Verdict::Retry(None) => backoff::Error::transient(err),
                Verdict::GiveUp => backoff::Error::permanent(err),
            })
        }
    };
    backoff::future::retry_notify(policy.backoff(), attempt, |err: E, wait| on_retry(&err, wait))
        .await
}

/// The pause after the `streak`-th 429 in a row (0 for the first): `Retry-After` when Krea sent
/// one, else `start` × 3ⁿ (Krea's own scripts wait 5, 15, 45 s) up to 20 × `start`, with ±25 %
/// jitter so that several clients do not come back at the same instant.
#[must_use]
pub(crate) fn rate_limit_delay(
    streak: u32,
    start: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(wait) = retry_after {
        return wait;
    }
    let factor = 3_u32.saturating_pow(streak.min(10)).min(20);
    let base = start.saturating_mul(factor);
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_then_gives_up() {
        let policy =
            RetryPolicy { first: Duration::from_secs(1), max: Duration::from_secs(4), attempts: 4 };
        let calls = Cell::new(0);
        let retried = Cell::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<(), &str> = retry(
            &policy,
            |_| Verdict::Retry(None),
            |_, _| retried.set(retried.get() + 1),
            || {
                calls.set(calls.get() + 1);
                async { Err("reset") }
            },
        )
        .await;
        assert_eq!(result, Err("reset"));
        assert_eq!(calls.get(), 4);
        assert_eq!(retried.get(), 3);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited <= Duration::from_secs(10),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried_and_success_ends_early() {
        let policy = RetryPolicy::transient(Duration::from_millis(10));
        let calls = Cell::new(0);
        let result: Result<(), &str> = retry(
            &policy,
            |_| Verdict::GiveUp,
            |_, _| {},
            || {
                calls.set(calls.get() + 1);
                async { Err("400") }
            },
        )
        .await;
        assert_eq!((result, calls.get()), (Err("400"), 1));

        calls.set(0);
        let result: Result<u8, &str> = retry(
            &policy,
            |_| Verdict::Retry(None),
            |_, _| {},
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 3 { Err("502") } else { Ok(7) } }
            },
        )
        .await;
        assert_eq!((result, calls.get()), (Ok(7), 3));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let policy = RetryPolicy::transient(Duration::from_millis(10));
        let calls = Cell::new(0);
        let started = tokio::time::Instant::now();
        let _: Result<(), &str> = retry(
            &policy,
            |_| Verdict::Retry(Some(Duration::from_secs(30))),
            |_, _| {},
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 2 { Err("429") } else { Ok(()) } }
            },
        )
        .await;
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    #[test]
    fn rate_limit_delays_grow_and_stay_bounded() {
        let start = Duration::from_secs(5);
        let first = rate_limit_delay(0, start, None);
        assert!(first >= Duration::from_millis(3750) && first <= Duration::from_millis(6250));
        let third = rate_limit_delay(2, start, None);
        assert!(third >= Duration::from_secs(33) && third <= Duration::from_secs(57), "{third:?}");
        let far = rate_limit_delay(40, start, None);
        assert!(far <= Duration::from_secs(125), "{far:?}");
        assert_eq!(
            rate_limit_delay(3, start, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
    }
}
