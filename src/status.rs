//! `krea-batch status`: what a state file holds, read without taking it (safe while a run or
//! the daemon writes to it): jobs by state, overall and per job file, what was spent, and
//! whether the service's submitting is paused, why and since when (the engine keeps that in
//! the state file, `runner/status.rs`'s [`Pause`]).

use crate::job::JobState;
use crate::pricing::round_usd;
use crate::report::count;
use crate::runner::status::{META_LEARNED, META_PAUSE};
use crate::runner::{Counts, Pause, StopReason};
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
    /// Why the service's submitting is paused, since and until when; `None` while it submits
    /// (and for a one-shot run's state, whose stop its summary reports).
    pub paused: Option<Pause>,
    /// Jobs by job file, in the order the files were imported: one for a run's state, one per
    /// inbox file for the service's.
    pub files: Vec<FileCounts>,
}

/// One job file's jobs by state.
#[derive(Debug, Serialize)]
pub struct FileCounts {
    /// The job file: its path for a run, its name in the inbox for the service.
    pub file: String,
    /// Its jobs by state.
    pub counts: Counts,
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
        paused: store.meta(META_PAUSE)?.as_deref().and_then(read_pause),
        files: file_counts(&store)?,
    })
}

/// The pause the engine wrote; an empty value (submitting) or one this version cannot read
/// shows as none.
fn read_pause(text: &str) -> Option<Pause> {
    if text.is_empty() {
        return None;
    }
    serde_json::from_str(text).ok()
}

fn file_counts(store: &Store) -> anyhow::Result<Vec<FileCounts>> {
    let mut files: Vec<FileCounts> = Vec::new();
    for (source, state, count) in store.count_by_batch_state()? {
        let file = source.strip_prefix("inbox:").unwrap_or(&source).to_owned();
        match files.last_mut() {
            Some(last) if last.file == file => last.counts.add_many(state, count),
            _ => {
                let mut counts = Counts::default();
                counts.add_many(state, count);
                files.push(FileCounts { file, counts });
            }
        }
    }
    Ok(files)
}

/// A time in ms since the epoch as RFC 3339 UTC, to the second.
fn utc(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or_default());
    humantime::format_rfc3339_seconds(at).to_string()
}

impl std::fmt::Display for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match (self.reason, self.until_ms) {
            (StopReason::BudgetReached | StopReason::DailyBudgetReached, Some(_))
            | (StopReason::DailyBudgetReached, None) => "the daily budget is reached",
            (reason, _) => match reason {
                StopReason::PaymentRequired => "the Krea API balance is exhausted (402)",
                StopReason::AuthRefused => "Krea refused the API key (401/403)",
                StopReason::BudgetReached => "the budget is reached",
                StopReason::DailyBudgetReached => "the daily budget is reached",
                StopReason::Interrupted => "interrupted",
            },
        };
        write!(f, "submitting paused since {}: {why}", utc(self.since_ms))?;
        match self.until_ms {
            Some(until) => write!(f, "; resumes at midnight UTC ({})", utc(until))?,
            None => f.write_str(match self.reason {
                StopReason::PaymentRequired => {
                    "; top up, then `krea-batch resume --config FILE` (or SIGHUP); a probe is also sent regularly"
                }
                StopReason::AuthRefused => {
                    "; fix the key, then `krea-batch resume --config FILE` (or SIGHUP)"
                }
                StopReason::BudgetReached => {
                    "; raise `budget:` in the configuration, then reload (SIGHUP)"
                }
                StopReason::DailyBudgetReached => "; resumes at midnight UTC",
                StopReason::Interrupted => "",
            })?,
        }
        if !self.message.is_empty() {
            write!(f, "\n  {}", self.message)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counts;
        writeln!(f, "{}: {}", self.state_file, count(c.total, "job"))?;
        if let Some(pause) = &self.paused {
            writeln!(f, "{pause}")?;
        }
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
        // One file says nothing the totals above do not.
        if self.files.len() > 1 {
            writeln!(f, "by job file:")?;
            for file in &self.files {
                writeln!(f, "  {}: {}", file.file, file.counts)?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::PriceTable;
    use crate::store::Change;

    fn import(store: &mut Store, dir: &Path, source: &str, jobs: usize) {
        let text =
            format!("jobs:\n  - prompt: {source}\n    model: bfl/flux-1-dev\n    count: {jobs}\n");
        let file = crate::jobfile::parse(text.as_bytes(), &dir.join("jobs.yaml")).expect("parses");
        let prices = PriceTable::with_overrides([].into());
        store.import(source, &dir.join(source), &file.jobs, &prices, false).expect("imported");
    }

    #[test]
    fn status_shows_the_pause_and_counts_per_job_file() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("state.sqlite");
        let mut store = Store::open_writer(&path).expect("the state");
        import(&mut store, dir.path(), "inbox:catalogue", 3);
        import(&mut store, dir.path(), "inbox:sweep", 2);
        let pause = Pause {
            reason: StopReason::BudgetReached,
            since_ms: 1_767_225_600_000,
            until_ms: Some(1_767_312_000_000),
            message: "the daily budget of $1 would be exceeded".into(),
        };
        let value = serde_json::to_string(&pause).expect("JSON");
        store.apply(&[Change::Meta { key: META_PAUSE.into(), value }]).expect("written");
        drop(store);

        let shown_status = super::status(&path).expect("the status");
        assert_eq!(shown_status.paused.as_ref(), Some(&pause));
        let files: Vec<(&str, usize)> =
            shown_status.files.iter().map(|file| (file.file.as_str(), file.counts.total)).collect();
        assert_eq!(files, [("catalogue", 3), ("sweep", 2)]);
        let shown = shown_status.to_string();
        assert!(
            shown.contains(
                "submitting paused since 2026-01-01T00:00:00Z: the daily budget is reached; \
                 resumes at midnight UTC (2026-01-02T00:00:00Z)"
            ),
            "{shown}"
        );
        assert!(shown.contains("  the daily budget of $1 would be exceeded"), "{shown}");
        assert!(
            shown.contains("by job file:\n  catalogue: 0 done, 0 failed, 0 in flight, 3 waiting"),
            "{shown}"
        );

        // Submitting again: an empty value.
        let mut store = Store::open_writer(&path).expect("the state");
        store
            .apply(&[Change::Meta { key: META_PAUSE.into(), value: String::new() }])
            .expect("written");
        drop(store);
        let shown_status = super::status(&path).expect("the status");
        assert_eq!(shown_status.paused, None);
        assert!(!shown_status.to_string().contains("paused"));
    }
}
