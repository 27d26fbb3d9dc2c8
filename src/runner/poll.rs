//! Polling: `GET /jobs/{id}` on each submitted job's own schedule, what Krea's answer means for
//! the job, and the job timeout (cancel at Krea with `DELETE`, report).

use super::{Engine, Event};
use crate::api::{ApiError, RemoteJob, RemoteStatus};
use crate::job::JobState;
use crate::retry::Verdict;
use std::sync::Arc;
use std::time::Duration;

/// Classifies a failed GET for the retry policy.
pub(super) fn get_verdict(err: &ApiError) -> Verdict {
    match err {
        ApiError::RateLimited { retry_after, .. } => Verdict::Retry(*retry_after),
        err if err.is_transient() => Verdict::Retry(None),
        _ => Verdict::GiveUp,
    }
}

impl Engine {
    pub(super) fn spawn_poll(&mut self, slot: usize) {
        let api = Arc::clone(&self.api);
        let Some(job_id) = self.slots[slot].job.remote_id.clone() else {
            // Jobs loaded so are reconciled (`add_jobs`); one that still got here is a bug, and
            // failing it loudly beats leaving it unpolled forever.
            let text = "cannot poll: the job has no Krea job id (a bug; please report it)";
            tracing::error!(job = %self.slots[slot].job.name, "{text}");
            return self.set_state(slot, JobState::Failed, Some(text.to_owned()));
        };
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

    pub(super) fn schedule_poll(&mut self, slot: usize, near_end: bool) {
        let entry = &mut self.slots[slot];
        let schedule = if entry.job.model.starts_with("video/") {
            self.settings.video_poll
        } else {
            self.settings.poll
        };
        let delay = schedule.next_delay(entry.poll_delay, near_end);
        entry.poll_delay = Some(delay);
        self.polls.insert(slot, delay);
    }

    pub(super) fn on_polled(&mut self, slot: usize, result: Result<RemoteJob, ApiError>) {
        if self.slots[slot].job.state != JobState::Submitted {
            return;
        }
        match result {
            Ok(remote) => self.on_remote_state(slot, &remote),
            Err(ApiError::NotFound { message }) => {
                let job = &self.slots[slot].job;
                let text = format!(
                    "lost: Krea no longer knows job {} ({message})",
                    job.remote_id.as_deref().unwrap_or("?")
                );
                tracing::error!(job = %job.name, "{text}");
                self.set_state(slot, JobState::Failed, Some(text));
            }
            Err(ApiError::Auth { status, message }) => {
                self.refuse_auth(status, &message);
                self.retry_poll_later(slot);
            }
            Err(err) => {
                tracing::warn!(job = %self.slots[slot].job.name, %err, "polling failed; trying again later");
                self.retry_poll_later(slot);
            }
        }
    }

    fn retry_poll_later(&mut self, slot: usize) {
        let max = self.settings.poll.max;
        self.slots[slot].poll_delay = Some(max);
        self.polls.insert(slot, max);
    }

    /// Takes in what Krea says of a submitted job.
    pub(super) fn on_remote_state(&mut self, slot: usize, remote: &RemoteJob) {
        let job = &mut self.slots[slot].job;
        let status =
            remote.status.clone().unwrap_or_else(|| RemoteStatus::Other("unstated".into()));
        let changed = job.remote_status.as_deref() != Some(status.as_str());
        job.remote_status = Some(status.to_string());
        if remote.created_at.is_some() {
            job.created_at.clone_from(&remote.created_at);
        }
        if remote.completed_at.is_some() {
            job.completed_at.clone_from(&remote.completed_at);
        }
        let name = job.name.clone();
        match status {
            RemoteStatus::Completed => {
                let urls = remote.result_urls().unwrap_or_default().to_vec();
                if urls.is_empty() {
                    let text = "Krea reported the job completed without result URLs".to_owned();
                    tracing::error!(job = %name, "{text}");
                    self.set_state(slot, JobState::Failed, Some(text));
                    return;
                }
                self.slots[slot].job.urls = urls;
                self.status.spend_usd += self.slots[slot].job.price_usd.unwrap_or_default();
                tracing::info!(job = %name, "completed");
                self.set_state(slot, JobState::Completed, None);
                self.to_download.push_back(slot);
            }
            RemoteStatus::Failed => {
                let reason = remote
                    .error
                    .clone()
                    .unwrap_or_else(|| "failed at Krea (no reason given)".into());
                tracing::warn!(job = %name, %reason, "failed at Krea");
                self.set_state(slot, JobState::Failed, Some(reason));
            }
            // Our own DELETE may have done it, its answer lost: say why, as the answer would.
            RemoteStatus::Cancelled => match self.slots[slot].cancel {
                Some(super::CancelCause::Timeout) => {
                    let text = self.timeout_text();
                    tracing::warn!(job = %name, "{text}");
                    self.set_state(slot, JobState::Failed, Some(text));
                }
                Some(super::CancelCause::User) => {
                    tracing::info!(job = %name, "cancelled at Krea, not billed");
                    self.set_state(slot, JobState::Cancelled, Some("cancelled by the user".into()));
                }
                None => {
                    tracing::info!(job = %name, "cancelled at Krea");
                    self.set_state(slot, JobState::Cancelled, None);
                }
            },
            pending => {
                if changed {
                    tracing::debug!(job = %name, status = %pending, "status");
                    self.touch(slot);
                }
                if self.slots[slot].cancel.is_none() && self.timed_out(slot) {
                    tracing::warn!(job = %name, "the job timeout passed; cancelling it at Krea");
                    self.slots[slot].cancel = Some(super::CancelCause::Timeout);
                }
                if self.slots[slot].cancel.is_some() && !self.slots[slot].cancel_sent {
                    self.spawn_cancel(slot);
                    return;
                }
                let near_end =
                    matches!(pending, RemoteStatus::Sampling | RemoteStatus::IntermediateComplete);
                self.schedule_poll(slot, near_end && changed);
            }
        }
    }

    /// Whether the job has been in flight longer than `job_timeout` (counted from the answer to
    /// its POST, or from the attempt for an adopted job).
    fn timed_out(&self, slot: usize) -> bool {
        let job = &self.slots[slot].job;
        let now = self.clock.now_ms();
        let since = job.submitted_at.or(job.attempt_at).unwrap_or(now);
        let age = Duration::from_millis(u64::try_from(now - since).unwrap_or_default());
        age > self.settings.job_timeout
    }

    fn timeout_text(&self) -> String {
        format!(
            "gave up after the job timeout ({}); cancelled at Krea, not billed",
            humantime::format_duration(self.settings.job_timeout)
        )
    }

    /// `krea-batch cancel`: pending jobs are cancelled at once; jobs in flight are cancelled at
    /// Krea (not billed) as soon as Krea allows; finished jobs are left as they are.
    pub(super) fn cancel_jobs(&mut self, ids: &[i64]) {
        for id in ids {
            let Some(&slot) = self.by_id.get(id) else { continue };
            let name = self.slots[slot].job.name.clone();
            match self.slots[slot].job.state {
                JobState::Pending => {
                    self.pending.retain(|&waiting| waiting != slot);
                    self.backing_off.retain(|&(_, waiting)| waiting != slot);
                    tracing::info!(job = %name, "cancelled before submission");
                    self.set_state(slot, JobState::Cancelled, Some("cancelled by the user".into()));
                }
                JobState::Submitted => {
                    tracing::info!(job = %name, "cancelling at Krea");
                    self.slots[slot].cancel = Some(super::CancelCause::User);
                }
                state => {
                    tracing::info!(job = %name, %state, "not cancelled: nothing to cancel in this state");
                }
            }
        }
    }

    fn spawn_cancel(&mut self, slot: usize) {
        let api = Arc::clone(&self.api);
        let Some(job_id) = self.slots[slot].job.remote_id.clone() else { return };
        self.slots[slot].cancel_sent = true;
        self.tasks.spawn(async move {
            let result = api.cancel_job(&job_id).await;
            Event::CancelAnswered { slot, result }
        });
    }

    pub(super) fn on_cancel_answered(&mut self, slot: usize, result: Result<(), ApiError>) {
        if self.slots[slot].job.state != JobState::Submitted {
            return;
        }
        match (result, self.slots[slot].cancel) {
            (Ok(()), Some(super::CancelCause::User)) => {
                tracing::info!(job = %self.slots[slot].job.name, "cancelled at Krea, not billed");
                self.set_state(slot, JobState::Cancelled, Some("cancelled by the user".into()));
            }
            (Ok(()), _) => {
                let text = self.timeout_text();
                tracing::warn!(job = %self.slots[slot].job.name, "{text}");
                self.set_state(slot, JobState::Failed, Some(text));
            }
            (Err(err), _) => {
                // Not cancellable now (Krea cancels only queued or processing jobs; it may also
                // just have completed): keep polling, and try again at the next poll.
                tracing::debug!(job = %self.slots[slot].job.name, %err, "cancel refused");
                self.slots[slot].cancel_sent = false;
                self.schedule_poll(slot, true);
            }
        }
    }
}
