//! Talking to systemd: `READY=1`, `STATUS=`, `WATCHDOG=1`, `RELOADING=1`, `STOPPING=1`, with
//! `sd-notify`'s message format. Without `NOTIFY_SOCKET` every call does nothing, so the daemon
//! works the same outside systemd. Sending never blocks: the datagram goes through a
//! non-blocking socket, and a full queue at systemd's end drops the message instead of stalling
//! the daemon's loop (the next status or watchdog message follows soon).

use crate::runner::{EngineStatus, StopReason};
use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;

/// Sends `states`; a failure is logged at debug level and otherwise ignored (systemd is an
/// observer here, never a reason to stop).
pub(crate) fn send(states: &[sd_notify::NotifyState<'_>]) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(err) = send_to(std::path::Path::new(&socket), states) {
        tracing::debug!(%err, "cannot notify systemd");
    }
}

/// One datagram of `states`, one `KEY=VALUE` a line, to the socket at `path` (`@name` is an
/// abstract socket, as `sd_notify(3)` specifies). `sd_notify::notify` sends through a blocking
/// socket, which would stall the daemon's loop while systemd's queue is full, hence this.
fn send_to(path: &std::path::Path, states: &[sd_notify::NotifyState<'_>]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut message = String::new();
    for state in states {
        let _ = writeln!(message, "{state}");
    }
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    match path.as_os_str().as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &address)?;
        }
        None => {
            socket.send_to(message.as_bytes(), path)?;
        }
    }
    Ok(())
}

/// `READY=1` with the status line.
pub(crate) fn ready(status: &str) {
    send(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (systemd 253 and later require both).
pub(crate) fn reloading() {
    send(&reloading_states());
}

fn reloading_states() -> Vec<sd_notify::NotifyState<'static>> {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => vec![sd_notify::NotifyState::Reloading, now],
        Err(_) => vec![sd_notify::NotifyState::Reloading],
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
            "; paused: the budget is reached, {} waiting; raise it and reload",
            c.pending
        ),
        Some(StopReason::DailyBudgetReached) => write!(
            line,
            "; paused: the daily budget is reached, {} waiting; resumes at midnight UTC (or \
             raise it and reload)",
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

    /// A full queue at systemd's end drops the message at once, never waits: the receiving
    /// socket here is never read, so a blocking send would hang this test.
    #[test]
    fn sending_to_a_full_notify_socket_returns_instead_of_blocking() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).expect("bound");
        let mut outcomes = Vec::new();
        for _ in 0..10_000 {
            let sent = send_to(&path, &[sd_notify::NotifyState::Watchdog]);
            let full = sent.is_err();
            outcomes.push(sent);
            if full {
                break;
            }
        }
        let last = outcomes.pop().expect("sent at least once").expect_err("the queue filled");
        assert_eq!(last.kind(), std::io::ErrorKind::WouldBlock, "{last}");
        let mut buffer = [0; 64];
        let n = systemd.recv(&mut buffer).expect("the first message arrived");
        assert_eq!(&buffer[..n], b"WATCHDOG=1\n");
    }

    /// `RELOADING=1` goes with `MONOTONIC_USEC=`, as `Type=notify-reload` requires.
    #[test]
    fn the_reload_message_carries_the_monotonic_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).expect("bound");
        send_to(&path, &reloading_states()).expect("sent");
        let mut buffer = [0; 128];
        let n = systemd.recv(&mut buffer).expect("received");
        let text = std::str::from_utf8(&buffer[..n]).expect("text");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"), "{text}");
        let usec = lines.next().and_then(|l| l.strip_prefix("MONOTONIC_USEC=")).expect(text);
        assert!(usec.parse::<u64>().is_ok_and(|n| n > 0), "{text}");
    }

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
