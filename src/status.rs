//! `krea-batch status`: what a state file holds, read without taking it (safe while a run or
//! the daemon writes to it).

use crate::job::JobState;
use crate::pricing::round_usd;
use crate::report::count;
use crate::runner::Counts;
use crate::runner::status::META_LEARNED;
use crate::store::Store;
use serde::Serialize;
use std::path::Path;

/// What `status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The state file.
    pub state_file: String,
    /// Jobs by state.
    pub counts: Counts,
    /// Jobs whose submission's outcome is unknown, waiting for reconciliation.
    pub unknown: Vec<String>,
    /// Completed jobs with files still to download.
    pub download_pending: Vec<String>,
    /// Estimated spend: completed jobs (billed) at their price, USD.
    pub spent_usd: f64,
    /// Estimated commitment: jobs in flight at their price, USD.
    pub in_flight_usd: f64,
    /// What the last run learned of the account ("account runs about 20 at a time; pace
    /// 4.1/s"), as it last wrote it; `None` before any run submitted.
    pub learned: Option<String>,
}

/// How many names of unknown or download-pending jobs `status` lists.
const LISTED_NAMES: usize = 50;

/// `krea-batch status`: reads the state file; safe while a run writes to it. Works from SQL
/// counts and sums, so it stays quick on a state of 100,000 jobs.
pub fn status(state_path: &Path) -> anyhow::Result<Status> {
    let store = Store::open_reader(state_path)?;
    let mut counts = Counts::default();
    for (state, count) in store.count_by_state(None)? {
        counts.add_many(state, count);
    }
    let (spent_usd, _) = store.price_sum(&[JobState::Completed, JobState::Downloaded])?;
    let (in_flight_usd, _) =
        store.price_sum(&[JobState::Submitting, JobState::Unknown, JobState::Submitted])?;
    Ok(Status {
        state_file: state_path.display().to_string(),
        counts,
        unknown: store.names_in(JobState::Unknown, LISTED_NAMES)?,
        download_pending: store.names_in(JobState::Completed, LISTED_NAMES)?,
        spent_usd: round_usd(spent_usd),
        in_flight_usd: round_usd(in_flight_usd),
        learned: store.meta(META_LEARNED)?,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counts;
        writeln!(f, "{}: {}", self.state_file, count(c.total, "job"))?;
        for (label, count) in [
            ("completed", c.completed),
            ("download pending", c.download_pending),
            ("in flight", c.in_flight),
            ("unknown (awaiting reconciliation)", c.unknown),
            // The JSON's word first, so text and JSON name the state alike.
            ("pending (not submitted)", c.pending),
            ("failed", c.failed),
            ("cancelled", c.cancelled),
        ] {
            writeln!(f, "  {label:<36} {count:>7}")?;
        }
        writeln!(
            f,
            "estimated spend ${:.4}; in flight ${:.4}",
            self.spent_usd, self.in_flight_usd
        )?;
        if let Some(learned) = &self.learned {
            writeln!(f, "{learned}")?;
        }
        for name in &self.unknown {
            writeln!(f, "  unknown: {name}")?;
        }
        for name in &self.download_pending {
            writeln!(f, "  download pending: {name}")?;
        }
        Ok(())
    }
}
