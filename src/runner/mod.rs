//! The engine: moves every job from `pending` to an end, through submission, polling and
//! download, and records each step in the state file before the network call that depends on it.
//!
//! One task (the loop in [`Engine::run`]) owns all job state and makes every decision; network
//! work runs in spawned tasks whose results come back to the loop as [`Event`]s. Each turn of the
//! loop handles what arrived, plans the next submission, commits every change in one durable
//! transaction, and only then starts the requests that depend on those changes. So:
//!
//! - a POST starts only after its attempt (`submitting`, with the time) is on disk;
//! - up to K POSTs (the controller's choice, under `limits.submission_concurrency`) are on the wire at once; the attempts planned in
//!   one turn share its one synced commit, and the outcome of each POST is committed with the
//!   next turn's attempts. A crash leaves at most K jobs whose POSTs may or may not have
//!   reached Krea; with K = 1 the order in which Krea created jobs is the order of the attempts,
//!   with K > 1 it is not, and reconciliation knows which attempts raced (`reconcile.rs`);
//! - a job with a Krea id is polled by that id after any restart, never submitted again;
//! - a POST that ends without an answer leaves the job `unknown`; no submission starts until
//!   reconciliation has found the job at Krea or shown it does not exist, and then POSTs go one
//!   at a time until Krea accepts one (`submit.rs`); a job shown not to exist waits a back-off
//!   of its own before it is sent again, while the others go on, and fails after a few such
//!   attempts; jobs whose lost answers raced and cannot be told apart are never sent again, and
//!   what Krea made for them is downloaded to `unattributed/` (`unattributed.rs`);
//! - the first Ctrl-C (or the service's SIGTERM) ends the waits of reconciliation at once: the
//!   jobs still unknown stay so in the state file, and the next run reconciles them;
//! - from the first 402 no new POST starts, while everything in flight is polled and downloaded.
//!
//! Polls are timers in one `DelayQueue`, not a task per job, so thousands of jobs in flight cost
//! no busy loops. Shutdown is injected through [`Controls`]; this module installs no signal
//! handlers.
//!
//! The jobs themselves live in one job table (`table.rs`): each job's phase, which carries
//! the data it needs (`phase.rs`: a submitted job its Krea id, a completed one its URLs, a
//! failed one its reason), and the queue it waits in (to submit, backing off, to reconcile, to
//! poll, to download). A transition is one call on the table, which checks it against
//! `JobState::may_become`, moves the job between queues and queues its write; an illegal one is
//! refused, logged here as a bug (`report_bug`), and fatal only in debug builds.
//!
//! The loop and the engine's decisions are here; each step has its own file: `submit.rs`
//! (POSTs), `poll.rs` (GETs, job timeouts), `cancel.rs` (cancels at Krea, refused ones), `fetch.rs` (downloads), `reconciling.rs` (unknown
//! jobs), `unattributed.rs` (Krea jobs reconciliation could not attribute), `budget.rs` (the
//! spending cap). What it tells the outside (why it stopped, counts,
//! its published status) is in `status.rs`.
//!
//! The engine reaches the world only through its seam (`seam.rs` beside it, bundled in [`EngineIo`]): Krea
//! through [`KreaApi`], result hosts through [`ResultFetcher`], the wall clock through [`Clock`],
//! the state file through its [`StoreWriter`]. Waits and deadlines use tokio's clock. So the
//! in-process tests (`tests.rs`) run the engine against in-memory doubles (`doubles.rs`) on
//! paused tokio time, with the writer inline ([`StoreWriter::inline`]); the table has unit
//! tests of its own (`table_tests.rs`).

mod budget;
mod cancel;
pub(crate) mod controller;
#[cfg(test)]
mod doubles;
mod fetch;
mod phase;
mod poll;
mod reconciling;
mod stages;
pub(crate) mod status;
mod submit;
mod sweep;
mod table;
#[cfg(test)]
mod tests;
mod unattributed;

use crate::api::{ApiError, RemoteJob};
use crate::job::JobState;
use crate::pace::{Pacer, PollSchedule};
use crate::reconcile::Listing;
use crate::report::append_manifest;
use crate::retry::RetryPolicy;
pub(crate) use crate::seam::{Clock, EngineIo, KreaApi, RefusingApi, ResultFetcher};
use crate::store::{Change, FileRecord, JobRecord, StoreError, StoreWriter};
pub(crate) use budget::Budget;
use controller::{Ceilings, Controller};
pub(crate) use fetch::write_sidecar_of;
use phase::IllegalTransition;
pub use status::{Counts, EngineStatus, Pause, RefusedCancel, StopReason};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
pub use submit::MAX_UNANSWERED_POSTS;
use table::JobTable;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the engine paces, polls and reconciles; built from a job file's `limits`.
#[derive(Clone, Debug)]
pub(crate) struct EngineSettings {
    /// The ceilings written in `limits` (`None` where nothing was written: discovered).
    pub ceilings: Ceilings,
    /// Poll schedule of image and enhance jobs.
    pub poll: PollSchedule,
    /// Poll schedule of video jobs.
    pub video_poll: PollSchedule,
    /// A job still unfinished this long after submission is cancelled and reported.
    pub job_timeout: Duration,
    /// Downloads at once.
    pub download_concurrency: usize,
    /// After the first interrupt (or the service's drain), how long a download may go on
    /// before it is stopped and left download pending.
    pub download_grace: Duration,
    /// Retries of GETs and downloads.
    pub retry: RetryPolicy,
    /// The first pause after a 429 without `Retry-After` (then ×3), or while Krea cannot be
    /// reached (then ×3, with jitter).
    pub rate_limit_backoff: Duration,
    /// The timeout of one API request: bounds a POST whose end was not recorded.
    pub request_timeout: Duration,
    /// How long after an unanswered POST's end reconciliation looks for the job.
    pub reconcile_after: Duration,
    /// A one-shot run or the service: what a 402, a refused key or the budget does to
    /// submitting.
    pub kind: RunKind,
    /// Wake up at least this often, to show the loop is alive (the systemd watchdog).
    pub heartbeat: Option<Duration>,
    /// The spending cap, if any.
    pub budget: Option<Budget>,
    /// Whether a job's end starts its next stage (`stages.rs`): not in `krea-batch download`,
    /// which sends nothing.
    pub start_stages: bool,
}

/// Whether the engine runs once over a batch or as the long-running service. The two differ
/// only when submitting cannot go on (402, refused key, budget reached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// `krea-batch run`: a 402, a refused key or the budget ends submitting for good, and the
    /// run ends once nothing is left to do.
    OneShot,
    /// `krea-batch daemon`: submitting pauses instead, one submission probes every
    /// `probe_every`, and the engine waits for new jobs until it drains.
    Service {
        /// How often a paused service probes with one submission.
        probe_every: Duration,
    },
}

/// Requests to a running engine (the service uses them; a one-shot run needs none).
#[derive(Debug)]
pub(crate) enum EngineCommand {
    /// Take on new jobs, already in the state file (an inbox file was imported).
    AddJobs {
        /// The jobs.
        jobs: Vec<JobRecord>,
        /// The output folder of each of their batches.
        output_dirs: HashMap<i64, PathBuf>,
    },
    /// Probe now whether submitting may resume (after a top-up: SIGHUP, `krea-batch resume`).
    Probe,
    /// Cancel these jobs (state-file row ids): pending ones at once, in-flight ones at Krea.
    Cancel(Vec<i64>),
    /// Use new settings (a reloaded configuration): pacing and polling from now on.
    Reconfigure(Box<EngineSettings>),
}

/// How the outside asks the engine to stop. Cancel `stop_submitting` to let everything in flight
/// finish (first Ctrl-C); cancel `drain` to start nothing new at all and return once the network
/// steps under way have ended (the service's SIGTERM); cancel `abort` to stop at once (second
/// Ctrl-C, or the end of the drain time). The state is saved either way; a rerun resumes.
#[derive(Clone, Debug, Default)]
pub struct Controls {
    /// No new submission starts once cancelled.
    pub stop_submitting: CancellationToken,
    /// No new request of any kind starts once cancelled; the engine returns when idle.
    pub drain: CancellationToken,
    /// The engine returns as soon as it has saved what it knows.
    pub abort: CancellationToken,
    /// The local time (ms since the epoch) of the engine loop's latest turn.
    pub heartbeat: Arc<AtomicI64>,
}

/// What a run ended with.
#[derive(Debug)]
pub(crate) struct EngineOutcome {
    /// Every job, as it ended.
    pub jobs: Vec<JobRecord>,
    /// Why submitting stopped before every job was sent, if it did.
    pub stopped: Option<StopReason>,
    /// Jobs that were to be cancelled and that Krea ran and billed all the same.
    pub cancels_refused: Vec<RefusedCancel>,
    /// Jobs (state-file row ids) the user asked to cancel that had not ended when the engine
    /// stopped: to be kept as requests for the next run.
    pub cancels_left: Vec<i64>,
}

/// The result of a network task, handed back to the loop.
#[derive(Debug)]
enum Event {
    Submitted {
        slot: usize,
        result: Result<RemoteJob, ApiError>,
    },
    Polled {
        slot: usize,
        result: Result<RemoteJob, ApiError>,
    },
    CancelAnswered {
        slot: usize,
        result: Result<(), ApiError>,
    },
    Downloaded {
        slot: usize,
        files: Vec<FileRecord>,
        error: Option<String>,
    },
    Listed {
        slots: Vec<usize>,
        result: Result<Listing, ApiError>,
    },
    /// The next stage's jobs of an ended job were inserted (`stages.rs`).
    StagesAdded {
        batch_id: i64,
        dir: Arc<PathBuf>,
        result: stages::StagesAdded,
    },
    /// A listing was cut short by a stop: its unknown jobs are left to the next run.
    ListingStopped,
    /// A sweep's page of the account's newest jobs (`sweep.rs`).
    Swept {
        result: Result<crate::api::JobPage, ApiError>,
    },
    /// A poll of a Krea job that could not be attributed (`unattributed.rs`).
    UnattributedPolled {
        index: usize,
        result: Result<RemoteJob, ApiError>,
    },
    /// Its results are on disk, or why not.
    UnattributedDownloaded {
        index: usize,
        error: Option<String>,
    },
}

/// The engine. Build with [`Engine::new`], then [`Engine::run`].
pub(crate) struct Engine {
    api: Arc<dyn KreaApi>,
    fetcher: Arc<dyn ResultFetcher>,
    clock: Arc<dyn Clock>,
    writer: StoreWriter,
    settings: EngineSettings,
    controls: Controls,
    pacer: Pacer,
    /// How hard to push the account: learns its capacity and pace, sets the pacer's pace.
    controller: Controller,
    /// When each POST on the wire was sent (by slot), for its round trip.
    post_sent_at: HashMap<usize, Instant>,
    /// When the controller's summary was last written to the state file.
    learned_written: Option<Instant>,
    /// Every job, its phase and its queue, and the writes not yet committed (`table.rs`).
    table: JobTable,
    /// POSTs on the wire (at most K; see `submit.rs`).
    posts_running: usize,
    /// When a POST last got no usable answer (ms), until Krea has accepted a run of POSTs sent
    /// since: POSTs go one at a time meanwhile (`submit.rs`).
    posts_narrowed_since: Option<i64>,
    /// POSTs sent alone since the narrowing that Krea accepted: narrowing ends at
    /// [`submit::NARROWED_RUN`] of them.
    posts_accepted_narrowed: u32,
    /// Krea jobs that an earlier listing of this run showed unclaimed: none of them can be
    /// the job of a POST sent after that listing (`reconciling.rs`).
    listed_before: HashSet<String>,
    /// Krea jobs whose results are downloaded to `unattributed/` (`unattributed.rs`).
    unattributed: unattributed::Unattributed,
    /// Whether a reconciliation listing is running.
    listing: bool,
    /// The sweeps that read every job in flight with one request (`sweep.rs`).
    sweeps: sweep::Sweeps,
    /// After a failed listing, when to try again.
    listing_retry_at: Option<Instant>,
    /// Cancelled on the first Ctrl-C or SIGTERM: a listing under way ends at once.
    listing_stop: CancellationToken,
    /// Listings in this run that held unreadable items (only the first one warns).
    unreadable_listings: u32,
    /// Recent (sent, answered, created) times of accepted POSTs, bounding Krea's clock.
    clock_samples: VecDeque<(i64, i64, i64)>,
    downloads_running: usize,
    tasks: JoinSet<Event>,
    /// Totals and the pause, published with the counts.
    status: EngineStatus,
    status_tx: tokio::sync::watch::Sender<EngineStatus>,
    /// Requests from the outside (the service).
    commands: Option<tokio::sync::mpsc::UnboundedReceiver<EngineCommand>>,
    /// Why submitting stopped for good in this run (one-shot), if it did.
    stopped: Option<StopReason>,
    /// Why submitting is paused (service), if it is.
    paused: Option<StopReason>,
    /// The pause with its times and message (service), for `status` and the metrics.
    pause: Option<Pause>,
    /// Whether `pause` changed since it was last written to the state file (service); true at
    /// the start, so that the first write clears what an earlier start left.
    pause_unwritten: bool,
    /// When the next probe submission may go while paused.
    probe_at: Option<Instant>,
    /// Draining for shutdown: nothing new starts.
    draining: bool,
    /// Cancels waiting for a Krea id, and those Krea did not carry out (`cancel.rs`).
    cancels: cancel::Cancels,
    /// When the pacer will next grant a submission, if it is what holds submissions back.
    submit_wake: Option<Instant>,
    /// K fixed instead of chosen by the controller, and the written ceilings taken as fixed
    /// limits: the tests of the POST window's mechanics (reconciliation with several POSTs on
    /// the wire) need limits they can count on.
    #[cfg(test)]
    fixed_posts: Option<u32>,
    /// Output folders whose gallery is out of date, and when each was last written.
    gallery_stale: HashSet<Arc<PathBuf>>,
    gallery_written: HashMap<Arc<PathBuf>, Instant>,
    /// Ended jobs (slots) whose next stage's jobs are to be inserted (`stages.rs`).
    stages_due: Vec<usize>,
    /// Jobs (row ids) the user asked to cancel: their later stages are cancelled too, even
    /// when Krea ran the job all the same.
    chains_cancelled: HashSet<i64>,
}

/// What was learned is written to the state file at most this often.
const LEARNED_EVERY: Duration = Duration::from_secs(5);

/// A gallery is rewritten at most this often while jobs end.
const GALLERY_EVERY: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("counts", &self.table.counts()).finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `jobs`, writing results under each job's batch folder in `output_dirs`.
    /// Pending jobs the job file no longer lists are left alone; everything else is carried on.
    #[must_use]
    pub(crate) fn new(
        io: EngineIo,
        jobs: Vec<JobRecord>,
        output_dirs: &HashMap<i64, PathBuf>,
        settings: EngineSettings,
        controls: Controls,
        status_tx: tokio::sync::watch::Sender<EngineStatus>,
    ) -> Self {
        let EngineIo { api, fetcher, clock, writer, claimed_elsewhere } = io;
        let controller = Controller::new(settings.ceilings, settings.rate_limit_backoff);
        let pacer = Pacer::new(controller.pace(), settings.rate_limit_backoff);
        let dirs: HashMap<i64, Arc<PathBuf>> =
            output_dirs.iter().map(|(id, dir)| (*id, Arc::new(dir.clone()))).collect();
        let mut engine = Self {
            api,
            fetcher,
            clock,
            writer,
            settings,
            controls,
            pacer,
            controller,
            post_sent_at: HashMap::new(),
            learned_written: None,
            table: JobTable::new(claimed_elsewhere),
            posts_running: 0,
            posts_narrowed_since: None,
            posts_accepted_narrowed: 0,
            listed_before: HashSet::new(),
            unattributed: unattributed::Unattributed::default(),
            listing: false,
            sweeps: sweep::Sweeps::default(),
            listing_retry_at: None,
            listing_stop: CancellationToken::new(),
            unreadable_listings: 0,
            clock_samples: VecDeque::new(),
            downloads_running: 0,
            tasks: JoinSet::new(),
            status: EngineStatus::default(),
            status_tx,
            commands: None,
            stopped: None,
            paused: None,
            pause: None,
            pause_unwritten: true,
            probe_at: None,
            draining: false,
            cancels: cancel::Cancels::default(),
            submit_wake: None,
            #[cfg(test)]
            fixed_posts: None,
            gallery_stale: HashSet::new(),
            gallery_written: HashMap::new(),
            stages_due: Vec::new(),
            chains_cancelled: HashSet::new(),
        };
        engine.add_jobs(jobs, &dirs);
        engine
    }

    /// Lets the outside send [`EngineCommand`]s while the engine runs.
    #[must_use]
    pub(crate) fn with_commands(
        mut self,
        commands: tokio::sync::mpsc::UnboundedReceiver<EngineCommand>,
    ) -> Self {
        self.commands = Some(commands);
        self
    }

    /// Takes on jobs, each in the queue its state calls for ([`JobTable::add`]). Jobs already
    /// known (by row id) are skipped.
    fn add_jobs(&mut self, jobs: Vec<JobRecord>, dirs: &HashMap<i64, Arc<PathBuf>>) {
        let now = self.clock.now_ms();
        for job in jobs {
            let output_dir = dirs.get(&job.batch_id).cloned().unwrap_or_default();
            let Some(slot) = self.table.add(job, output_dir, now) else { continue };
            let job = self.table.job(slot);
            if matches!(job.state, JobState::Completed | JobState::Downloaded) {
                self.status.spend_usd += job.price_usd.unwrap_or_default();
            }
            if job.state == JobState::Downloaded {
                let repaired = fetch::repair_sidecars(job, self.table.output_dir(slot));
                if repaired > 0 {
                    tracing::info!(job = %job.name, repaired, "rewrote missing sidecars");
                }
            }
            self.note_clock_sample(slot);
            if stages::has_stages_after(self.table.job(slot)) {
                self.stages_due.push(slot);
            }
        }
    }

    /// Runs until every job has ended (or cannot go further in this run), then returns them.
    pub(crate) async fn run(mut self) -> Result<EngineOutcome, StoreError> {
        let mut stop_seen = false;
        let mut drain_seen = false;
        let mut heartbeat = self.settings.heartbeat.map(|every| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            #[cfg(test)]
            assert_sound(&self.table);
            self.controls.heartbeat.store(self.clock.now_ms(), Ordering::Relaxed);
            self.follow_up_cancels();
            let sends = self.plan_submissions();
            // Synced only when a POST depends on it; other turns survive a killed process and
            // become durable with the next synced commit. Every attempt planned in this turn
            // shares that one commit (group commit).
            self.commit(!sends.is_empty()).await?;
            for slot in sends {
                self.spawn_submit(slot);
            }
            self.start_stages();
            self.start_downloads();
            self.start_unattributed();
            self.maybe_start_listing();
            self.maybe_sweep();
            self.refresh_galleries(false);
            self.publish_status();
            if self.finished() || self.controls.abort.is_cancelled() {
                break;
            }

            let wake = [
                self.submit_wake,
                self.backoff_wake(),
                self.reconcile_wake(),
                self.gallery_wake(),
                self.unattributed.wake(),
                self.sweep_wake(),
            ]
            .into_iter()
            .flatten()
            .min();
            let has_commands = self.commands.is_some();
            tokio::select! {
                () = self.controls.abort.cancelled() => {}
                () = self.controls.stop_submitting.cancelled(), if !stop_seen => {
                    stop_seen = true;
                    self.stop(StopReason::Interrupted);
                }
                () = self.controls.drain.cancelled(), if !drain_seen => {
                    drain_seen = true;
                    self.start_draining();
                }
                command = recv_command(&mut self.commands), if has_commands => match command {
                    Some(command) => self.on_command(command),
                    None => self.commands = None,
                },
                () = tick_or_forever(&mut heartbeat) => {}
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.take(joined);
                    // Take everything else that is ready in the same turn: one commit for all.
                    while let Some(joined) = self.tasks.try_join_next() {
                        self.take(joined);
                    }
                }
                Some(slot) = self.table.next_poll(), if self.table.has_polls() && !self.draining => {
                    self.spawn_poll(slot);
                }
                () = sleep_until_or_forever(wake) => {}
            }
        }
        self.publish_status();
        self.commit_turn(true, true).await?;
        self.refresh_galleries(true);
        self.tasks.abort_all();
        let cancels_left = self.cancels_left();
        Ok(EngineOutcome {
            cancels_left,
            jobs: self.table.into_records(),
            stopped: self.stopped,
            cancels_refused: self.cancels.billed,
        })
    }

    fn take(&mut self, joined: Result<Event, tokio::task::JoinError>) {
        let taken = match joined {
            Ok(Event::Submitted { slot, result }) => self.on_submitted(slot, result),
            Ok(Event::Polled { slot, result }) => self.on_polled(slot, result),
            Ok(Event::CancelAnswered { slot, result }) => self.on_cancel_answered(slot, result),
            Ok(Event::Downloaded { slot, files, error }) => self.on_downloaded(slot, files, error),
            Ok(Event::Listed { slots, result }) => self.on_listed(&slots, result),
            Ok(Event::Swept { result }) => {
                self.on_swept(result);
                Ok(())
            }
            Ok(Event::UnattributedPolled { index, result }) => {
                self.on_unattributed_polled(index, result);
                Ok(())
            }
            Ok(Event::UnattributedDownloaded { index, error }) => {
                self.on_unattributed_downloaded(index, error);
                Ok(())
            }
            Ok(Event::StagesAdded { batch_id, dir, result }) => {
                self.on_stages_added(batch_id, dir, result);
                Ok(())
            }
            Ok(Event::ListingStopped) => {
                self.listing = false;
                Ok(())
            }
            Err(err) => {
                tracing::error!(%err, "a network task failed");
                Ok(())
            }
        };
        if let Err(err) = taken {
            report_bug(&err);
        }
    }

    /// True when nothing is left to do in this run. The service is never finished: it waits
    /// for new jobs until it drains.
    fn finished(&self) -> bool {
        if self.draining {
            return self.tasks.is_empty();
        }
        if let RunKind::Service { .. } = self.settings.kind {
            return false;
        }
        let may_submit = self.stopped.is_none() && self.table.has_pending();
        !may_submit
            && self.table.waiting_to_reconcile() == 0
            && self.tasks.is_empty()
            && !self.table.has_polls()
            && !self.table.has_downloads()
            && self.unattributed.is_idle()
    }

    /// Rewrites the galleries of folders where jobs ended, each at most every
    /// [`GALLERY_EVERY`] unless `now_all` (the end of a run).
    fn refresh_galleries(&mut self, now_all: bool) {
        let due: Vec<Arc<PathBuf>> = self
            .gallery_stale
            .iter()
            .filter(|dir| {
                now_all
                    || self.gallery_written.get(*dir).is_none_or(|at| at.elapsed() >= GALLERY_EVERY)
            })
            .cloned()
            .collect();
        for dir in due {
            self.gallery_stale.remove(&dir);
            self.gallery_written.insert(Arc::clone(&dir), Instant::now());
            let jobs = self.table.jobs().filter(|(of, _)| **of == dir).map(|(_, job)| job);
            if let Err(err) = crate::gallery::write(&dir, jobs) {
                tracing::warn!(%err, "cannot write the gallery");
            }
        }
    }

    /// When the next stale gallery is due.
    fn gallery_wake(&self) -> Option<Instant> {
        self.gallery_stale
            .iter()
            .map(|dir| {
                self.gallery_written.get(dir).map_or_else(Instant::now, |at| *at + GALLERY_EVERY)
            })
            .min()
    }

    fn publish_status(&mut self) {
        self.status.counts = self.table.counts();
        self.status.paused = self.paused.or(self.stopped);
        self.status.pause.clone_from(&self.pause);
        self.status.learned = self.controller.summary(Instant::now());
        self.status.capacity = self.controller.capacity();
        self.status.allowed_in_flight = self.controller.allowed_in_flight();
        self.status.posts_allowed = u32::try_from(self.posts_allowed()).unwrap_or(u32::MAX);
        self.status.backlogged = self.controller.in_flight().1;
        self.status.pace_per_second = self.pacer.pace().per_second;
        let status = &self.status;
        self.status_tx.send_if_modified(|shown| {
            let changed = shown != status;
            if changed {
                shown.clone_from(status);
            }
            changed
        });
    }

    /// SIGTERM for the service: nothing new starts; the loop ends once the requests under way
    /// have been answered and recorded. Jobs still running at Krea stay recorded for the next
    /// start.
    fn start_draining(&mut self) {
        self.draining = true;
        self.stopped.get_or_insert(StopReason::Interrupted);
        self.table.drop_downloads();
        self.leave_unknown_to_next_run();
        tracing::info!(requests = self.tasks.len(), "draining: finishing the requests under way");
    }

    fn on_command(&mut self, command: EngineCommand) {
        match command {
            EngineCommand::AddJobs { jobs, output_dirs } => {
                let dirs = output_dirs.into_iter().map(|(id, dir)| (id, Arc::new(dir))).collect();
                self.add_jobs(jobs, &dirs);
            }
            EngineCommand::Probe => {
                if self.paused.is_some() {
                    tracing::info!("probing now whether submitting may resume");
                    self.probe_at = Some(Instant::now());
                }
            }
            EngineCommand::Cancel(ids) => self.cancel_jobs(&ids),
            EngineCommand::Reconfigure(settings) => {
                // What was learned of the account is kept; the new ceilings hold from now on.
                self.controller.reconfigure(settings.ceilings, settings.rate_limit_backoff);
                self.pacer = Pacer::new(self.controller.pace(), settings.rate_limit_backoff);
                self.settings = *settings;
            }
        }
    }

    /// Jobs that may be running at Krea: they count against the cap.
    fn in_flight(&self) -> usize {
        self.table.counts().in_flight + self.table.waiting_to_reconcile()
    }

    /// Writes the turn's changes (fsynced if `synced`), then the manifest lines of the jobs
    /// that ended: one append per output folder.
    async fn commit(&mut self, synced: bool) -> Result<(), StoreError> {
        self.commit_turn(synced, false).await
    }

    /// [`Engine::commit`]; `final_commit` also writes what was learned, however recently.
    async fn commit_turn(&mut self, synced: bool, final_commit: bool) -> Result<(), StoreError> {
        let pause_due =
            self.pause_unwritten && matches!(self.settings.kind, RunKind::Service { .. });
        if !self.table.has_changes() && !final_commit && !pause_due {
            return Ok(());
        }
        let (mut changes, mut ended) = self.table.take_changes();
        // What was learned goes with the turn's writes, at most every `LEARNED_EVERY` (and at
        // the end), for `krea-batch status` in another process: no write of its own. A run
        // that submitted nothing learned nothing, and leaves what an earlier run wrote.
        let due = self.learned_written.is_none_or(|at| at.elapsed() >= LEARNED_EVERY);
        if (due || final_commit) && self.status.submissions_total > 0 {
            self.learned_written = Some(Instant::now());
            let value = self.status.learned.clone();
            changes.push(Change::Meta { key: status::META_LEARNED.to_owned(), value });
        }
        if pause_due {
            self.pause_unwritten = false;
            let value = self
                .pause
                .as_ref()
                .and_then(|pause| serde_json::to_string(pause).ok())
                .unwrap_or_default();
            changes.push(Change::Meta { key: status::META_PAUSE.to_owned(), value });
        }
        self.writer.commit_with(changes, synced).await?;
        let table = &self.table;
        for &slot in &ended {
            self.gallery_stale.insert(Arc::clone(table.output_dir(slot)));
            if stages::has_stages_after(table.job(slot)) {
                self.stages_due.push(slot);
            }
        }
        ended.sort_by(|a, b| table.output_dir(*a).cmp(table.output_dir(*b)));
        for group in ended.chunk_by(|a, b| table.output_dir(*a) == table.output_dir(*b)) {
            let dir = table.output_dir(group[0]);
            let jobs = group.iter().map(|&slot| table.job(slot));
            if let Err(err) = append_manifest(dir, jobs) {
                tracing::warn!(%err, "cannot append to the manifest; it is rewritten at the end");
            }
        }
        Ok(())
    }

    /// Puts a job that was not created back at the head of the queue.
    fn requeue(&mut self, slot: usize) -> Result<(), IllegalTransition> {
        self.table.requeue(slot, self.clock.now_ms())
    }

    /// Fails a job for `reason`.
    fn fail(&mut self, slot: usize, reason: String) -> Result<(), IllegalTransition> {
        self.table.failed(slot, reason, self.clock.now_ms())
    }

    /// Submitting cannot go on: Krea wants payment, or refused the key. A one-shot run stops
    /// submitting for good; the service pauses and probes with one submission every
    /// `probe_every`. Krea's message (`message`) is always shown.
    fn halt_with(&mut self, reason: StopReason, message: &str) {
        let RunKind::Service { probe_every: every } = self.settings.kind else {
            if reason == StopReason::AuthRefused {
                self.stopped = Some(StopReason::AuthRefused);
                self.controls.abort.cancel();
            } else {
                self.stop_with(reason, message);
            }
            return;
        };
        self.probe_at = Some(Instant::now() + every);
        if self.paused == Some(reason) {
            return;
        }
        self.paused = Some(reason);
        self.note_pause(reason, message, None);
        let waiting = self.table.counts().pending;
        let probe = humantime::format_duration(every);
        match reason {
            StopReason::PaymentRequired => tracing::warn!(
                waiting,
                %message,
                "the Krea API balance is exhausted (402): submitting paused; jobs in flight are \
                 finished and downloaded; one submission probes every {probe} (or at once on \
                 SIGHUP or `krea-batch resume`)"
            ),
            StopReason::AuthRefused => tracing::error!(
                waiting,
                "Krea refused the API key (401/403): submitting paused; fix the key, then send \
                 SIGHUP or run `krea-batch resume`; a probe is also sent every {probe}"
            ),
            StopReason::Interrupted
            | StopReason::BudgetReached
            | StopReason::DailyBudgetReached => {}
        }
    }

    /// A submission was accepted: a pause, if any, is over.
    fn resume_after_pause(&mut self) {
        if let Some(reason) = self.paused.take() {
            self.pause = None;
            self.pause_unwritten = true;
            self.probe_at = None;
            tracing::info!(%reason, "the probe was accepted: submitting resumes");
        }
    }

    fn stop(&mut self, reason: StopReason) {
        self.stop_with(reason, "");
    }

    /// [`Engine::stop`], with Krea's message, which is always shown.
    fn stop_with(&mut self, reason: StopReason, message: &str) {
        if self.stopped.is_some() {
            return;
        }
        self.stopped = Some(reason);
        match reason {
            StopReason::PaymentRequired => tracing::warn!(
                %message,
                waiting = self.table.counts().pending,
                in_flight = self.table.counts().in_flight,
                "the Krea API balance is exhausted (402): no more submissions; jobs in flight \
                 are finished and downloaded"
            ),
            StopReason::Interrupted => {
                tracing::warn!(
                    in_flight = self.table.counts().in_flight,
                    "stopping: no more submissions; waiting for jobs in flight (press Ctrl-C \
                     again to stop now; a rerun resumes)"
                );
                self.leave_unknown_to_next_run();
            }
            StopReason::AuthRefused
            | StopReason::BudgetReached
            | StopReason::DailyBudgetReached => {}
        }
    }

    /// Krea refused the key: nothing else can succeed. A one-shot run stops at once (a rerun
    /// resumes); the service pauses.
    fn refuse_auth(&mut self, status: u16, message: &str) {
        if self.settings.kind == RunKind::OneShot {
            tracing::error!(status, %message, "Krea refused the API key; stopping");
        }
        self.halt_with(StopReason::AuthRefused, message);
    }

    /// Records why submitting is paused, from now (wall clock) until `until_ms` if known.
    fn note_pause(&mut self, reason: StopReason, message: &str, until_ms: Option<i64>) {
        self.pause = Some(Pause {
            reason,
            since_ms: self.clock.now_ms(),
            until_ms,
            message: message.to_owned(),
        });
        self.pause_unwritten = true;
    }
}

/// An illegal transition reached the loop: a bug in the engine (`table.rs` says why it is
/// refused rather than a panic). Logged; fatal in debug builds, so the tests catch it.
fn report_bug(err: &IllegalTransition) {
    tracing::error!(%err, "refused a state transition");
    debug_assert!(false, "{err}");
}

/// The in-process tests check the job table's invariants at every turn of the loop, so each
/// of them also shows that queue membership followed every state change it made.
#[cfg(test)]
fn assert_sound(table: &JobTable) {
    if let Some(broken) = table.broken() {
        panic!("the job table is broken: {broken}");
    }
}

async fn recv_command(
    commands: &mut Option<tokio::sync::mpsc::UnboundedReceiver<EngineCommand>>,
) -> Option<EngineCommand> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

/// Ticks `tick`, or never when there is none.
pub(crate) async fn tick_or_forever(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(tick) => {
            tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever when there is none.
pub(crate) async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
