//! The errors every layer may raise and the binary sorts into exit codes: [`InputError`] (bad
//! input or usage, exit code 2). It lives below the commands so that the layers they build on
//! (set-up, the daemon's inbox, `control`) can say "fix the input" without importing a command.

/// Bad input or usage (exit code 2), as opposed to a failure while running.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);
