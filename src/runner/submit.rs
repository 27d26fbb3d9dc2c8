//! Submissions: choosing the next job to POST, and taking in Krea's answer.
//!
//! One POST at a time. The attempt is recorded (state `submitting`, time, count) in the turn's
//! commit before the POST starts; the answer is recorded in the next turn's commit, together
//! with the next attempt. An answer that proves nothing was created (402, 429, 400, a refused
//! connection) puts the job back or fails it; a missing answer makes it `unknown`.

use super::Engine;
use crate::api::{ApiError, RemoteJob};
use crate::job::JobState;
use crate::report::StopReason;
use crate::store::{JobRecord, now_ms};
use std::sync::Arc;

/// How many recent accepted POSTs bound the offset to Krea's clock.
const CLOCK_SAMPLES: usize = 20;

impl Engine {
    /// Takes the next pending job if nothing holds submissions back (a stop, a POST on the
    /// wire, an unknown job awaiting reconciliation, the in-flight cap, the pacer) and records
    /// its attempt for the coming commit.
    pub(super) fn plan_submission(&mut self) -> Option<usize> {
        self.submit_wake = None;
        if self.stopped.is_some()
            || self.draining
            || self.post_running
            || !self.unknown.is_empty()
            || self.pending.is_empty()
            || self.in_flight() >= self.pacer.in_flight_cap()
        {
            return None;
        }
        // Paused (service): one submission probes when the probe is due.
        if let (Some(_), Some(probe_at)) = (self.paused, self.probe_at)
            && probe_at > tokio::time::Instant::now()
        {
            self.submit_wake = Some(probe_at);
            return None;
        }
        let next = *self.pending.front()?;
        if let Err(exceeded) = self.budget_check(self.slots[next].job.price_usd) {
            self.halt_on_budget(&exceeded);
            self.submit_wake = self.probe_at.filter(|_| self.paused.is_some());
            return None;
        }
        if let Err(wake) = self.pacer.try_acquire() {
            self.submit_wake = Some(wake);
            return None;
        }
        let slot = self.pending.pop_front()?;
        let job = &mut self.slots[slot].job;
        job.attempt_at = Some(now_ms());
        job.attempt_ended = None;
        job.attempts += 1;
        self.set_state(slot, JobState::Submitting, None);
        Some(slot)
    }

    pub(super) fn spawn_submit(&mut self, slot: usize) {
        self.post_running = true;
        self.status.submissions_total += 1;
        let api = Arc::clone(&self.api);
        let model = self.slots[slot].job.model.clone();
        let body = Arc::clone(&self.slots[slot].job.body);
        self.tasks.spawn(async move {
            let result = api.create_job(&model, &body).await;
            super::Event::Submitted { slot, result }
        });
    }

    pub(super) fn on_submitted(&mut self, slot: usize, result: Result<RemoteJob, ApiError>) {
        self.post_running = false;
        let name = self.slots[slot].job.name.clone();
        match result {
            Ok(remote) => self.on_accepted(slot, &remote),
            Err(ApiError::PaymentRequired { message }) => {
                tracing::debug!(job = %name, %message, "402 on submission");
                self.status.payment_required_total += 1;
                self.requeue(slot);
                self.halt(StopReason::PaymentRequired);
            }
            Err(ApiError::Auth { status, message }) => {
                self.requeue(slot);
                self.refuse_auth(status, &message);
            }
            Err(ApiError::RateLimited { retry_after, message }) => {
                self.status.rate_limited_total += 1;
                self.requeue(slot);
                let wait = self.pacer.on_rate_limited(retry_after, self.in_flight());
                tracing::info!(
                    %message,
                    wait_ms = wait.as_millis() as u64,
                    cap = self.pacer.in_flight_cap(),
                    "Krea is rate limiting (429); pausing submissions"
                );
            }
            Err(err @ ApiError::NotSent(_)) => {
                // Nothing reached Krea: safe to send again after a pause.
                self.requeue(slot);
                let wait = self.pacer.on_unreachable();
                tracing::warn!(%err, wait_ms = wait.as_millis() as u64, "cannot reach Krea; pausing submissions");
            }
            Err(err) if err.may_have_created_job() => {
                tracing::warn!(
                    job = %name, %err,
                    "the submission got no usable answer: Krea may have created the job; \
                     submissions pause until it is found or shown not to exist"
                );
                self.slots[slot].job.attempt_ended = Some(now_ms());
                self.set_state(slot, JobState::Unknown, Some(err.to_string()));
                self.unknown.insert(slot);
            }
            Err(err @ (ApiError::ModelGone { .. } | ApiError::NotFound { .. })) => {
                // The model itself is refused: every waiting job of it would be refused too.
                let message = err.to_string();
                let model = self.slots[slot].job.model.clone();
                tracing::error!(job = %name, %model, %message, "model refused; failing its jobs");
                self.set_state(slot, JobState::Failed, Some(message.clone()));
                self.fail_pending_of_model(&model, &message);
            }
            Err(err) => {
                tracing::warn!(job = %name, %err, "Krea refused the job");
                self.set_state(slot, JobState::Failed, Some(err.to_string()));
            }
        }
    }

    fn on_accepted(&mut self, slot: usize, remote: &RemoteJob) {
        self.pacer.on_accepted();
        self.resume_after_pause();
        let name = self.slots[slot].job.name.clone();
        if let Some(owner) = self.claim_owner(&remote.job_id) {
            let message = format!(
                "Krea answered with job id {} which already belongs to {owner}; not recorded \
                 twice",
                remote.job_id
            );
            tracing::error!(job = %name, "{message}");
            self.slots[slot].job.attempt_ended = Some(now_ms());
            self.set_state(slot, JobState::Unknown, Some(message));
            self.unknown.insert(slot);
            return;
        }
        self.claim(slot, remote);
        let job = &mut self.slots[slot].job;
        job.submitted_at = Some(now_ms());
        tracing::info!(job = %name, job_id = %remote.job_id, "submitted");
        self.set_state(slot, JobState::Submitted, None);
        let job = self.slots[slot].job.clone();
        self.note_clock_sample(&job);
        self.on_remote_state(slot, remote);
    }

    /// Records `remote` as this slot's job at Krea.
    pub(super) fn claim(&mut self, slot: usize, remote: &RemoteJob) {
        self.remote_ids.insert(remote.job_id.clone(), slot);
        let job = &mut self.slots[slot].job;
        job.remote_id = Some(remote.job_id.clone());
        if remote.created_at.is_some() {
            job.created_at.clone_from(&remote.created_at);
        }
    }

    /// Who already holds a Krea job id, if anyone.
    pub(super) fn claim_owner(&self, job_id: &str) -> Option<String> {
        if let Some(&owner) = self.remote_ids.get(job_id) {
            return Some(format!("job {}", self.slots[owner].job.name));
        }
        self.claimed_elsewhere.contains(job_id).then(|| "another job file's job".to_owned())
    }

    /// Remembers when an accepted POST was sent, answered and created, to bound the offset
    /// between the local clock and Krea's for reconciliation.
    pub(super) fn note_clock_sample(&mut self, job: &JobRecord) {
        let created = job.created_at.as_deref().and_then(crate::reconcile::parse_time_ms);
        if let (Some(sent), Some(answered), Some(created)) =
            (job.attempt_at, job.submitted_at, created)
        {
            if self.clock_samples.len() == CLOCK_SAMPLES {
                self.clock_samples.pop_front();
            }
            self.clock_samples.push_back((sent, answered, created));
        }
    }

    /// Puts a job that was not created back at the head of the queue.
    pub(super) fn requeue(&mut self, slot: usize) {
        self.set_state(slot, JobState::Pending, None);
        self.pending.push_front(slot);
    }

    fn fail_pending_of_model(&mut self, model: &str, message: &str) {
        let (same, others): (Vec<usize>, Vec<usize>) =
            self.pending.drain(..).partition(|slot| self.slots[*slot].job.model == model);
        self.pending = others.into();
        for slot in same {
            self.set_state(slot, JobState::Failed, Some(message.to_owned()));
        }
    }
}
