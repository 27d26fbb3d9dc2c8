//! Log priorities for journald. Under systemd (`JOURNAL_STREAM` set) stderr goes to the journal,
//! which reads a leading `<N>` on a line as that line's syslog priority and strips it
//! (sd-daemon(3)); without one every line is `info`. [`Prioritised`] wraps the log writer so
//! that each line of an event starts with its level's prefix, and `journalctl -p warning`
//! shows warnings and errors only. The binary sets logging up (`main.rs`) and uses it there.

use std::io::Write;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The syslog priority of a `tracing` level: error 3 (`err`), warn 4 (`warning`), info 6
/// (`info`), debug and trace 7 (`debug`). Nothing krea-batch logs is `notice` (5) or above
/// `err`.
pub(crate) fn priority(level: Level) -> u8 {
    if level == Level::ERROR {
        3
    } else if level == Level::WARN {
        4
    } else if level == Level::INFO {
        6
    } else {
        7
    }
}

/// A `MakeWriter` whose writers start every line with the event's `<N>` priority.
#[derive(Clone, Debug)]
pub struct Prioritised<M> {
    inner: M,
}

impl<M> Prioritised<M> {
    /// Prefixes the lines that `inner`'s writers write.
    #[must_use]
    pub fn new(inner: M) -> Self {
        Self { inner }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Prioritised<M> {
    type Writer = PrefixedLines<M::Writer>;

    /// Without an event's level (`fmt` always gives one): `info`, journald's own default.
    fn make_writer(&'a self) -> Self::Writer {
        PrefixedLines::new(self.inner.make_writer(), priority(Level::INFO))
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        PrefixedLines::new(self.inner.make_writer_for(meta), priority(*meta.level()))
    }
}

/// Writes through to `inner`, putting `<N>` before each line: an event's message of several
/// lines keeps its priority on every one (journald reads each line as an entry).
pub struct PrefixedLines<W> {
    inner: W,
    prefix: [u8; 3],
    at_line_start: bool,
}

impl<W> PrefixedLines<W> {
    fn new(inner: W, priority: u8) -> Self {
        Self { inner, prefix: [b'<', b'0' + priority, b'>'], at_line_start: true }
    }
}

impl<W: Write> Write for PrefixedLines<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + self.prefix.len());
        for &byte in buf {
            if self.at_line_start {
                out.extend_from_slice(&self.prefix);
            }
            out.push(byte);
            self.at_line_start = byte == b'\n';
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testlog::LogLines;

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }

    /// Lines formatted as the service writes them under journald: no time, no colours, each
    /// line of each event led by its priority.
    #[test]
    fn formatted_lines_carry_their_priority() {
        let captured = LogLines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Prioritised::new(captured.clone()))
            .with_max_level(Level::DEBUG)
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(job = "fox", "download failed; retrying in 2 s");
            tracing::info!("first line\nsecond line");
            tracing::error!("stopped");
            tracing::debug!("polled");
        });
        let text = captured.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "<4> WARN download failed; retrying in 2 s job=\"fox\"",
                "<6> INFO first line",
                "<6>second line",
                "<3>ERROR stopped",
                "<7>DEBUG polled",
            ]
        );
    }
}
