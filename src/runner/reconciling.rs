//! When and how unknown jobs are reconciled (the matching itself is `reconcile.rs`).
//!
//! An unknown job holds every submission back. Once its POST's timeout and `reconcile_after`
//! have passed for every unknown job, and no POST is on the wire, the account's recent jobs are
//! listed and matched: adopted jobs are polled, jobs shown not to exist go back to the head of
//! the queue, ambiguous ones are reported and set aside (still `unknown`, never resubmitted).

use super::{Engine, Event};
use crate::api::ApiError;
use crate::job::JobState;
use crate::reconcile::{Attempt, Candidate, ClockOffset, Outcome, list_unclaimed, match_attempts};
use crate::store::now_ms;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl Engine {
    /// When the unknown job settled last may be reconciled (ms since the epoch): its POST's end
    /// (or the attempt plus the request timeout, if the end was not seen) plus `reconcile_after`.
    fn settled_at_ms(&self) -> Option<i64> {
        let timeout = millis(self.settings.request_timeout);
        let after = millis(self.settings.reconcile_after);
        self.unknown
            .iter()
            .map(|&slot| {
                let job = &self.slots[slot].job;
                let started = job.attempt_at.unwrap_or(0);
                job.attempt_ended.unwrap_or(started + timeout) + after
            })
            .max()
    }

    /// When the loop must wake up to start a reconciliation, if one is waiting.
    pub(super) fn reconcile_wake(&self) -> Option<Instant> {
        if self.unknown.is_empty() || self.listing {
            return None;
        }
        let wait_ms = self.settled_at_ms()?.saturating_sub(now_ms()).max(0);
        let settled =
            Instant::now() + Duration::from_millis(u64::try_from(wait_ms).unwrap_or_default());
        Some(self.listing_retry_at.map_or(settled, |retry| retry.max(settled)))
    }

    /// Starts listing the account's recent jobs when every unknown job has settled and no POST
    /// is on the wire (its job would be unclaimed but ours).
    pub(super) fn maybe_start_listing(&mut self) {
        if self.unknown.is_empty() || self.listing || self.post_running {
            return;
        }
        if self.settled_at_ms().is_some_and(|settled| settled > now_ms())
            || self.listing_retry_at.is_some_and(|retry| retry > Instant::now())
        {
            return;
        }
        let slots: Vec<usize> = self.unknown.iter().copied().collect();
        let offset = self.clock_offset();
        let earliest = slots
            .iter()
            .filter_map(|&slot| self.slots[slot].job.attempt_at)
            .min()
            .unwrap_or_else(now_ms);
        let since_ms = earliest + offset.low_ms;
        let claimed: HashSet<String> =
            self.remote_ids.keys().chain(self.claimed_elsewhere.iter()).cloned().collect();
        let api = Arc::clone(&self.api);
        let policy = self.settings.retry;
        self.listing = true;
        tracing::info!(unknown = slots.len(), "looking for unanswered submissions at Krea");
        self.tasks.spawn(async move {
            let result = list_unclaimed(&api, since_ms, &claimed, &policy).await;
            Event::Listed { slots, result }
        });
    }

    fn clock_offset(&self) -> ClockOffset {
        let samples: Vec<(i64, i64, i64)> = self.clock_samples.iter().copied().collect();
        ClockOffset::measured(&samples)
    }

    pub(super) fn on_listed(&mut self, slots: &[usize], result: Result<Vec<Candidate>, ApiError>) {
        self.listing = false;
        let candidates = match result {
            Ok(candidates) => candidates,
            Err(ApiError::Auth { status, message }) => {
                self.listing_retry_at = Some(Instant::now() + self.settings.poll.max);
                return self.refuse_auth(status, &message);
            }
            Err(err) => {
                let wait = self.settings.poll.max;
                tracing::warn!(%err, "cannot list jobs at Krea to reconcile; trying again later");
                self.listing_retry_at = Some(Instant::now() + wait);
                return;
            }
        };
        self.listing_retry_at = None;
        let attempts: Vec<Attempt> = slots
            .iter()
            .filter(|&&slot| self.slots[slot].job.state == JobState::Unknown)
            .map(|&slot| {
                let job = &self.slots[slot].job;
                Attempt {
                    slot,
                    started_ms: job.attempt_at.unwrap_or_else(now_ms),
                    ended_ms: job.attempt_ended,
                }
            })
            .collect();
        let outcomes = match_attempts(
            &attempts,
            &candidates,
            self.clock_offset(),
            self.settings.request_timeout,
        );
        for outcome in outcomes {
            match outcome {
                Outcome::Adopt { slot, job } => {
                    self.unknown.remove(&slot);
                    if let Some(owner) = self.claim_owner(&job.job_id) {
                        self.set_aside(
                            slot,
                            format!("Krea job {} is already held by {owner}", job.job_id),
                        );
                        continue;
                    }
                    tracing::info!(
                        job = %self.slots[slot].job.name, job_id = %job.job_id,
                        "found at Krea: the unanswered submission had created it; adopted"
                    );
                    self.claim(slot, &job);
                    self.set_state(slot, JobState::Submitted, None);
                    self.on_remote_state(slot, &job);
                }
                Outcome::NotCreated { slot } => {
                    self.unknown.remove(&slot);
                    tracing::info!(
                        job = %self.slots[slot].job.name,
                        "not found at Krea: the unanswered submission created nothing; it will be submitted again"
                    );
                    self.requeue(slot);
                }
                Outcome::Ambiguous { slot, reason } => {
                    self.unknown.remove(&slot);
                    self.set_aside(slot, reason);
                }
            }
        }
    }

    /// Reports an unknown job that cannot be reconciled with confidence and stops holding
    /// submissions for it. It stays `unknown`: never submitted again by krea-batch.
    fn set_aside(&mut self, slot: usize, reason: String) {
        tracing::error!(job = %self.slots[slot].job.name, "{reason}");
        self.slots[slot].job.error = Some(reason);
        self.touch(slot);
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
