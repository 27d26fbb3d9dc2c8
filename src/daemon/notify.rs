//! Talking to systemd: `READY=1`, `STATUS=`, `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1` through
//! `sd-notify`. Without `NOTIFY_SOCKET` every call does nothing, so the daemon works the same
//! outside systemd.

use crate::runner::{EngineStatus, StopReason};
use std::fmt::Write as _;

/// Sends `states`; a failure is logged once at debug level and otherwise ignored (systemd is
/// an observer here, never a reason to stop).
pub(crate) fn send(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!(%err, "cannot notify systemd");
    }
}

/// `READY=1` with the status line.
pub(crate) fn ready(status: &str) {
    send(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (systemd 253 and later require both).
pub(crate) fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => send(&[sd_notify::NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
pub(crate) fn stopping() {
    send(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1`.
pub(crate) fn watchdog() {
    send(&[sd_notify::NotifyState::Watchdog]);
}

/// `STATUS=…`.
pub(crate) fn status(line: &str) {
    send(&[sd_notify::NotifyState::Status(line)]);
}

/// The one-line status systemd shows: in flight, queued, done, failed, and the pause.
#[must_use]
pub(crate) fn status_line(status: &EngineStatus) -> String {
    let c = &status.counts;
    let mut line = format!(
        "{} in flight, {} queued, {} done, {} failed",
        c.in_flight + c.unknown,
        c.pending,
        c.completed,
        c.failed
    );
    if c.download_pending > 0 {
        let _ = write!(line, ", {} to download", c.download_pending);
    }
    let _ = match status.paused {
        Some(StopReason::PaymentRequired) => write!(
            line,
            "; paused: Krea API balance exhausted (402), {} waiting; top up, then SIGHUP or \
             `krea-batch resume`",
            c.pending
        ),
        Some(StopReason::AuthRefused) => write!(
            line,
            "; paused: Krea refused the API key, {} waiting; fix the key, then SIGHUP",
            c.pending
        ),
        Some(StopReason::BudgetReached) => write!(
            line,
            "; paused: the budget is reached, {} waiting; raise it and reload, or wait for the \
             next day (a daily budget)",
            c.pending
        ),
        Some(StopReason::Interrupted) => write!(line, "; stopping"),
        None => Ok(()),
    };
    if !status.learned.is_empty() {
        let _ = write!(line, "; {}", status.learned);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_says_what_and_why() {
        let mut status = EngineStatus::default();
        status.counts.in_flight = 3;
        status.counts.pending = 40;
        status.counts.completed = 7;
        assert_eq!(status_line(&status), "3 in flight, 40 queued, 7 done, 0 failed");
        status.learned = "account runs about 20 at a time; pace 4.1/s".into();
        assert_eq!(
            status_line(&status),
            "3 in flight, 40 queued, 7 done, 0 failed; account runs about 20 at a time; pace 4.1/s"
        );
        status.learned.clear();
        status.paused = Some(StopReason::PaymentRequired);
        let line = status_line(&status);
        assert!(
            line.contains("paused") && line.contains("402") && line.contains("40 waiting"),
            "{line}"
        );
    }
}
