//! A job's phase in the engine: where it stands, with the data that standing needs. Submitted
//! holds Krea's id (and the engine's polls and cancel of it), completed its result URLs, failed
//! its reason. So a job polled without a Krea id, or completed without its results, cannot be
//! written down in the engine. The table (`table.rs`) moves jobs between phases; this file says
//! what a phase is and how a stored row becomes one.
//!
//! # Rows and phases
//!
//! The state file keeps flat columns (`state`, `remote_id`, `urls`, `error`), and any
//! combination of them can be read back. Rows become phases once, when the engine takes a job
//! on ([`Phase::of_row`]); each transition then writes the columns back from the phase
//! (`JobTable::enter`). A row that cannot be taken as it reads is repaired, and the repaired
//! row is written back:
//!
//! - `submitted` without a Krea id becomes `unknown`: it may exist at Krea and be billed, so it
//!   is reconciled like a POST that got no answer, never dropped and never sent blindly;
//! - `submitting` becomes `unknown` too (the store already does this when it opens, so a row
//!   handed over as `submitting` can only mean the same: its POST may have reached Krea).
//!
//! A `failed` row without a reason keeps an empty one (nothing depends on it: an end is final).

use crate::job::JobState;
use crate::store::JobRecord;
use std::time::Duration;

/// Where a job stands in the engine, with what that phase needs. Mirrors [`JobState`]; see the
/// module docs for how rows become phases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting to be sent.
    Pending,
    /// Its attempt is recorded; its POST may be on the wire.
    Submitting,
    /// Its POST got no answer: Krea may have created it.
    Unknown,
    /// Krea has it, under this id.
    Submitted(AtKrea),
    /// Krea completed it with these results; some are not on disk yet.
    Completed {
        /// Where the results are.
        urls: Vec<String>,
    },
    /// Every result is on disk.
    Downloaded,
    /// Ended without results.
    Failed {
        /// Why.
        reason: String,
    },
    /// Cancelled, before submission or at Krea.
    Cancelled,
}

impl Phase {
    /// The state stored for this phase.
    pub(super) fn state(&self) -> JobState {
        match self {
            Self::Pending => JobState::Pending,
            Self::Submitting => JobState::Submitting,
            Self::Unknown => JobState::Unknown,
            Self::Submitted(_) => JobState::Submitted,
            Self::Completed { .. } => JobState::Completed,
            Self::Downloaded => JobState::Downloaded,
            Self::Failed { .. } => JobState::Failed,
            Self::Cancelled => JobState::Cancelled,
        }
    }

    /// The phase of a stored row. A row that cannot be taken as it reads is repaired in place
    /// (see the module docs); returns whether it was, so the caller writes it back.
    pub(super) fn of_row(job: &mut JobRecord) -> (Self, bool) {
        let phase = match (job.state, &job.remote_id) {
            (JobState::Pending, _) => Self::Pending,
            (JobState::Unknown, _) => Self::Unknown,
            (JobState::Submitted, Some(id)) => Self::Submitted(AtKrea::new(id.clone())),
            (JobState::Submitting | JobState::Submitted, _) => {
                repair_to_unknown(job);
                return (Self::Unknown, true);
            }
            (JobState::Completed, _) => Self::Completed { urls: job.urls.clone() },
            (JobState::Downloaded, _) => Self::Downloaded,
            (JobState::Failed, _) => Self::Failed { reason: job.error.clone().unwrap_or_default() },
            (JobState::Cancelled, _) => Self::Cancelled,
        };
        (phase, false)
    }
}

/// A job Krea has: its id, and the engine's dealings with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AtKrea {
    remote_id: String,
    /// The last poll delay, for the back-off (kept by the table's poll timers).
    pub(super) poll_delay: Option<Duration>,
    /// Why the job is to be cancelled at Krea, if it is.
    pub(super) cancel: Option<CancelCause>,
    /// A DELETE is on the wire.
    pub(super) cancel_sent: bool,
    /// Krea's reason for refusing the latest DELETE: the job runs on, and the DELETE goes
    /// again once Krea shows the job in a state it cancels (`cancel.rs`).
    pub(super) cancel_refused: Option<String>,
}

impl AtKrea {
    /// A job Krea has just named `remote_id`, not yet polled nor cancelled.
    pub(super) fn new(remote_id: String) -> Self {
        Self { remote_id, poll_delay: None, cancel: None, cancel_sent: false, cancel_refused: None }
    }

    /// Krea's id of the job.
    pub(super) fn remote_id(&self) -> &str {
        &self.remote_id
    }
}

/// Why a job in flight is cancelled at Krea.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CancelCause {
    /// It outlived `job_timeout`.
    Timeout,
    /// The user asked (`krea-batch cancel`).
    User,
}

/// A move the lifecycle does not allow: a bug in the engine (`table.rs` says what is done
/// with it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "job {job} cannot go from {from} to {to}: refused and left as it was, so nothing is paid \
     twice (a bug in krea-batch; please report it)"
)]
pub(super) struct IllegalTransition {
    /// The job's name.
    pub(super) job: String,
    /// Where it is.
    pub(super) from: JobState,
    /// Where it was to go (or the phase an operation needs it to be in).
    pub(super) to: JobState,
}

/// A row that cannot be taken as it reads (module docs): it becomes `unknown`, reconciled like
/// a POST that got no answer.
fn repair_to_unknown(job: &mut JobRecord) {
    if job.state == JobState::Submitted {
        tracing::warn!(
            job = %job.name,
            "recorded as submitted without a Krea job id: looking for it at Krea before \
             anything else is submitted"
        );
        job.error = Some(SUBMITTED_WITHOUT_ID.to_owned());
    }
    job.state = JobState::Unknown;
    job.attempt_at = job.attempt_at.or(job.submitted_at);
}

/// The error a job submitted without a Krea job id carries until reconciliation decides.
pub(super) const SUBMITTED_WITHOUT_ID: &str =
    "recorded as submitted without a Krea job id; reconciled like an unanswered submission";
