//! Submissions: choosing the next job to POST, and taking in Krea's answer.
//!
//! Up to K POSTs on the wire (the submission controller chooses K, under `limits.submission_concurrency`). Each
//! attempt is recorded (state `submitting`, time, count) in the turn's commit before its POST
//! starts, and every attempt planned in one turn (as many as the window, the pacer, the
//! in-flight cap and the budget allow) shares that one synced commit; each answer is recorded
//! in the next turn's commit, together with the next attempts.
//!
//! The window narrows when an answer is lost ([`Engine::post_window`]): to none while an
//! unknown job awaits reconciliation (its listing must see no job whose answer is still to
//! come), then to one POST at a time until Krea has accepted [`NARROWED_RUN`] POSTs sent since. So a POST that is
//! in doubt is followed by POSTs that cannot race with another lost answer, and a job sent
//! again after "not created" goes alone: if its answer is lost again, its window holds no
//! other unknown attempt and reconciliation can attribute what it finds. An answer that proves nothing was created (402, 429, 400, a refused
//! connection) puts the job back or fails it; a missing answer makes it `unknown`. An accepted
//! POST always created something: answered with a job id another job already holds, the job
//! fails with both named and is never sent again.
//!
//! A job whose POST got no usable answer (a 5xx, a timeout) is sent again only once
//! reconciliation has shown that the attempt created nothing, and then only after a back-off of
//! its own that doubles with each such attempt ([`unanswered_backoff`]); meanwhile the other
//! jobs are submitted. After [`MAX_UNANSWERED_POSTS`] of them the job fails ("Krea answered 500
//! to 6 attempts"): one job that Krea cannot take never starves the rest.
//!
//! How hard to push is the controller's (`controller.rs`): every answer, with its round trip,
//! is told to it ([`Engine::tell_controller`]); it says how many jobs may be in flight, whether
//! submitting waits after a 429, and the pace the governor enforces.

use super::controller::LimitKind;
use super::phase::IllegalTransition;
use super::{Engine, StopReason};
use crate::api::{ApiError, RemoteJob, RemoteStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Accepted POSTs, each sent alone, that end the narrowing after a lost answer. A network that
/// just lost an answer may lose the next: while it does, POSTs go one at a time, so a second
/// lost answer has no other in its window and is attributed rather than set aside. Ten answers
/// in a row (a few seconds at most) say it is steady again.
pub(super) const NARROWED_RUN: u32 = 10;

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
pub(super) fn unanswered_backoff(first: Duration, unanswered: usize) -> Duration {
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
    /// How many POSTs may be on the wire now: none while an unknown job awaits
    /// reconciliation (its listing must not see a job whose answer is still coming), one while
    /// narrowed (since a POST got no usable answer, until Krea has accepted [`NARROWED_RUN`] sent
    /// since) or while a
    /// paused service probes, else the controller's `K` ([`Self::posts_allowed`]).
    pub(super) fn post_window(&self) -> usize {
        if self.table.waiting_to_reconcile() > 0 {
            0
        } else if self.posts_narrowed_since.is_some() || self.paused.is_some() {
            1
        } else {
            self.posts_allowed()
        }
    }

    /// Takes as many pending jobs as may be sent now (up to the POST window, see
    /// [`Self::post_window`], each granted by the pacer and within the in-flight cap and the
    /// budget) and records their attempts for the coming commit, in send order.
    pub(super) fn plan_submissions(&mut self) -> Vec<usize> {
        // Released every turn, whether or not a POST may go now: a back-off that is due stays
        // the loop's earliest wake until released, and a wake in the past would spin the loop.
        self.table.release_backed_off(Instant::now());
        let mut planned = Vec::new();
        while self.posts_running + planned.len() < self.post_window() {
            match self.plan_submission() {
                Some(slot) => planned.push(slot),
                None => break,
            }
        }
        planned
    }

    /// Takes the next pending job if nothing holds submissions back (a stop, an unknown job
    /// awaiting reconciliation, the in-flight cap, the pacer) and records its attempt for the
    /// coming commit.
    fn plan_submission(&mut self) -> Option<usize> {
        self.submit_wake = None;
        if self.stopped.is_some()
            || self.draining
            || self.table.waiting_to_reconcile() > 0
            || self.table.next_to_submit().is_none()
            || self.in_flight() >= self.allowed_in_flight()
        {
            return None;
        }
        // Paused (service): one submission probes when the probe is due.
        if let (Some(_), Some(probe_at)) = (self.paused, self.probe_at)
            && probe_at > Instant::now()
        {
            self.submit_wake = Some(probe_at);
            return None;
        }
        let next = self.table.next_to_submit()?;
        if let Err(exceeded) = self.budget_check(self.table.job(next).price_usd) {
            self.halt_on_budget(&exceeded);
            self.submit_wake = self.probe_at.filter(|_| self.paused.is_some());
            return None;
        }
        if let Some(wake) = self.controller.wait_until(Instant::now()) {
            self.submit_wake = Some(wake);
            return None;
        }
        self.pacer.set_pace(self.pace());
        if let Err(wake) = self.pacer.try_acquire() {
            self.submit_wake = Some(wake);
            return None;
        }
        // Refused only by a bug; then the job is not sent.
        if let Err(err) = self.table.submitting(next, self.clock.now_ms()) {
            super::report_bug(&err);
            return None;
        }
        Some(next)
    }

    /// How many POSTs may wait for their answer at once, unnarrowed: the controller's `K` (under
    /// `limits.submission_concurrency`, if written).
    pub(super) fn posts_allowed(&self) -> usize {
        #[cfg(test)]
        if let Some(k) = self.fixed_posts {
            return k as usize;
        }
        self.controller.posts_allowed() as usize
    }

    /// How many jobs may be in flight: the controller's window (under `limits.max_in_flight`).
    fn allowed_in_flight(&self) -> usize {
        #[cfg(test)]
        if self.fixed_posts.is_some() {
            return self.settings.ceilings.max_in_flight.unwrap_or(u32::MAX) as usize;
        }
        self.controller.allowed_in_flight() as usize
    }

    /// The pace for the governor: the controller's (under the written ceilings).
    pub(super) fn pace(&self) -> crate::pace::Pace {
        #[cfg(test)]
        if self.fixed_posts.is_some() {
            let ceilings = &self.settings.ceilings;
            return crate::pace::Pace {
                per_second: ceilings
                    .submissions_per_minute
                    .map(|per_minute| f64::from(per_minute) / 60.0),
                burst: ceilings.burst.unwrap_or(1),
            };
        }
        self.controller.pace()
    }

    pub(super) fn spawn_submit(&mut self, slot: usize) {
        let now = Instant::now();
        self.controller.post_sent(now);
        self.post_sent_at.insert(slot, now);
        self.posts_running += 1;
        self.status.submissions_total += 1;
        let api = Arc::clone(&self.api);
        let model = self.table.job(slot).model.clone();
        let body = Arc::clone(&self.table.job(slot).body);
        self.tasks.spawn(async move {
            let result = api.create_job(&model, &body).await;
            super::Event::Submitted { slot, result }
        });
    }

    pub(super) fn on_submitted(
        &mut self,
        slot: usize,
        result: Result<RemoteJob, ApiError>,
    ) -> Result<(), IllegalTransition> {
        self.posts_running = self.posts_running.saturating_sub(1);
        let limited_for = self.tell_controller(slot, &result);
        let name = self.table.job(slot).name.clone();
        match result {
            Ok(remote) => self.on_accepted(slot, &remote)?,
            Err(ApiError::PaymentRequired { message }) => {
                tracing::debug!(job = %name, %message, "402 on submission");
                self.status.payment_required_total += 1;
                self.requeue(slot)?;
                self.halt_with(StopReason::PaymentRequired, &message);
            }
            Err(ApiError::Auth { status, message }) => {
                self.requeue(slot)?;
                self.refuse_auth(status, &message);
            }
            Err(ApiError::RateLimited { retry_after, message }) => {
                self.status.rate_limited_total += 1;
                self.requeue(slot)?;
                tracing::info!(
                    %message,
                    retry_after_ms = retry_after.map(|wait| wait.as_millis() as u64),
                    wait_ms = limited_for.as_millis() as u64,
                    allowed_in_flight = self.controller.allowed_in_flight(),
                    "Krea is rate limiting (429); pausing submissions"
                );
            }
            Err(err @ ApiError::NotSent(_)) => {
                // Nothing reached Krea: safe to send again after a pause.
                self.requeue(slot)?;
                let wait = self.pacer.on_unreachable();
                tracing::warn!(%err, wait_ms = wait.as_millis() as u64, "cannot reach Krea; pausing submissions");
            }
            Err(err) if err.may_have_created_job() => {
                tracing::warn!(
                    job = %name, %err,
                    "the submission got no usable answer: Krea may have created the job; \
                     submissions pause until it is found or shown not to exist"
                );
                self.table.notes_mut(slot).unanswered.push(unanswered_label(&err));
                self.posts_narrowed_since = Some(self.clock.now_ms());
                self.posts_accepted_narrowed = 0;
                let reconcile = self.reconciles_now(slot);
                self.table.unanswered(slot, self.clock.now_ms(), err.to_string(), reconcile)?;
            }
            Err(
                err @ (ApiError::ModelGone { .. }
                | ApiError::NotFound { .. }
                | ApiError::PlanRequired { .. }),
            ) => {
                // The model itself is refused: every waiting job of it would be refused too. A
                // plan-402 is such a refusal, not an empty balance: the other models go on.
                let message = err.to_string();
                let model = self.table.job(slot).model.clone();
                tracing::error!(job = %name, %model, %message, "model refused; failing its jobs");
                self.fail(slot, message.clone())?;
                self.table.fail_pending_of_model(&model, &message, self.clock.now_ms())?;
            }
            Err(err) => {
                tracing::warn!(job = %name, %err, "Krea refused the job");
                self.fail(slot, err.to_string())?;
            }
        }
        Ok(())
    }

    /// Tells the controller how a POST was answered, and how long it took; returns how long
    /// submitting waits after a 429 (zero otherwise).
    fn tell_controller(&mut self, slot: usize, result: &Result<RemoteJob, ApiError>) -> Duration {
        let now = Instant::now();
        let round_trip = self.post_sent_at.remove(&slot).map_or(Duration::ZERO, |sent| now - sent);
        let wait = match result {
            Ok(remote) => {
                self.pacer.on_answered();
                let status = remote.status.as_ref();
                self.controller.accepted(&remote.job_id, status, round_trip, now);
                if status.is_some_and(RemoteStatus::is_terminal) {
                    // Ended in its answer: no poll will tell the controller so.
                    self.controller.ended(&remote.job_id, now);
                }
                Duration::ZERO
            }
            Err(ApiError::RateLimited { retry_after, message }) => {
                self.pacer.on_answered();
                let kind = LimitKind::of_message(message);
                self.controller.rate_limited(kind, *retry_after, round_trip, now)
            }
            Err(_) => {
                self.controller.post_failed();
                Duration::ZERO
            }
        };
        // The pace learned from this answer holds from now, not from the next submission: a
        // bucket rebuilt only after a back-off would add a whole period to it.
        self.pacer.set_pace(self.pace());
        wait
    }

    fn on_accepted(&mut self, slot: usize, remote: &RemoteJob) -> Result<(), IllegalTransition> {
        // Narrowing ends after a run of POSTs sent alone since then that Krea accepted (one
        // sent before, still on the wire, proves nothing about Krea now).
        let sent_at = self.table.job(slot).attempt_at.unwrap_or_default();
        if self.posts_narrowed_since.is_some_and(|since| sent_at >= since) {
            self.posts_accepted_narrowed += 1;
        }
        if self.posts_accepted_narrowed >= NARROWED_RUN {
            self.posts_narrowed_since = None;
            self.posts_accepted_narrowed = 0;
            tracing::info!("Krea answers submissions again: several may be on the wire again");
        }
        self.resume_after_pause();
        let name = self.table.job(slot).name.clone();
        if let Some(owner) = self.table.claim_owner(&remote.job_id) {
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
            self.table.attempt_ended(slot, self.clock.now_ms());
            return self.fail(slot, message);
        }
        tracing::info!(job = %name, job_id = %remote.job_id, "submitted");
        self.table.accepted(slot, remote, self.clock.now_ms())?;
        self.note_clock_sample(slot);
        self.on_remote_state(slot, remote)
    }

    /// Remembers when the job's accepted POST was sent, answered and created, to bound the
    /// offset between the local clock and Krea's for reconciliation.
    pub(super) fn note_clock_sample(&mut self, slot: usize) {
        let job = self.table.job(slot);
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

    /// Reconciliation showed that the job's last attempt created nothing. A job whose attempts
    /// got no usable answer waits its own back-off (the others are submitted meanwhile), and
    /// fails after [`MAX_UNANSWERED_POSTS`] of them; one left unknown by a crash is sent again
    /// at once.
    pub(super) fn retry_not_created(&mut self, slot: usize) -> Result<(), IllegalTransition> {
        let unanswered = &self.table.notes(slot).unanswered;
        let name = self.table.job(slot).name.clone();
        if unanswered.is_empty() {
            tracing::info!(
                job = %name,
                "not found at Krea: the unanswered submission created nothing; it will be submitted again"
            );
            return self.requeue(slot);
        }
        if unanswered.len() >= MAX_UNANSWERED_POSTS {
            let message = unanswered_message(unanswered);
            tracing::error!(job = %name, "{message}");
            return self.fail(slot, message);
        }
        let attempts = unanswered.len();
        let wait = unanswered_backoff(self.settings.rate_limit_backoff, attempts);
        tracing::info!(
            job = %name,
            attempts,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "not found at Krea: the unanswered submission created nothing; this job is sent \
             again after its back-off, the others meanwhile"
        );
        self.table.back_to_pending_after(slot, Instant::now() + wait, self.clock.now_ms())
    }

    /// When the next job's back-off ends, if one is backing off.
    pub(super) fn backoff_wake(&self) -> Option<Instant> {
        self.table.backoff_wake()
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
