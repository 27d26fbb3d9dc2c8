//! Submissions: choosing the next job to POST, and taking in Krea's answer.
//!
//! One POST at a time. The attempt is recorded (state `submitting`, time, count) in the turn's
//! commit before the POST starts; the answer is recorded in the next turn's commit, together
//! with the next attempt. An answer that proves nothing was created (402, 429, 400, a refused
//! connection) puts the job back or fails it; a missing answer makes it `unknown`. An accepted
//! POST always created something: answered with a job id another job already holds, the job
//! fails with both named and is never sent again.
//!
//! A job whose POST got no usable answer (a 5xx, a timeout) is sent again only once
//! reconciliation has shown that the attempt created nothing, and then only after a back-off of
//! its own that doubles with each such attempt ([`unanswered_backoff`]); meanwhile the other
//! jobs are submitted. After [`MAX_UNANSWERED_POSTS`] of them the job fails ("Krea answered 500
//! to 6 attempts"): one job that Krea cannot take never starves the rest.

use super::Engine;
use super::StopReason;
use crate::api::{ApiError, RemoteJob};
use crate::job::JobState;
use crate::store::JobRecord;
use std::sync::Arc;
use std::time::Duration;

/// How many recent accepted POSTs bound the offset to Krea's clock.
const CLOCK_SAMPLES: usize = 20;

/// Attempts of one job that may end without a usable answer (and be shown by reconciliation to
/// have created nothing) before the job fails. Documented in README ("How each answer from
/// Krea is handled").
pub const MAX_UNANSWERED_POSTS: usize = 6;

/// The longest wait between two attempts of one job.
const MAX_UNANSWERED_BACKOFF: Duration = Duration::from_mins(5);

/// The wait before the next attempt of a job whose last `unanswered` (at least 1) attempts got
/// no usable answer and created nothing: `first` (the job file's `retry_backoff`), doubled for
/// each further one, at most [`MAX_UNANSWERED_BACKOFF`].
#[must_use]
pub fn unanswered_backoff(first: Duration, unanswered: usize) -> Duration {
    let doublings = u32::try_from(unanswered.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
    first.saturating_mul(1 << doublings).min(MAX_UNANSWERED_BACKOFF)
}

/// The short label of a POST that got no usable answer, and what came with it, for the
/// message that fails the job.
fn unanswered_label(err: &ApiError) -> (String, String) {
    match err {
        ApiError::Server { status, message } => (status.to_string(), message.clone()),
        ApiError::NoAnswer(text) => ("no answer".to_owned(), text.clone()),
        ApiError::Malformed(text) => ("an unreadable answer".to_owned(), text.clone()),
        other => (other.to_string(), other.to_string()),
    }
}

/// Why a job fails after `attempts` (label, detail) without a usable answer.
fn unanswered_message(attempts: &[(String, String)]) -> String {
    let n = attempts.len();
    let last = attempts.last().map(|(_, detail)| detail.as_str()).filter(|d| !d.is_empty());
    let mut distinct: Vec<&str> = attempts.iter().map(|(label, _)| label.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let what = match distinct[..] {
        [status] if status.parse::<u16>().is_ok() => {
            format!("Krea answered {status} to {n} attempts")
        }
        _ => format!("Krea gave no usable answer to {n} attempts ({})", distinct.join(", ")),
    };
    let last = last.map(|last| format!(" (last: {last})")).unwrap_or_default();
    format!(
        "{what}{last}; reconciliation showed that none of them created a job, so nothing was \
         billed; run again to try once more"
    )
}

impl Engine {
    /// Takes the next pending job if nothing holds submissions back (a stop, a POST on the
    /// wire, an unknown job awaiting reconciliation, the in-flight cap, the pacer) and records
    /// its attempt for the coming commit.
    pub(super) fn plan_submission(&mut self) -> Option<usize> {
        self.submit_wake = None;
        self.release_backed_off();
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
        let now = self.clock.now_ms();
        let job = &mut self.slots[slot].job;
        job.attempt_at = Some(now);
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
                self.slots[slot].unanswered.push(unanswered_label(&err));
                self.slots[slot].job.attempt_ended = Some(self.clock.now_ms());
                self.set_state(slot, JobState::Unknown, Some(err.to_string()));
                self.await_reconciliation(slot);
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
            // Krea accepted the POST, so it created a job (and may bill it), but its answer
            // names a job that is not ours to poll. Sending the job again could pay for it a
            // second time and would hide the anomaly; the job fails, for good, and says why.
            let message = format!(
                "Krea answered the submission with job id {id}, which already belongs to \
                 {owner}: an anomaly at Krea, not recorded twice; the submission was accepted \
                 (Krea may bill it) so this job is not submitted again (look up job {id} at \
                 Krea)",
                id = remote.job_id
            );
            tracing::error!(job = %name, job_id = %remote.job_id, "{message}");
            self.slots[slot].job.attempt_ended = Some(self.clock.now_ms());
            self.set_state(slot, JobState::Failed, Some(message));
            return;
        }
        self.claim(slot, remote);
        let now = self.clock.now_ms();
        let job = &mut self.slots[slot].job;
        job.submitted_at = Some(now);
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

    /// Reconciliation showed that the job's last attempt created nothing. A job whose attempts
    /// got no usable answer waits its own back-off (the others are submitted meanwhile), and
    /// fails after [`MAX_UNANSWERED_POSTS`] of them; one left unknown by a crash is sent again
    /// at once.
    pub(super) fn retry_not_created(&mut self, slot: usize) {
        let unanswered = self.slots[slot].unanswered.len();
        let name = self.slots[slot].job.name.clone();
        if unanswered == 0 {
            tracing::info!(
                job = %name,
                "not found at Krea: the unanswered submission created nothing; it will be submitted again"
            );
            return self.requeue(slot);
        }
        if unanswered >= MAX_UNANSWERED_POSTS {
            let message = unanswered_message(&self.slots[slot].unanswered);
            tracing::error!(job = %name, "{message}");
            return self.set_state(slot, JobState::Failed, Some(message));
        }
        let wait = unanswered_backoff(self.settings.rate_limit_backoff, unanswered);
        tracing::info!(
            job = %name,
            attempts = unanswered,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "not found at Krea: the unanswered submission created nothing; this job is sent \
             again after its back-off, the others meanwhile"
        );
        self.set_state(slot, JobState::Pending, None);
        self.backing_off.insert((tokio::time::Instant::now() + wait, slot));
    }

    /// Moves the jobs whose back-off has ended to the head of the queue.
    fn release_backed_off(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some(&(due, slot)) = self.backing_off.first() {
            if due > now {
                break;
            }
            self.backing_off.remove(&(due, slot));
            if self.slots[slot].job.state == JobState::Pending {
                self.pending.push_front(slot);
            }
        }
    }

    /// When the next job's back-off ends, if one is backing off.
    pub(super) fn backoff_wake(&self) -> Option<tokio::time::Instant> {
        self.backing_off.first().map(|(due, _)| *due)
    }

    fn fail_pending_of_model(&mut self, model: &str, message: &str) {
        let (same, others): (Vec<usize>, Vec<usize>) =
            self.pending.drain(..).partition(|slot| self.slots[*slot].job.model == model);
        self.pending = others.into();
        let backing_off: Vec<usize> = self.backing_off.iter().map(|(_, slot)| *slot).collect();
        self.backing_off.retain(|(_, slot)| self.slots[*slot].job.model != model);
        let backing_off: Vec<usize> =
            backing_off.into_iter().filter(|slot| self.slots[*slot].job.model == model).collect();
        for slot in same.into_iter().chain(backing_off) {
            self.set_state(slot, JobState::Failed, Some(message.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_of_one_job_grows_to_a_cap() {
        let first = Duration::from_secs(5);
        let waits: Vec<Duration> =
            (1..MAX_UNANSWERED_POSTS).map(|n| unanswered_backoff(first, n)).collect();
        assert_eq!(waits[0], first);
        assert!(waits.windows(2).all(|pair| pair[1] > pair[0]), "{waits:?}");
        assert_eq!(unanswered_backoff(first, 100), MAX_UNANSWERED_BACKOFF);
    }

    #[test]
    fn the_failure_says_what_krea_answered_and_how_often() {
        let five_hundreds = vec![("500".to_owned(), "Internal Server Error".to_owned()); 6];
        let message = unanswered_message(&five_hundreds);
        assert!(message.starts_with("Krea answered 500 to 6 attempts"), "{message}");
        assert!(message.contains("Internal Server Error"), "{message}");
        let mixed = [("502".to_owned(), String::new()), ("no answer".to_owned(), "reset".into())];
        let message = unanswered_message(&mixed);
        assert!(message.contains("no usable answer to 2 attempts (502, no answer)"), "{message}");
    }
}
