//! The engine: moves every job from `pending` to an end, through submission, polling and
//! download, and records each step in the state file before the network call that depends on it.
//!
//! One task (the loop in [`Engine::run`]) owns all job state and makes every decision; network
//! work runs in spawned tasks whose results come back to the loop as [`Event`]s. Each turn of the
//! loop handles what arrived, plans the next submission, commits every change in one durable
//! transaction, and only then starts the requests that depend on those changes. So:
//!
//! - a POST starts only after its attempt (`submitting`, with the time) is on disk;
//! - POSTs go one at a time, and the outcome of one is committed with the attempt of the next:
//!   a crash leaves at most one job whose POST may or may not have reached Krea, and the order
//!   in which Krea created jobs is the order of the attempts;
//! - a job with a Krea id is polled by that id after any restart, never submitted again;
//! - a POST that ends without an answer leaves the job `unknown`, and no submission starts until
//!   reconciliation (`reconcile.rs`) has found the job at Krea or shown it does not exist; a job
//!   shown not to exist waits a back-off of its own before it is sent again, while the others
//!   go on, and fails after a few such attempts (`submit.rs`);
//! - the first Ctrl-C (or the service's SIGTERM) ends the waits of reconciliation at once: the
//!   jobs still unknown stay so in the state file, and the next run reconciles them;
//! - from the first 402 no new POST starts, while everything in flight is polled and downloaded.
//!
//! Polls are timers in one `DelayQueue`, not a task per job, so thousands of jobs in flight cost
//! no busy loops. Shutdown is injected through [`Controls`]; this module installs no signal
//! handlers.
//!
//! The loop and the bookkeeping are here; each step has its own file: `submit.rs` (POSTs),
//! `poll.rs` (GETs, job timeouts), `fetch.rs` (downloads), `reconciling.rs` (unknown jobs).
//! What it tells the outside (why it stopped, counts, its published status) is in `status.rs`.
//!
//! The engine reaches the world only through its seam (`seam.rs` beside it, bundled in [`EngineIo`]): Krea
//! through [`KreaApi`], result hosts through [`ResultFetcher`], the wall clock through [`Clock`],
//! the state file through its [`StoreWriter`]. Waits and deadlines use tokio's clock. So the
//! in-process tests (`tests.rs`) run the engine against in-memory doubles (`doubles.rs`) on
//! paused tokio time, with the writer inline ([`StoreWriter::inline`]).

mod budget;
#[cfg(test)]
mod doubles;
mod fetch;
mod poll;
mod reconciling;
pub(crate) mod status;
mod submit;
#[cfg(test)]
mod tests;

use crate::api::{ApiError, RemoteJob};
use crate::job::JobState;
use crate::pace::{Pacer, PollSchedule};
use crate::reconcile::Listing;
use crate::report::append_manifest;
use crate::retry::RetryPolicy;
pub use crate::seam::{Clock, EngineIo, KreaApi, RefusingApi, ResultFetcher};
use crate::store::{Change, FileRecord, JobRecord, StoreError, StoreWriter};
pub use budget::Budget;
pub(crate) use fetch::write_sidecar_of;
pub use status::{Counts, EngineStatus, StopReason};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
pub use submit::MAX_UNANSWERED_POSTS;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

/// How the engine paces, polls and reconciles; built from a job file's `limits`.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Submissions per minute (governor).
    pub submissions_per_minute: u32,
    /// Burst of submissions allowed at once.
    pub burst: u32,
    /// Cap on jobs in flight.
    pub max_in_flight: u32,
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
    /// The first pause after a 429 (then ×3, with jitter).
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
}

/// Whether the engine runs once over a batch or as the long-running service. The two differ
/// only when submitting cannot go on (402, refused key, budget reached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
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
pub enum EngineCommand {
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
    Reconfigure(EngineSettings),
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
pub struct EngineOutcome {
    /// Every job, as it ended.
    pub jobs: Vec<JobRecord>,
    /// Why submitting stopped before every job was sent, if it did.
    pub stopped: Option<StopReason>,
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
    /// A listing was cut short by a stop: its unknown jobs are left to the next run.
    ListingStopped,
}

/// A job and the engine's bookkeeping for it.
#[derive(Debug)]
struct Slot {
    job: JobRecord,
    output_dir: Arc<PathBuf>,
    /// The last poll delay, for the back-off.
    poll_delay: Option<Duration>,
    /// Why the job is to be cancelled at Krea, if it is.
    cancel: Option<CancelCause>,
    /// A DELETE is on the wire.
    cancel_sent: bool,
    /// This run's attempts of the job that got no usable answer and were shown to have created
    /// nothing: (label, detail), e.g. ("500", "Internal Server Error").
    unanswered: Vec<(String, String)>,
}

/// Why a job in flight is cancelled at Krea.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CancelCause {
    /// It outlived `job_timeout`.
    Timeout,
    /// The user asked (`krea-batch cancel`).
    User,
}

/// The engine. Build with [`Engine::new`], then [`Engine::run`].
pub struct Engine {
    api: Arc<dyn KreaApi>,
    fetcher: Arc<dyn ResultFetcher>,
    clock: Arc<dyn Clock>,
    writer: StoreWriter,
    settings: EngineSettings,
    controls: Controls,
    pacer: Pacer,
    slots: Vec<Slot>,
    /// Jobs to submit, in order.
    pending: VecDeque<usize>,
    /// Whether a POST is on the wire (there is never more than one).
    post_running: bool,
    /// Unknown jobs awaiting reconciliation (not those reported as ambiguous).
    unknown: BTreeSet<usize>,
    /// Whether a reconciliation listing is running.
    listing: bool,
    /// After a failed listing, when to try again.
    listing_retry_at: Option<Instant>,
    /// Cancelled on the first Ctrl-C or SIGTERM: a listing under way ends at once.
    listing_stop: CancellationToken,
    /// Listings in this run that held unreadable items (only the first one warns).
    unreadable_listings: u32,
    /// Jobs whose attempt created nothing, waiting out their back-off: (when, slot).
    backing_off: BTreeSet<(Instant, usize)>,
    /// Recent (sent, answered, created) times of accepted POSTs, bounding Krea's clock.
    clock_samples: VecDeque<(i64, i64, i64)>,
    /// Completed jobs waiting for a download slot.
    to_download: VecDeque<usize>,
    downloads_running: usize,
    polls: DelayQueue<usize>,
    tasks: JoinSet<Event>,
    /// Krea job ids claimed by a job of this engine.
    remote_ids: HashMap<String, usize>,
    /// Krea job ids claimed by other batches of the state file.
    claimed_elsewhere: HashSet<String>,
    counts: Counts,
    /// Totals and the pause, published with the counts.
    status: EngineStatus,
    status_tx: tokio::sync::watch::Sender<EngineStatus>,
    /// Requests from the outside (the service).
    commands: Option<tokio::sync::mpsc::UnboundedReceiver<EngineCommand>>,
    /// Slot of each state-file row id.
    by_id: HashMap<i64, usize>,
    /// Why submitting stopped for good in this run (one-shot), if it did.
    stopped: Option<StopReason>,
    /// Why submitting is paused (service), if it is.
    paused: Option<StopReason>,
    /// When the next probe submission may go while paused.
    probe_at: Option<Instant>,
    /// Draining for shutdown: nothing new starts.
    draining: bool,
    /// Changes to commit at the end of this turn.
    changes: Vec<Change>,
    /// Jobs that ended this turn, for the manifest once committed.
    ended: Vec<usize>,
    /// When the pacer will next grant a submission, if it is what holds submissions back.
    submit_wake: Option<Instant>,
    /// What is committed against the budget.
    ledger: budget::Ledger,
    /// Output folders whose gallery is out of date, and when each was last written.
    gallery_stale: HashSet<Arc<PathBuf>>,
    gallery_written: HashMap<Arc<PathBuf>, Instant>,
}

/// A gallery is rewritten at most this often while jobs end.
const GALLERY_EVERY: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("counts", &self.counts).finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `jobs`, writing results under each job's batch folder in `output_dirs`.
    /// Pending jobs the job file no longer lists are left alone; everything else is carried on.
    #[must_use]
    pub fn new(
        io: EngineIo,
        jobs: Vec<JobRecord>,
        output_dirs: &HashMap<i64, PathBuf>,
        settings: EngineSettings,
        controls: Controls,
        status_tx: tokio::sync::watch::Sender<EngineStatus>,
    ) -> Self {
        let EngineIo { api, fetcher, clock, writer, claimed_elsewhere } = io;
        let pacer = Pacer::new(
            settings.submissions_per_minute,
            settings.burst,
            settings.max_in_flight,
            settings.rate_limit_backoff,
        );
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
            slots: Vec::with_capacity(jobs.len()),
            pending: VecDeque::new(),
            post_running: false,
            unknown: BTreeSet::new(),
            listing: false,
            listing_retry_at: None,
            listing_stop: CancellationToken::new(),
            unreadable_listings: 0,
            backing_off: BTreeSet::new(),
            clock_samples: VecDeque::new(),
            to_download: VecDeque::new(),
            downloads_running: 0,
            polls: DelayQueue::new(),
            tasks: JoinSet::new(),
            remote_ids: HashMap::new(),
            claimed_elsewhere,
            counts: Counts::default(),
            status: EngineStatus::default(),
            status_tx,
            commands: None,
            by_id: HashMap::new(),
            stopped: None,
            paused: None,
            probe_at: None,
            draining: false,
            changes: Vec::new(),
            ended: Vec::new(),
            submit_wake: None,
            ledger: budget::Ledger::default(),
            gallery_stale: HashSet::new(),
            gallery_written: HashMap::new(),
        };
        engine.add_jobs(jobs, &dirs);
        engine
    }

    /// Lets the outside send [`EngineCommand`]s while the engine runs.
    #[must_use]
    pub fn with_commands(
        mut self,
        commands: tokio::sync::mpsc::UnboundedReceiver<EngineCommand>,
    ) -> Self {
        self.commands = Some(commands);
        self
    }

    /// Takes on jobs: each joins the queue its state calls for. Jobs already known (by row id)
    /// are skipped.
    fn add_jobs(&mut self, jobs: Vec<JobRecord>, dirs: &HashMap<i64, Arc<PathBuf>>) {
        let now = self.clock.now_ms();
        for mut job in jobs {
            if (!job.in_file && job.state == JobState::Pending) || self.by_id.contains_key(&job.id)
            {
                continue;
            }
            if job.state == JobState::Submitted && job.remote_id.is_none() {
                self.changes.push(Change::Job(Box::new(unknown_without_id(&mut job))));
            }
            let engine = &mut *self;
            let index = engine.slots.len();
            let output_dir = dirs.get(&job.batch_id).cloned().unwrap_or_default();
            engine.by_id.insert(job.id, index);
            engine.counts.add(job.state);
            engine.ledger.add(&job, now);
            if matches!(job.state, JobState::Completed | JobState::Downloaded) {
                engine.status.spend_usd += job.price_usd.unwrap_or_default();
            }
            if let Some(id) = &job.remote_id {
                engine.remote_ids.insert(id.clone(), index);
                engine.claimed_elsewhere.remove(id);
            }
            engine.note_clock_sample(&job);
            match job.state {
                JobState::Pending => engine.pending.push_back(index),
                // Polled at once: the job may have ended while nobody was looking.
                JobState::Submitted => {
                    engine.polls.insert(index, Duration::ZERO);
                }
                JobState::Completed => engine.to_download.push_back(index),
                JobState::Downloaded => {
                    let repaired = fetch::repair_sidecars(&job, &output_dir);
                    if repaired > 0 {
                        tracing::info!(job = %job.name, repaired, "rewrote missing sidecars");
                    }
                }
                // Left by a crash or an earlier unanswered POST: reconciled before anything
                // else is submitted.
                JobState::Unknown | JobState::Submitting => {
                    engine.unknown.insert(index);
                }
                _ => {}
            }
            engine.slots.push(Slot {
                job,
                output_dir,
                poll_delay: None,
                cancel: None,
                cancel_sent: false,
                unanswered: Vec::new(),
            });
        }
    }

    /// Runs until every job has ended (or cannot go further in this run), then returns them.
    pub async fn run(mut self) -> Result<EngineOutcome, StoreError> {
        let mut stop_seen = false;
        let mut drain_seen = false;
        let mut heartbeat = self.settings.heartbeat.map(|every| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            self.controls.heartbeat.store(self.clock.now_ms(), Ordering::Relaxed);
            let send = self.plan_submission();
            // Synced only when a POST depends on it; other turns survive a killed process and
            // become durable with the next synced commit.
            self.commit(send.is_some()).await?;
            if let Some(slot) = send {
                self.spawn_submit(slot);
            }
            self.start_downloads();
            self.maybe_start_listing();
            self.refresh_galleries(false);
            self.publish_status();
            if self.finished() || self.controls.abort.is_cancelled() {
                break;
            }

            let wake =
                [self.submit_wake, self.backoff_wake(), self.reconcile_wake(), self.gallery_wake()]
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
                Some(expired) = futures_util::StreamExt::next(&mut self.polls), if !self.polls.is_empty() && !self.draining => {
                    self.spawn_poll(expired.into_inner());
                }
                () = sleep_until_or_forever(wake) => {}
            }
        }
        self.commit(true).await?;
        self.refresh_galleries(true);
        self.tasks.abort_all();
        Ok(EngineOutcome {
            jobs: self.slots.into_iter().map(|slot| slot.job).collect(),
            stopped: self.stopped,
        })
    }

    fn take(&mut self, joined: Result<Event, tokio::task::JoinError>) {
        match joined {
            Ok(Event::Submitted { slot, result }) => self.on_submitted(slot, result),
            Ok(Event::Polled { slot, result }) => self.on_polled(slot, result),
            Ok(Event::CancelAnswered { slot, result }) => self.on_cancel_answered(slot, result),
            Ok(Event::Downloaded { slot, files, error }) => self.on_downloaded(slot, files, error),
            Ok(Event::Listed { slots, result }) => self.on_listed(&slots, result),
            Ok(Event::ListingStopped) => self.listing = false,
            Err(err) => tracing::error!(%err, "a network task failed"),
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
        let may_submit =
            self.stopped.is_none() && !(self.pending.is_empty() && self.backing_off.is_empty());
        !may_submit
            && self.unknown.is_empty()
            && self.tasks.is_empty()
            && self.polls.is_empty()
            && self.to_download.is_empty()
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
            let jobs =
                self.slots.iter().filter(|slot| slot.output_dir == dir).map(|slot| &slot.job);
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
        self.status.counts = self.counts;
        self.status.paused = self.paused.or(self.stopped);
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
        self.to_download.clear();
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
                self.pacer = Pacer::new(
                    settings.submissions_per_minute,
                    settings.burst,
                    settings.max_in_flight,
                    settings.rate_limit_backoff,
                );
                self.settings = settings;
            }
        }
    }

    /// Jobs that may be running at Krea: they count against the cap.
    fn in_flight(&self) -> usize {
        self.counts.in_flight + self.unknown.len()
    }

    /// Writes the turn's changes (fsynced if `synced`), then the manifest lines of the jobs
    /// that ended: one append per output folder.
    async fn commit(&mut self, synced: bool) -> Result<(), StoreError> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.changes);
        self.writer.commit_with(changes, synced).await?;
        let mut ended = std::mem::take(&mut self.ended);
        for &slot in &ended {
            self.gallery_stale.insert(Arc::clone(&self.slots[slot].output_dir));
        }
        ended.sort_by(|a, b| self.slots[*a].output_dir.cmp(&self.slots[*b].output_dir));
        for group in ended.chunk_by(|a, b| self.slots[*a].output_dir == self.slots[*b].output_dir) {
            let dir = &self.slots[group[0]].output_dir;
            let jobs = group.iter().map(|&slot| &self.slots[slot].job);
            if let Err(err) = append_manifest(dir, jobs) {
                tracing::warn!(%err, "cannot append to the manifest; it is rewritten at the end");
            }
        }
        Ok(())
    }

    /// Moves a job to `state`, queues the write, and keeps the counts. `error` replaces the
    /// recorded error when given; reaching `downloaded` clears it.
    fn set_state(&mut self, slot: usize, state: JobState, error: Option<String>) {
        let now = self.clock.now_ms();
        let job = &mut self.slots[slot].job;
        let from = job.state;
        if !from.may_become(state) {
            // A refused transition is a bug; refusing it keeps the promise not to pay twice.
            tracing::error!(job = %job.name, %from, to = %state, "refused a state transition");
            return;
        }
        job.state = state;
        if error.is_some() || state == JobState::Downloaded {
            job.error = error;
        }
        if state.is_final() || state == JobState::Completed {
            job.finished_at.get_or_insert(now);
        }
        self.counts.moved(from, state);
        self.ledger.moved(job, from, now);
        if state.is_final() {
            self.ended.push(slot);
        }
        self.changes.push(Change::Job(Box::new(job.clone())));
    }

    /// Queues a write of the job as it is (a remote status change, new times).
    fn touch(&mut self, slot: usize) {
        self.changes.push(Change::Job(Box::new(self.slots[slot].job.clone())));
    }

    /// Submitting cannot go on: Krea wants payment, or refused the key. A one-shot run stops
    /// submitting for good; the service pauses and probes with one submission every
    /// `probe_every`.
    fn halt(&mut self, reason: StopReason) {
        let RunKind::Service { probe_every: every } = self.settings.kind else {
            if reason == StopReason::AuthRefused {
                self.stopped = Some(StopReason::AuthRefused);
                self.controls.abort.cancel();
            } else {
                self.stop(reason);
            }
            return;
        };
        self.probe_at = Some(Instant::now() + every);
        if self.paused == Some(reason) {
            return;
        }
        self.paused = Some(reason);
        let waiting = self.counts.pending;
        let probe = humantime::format_duration(every);
        match reason {
            StopReason::PaymentRequired => tracing::warn!(
                waiting,
                "the Krea API balance is exhausted (402): submitting paused; jobs in flight are \
                 finished and downloaded; one submission probes every {probe} (or at once on \
                 SIGHUP or `krea-batch resume`)"
            ),
            StopReason::AuthRefused => tracing::error!(
                waiting,
                "Krea refused the API key (401/403): submitting paused; fix the key, then send \
                 SIGHUP or run `krea-batch resume`; a probe is also sent every {probe}"
            ),
            StopReason::Interrupted | StopReason::BudgetReached => {}
        }
    }

    /// A submission was accepted: a pause, if any, is over.
    fn resume_after_pause(&mut self) {
        if let Some(reason) = self.paused.take() {
            self.probe_at = None;
            tracing::info!(%reason, "the probe was accepted: submitting resumes");
        }
    }

    fn stop(&mut self, reason: StopReason) {
        if self.stopped.is_some() {
            return;
        }
        self.stopped = Some(reason);
        match reason {
            StopReason::PaymentRequired => tracing::warn!(
                waiting = self.counts.pending,
                in_flight = self.counts.in_flight,
                "the Krea API balance is exhausted (402): no more submissions; jobs in flight \
                 are finished and downloaded"
            ),
            StopReason::Interrupted => {
                tracing::warn!(
                    in_flight = self.counts.in_flight,
                    "stopping: no more submissions; waiting for jobs in flight (press Ctrl-C \
                     again to stop now; a rerun resumes)"
                );
                self.leave_unknown_to_next_run();
            }
            StopReason::AuthRefused | StopReason::BudgetReached => {}
        }
    }

    /// Krea refused the key: nothing else can succeed. A one-shot run stops at once (a rerun
    /// resumes); the service pauses.
    fn refuse_auth(&mut self, status: u16, message: &str) {
        if self.settings.kind == RunKind::OneShot {
            tracing::error!(status, %message, "Krea refused the API key; stopping");
        }
        self.halt(StopReason::AuthRefused);
    }
}

/// A job recorded as submitted but without Krea's job id cannot be polled: it may exist at Krea
/// (and be billed), so it is reconciled like a job whose POST got no answer, never dropped and
/// never submitted blindly. The record is repaired before the engine counts it; returns it for
/// the state file.
fn unknown_without_id(job: &mut JobRecord) -> JobRecord {
    tracing::warn!(
        job = %job.name,
        "recorded as submitted without a Krea job id: looking for it at Krea before anything \
         else is submitted"
    );
    job.state = JobState::Unknown;
    job.attempt_at = job.attempt_at.or(job.submitted_at);
    job.error = Some(SUBMITTED_WITHOUT_ID.to_owned());
    job.clone()
}

/// The error a job submitted without a Krea job id carries until reconciliation decides.
const SUBMITTED_WITHOUT_ID: &str =
    "recorded as submitted without a Krea job id; reconciled like an unanswered submission";

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
