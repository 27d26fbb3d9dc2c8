//! Cancelling jobs at Krea: the user's cancels (`krea-batch cancel`) and the job timeout's,
//! Krea's refusals, and what becomes of a job whose cancel Krea would not carry out.
//!
//! Krea cancels a job only while it is `queued` or `processing`; in any other state (for
//! example `backlogged` or `sampling`) it refuses the `DELETE` with a 404 and a reason, and the
//! job runs on and is billed if it completes. So a refusal is never silent: it is logged as a
//! warning with Krea's reason, the `DELETE` is sent again whenever a poll (`poll.rs`) shows the
//! job in a state Krea cancels, and a job that completes all the same is counted in the run's
//! summary ([`RefusedCancel`]) as run and billed.
//!
//! A job the user cancels before Krea has named it (its POST is on the wire, or unanswered) is
//! remembered here and cancelled as soon as it is at Krea, or instead of being sent again.

use super::phase::{CancelCause, IllegalTransition};
use super::status::RefusedCancel;
use super::{Engine, Event};
use crate::api::{ApiError, RemoteStatus};
use crate::job::JobState;
use std::collections::BTreeSet;
use std::sync::Arc;

/// What the engine keeps about cancels beyond each job's phase.
#[derive(Debug, Default)]
pub(super) struct Cancels {
    /// Jobs the user cancelled before Krea named them (by slot): cancelled once they are at
    /// Krea, or instead of being submitted again.
    waiting: BTreeSet<usize>,
    /// Jobs that were to be cancelled and that Krea completed (and billed) all the same.
    pub(super) billed: Vec<RefusedCancel>,
}

/// Whether Krea cancels a job in `status` (krea-api.md: only `queued` or `processing`).
pub(super) fn krea_cancels(status: &RemoteStatus) -> bool {
    matches!(status, RemoteStatus::Queued | RemoteStatus::Processing)
}

/// Krea's own words in a refused `DELETE`, or the error when it said none.
fn krea_reason(err: &ApiError) -> String {
    let said = match err {
        ApiError::NotFound { message }
        | ApiError::Rejected { message, .. }
        | ApiError::Auth { message, .. } => message.trim(),
        _ => "",
    };
    if said.is_empty() { err.to_string() } else { said.to_owned() }
}

impl Engine {
    /// `krea-batch cancel`: pending jobs are cancelled at once; jobs in flight are cancelled at
    /// Krea (not billed) as soon as Krea allows; jobs whose POST has no answer yet as soon as
    /// they are at Krea; finished jobs are left as they are.
    pub(super) fn cancel_jobs(&mut self, ids: &[i64]) {
        // A chain stops where the user cancelled it, whatever becomes of the job itself.
        self.chains_cancelled.extend(ids);
        for id in ids {
            let Some(slot) = self.table.slot_of(*id) else { continue };
            let name = self.table.job(slot).name.clone();
            match self.table.state(slot) {
                JobState::Pending => {
                    tracing::info!(job = %name, "cancelled before submission");
                    if let Err(err) = self.cancelled(slot, Some("cancelled by the user".into())) {
                        super::report_bug(&err);
                    }
                }
                JobState::Submitted => {
                    tracing::info!(job = %name, "cancelling at Krea");
                    self.ask_krea_to_cancel(slot);
                }
                JobState::Submitting | JobState::Unknown => {
                    tracing::info!(
                        job = %name,
                        "its submission is not answered yet: it is cancelled as soon as Krea's \
                         answer is known"
                    );
                    self.cancels.waiting.insert(slot);
                }
                JobState::Completed | JobState::Downloaded => {
                    tracing::info!(job = %name, "not cancelled: Krea has already completed it");
                }
                JobState::Failed | JobState::Cancelled => {
                    tracing::info!(job = %name, "not cancelled: it has already ended");
                }
            }
        }
    }

    /// Marks a submitted job as cancelled by the user and sends the `DELETE` now, unless one
    /// is on the wire or the engine is draining (then the next poll sends it).
    fn ask_krea_to_cancel(&mut self, slot: usize) {
        let draining = self.draining;
        let Some(at) = self.table.at_krea(slot) else { return };
        at.cancel = Some(CancelCause::User);
        if !at.cancel_sent
            && !draining
            && let Err(err) = self.spawn_cancel(slot)
        {
            super::report_bug(&err);
        }
    }

    /// Acts on the cancels of jobs that had no Krea id when the user asked: a job now at Krea
    /// is cancelled there, one put back to be sent again is cancelled instead. Called once per
    /// turn of the loop, before the next submission is chosen.
    pub(super) fn follow_up_cancels(&mut self) {
        if self.cancels.waiting.is_empty() {
            return;
        }
        for slot in std::mem::take(&mut self.cancels.waiting) {
            match self.table.state(slot) {
                JobState::Submitting | JobState::Unknown => {
                    self.cancels.waiting.insert(slot);
                }
                JobState::Pending => {
                    tracing::info!(job = %self.table.job(slot).name, "cancelled before submission");
                    if let Err(err) = self.cancelled(slot, Some("cancelled by the user".into())) {
                        super::report_bug(&err);
                    }
                }
                JobState::Submitted => {
                    tracing::info!(job = %self.table.job(slot).name, "cancelling at Krea");
                    self.ask_krea_to_cancel(slot);
                }
                JobState::Completed | JobState::Downloaded => {
                    let job = self.table.job(slot).name.clone();
                    let reason = "Krea completed it before the cancel reached it".to_owned();
                    tracing::warn!(job = %job, "completed and billed although it was to be cancelled: {reason}");
                    self.cancels.billed.push(RefusedCancel { job, reason, after_timeout: false });
                }
                JobState::Failed | JobState::Cancelled => {}
            }
        }
    }

    /// Whether the submitted job is to be cancelled and a `DELETE` should go now: none is on
    /// the wire, and Krea has not refused one yet or now shows the job in a state it cancels.
    pub(super) fn cancel_due(&mut self, slot: usize, status: &RemoteStatus) -> bool {
        self.table.at_krea(slot).is_some_and(|at| {
            at.cancel.is_some()
                && !at.cancel_sent
                && (at.cancel_refused.is_none() || krea_cancels(status))
        })
    }

    pub(super) fn spawn_cancel(&mut self, slot: usize) -> Result<(), IllegalTransition> {
        let api = Arc::clone(&self.api);
        let Some(at) = self.table.at_krea(slot) else {
            return Err(self.table.refused(slot, JobState::Submitted));
        };
        at.cancel_sent = true;
        let job_id = at.remote_id().to_owned();
        self.tasks.spawn(async move {
            let result = api.cancel_job(&job_id).await;
            Event::CancelAnswered { slot, result }
        });
        Ok(())
    }

    pub(super) fn on_cancel_answered(
        &mut self,
        slot: usize,
        result: Result<(), ApiError>,
    ) -> Result<(), IllegalTransition> {
        let name = self.table.job(slot).name.clone();
        if result.is_ok() {
            // Ended at Krea: the controller stops counting it as running.
            self.job_gone(slot);
        }
        let Some(at) = self.table.at_krea(slot) else { return Ok(()) };
        at.cancel_sent = false;
        let cause = at.cancel;
        match (result, cause) {
            (Ok(()), Some(CancelCause::User)) => {
                tracing::info!(job = %name, "cancelled at Krea, not billed");
                self.cancelled(slot, Some("cancelled by the user".into()))
            }
            (Ok(()), _) => {
                let text = self.timeout_text();
                tracing::warn!(job = %name, "{text}");
                self.fail(slot, text)
            }
            (Err(err), _) if err.is_transient() => {
                tracing::warn!(job = %name, %err, "could not cancel at Krea; trying again at the next poll");
                self.schedule_poll(slot, true)
            }
            (Err(err), _) => {
                // Krea answered and would not: the job runs on. Say so once per reason, and
                // ask again when a poll shows it in a state Krea cancels (`cancel_due`).
                let reason = krea_reason(&err);
                let Some(at) = self.table.at_krea(slot) else { return Ok(()) };
                let repeated = at.cancel_refused.as_deref() == Some(reason.as_str());
                at.cancel_refused = Some(reason.clone());
                let what = match cause {
                    Some(CancelCause::Timeout) => {
                        "the job timeout passed, but Krea refused to cancel the job"
                    }
                    _ => "Krea refused to cancel the job now",
                };
                if repeated {
                    tracing::debug!(job = %name, %reason, "{what}");
                } else {
                    tracing::warn!(
                        job = %name,
                        "{what}: {reason}. It runs on at Krea and is billed if it completes; \
                         krea-batch asks again whenever Krea shows it queued or processing"
                    );
                }
                self.schedule_poll(slot, true)
            }
        }
    }

    /// A job that was to be cancelled completed at Krea all the same: it ran and is billed.
    /// Logged, and kept for the run's summary.
    pub(super) fn note_billed_despite_cancel(&mut self, slot: usize) {
        let Some(at) = self.table.at_krea(slot) else { return };
        let Some(cause) = at.cancel else { return };
        let reason = at
            .cancel_refused
            .clone()
            .unwrap_or_else(|| "Krea completed it before the cancel reached it".to_owned());
        let job = self.table.job(slot).name.clone();
        let after_timeout = cause == CancelCause::Timeout;
        tracing::warn!(
            job = %job,
            "completed and billed although it was to be cancelled{}: {reason}",
            if after_timeout { " (job timeout)" } else { "" }
        );
        self.cancels.billed.push(RefusedCancel { job, reason, after_timeout });
    }

    /// The jobs (state-file row ids) the user asked to cancel that have not ended: Krea
    /// refused so far, or has not named them yet. The engine hands them back when it stops, so
    /// that they are kept as requests for the next run or start of the service (`setup.rs`),
    /// which goes on asking. (A timeout's cancel needs no keeping: the next run sees the job
    /// past its timeout again.)
    pub(super) fn cancels_left(&mut self) -> Vec<i64> {
        let ids: Vec<i64> = self.table.jobs().map(|(_, job)| job.id).collect();
        let mut left = Vec::new();
        for id in ids {
            let Some(slot) = self.table.slot_of(id) else { continue };
            let asked = self.cancels.waiting.contains(&slot)
                || self.table.at_krea(slot).is_some_and(|at| at.cancel == Some(CancelCause::User));
            if asked && !self.table.state(slot).is_final() {
                left.push(id);
            }
        }
        left
    }

    pub(super) fn timeout_text(&self) -> String {
        format!(
            "gave up after the job timeout ({}); cancelled at Krea, not billed",
            humantime::format_duration(self.settings.job_timeout)
        )
    }

    pub(super) fn cancelled(
        &mut self,
        slot: usize,
        note: Option<String>,
    ) -> Result<(), IllegalTransition> {
        self.table.cancelled(slot, note, self.clock.now_ms())
    }
}
