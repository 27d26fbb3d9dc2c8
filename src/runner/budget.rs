//! The spending cap. Before each POST, what the batch has committed (completed jobs, which are
//! billed, plus jobs in flight, at their estimated price) and the next job's price must fit
//! under `max_usd`, and the same counted for today (UTC) under `per_day_usd`. When they do not,
//! submitting stops exactly as on a 402: jobs in flight finish; a one-shot run ends (exit 5),
//! the service pauses until the next day or a reload. Failed and cancelled jobs cost nothing.

use super::{Engine, RunKind, StopReason};
use crate::job::JobState;
use crate::pricing::usd;
use crate::store::JobRecord;
use std::collections::HashMap;
use std::time::Duration;

pub(crate) use crate::jobfile::Budget;

const DAY_MS: i64 = 86_400_000;

/// What is committed: billed (completed) spend by day, and jobs in flight.
#[derive(Clone, Debug, Default)]
pub(super) struct Ledger {
    in_flight_usd: f64,
    billed_usd: f64,
    billed_by_day: HashMap<i64, f64>,
}

/// How a state counts against the budget.
enum Weight {
    Nothing,
    InFlight,
    Billed,
}

fn weight(state: JobState) -> Weight {
    match state {
        JobState::Submitting | JobState::Unknown | JobState::Submitted => Weight::InFlight,
        JobState::Completed | JobState::Downloaded => Weight::Billed,
        JobState::Pending | JobState::Failed | JobState::Cancelled => Weight::Nothing,
    }
}

impl Ledger {
    /// Counts a job as it stands (when the engine takes it on).
    /// `now_ms` dates a billed job that has no end time.
    pub(super) fn add(&mut self, job: &JobRecord, now_ms: i64) {
        self.apply(job, job.state, 1.0, now_ms);
    }

    /// A job moved from `from` to its current state.
    pub(super) fn moved(&mut self, job: &JobRecord, from: JobState, now_ms: i64) {
        self.apply(job, from, -1.0, now_ms);
        self.apply(job, job.state, 1.0, now_ms);
    }

    fn apply(&mut self, job: &JobRecord, state: JobState, sign: f64, now_ms: i64) {
        let price = job.price_usd.unwrap_or_default() * sign;
        match weight(state) {
            Weight::Nothing => {}
            Weight::InFlight => self.in_flight_usd += price,
            Weight::Billed => {
                self.billed_usd += price;
                let day = job.finished_at.unwrap_or(now_ms).div_euclid(DAY_MS);
                *self.billed_by_day.entry(day).or_default() += price;
            }
        }
    }

    fn total(&self) -> f64 {
        self.billed_usd + self.in_flight_usd
    }

    fn today(&self, now_ms: i64) -> f64 {
        self.billed_by_day.get(&now_ms.div_euclid(DAY_MS)).copied().unwrap_or_default()
            + self.in_flight_usd
    }
}

/// Why the next job does not fit, and until when (a per-day cap ends at midnight UTC).
pub(super) struct Exceeded {
    pub(super) message: String,
    pub(super) retry_in: Option<Duration>,
}

impl Engine {
    /// Whether the next job (costing `price`) fits under the budget.
    pub(super) fn budget_check(&self, price: Option<f64>) -> Result<(), Exceeded> {
        let Some(budget) = self.settings.budget else { return Ok(()) };
        // What a job of unknown price commits cannot be counted, so none is sent under a cap.
        // `run` and the service's inbox refuse such files first; this covers jobs imported
        // before the budget was set.
        let Some(price) = price else {
            return Err(Exceeded {
                message: "the next job has no known price, so the budget cannot count it (add \
                          its model under `prices:`)"
                    .into(),
                retry_in: None,
            });
        };
        let now = self.clock.now_ms();
        // A cent's thousandth of slack: prices are sums of floats.
        let over = |committed: f64, cap: f64| committed + price > cap + 1e-9;
        if let Some(cap) = budget.max_usd.filter(|cap| over(self.table.ledger().total(), *cap)) {
            return Err(Exceeded {
                message: format!(
                    "the budget of {} would be exceeded: {} committed (completed and in \
                     flight) + {} for the next job",
                    usd(cap),
                    usd(self.table.ledger().total()),
                    usd(price)
                ),
                retry_in: None,
            });
        }
        if let Some(cap) =
            budget.per_day_usd.filter(|cap| over(self.table.ledger().today(now), *cap))
        {
            let to_midnight = DAY_MS - now.rem_euclid(DAY_MS);
            return Err(Exceeded {
                message: format!(
                    "the daily budget of {} would be exceeded: {} committed today (UTC) + {} \
                     for the next job",
                    usd(cap),
                    usd(self.table.ledger().today(now)),
                    usd(price)
                ),
                retry_in: Some(Duration::from_millis(
                    u64::try_from(to_midnight).unwrap_or_default(),
                )),
            });
        }
        Ok(())
    }

    /// Stops (one-shot) or pauses (service) submitting because the budget is reached.
    pub(super) fn halt_on_budget(&mut self, exceeded: &Exceeded) {
        // Only a daily cap frees up by itself (at midnight UTC).
        let reason = if exceeded.retry_in.is_some() {
            StopReason::DailyBudgetReached
        } else {
            StopReason::BudgetReached
        };
        if self.settings.kind == RunKind::OneShot {
            if self.stopped.is_none() {
                tracing::warn!(
                    "{}; no more submissions; jobs in flight are finished",
                    exceeded.message
                );
            }
            self.stopped.get_or_insert(reason);
            return;
        }
        let until_ms = exceeded.retry_in.map(|wait| {
            self.clock.now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2)
        });
        if self.paused != Some(reason) {
            let until = if reason == StopReason::DailyBudgetReached {
                "submitting paused until midnight UTC"
            } else {
                "submitting paused"
            };
            tracing::warn!("{}; {until}", exceeded.message);
            self.note_pause(reason, &exceeded.message, until_ms);
        }
        self.paused = Some(reason);
        // A daily cap frees up at midnight; a total cap only with a new configuration (SIGHUP).
        let wait = exceeded.retry_in.unwrap_or(Duration::from_hours(24 * 365));
        self.probe_at = Some(tokio::time::Instant::now() + wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any time: every test job has an end time.
    const NOW: i64 = 12 * DAY_MS;

    fn job(state: JobState, price: f64, finished_day: i64) -> JobRecord {
        JobRecord {
            finished_at: Some(finished_day * DAY_MS + 1000),
            price_usd: Some(price),
            ..super::super::doubles::job_record(1, state)
        }
    }

    #[test]
    fn the_ledger_counts_billed_and_in_flight_not_failed() {
        let mut ledger = Ledger::default();
        ledger.add(&job(JobState::Downloaded, 1.0, 10), NOW);
        ledger.add(&job(JobState::Failed, 5.0, 10), NOW);
        ledger.add(&job(JobState::Pending, 7.0, 10), NOW);
        let mut flying = job(JobState::Submitted, 0.5, 11);
        ledger.add(&flying, NOW);
        assert!((ledger.total() - 1.5).abs() < 1e-9);
        assert!((ledger.today(11 * DAY_MS) - 0.5).abs() < 1e-9, "yesterday's spend is not today's");
        flying.state = JobState::Completed;
        ledger.moved(&flying, JobState::Submitted, NOW);
        assert!((ledger.total() - 1.5).abs() < 1e-9);
        assert!((ledger.today(11 * DAY_MS) - 0.5).abs() < 1e-9);
        flying.state = JobState::Downloaded;
        ledger.moved(&flying, JobState::Completed, NOW);
        let mut refused = job(JobState::Submitting, 2.0, 11);
        ledger.add(&refused, NOW);
        refused.state = JobState::Failed;
        ledger.moved(&refused, JobState::Submitting, NOW);
        assert!((ledger.total() - 1.5).abs() < 1e-9, "a failed job costs nothing");
    }
}
