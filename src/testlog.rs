//! Tests only: what the code under test logs, captured as text for assertions. Capture lasts
//! while the returned guard lives, on the current thread (a current-thread tokio test's tasks
//! included).

use std::sync::{Arc, Mutex, PoisonError};

/// The text logged so far.
#[derive(Clone, Default)]
pub(crate) struct LogLines(Arc<Mutex<Vec<u8>>>);

impl LogLines {
    /// Everything logged, one event a line, without times or colours.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Captures this thread's log (info and above) until the guard is dropped.
pub(crate) fn capture() -> (LogLines, tracing::subscriber::DefaultGuard) {
    let lines = LogLines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(lines.clone())
        .with_ansi(false)
        .without_time()
        .finish();
    (lines, tracing::subscriber::set_default(subscriber))
}
