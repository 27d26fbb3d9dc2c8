//! When and how unknown jobs are reconciled (the matching itself is `reconcile.rs`).
//!
//! An unknown job holds every submission back. Once its POST's timeout and `reconcile_after`
//! have passed for every unknown job, and no POST is on the wire, the account's recent jobs are
//! listed and matched: adopted jobs are polled, jobs shown not to exist go back to the head of
//! the queue (after a back-off when their POST got no usable answer: `submit.rs`), ambiguous
//! ones are reported and set aside (still `unknown`, never resubmitted).
//!
//! # Several POSTs on the wire
//!
//! With K > 1 the send order no longer tells which lost answer made which job, so the engine
//! keeps three rules (the matching itself is in `reconcile.rs`, "What cannot be told apart"):
//!
//! - no listing while any POST is on the wire, and no POST while an unknown job awaits its
//!   listing: every job an answered POST made is claimed before the list is read, so the
//!   unclaimed jobs in the windows are the unknown attempts' (or a foreign program's);
//! - each attempt handed to the matching says whether it raced, that is whether its POST may
//!   have been on the wire with another unknown one ([`Attempt::raced_among`], from the
//!   recorded start and end of each attempt; an end not seen, after a kill, counts as never):
//!   raced attempts are paired with jobs only where the windows force it, never by order;
//! - a job that a listing showed unclaimed is never a candidate of a later listing in the same
//!   run: every POST after a listing was sent after it, so that job cannot be theirs. Without
//!   this, a job set aside as unattributed (or ambiguous) could be adopted by a later lost
//!   answer whose window it falls in. (The next run reconciles all unknown jobs together,
//!   those set aside included, so their jobs go back to their own groups.)
//! - a group of raced attempts that cannot be paired is set aside (each job stays `unknown`,
//!   never sent again, its error naming the Krea jobs), and the group's readable jobs are
//!   polled and downloaded to `unattributed/` with every candidate named (`unattributed.rs`).
//!   The next run reconciles the set-aside jobs again, finds the same jobs, and skips the
//!   files already there.
//!
//! Items of the list that cannot be read (an id of 300 characters, say) are skipped with one
//! warning per run; one that may have been created in an attempt's window makes that attempt
//! ambiguous rather than "not created" (`reconcile.rs`). The first Ctrl-C or SIGTERM ends every
//! wait here at once: jobs still unknown stay so in the state file for the next run.

use super::phase::IllegalTransition;
use super::{Engine, Event};
use crate::api::ApiError;
use crate::job::JobState;
use crate::reconcile::{Attempt, ClockOffset, Listing, Outcome, list_unclaimed, match_attempts};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

impl Engine {
    /// Whether an unanswered POST's job holds submissions until reconciliation has decided
    /// what it did; after a Ctrl-C (or while draining) it is left unknown for the next run
    /// instead.
    pub(super) fn reconciles_now(&self, slot: usize) -> bool {
        if self.draining || self.stopped == Some(super::StopReason::Interrupted) {
            tracing::info!(
                job = %self.table.job(slot).name,
                "left unknown: the next run looks for it at Krea before sending anything"
            );
            return false;
        }
        true
    }

    /// A Ctrl-C or SIGTERM: no more waiting to reconcile. A listing under way ends at once; the
    /// unknown jobs stay `unknown` in the state file (never resubmitted blindly), and the next
    /// run reconciles them first.
    pub(super) fn leave_unknown_to_next_run(&mut self) {
        self.listing_stop.cancel();
        self.listing_retry_at = None;
        let names = self.table.leave_unknown_to_next_run();
        if names.is_empty() {
            return;
        }
        tracing::warn!(
            jobs = %names.join(", "),
            "stopping before reconciliation: these jobs stay unknown; the next run looks for \
             them at Krea before sending anything"
        );
    }

    /// When the unknown job settled last may be reconciled (ms since the epoch): its POST's end
    /// (or the attempt plus the request timeout, if the end was not seen) plus `reconcile_after`.
    fn settled_at_ms(&self) -> Option<i64> {
        let timeout = millis(self.settings.request_timeout);
        let after = millis(self.settings.reconcile_after);
        self.table
            .awaiting_reconciliation()
            .map(|slot| {
                let job = self.table.job(slot);
                let started = job.attempt_at.unwrap_or(0);
                job.attempt_ended.unwrap_or(started + timeout) + after
            })
            .max()
    }

    /// When the loop must wake up to start a reconciliation, if one is waiting.
    pub(super) fn reconcile_wake(&self) -> Option<Instant> {
        if self.table.waiting_to_reconcile() == 0 || self.listing {
            return None;
        }
        let wait_ms = self.settled_at_ms()?.saturating_sub(self.clock.now_ms()).max(0);
        let settled =
            Instant::now() + Duration::from_millis(u64::try_from(wait_ms).unwrap_or_default());
        Some(self.listing_retry_at.map_or(settled, |retry| retry.max(settled)))
    }

    /// Starts listing the account's recent jobs when every unknown job has settled and no POST
    /// is on the wire (its job would be unclaimed but ours).
    pub(super) fn maybe_start_listing(&mut self) {
        if self.table.waiting_to_reconcile() == 0 || self.listing || self.posts_running > 0 {
            return;
        }
        let now = self.clock.now_ms();
        if self.settled_at_ms().is_some_and(|settled| settled > now)
            || self.listing_retry_at.is_some_and(|retry| retry > Instant::now())
        {
            return;
        }
        let slots: Vec<usize> = self.table.awaiting_reconciliation().collect();
        let offset = self.clock_offset();
        let earliest =
            slots.iter().filter_map(|&slot| self.table.job(slot).attempt_at).min().unwrap_or(now);
        let since_ms = earliest + offset.low_ms;
        let mut claimed = self.table.claimed();
        claimed.extend(self.listed_before.iter().cloned());
        let api = Arc::clone(&self.api);
        let policy = self.settings.retry;
        let stop = self.listing_stop.clone();
        self.listing = true;
        tracing::info!(unknown = slots.len(), "looking for unanswered submissions at Krea");
        self.tasks.spawn(async move {
            tokio::select! {
                result = list_unclaimed(&*api, since_ms, &claimed, &policy) => {
                    Event::Listed { slots, result }
                }
                () = stop.cancelled() => Event::ListingStopped,
            }
        });
    }

    fn clock_offset(&self) -> ClockOffset {
        let samples: Vec<(i64, i64, i64)> = self.clock_samples.iter().copied().collect();
        ClockOffset::measured(&samples)
    }

    pub(super) fn on_listed(
        &mut self,
        slots: &[usize],
        result: Result<Listing, ApiError>,
    ) -> Result<(), IllegalTransition> {
        self.listing = false;
        let candidates = match result {
            Ok(listing) => {
                self.report_unreadable(&listing);
                listing.candidates
            }
            Err(ApiError::Auth { status, message }) => {
                self.listing_retry_at = Some(Instant::now() + self.settings.poll.max);
                self.refuse_auth(status, &message);
                return Ok(());
            }
            Err(err) => {
                let wait = self.settings.poll.max;
                tracing::warn!(%err, "cannot list jobs at Krea to reconcile; trying again later");
                self.listing_retry_at = Some(Instant::now() + wait);
                return Ok(());
            }
        };
        self.listing_retry_at = None;
        // Every POST from now on is sent after this listing, so no job it shows can be theirs;
        // a job set aside here (unattributed, ambiguous) is never taken for a later one's.
        let shown = candidates.iter().filter_map(|c| c.job.as_ref()).map(|job| job.job_id.clone());
        self.listed_before.extend(shown);
        let now = self.clock.now_ms();
        let mut attempts: Vec<Attempt> = slots
            .iter()
            .filter(|&&slot| self.table.state(slot) == JobState::Unknown)
            .map(|&slot| {
                let job = self.table.job(slot);
                Attempt {
                    slot,
                    started_ms: job.attempt_at.unwrap_or(now),
                    ended_ms: job.attempt_ended,
                    raced: false,
                }
            })
            .collect();
        Attempt::raced_among(&mut attempts);
        let outcomes = match_attempts(
            &attempts,
            &candidates,
            self.clock_offset(),
            self.settings.request_timeout,
        );
        for outcome in outcomes {
            match outcome {
                Outcome::Adopt { slot, job } => {
                    if let Some(owner) = self.table.claim_owner(&job.job_id) {
                        self.set_aside(
                            slot,
                            format!("Krea job {} is already held by {owner}", job.job_id),
                        )?;
                        continue;
                    }
                    tracing::info!(
                        job = %self.table.job(slot).name, job_id = %job.job_id,
                        "found at Krea: the unanswered submission had created it; adopted"
                    );
                    self.table.adopted(slot, &job, self.clock.now_ms())?;
                    self.on_remote_state(slot, &job)?;
                }
                Outcome::NotCreated { slot } => self.retry_not_created(slot)?,
                Outcome::Ambiguous { slot, reason } => self.set_aside(slot, reason)?,
                Outcome::Unattributed { slot, jobs, reason } => {
                    self.set_aside(slot, reason)?;
                    self.add_unattributed(slot, jobs);
                }
            }
        }
        self.report_unattributed();
        Ok(())
    }

    /// Says that Krea's job list held items that could not be read: a warning the first time
    /// in a run, then only at debug level (each reconciliation lists them again).
    fn report_unreadable(&mut self, listing: &Listing) {
        let Some(example) = &listing.first_unreadable else { return };
        self.unreadable_listings += 1;
        if self.unreadable_listings > 1 {
            tracing::debug!(skipped = listing.unreadable, %example, "unreadable items in Krea's job list skipped");
            return;
        }
        tracing::warn!(
            skipped = listing.unreadable,
            %example,
            "Krea's job list holds items that cannot be read; they are skipped (one created \
             around an unanswered submission leaves that job unknown rather than sent again)"
        );
    }

    /// Reports an unknown job that cannot be reconciled with confidence and stops holding
    /// submissions for it. It stays `unknown`: never submitted again by krea-batch.
    fn set_aside(&mut self, slot: usize, reason: String) -> Result<(), IllegalTransition> {
        tracing::error!(job = %self.table.job(slot).name, "{reason}");
        self.table.set_aside(slot, reason)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
