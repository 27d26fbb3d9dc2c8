//! `krea-batch retry`: failed jobs of a job file run again, on purpose (command).
//!
//! A failed job is never sent again by the engine (`JobState::may_become` refuses
//! `failed → pending`): a refusal, a moderation or a timeout is data, not something to retry
//! behind the user's back. This command is the user saying "again": [`retry_plan`] reads which
//! failed jobs would go (the named ones, or every failed one of the job file) and what they are
//! estimated to cost, the binary shows it and asks, and [`retry_jobs`] puts them back to
//! pending while holding the state's writer lock, keeping each failure in the state file
//! (`store/retries.rs`). The binary then runs the job file as `run` does: the jobs go through
//! the engine like any pending job, once, with every guarantee of a run.
//!
//! Exactly once: Krea bills only completed jobs, and a failed job has no result, so running it
//! again pays once for one result. Its failed attempt's Krea id stays claimed in the state, so
//! reconciliation never takes it for the new attempt. Cancelled jobs are not retried: a cancel
//! was a decision too (a new job file entry runs such a prompt again).

use crate::error::InputError;
use crate::job::{JobKey, JobState};
use crate::jobfile::JobFile;
use crate::pricing::{Estimate, round_usd, usd};
use crate::report::count;
use crate::selection::{Selection, select};
use crate::store::{JobRecord, Store};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// One failed job that `retry` would run again.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryJob {
    /// Its name.
    pub name: String,
    /// Its model.
    pub model: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Its estimated price, USD.
    pub price_usd: Option<f64>,
    /// How many times it was retried before.
    pub retried_before: usize,
    /// Its row in the state file.
    #[serde(skip)]
    id: i64,
}

/// What `retry` would do: which failed jobs go again, and their estimated cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPlan {
    /// The state file.
    pub state: PathBuf,
    /// The jobs, in the state's order.
    pub jobs: Vec<RetryJob>,
    /// Their estimated cost, USD (of the priced ones).
    pub estimated_usd: f64,
    /// How many have no known price.
    pub unpriced: usize,
}

/// The failed jobs of `selection` in `state`: the named ones (each must have failed), or every
/// failed one when no name is given; only jobs `file` still has, since the run that follows
/// sends no job gone from its file. Reads only.
pub fn retry_plan(
    state: &Path,
    selection: &Selection,
    file: &JobFile,
) -> anyhow::Result<RetryPlan> {
    let store = Store::open_reader(state)?;
    let jobs = select(&store, selection)?;
    let in_file: HashSet<&JobKey> = file.jobs.iter().map(|job| &job.key).collect();
    // Named jobs must all have failed and be in the file; `--failed` takes those among all.
    let named = !selection.names.is_empty();
    for job in jobs.iter().filter(|_| named) {
        let why = if !job.state.may_be_retried() {
            format!(
                "is {}, not failed: `retry` runs only failed jobs again",
                shown_state(job.state)
            )
        } else if !in_file.contains(&job.key) {
            format!("is no longer in {}: put it back to run it again", file.source.display())
        } else {
            continue;
        };
        return Err(InputError::msg(format!(
            "job {} {why} (`krea-batch status` shows each job's state)",
            job.name
        ))
        .into());
    }
    let mut estimate = Estimate::default();
    let mut chosen = Vec::new();
    let again = |job: &JobRecord| job.state.may_be_retried() && in_file.contains(&job.key);
    for job in jobs.into_iter().filter(again) {
        estimate.add(job.price_usd);
        chosen.push(RetryJob {
            retried_before: store.retried_failures(job.id)?.len(),
            name: job.name,
            model: job.model,
            error: job.error,
            price_usd: job.price_usd,
            id: job.id,
        });
    }
    Ok(RetryPlan {
        state: state.to_owned(),
        jobs: chosen,
        estimated_usd: round_usd(estimate.usd),
        unpriced: estimate.unpriced,
    })
}

/// A state as `retry`'s messages say it.
fn shown_state(state: JobState) -> &'static str {
    match state {
        JobState::Pending => "not submitted yet",
        JobState::Downloaded => "done",
        JobState::Completed => "completed (its download is pending)",
        JobState::Cancelled => "cancelled",
        _ => "in flight",
    }
}

/// Puts the jobs of `plan` back to pending, each failure kept; refused while another
/// krea-batch holds the state (exit 2). Returns how many went back.
pub fn retry_jobs(plan: &RetryPlan) -> anyhow::Result<usize> {
    let mut store = crate::setup::open_store(&plan.state)?;
    let ids: Vec<i64> = plan.jobs.iter().map(|job| job.id).collect();
    let moved = store.retry_failed(&ids)?;
    tracing::info!(jobs = moved, "failed jobs put back to pending, to be run again");
    Ok(moved)
}

impl fmt::Display for RetryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} to run again ({}):",
            count(self.jobs.len(), "failed job"),
            self.state.display()
        )?;
        for job in &self.jobs {
            let price = job.price_usd.map_or_else(|| "price unknown".to_owned(), usd);
            write!(f, "  {} ({}, {price})", job.name, job.model)?;
            if let Some(error) = &job.error {
                write!(f, ": failed: {}", crate::api::printable(error, 100))?;
            }
            if job.retried_before > 0 {
                write!(f, " [retried {} before]", count(job.retried_before, "time"))?;
            }
            writeln!(f)?;
        }
        let estimate = Estimate { usd: self.estimated_usd, unpriced: self.unpriced };
        writeln!(f, "estimated cost: {estimate} (billed only for jobs that complete)")
    }
}
