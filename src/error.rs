//! The errors every layer may raise and the binary sorts into exit codes: [`InputError`] (bad
//! input or usage, exit code 2). It lives below the commands so that the layers they build on
//! (set-up, the daemon's inbox, `control`) can say "fix the input" without importing a command.

use std::error::Error;

/// Bad input or usage (exit code 2), as opposed to a failure while running. It shows what it
/// wraps, and keeps that error's sources.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct InputError(Box<dyn Error + Send + Sync>);

impl InputError {
    /// Bad input said in words, with no error beneath it.
    pub fn msg(message: impl Into<String>) -> Self {
        Self(message.into().into())
    }

    /// Bad input that `err` describes, kept whole.
    pub fn new(err: impl Error + Send + Sync + 'static) -> Self {
        Self(Box::new(err))
    }

    /// Bad input: `message` (which says what `source` is about, in its own words), caused by
    /// `source`.
    pub fn because(message: impl Into<String>, source: impl Error + Send + Sync + 'static) -> Self {
        Self(Box::new(Because { message: message.into(), source: Box::new(source) }))
    }
}

/// A message and the error beneath it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Because {
    message: String,
    #[source]
    source: Box<dyn Error + Send + Sync>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_beneath_is_kept() {
        let io = std::io::Error::other("disk on fire");
        let err = InputError::because(format!("output: {io}"), io);
        assert_eq!(err.to_string(), "output: disk on fire");
        let source = err.source().expect("a source");
        assert_eq!(source.to_string(), "disk on fire");
        let plain = InputError::msg("no API key");
        assert_eq!(plain.to_string(), "no API key");
        assert!(plain.source().is_none());
    }
}
