//! Sweeps: one `GET /jobs` that reads the state of every job in flight at once.
//!
//! Polling each job by its id costs one request per job per poll, so short jobs are either seen
//! ending late (each poll waits seconds) or cost many requests. A sweep lists the account's
//! newest jobs in one request and hands each of ours it shows to the same code as a poll
//! (`poll.rs`), which also pushes that job's own poll back: while sweeps see a job, its own
//! poll never fires. A job the sweep does not show (beyond the page, or a listing that left it
//! out) keeps its own poll, so sweeps only ever add sightings.
//!
//! Each sweep also tells the controller whether the page showed any job backlogged (anyone's:
//! Krea parks jobs only when the account is full) and how many it showed running, which is how
//! a crossing of the account's capacity is seen before the answers of the POSTs that made it.
//!
//! How often: a tenth of the measured job time, so a job's end is seen within about 5 % of
//! its length on average, bounded by [`SWEEP_FLOOR`] below (at most ten requests a second
//! for the whole account, whatever the number of jobs) and by `poll_interval` above (a sweep is
//! never rarer than the first poll it replaces). Before any job time is measured, the floor.
//! With no job in flight, no sweep.
//!
//! One page of up to [`SWEEP_PAGE_MAX`] jobs, sized to what is in flight plus room for other
//! programs' jobs; a sweep that fails is only logged at debug level: the jobs' own polls carry
//! on, and the next sweep tries again.

use super::{Engine, Event};
use crate::api::{ApiError, JobPage, RemoteStatus};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The shortest time between two sweeps.
pub(super) const SWEEP_FLOOR: Duration = Duration::from_millis(100);

/// The largest page a sweep asks for (Krea's own maximum).
const SWEEP_PAGE_MAX: u32 = 1000;

/// The sweep schedule: when the last one started, and whether one is on the wire.
#[derive(Debug, Default)]
pub(super) struct Sweeps {
    last_started: Option<Instant>,
    running: bool,
}

impl Engine {
    /// Time between sweeps, from the measured job time.
    fn sweep_every(&self) -> Duration {
        let tenth = self.controller.job_time().map_or(SWEEP_FLOOR, |time| time / 10);
        tenth.clamp(SWEEP_FLOOR, self.settings.poll.first.max(SWEEP_FLOOR))
    }

    /// How many of our jobs are at Krea and not yet seen ending.
    fn jobs_to_sweep(&self) -> u32 {
        let at_krea = self.table.counts().in_flight.saturating_sub(self.posts_running);
        u32::try_from(at_krea).unwrap_or(u32::MAX)
    }

    /// When the next sweep is due, if jobs are in flight.
    pub(super) fn sweep_wake(&self) -> Option<Instant> {
        if self.sweeps.running || self.draining || self.jobs_to_sweep() == 0 {
            return None;
        }
        Some(self.sweeps.last_started.map_or_else(Instant::now, |at| at + self.sweep_every()))
    }

    /// Starts a sweep if one is due.
    pub(super) fn maybe_sweep(&mut self) {
        let Some(due) = self.sweep_wake() else { return };
        if due > Instant::now() {
            return;
        }
        self.sweeps.running = true;
        self.sweeps.last_started = Some(Instant::now());
        let in_flight = self.jobs_to_sweep();
        let limit = in_flight.saturating_mul(2).saturating_add(20).min(SWEEP_PAGE_MAX);
        let api = Arc::clone(&self.api);
        self.tasks.spawn(async move {
            let result = api.sweep_jobs(limit).await;
            Event::Swept { result }
        });
    }

    /// Hands every job of ours the sweep shows to the poll's code.
    pub(super) fn on_swept(&mut self, result: Result<JobPage, ApiError>) {
        self.sweeps.running = false;
        let round_trip = self.sweeps.last_started.map_or(Duration::ZERO, |at| at.elapsed());
        let page = match result {
            Ok(page) => page,
            Err(err) => {
                tracing::debug!(%err, "sweep failed; the jobs' own polls go on");
                return;
            }
        };
        // Whose jobs they are does not matter here: Krea parks any job as backlogged only
        // when the account is full, and the jobs then running are what it runs at once. This
        // sees a crossing of the capacity one POST round trip sooner than our own jobs would
        // (a job is ours by id only once its POST is answered).
        let mut backlogged = false;
        let mut running = 0_u32;
        for remote in page.items {
            match &remote.status {
                Some(RemoteStatus::Backlogged) => backlogged = true,
                Some(status) if !status.is_terminal() => running = running.saturating_add(1),
                _ => {}
            }
            let Some(slot) = self.table.slot_of_remote(&remote.job_id) else { continue };
            if let Err(err) = self.on_polled(slot, Ok(remote)) {
                super::report_bug(&err);
            }
        }
        self.controller.swept(self.sweep_every(), round_trip, backlogged.then_some(running));
    }
}
