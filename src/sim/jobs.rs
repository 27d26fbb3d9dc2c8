//! The job vocabulary the world shares with the HTTP layer: the states Krea reports and their
//! names on the wire (with the state a running job is in after a given fraction of its job
//! time), what a creation carries, what a response shows, what a listing asks, and why a
//! request is refused. Plain values, no behaviour beyond naming.

use super::models::Kind;
use super::picture::Picture;

/// Unix time in milliseconds.
pub(crate) type Millis = u64;

/// Why a job failed: the `code` and `message` the API reports.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Failure {
    pub code: &'static str,
    pub message: String,
}

/// A job to create, once its request has been validated.
#[derive(Clone, Debug)]
pub(crate) struct NewJob {
    pub model: String,
    pub prompt: String,
    pub kind: Kind,
    pub job_type: &'static str,
    pub price_micros: i64,
    /// The first input URL of the request (`image_url`, `start_image`, …), if it had one.
    pub input: Option<String>,
    /// What its result pictures show besides the prompt.
    pub picture: Picture,
}

/// Why a creation was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The price does not fit in the balance left after reservations: 402.
    InsufficientBalance,
    /// Concurrency and backlog are both full: 429.
    AtCapacity,
}

/// Why a cancellation was refused (both are 404 on the wire).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CancelError {
    NotFound,
    NotCancellable(Status),
}

/// A job as a response shows it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct JobView {
    pub id: String,
    pub status: Status,
    pub kind: Kind,
    pub job_type: &'static str,
    pub created_ms: Millis,
    /// When it reached its terminal state.
    pub ended_ms: Option<Millis>,
    pub failure: Option<Failure>,
}

/// What a list request asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListQuery {
    pub limit: usize,
    /// Only jobs created strictly before this.
    pub before_ms: Option<Millis>,
    pub status: Option<Status>,
    pub types: Option<Vec<String>>,
}

/// Where a job is, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Status {
    Backlogged,
    Queued,
    Scheduled,
    /// The configured undocumented state (`quirks.undocumented_state`), between scheduled and
    /// processing.
    Undocumented,
    Processing,
    Sampling,
    IntermediateComplete,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub(crate) fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The state of a job `elapsed` ms into a run of `duration` ms: `queued` for the first
    /// tenth, `scheduled` for the second, the undocumented state (if any) for the third,
    /// `processing` to half-way, `sampling` to 80 %, `intermediate-complete` to the end.
    pub(crate) fn running(elapsed: Millis, duration: Millis, undocumented: bool) -> Self {
        let tenths = elapsed.saturating_mul(10).checked_div(duration).unwrap_or(10);
        match tenths {
            0 => Self::Queued,
            1 => Self::Scheduled,
            2 if undocumented => Self::Undocumented,
            2..=4 => Self::Processing,
            5..=7 => Self::Sampling,
            _ => Self::IntermediateComplete,
        }
    }
}

/// The name of a state on the wire; `undocumented` names `Status::Undocumented`.
pub(crate) fn status_name(status: Status, undocumented: &str) -> &str {
    match status {
        Status::Backlogged => "backlogged",
        Status::Queued => "queued",
        Status::Scheduled => "scheduled",
        Status::Undocumented => undocumented,
        Status::Processing => "processing",
        Status::Sampling => "sampling",
        Status::IntermediateComplete => "intermediate-complete",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

/// The state with this documented name.
pub(crate) fn parse_status(name: &str) -> Option<Status> {
    [
        Status::Backlogged,
        Status::Queued,
        Status::Scheduled,
        Status::Processing,
        Status::Sampling,
        Status::IntermediateComplete,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ]
    .into_iter()
    .find(|status| status_name(*status, "") == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_fraction_of_the_job_time() {
        assert_eq!(Status::running(0, 1_000, false), Status::Queued);
        assert_eq!(Status::running(250, 1_000, false), Status::Processing);
        assert_eq!(Status::running(250, 1_000, true), Status::Undocumented);
        assert_eq!(Status::running(799, 1_000, false), Status::Sampling);
        assert_eq!(Status::running(0, 0, false), Status::IntermediateComplete);
        assert_eq!(status_name(Status::Undocumented, "warming"), "warming");
        assert_eq!(parse_status("intermediate-complete"), Some(Status::IntermediateComplete));
        assert_eq!(parse_status("warming"), None);
    }
}
