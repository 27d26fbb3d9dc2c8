//! Polling: `GET /jobs/{id}` on each submitted job's own schedule, what Krea's answer means for
//! the job, and the job timeout (the job is then cancelled at Krea: `cancel.rs`).

use super::phase::{CancelCause, IllegalTransition};
use super::{Engine, Event};
use crate::api::{ApiError, RemoteJob, RemoteStatus};
use crate::job::JobState;
use crate::pace::PollSchedule;
use crate::retry::Verdict;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Classifies a failed GET for the retry policy.
pub(super) fn get_verdict(err: &ApiError) -> Verdict {
    match err {
        ApiError::RateLimited { retry_after, .. } => Verdict::Retry(*retry_after),
        err if err.is_transient() => Verdict::Retry(None),
        _ => Verdict::GiveUp,
    }
}

impl Engine {
    /// Polls a submitted job whose poll is due. Its phase carries its Krea id, so a job
    /// without one never gets here (it is reconciled instead: `table.rs`).
    pub(super) fn spawn_poll(&mut self, slot: usize) {
        let api = Arc::clone(&self.api);
        let Some(at) = self.table.at_krea(slot) else {
            return super::report_bug(&self.table.refused(slot, JobState::Submitted));
        };
        let job_id = at.remote_id().to_owned();
        let policy = self.settings.retry;
        self.tasks.spawn(async move {
            let result = crate::retry::retry(
                &policy,
                get_verdict,
                |err, wait| tracing::debug!(%err, ?wait, "poll failed; retrying"),
                || api.get_job(&job_id),
            )
            .await;
            Event::Polled { slot, result }
        });
    }

    pub(super) fn schedule_poll(
        &mut self,
        slot: usize,
        near_end: bool,
    ) -> Result<(), IllegalTransition> {
        let schedule = if self.table.job(slot).model.starts_with("video/") {
            self.settings.video_poll
        } else {
            self.settings.poll
        };
        let first = self.first_poll(schedule);
        self.table.schedule_poll(slot, |last| match last {
            None => first,
            Some(_) => schedule.next_delay(last, near_end),
        })
    }

    /// The first poll's delay: aimed just before the end of a job of the measured job time,
    /// once one is measured, so a short job is not polled many times and a long one not found
    /// late; within the schedule's first and longest delays. Aimed at 90 %, because the
    /// measured time includes how late its end was seen: aiming at all of it would let the
    /// estimate only grow.
    fn first_poll(&self, schedule: PollSchedule) -> Duration {
        let aimed = self.controller.job_time().map_or(schedule.first, |time| time.mul_f64(0.9));
        aimed.clamp(schedule.first.min(schedule.max), schedule.max)
    }

    pub(super) fn on_polled(
        &mut self,
        slot: usize,
        result: Result<RemoteJob, ApiError>,
    ) -> Result<(), IllegalTransition> {
        if self.table.state(slot) != JobState::Submitted {
            return Ok(());
        }
        match result {
            Ok(remote) => {
                if let Some(status) = &remote.status {
                    self.controller.observed(&remote.job_id, status, Instant::now());
                }
                self.on_remote_state(slot, &remote)
            }
            Err(ApiError::NotFound { message }) => {
                self.job_gone(slot);
                let job = self.table.job(slot);
                let text = format!(
                    "lost: Krea no longer knows job {} ({message})",
                    job.remote_id.as_deref().unwrap_or("?")
                );
                tracing::error!(job = %job.name, "{text}");
                self.fail(slot, text)
            }
            Err(ApiError::Auth { status, message }) => {
                self.refuse_auth(status, &message);
                self.retry_poll_later(slot)
            }
            Err(err) => {
                tracing::warn!(job = %self.table.job(slot).name, %err, "polling failed; trying again later");
                self.retry_poll_later(slot)
            }
        }
    }

    /// The job no longer takes a place at Krea (cancelled, or lost): the controller stops
    /// counting it.
    pub(super) fn job_gone(&mut self, slot: usize) {
        if let Some(at) = self.table.at_krea(slot) {
            let job_id = at.remote_id().to_owned();
            self.controller.ended(&job_id, Instant::now());
        }
    }

    fn retry_poll_later(&mut self, slot: usize) -> Result<(), IllegalTransition> {
        let max = self.settings.poll.max;
        self.table.schedule_poll(slot, |_| max)
    }

    /// Takes in what Krea says of a submitted job.
    pub(super) fn on_remote_state(
        &mut self,
        slot: usize,
        remote: &RemoteJob,
    ) -> Result<(), IllegalTransition> {
        let status =
            remote.status.clone().unwrap_or_else(|| RemoteStatus::Other("unstated".into()));
        let changed = self.table.remote_update(slot, status.as_str(), remote);
        let name = self.table.job(slot).name.clone();
        let cancel = self.table.at_krea(slot).and_then(|at| at.cancel);
        match status {
            RemoteStatus::Completed => {
                let urls = remote.result_urls().unwrap_or_default().to_vec();
                if urls.is_empty() {
                    let text = "Krea reported the job completed without result URLs".to_owned();
                    tracing::error!(job = %name, "{text}");
                    return self.fail(slot, text);
                }
                self.note_billed_despite_cancel(slot);
                self.status.spend_usd += self.table.job(slot).price_usd.unwrap_or_default();
                tracing::info!(job = %name, "completed");
                self.table.completed(slot, urls, self.clock.now_ms())
            }
            RemoteStatus::Failed => {
                let reason = remote
                    .error
                    .clone()
                    .unwrap_or_else(|| "failed at Krea (no reason given)".into());
                tracing::warn!(job = %name, %reason, "failed at Krea");
                self.fail(slot, reason)
            }
            // Our own DELETE may have done it, its answer lost: say why, as the answer would.
            RemoteStatus::Cancelled => match cancel {
                Some(CancelCause::Timeout) => {
                    let text = self.timeout_text();
                    tracing::warn!(job = %name, "{text}");
                    self.fail(slot, text)
                }
                Some(CancelCause::User) => {
                    tracing::info!(job = %name, "cancelled at Krea, not billed");
                    self.cancelled(slot, Some("cancelled by the user".into()))
                }
                None => {
                    tracing::info!(job = %name, "cancelled at Krea");
                    self.cancelled(slot, None)
                }
            },
            pending => {
                if changed {
                    tracing::debug!(job = %name, status = %pending, "status");
                    self.table.touch(slot);
                }
                let timed_out = cancel.is_none() && self.timed_out(slot);
                let Some(at) = self.table.at_krea(slot) else {
                    return Err(self.table.refused(slot, JobState::Submitted));
                };
                if timed_out {
                    tracing::warn!(job = %name, "the job timeout passed; cancelling it at Krea");
                    at.cancel = Some(CancelCause::Timeout);
                }
                if self.cancel_due(slot, &pending) {
                    return self.spawn_cancel(slot);
                }
                let near_end =
                    matches!(pending, RemoteStatus::Sampling | RemoteStatus::IntermediateComplete);
                self.schedule_poll(slot, near_end && changed)
            }
        }
    }

    /// Whether the job has been in flight longer than `job_timeout` (counted from the answer to
    /// its POST, or from the attempt for an adopted job).
    fn timed_out(&self, slot: usize) -> bool {
        let job = self.table.job(slot);
        let now = self.clock.now_ms();
        let since = job.submitted_at.or(job.attempt_at).unwrap_or(now);
        let age = Duration::from_millis(u64::try_from(now - since).unwrap_or_default());
        age > self.settings.job_timeout
    }
}
