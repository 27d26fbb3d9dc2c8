//! The request-rate limit on `POST /generate` ([`super::config::RateLimit`]): a sliding window of
//! the POSTs it let through, deciding whether the next one may pass and, if not, how long to
//! ask the client to wait. Pure: time comes in as milliseconds; `http.rs` answers the 429.

use super::config::RateLimit;
use super::jobs::Millis;
use std::collections::VecDeque;

/// The arrival times of the POSTs let through within the last window, oldest first.
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    admitted: VecDeque<Millis>,
}

impl RateWindow {
    /// Lets a POST arriving at `now` through under `limit` (recording it), or returns how many
    /// milliseconds until one would pass. A refused POST is not recorded: waiting out the
    /// answer is enough to get through.
    pub(crate) fn admit(&mut self, limit: &RateLimit, now: Millis) -> Result<(), Millis> {
        let window = u64::try_from(limit.per.as_millis()).unwrap_or(u64::MAX).max(1);
        while self.admitted.front().is_some_and(|at| at.saturating_add(window) <= now) {
            self.admitted.pop_front();
        }
        let allowed = usize::try_from(limit.requests).unwrap_or(usize::MAX);
        if self.admitted.len() < allowed {
            self.admitted.push_back(now);
            return Ok(());
        }
        // The oldest admitted POST leaves the window first; with a limit of 0 none ever does,
        // so the client is told to wait a whole window.
        let frees_at = self.admitted.front().map_or(now + window, |oldest| oldest + window);
        Err(frees_at.saturating_sub(now).max(1))
    }
}

/// `Retry-After` in whole seconds (the header has no finer unit), rounded up so that a client
/// honouring it is let through.
pub(crate) fn retry_after_secs(wait_ms: Millis) -> u64 {
    wait_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_window_slides_and_refusals_do_not_count() {
        let limit = RateLimit { requests: 2, per: Duration::from_secs(1) };
        let mut window = RateWindow::default();
        assert_eq!(window.admit(&limit, 0), Ok(()));
        assert_eq!(window.admit(&limit, 400), Ok(()));
        assert_eq!(window.admit(&limit, 500), Err(500), "the first leaves at 1000");
        assert_eq!(window.admit(&limit, 999), Err(1));
        assert_eq!(window.admit(&limit, 1000), Ok(()), "refusals took no room");
        assert_eq!(window.admit(&limit, 1100), Err(300));
        assert_eq!(retry_after_secs(300), 1);
        assert_eq!(retry_after_secs(1001), 2);
        let closed = RateLimit { requests: 0, per: Duration::from_secs(3) };
        assert_eq!(RateWindow::default().admit(&closed, 10), Err(3000));
    }
}
