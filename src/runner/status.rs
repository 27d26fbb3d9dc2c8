//! The engine's own vocabulary, shared with whoever shows or serves what it does: why
//! submitting stopped ([`StopReason`]), jobs by where they stand ([`Counts`]), what the
//! engine publishes as it runs ([`EngineStatus`]), and cancels Krea did not carry out
//! ([`RefusedCancel`]).
//!
//! This file imports only `job` and `store`, not the engine, so the modules the engine itself
//! uses (`report`, `gallery`) can name these types (as `runner::status::…`) without a circle.

use crate::job::JobState;
use crate::store::JobRecord;
use serde::{Deserialize, Serialize};

/// Why submitting stopped before every job was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Krea answered 402: the prepaid balance is exhausted.
    PaymentRequired,
    /// Krea refused the key (401/403).
    AuthRefused,
    /// The user asked to stop (Ctrl-C, SIGTERM).
    Interrupted,
    /// The next job would exceed the budget (`budget.max_usd` in the job file or the daemon
    /// config).
    BudgetReached,
    /// The next job would exceed today's budget (`budget.per_day_usd`): room comes back at
    /// midnight UTC.
    DailyBudgetReached,
}

impl StopReason {
    /// A short code for machines (metrics labels, JSON).
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Self::PaymentRequired => "payment_required",
            Self::AuthRefused => "auth_refused",
            Self::Interrupted => "interrupted",
            Self::BudgetReached => "budget_reached",
            Self::DailyBudgetReached => "daily_budget_reached",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PaymentRequired => "the Krea API balance is exhausted (402)",
            Self::AuthRefused => "Krea refused the API key",
            Self::Interrupted => "interrupted",
            Self::BudgetReached => "the budget is reached",
            Self::DailyBudgetReached => "the daily budget is reached until midnight UTC",
        })
    }
}

/// Why submitting is paused (the service) or stopped (a run), since when and until when: what
/// the engine keeps in the state file (meta key `pause`) for `krea-batch status`, another
/// process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// Why.
    pub reason: StopReason,
    /// Since when, ms since the epoch (UTC).
    pub since_ms: i64,
    /// Until when, ms since the epoch, when that is known: a daily budget frees up at the
    /// next midnight UTC. `None` for a 402, a refused key or a total budget, which end only
    /// with a top-up, a new key or a new budget (and a probe, SIGHUP or `krea-batch resume`).
    pub until_ms: Option<i64>,
    /// What was said: Krea's message for a 402 or a refused key, the budget's arithmetic for
    /// a budget.
    pub message: String,
}

/// The state file's meta key under which the engine keeps its current [`Pause`] as JSON (an
/// empty value when submitting goes on).
pub(crate) const META_PAUSE: &str = "pause";

/// Jobs by where they stand, for progress and summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// All jobs.
    pub total: usize,
    /// Not submitted.
    pub pending: usize,
    /// Submitted (or being submitted) and not finished at Krea.
    pub in_flight: usize,
    /// POSTs whose outcome is unknown, awaiting reconciliation.
    pub unknown: usize,
    /// Completed at Krea with files still to download.
    pub download_pending: usize,
    /// Completed with every file on disk.
    pub completed: usize,
    /// Failed.
    pub failed: usize,
    /// Cancelled.
    pub cancelled: usize,
}

impl Counts {
    /// Counts one more job in `state`.
    pub fn add(&mut self, state: JobState) {
        self.add_many(state, 1);
    }

    /// Counts `count` more jobs in `state`.
    pub fn add_many(&mut self, state: JobState, count: usize) {
        self.total += count;
        *self.slot(state) += count;
    }

    /// Moves one job from `from` to `to`.
    pub fn moved(&mut self, from: JobState, to: JobState) {
        *self.slot(from) -= 1;
        *self.slot(to) += 1;
    }

    fn slot(&mut self, state: JobState) -> &mut usize {
        match state {
            JobState::Pending => &mut self.pending,
            JobState::Submitting | JobState::Submitted => &mut self.in_flight,
            JobState::Unknown => &mut self.unknown,
            JobState::Completed => &mut self.download_pending,
            JobState::Downloaded => &mut self.completed,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
        }
    }

    /// Jobs that need nothing more.
    #[must_use]
    pub fn finished(&self) -> usize {
        self.completed + self.failed + self.cancelled
    }

    /// Counts over a set of records.
    pub fn of<'a>(jobs: impl IntoIterator<Item = &'a JobRecord>) -> Self {
        let mut counts = Self::default();
        for job in jobs {
            counts.add(job.state);
        }
        counts
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} done, {} failed, {} in flight, {} waiting",
            self.completed, self.failed, self.in_flight, self.pending
        )?;
        if self.download_pending > 0 {
            write!(f, ", {} to download", self.download_pending)?;
        }
        if self.unknown > 0 {
            write!(f, ", {} unknown", self.unknown)?;
        }
        if self.cancelled > 0 {
            write!(f, ", {} cancelled", self.cancelled)?;
        }
        Ok(())
    }
}

/// What the engine publishes as it runs: for the progress display, systemd's `STATUS=` and the
/// metrics endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineStatus {
    /// Jobs by where they stand.
    pub counts: Counts,
    /// Why submitting is stopped or paused, if it is.
    pub paused: Option<StopReason>,
    /// The pause with its times and message, if submitting is stopped or paused.
    pub pause: Option<Pause>,
    /// POSTs sent.
    pub submissions_total: u64,
    /// 429 answers.
    pub rate_limited_total: u64,
    /// 402 answers.
    pub payment_required_total: u64,
    /// Result files downloaded.
    pub downloads_total: u64,
    /// Their bytes.
    pub download_bytes_total: u64,
    /// Completed (billed) jobs at their estimated price, USD.
    pub spend_usd: f64,
    /// What the engine learned of the account, for people (`controller.rs`): "account runs
    /// about 20 at a time; pace 4.1/s". Empty before the engine first publishes.
    pub learned: String,
    /// The account's running capacity as learned, once a backlog or a 429 revealed it.
    pub capacity: Option<u32>,
    /// Jobs allowed in flight now (backlogged ones included).
    pub allowed_in_flight: u32,
    /// POSTs allowed to wait for their answer at once now.
    pub posts_allowed: u32,
    /// Our jobs last seen backlogged at Krea.
    pub backlogged: u32,
    /// The pace the governor enforces, POSTs per second; `None` while none is needed.
    pub pace_per_second: Option<f64>,
}

/// The state file's meta key under which the engine keeps [`EngineStatus::learned`], so that
/// `krea-batch status` (another process) shows it.
pub(crate) const META_LEARNED: &str = "learned";

/// A job that was to be cancelled (by the user, or after its job timeout) and that Krea ran and
/// billed all the same: it refused the cancel, or completed the job before the cancel reached it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusedCancel {
    /// The job's name.
    pub job: String,
    /// Krea's reason for refusing, or why the cancel came too late.
    pub reason: String,
    /// Whether the cancel was the job timeout's rather than the user's.
    pub after_timeout: bool,
}
