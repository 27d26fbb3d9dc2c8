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
//!   reconciliation (`reconcile.rs`) has found the job at Krea or shown it does not exist;
//! - from the first 402 no new POST starts, while everything in flight is polled and downloaded.
//!
//! Polls are timers in one `DelayQueue`, not a task per job, so thousands of jobs in flight cost
//! no busy loops. Shutdown is injected through [`Controls`]; this module installs no signal
//! handlers.
//!
//! The loop and the bookkeeping are here; each step has its own file: `submit.rs` (POSTs),
//! `poll.rs` (GETs, job timeouts), `fetch.rs` (downloads), `reconciling.rs` (unknown jobs).

mod fetch;
mod poll;
mod reconciling;
mod submit;

use crate::api::{ApiError, KreaClient, RemoteJob};
use crate::download::Downloader;
use crate::job::JobState;
use crate::pace::{Pacer, PollSchedule};
use crate::reconcile::Candidate;
use crate::report::{Counts, StopReason, append_manifest};
use crate::retry::RetryPolicy;
use crate::store::{Change, FileRecord, JobRecord, StoreError, StoreWriter};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
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
    /// Retries of GETs and downloads.
    pub retry: RetryPolicy,
    /// The first pause after a 429 (then ×3, with jitter).
    pub rate_limit_backoff: Duration,
    /// The timeout of one API request: bounds a POST whose end was not recorded.
    pub request_timeout: Duration,
    /// How long after an unanswered POST's end reconciliation looks for the job.
    pub reconcile_after: Duration,
}

/// How the outside asks the engine to stop. Cancel `stop_submitting` to let everything in flight
/// finish (first Ctrl-C, SIGTERM); cancel `abort` to stop at once (second Ctrl-C). The state is
/// saved either way; a rerun resumes.
#[derive(Clone, Debug, Default)]
pub struct Controls {
    /// No new submission starts once cancelled.
    pub stop_submitting: CancellationToken,
    /// The engine returns as soon as it has saved what it knows.
    pub abort: CancellationToken,
}

/// The engine's connections to the world: the API, the result hosts, the state file.
#[derive(Debug)]
pub struct EngineIo {
    /// The Krea client.
    pub api: Arc<KreaClient>,
    /// The download client.
    pub downloader: Downloader,
    /// The state file's writer.
    pub writer: StoreWriter,
    /// Krea job ids held by other batches of the same state file: never adopted.
    pub claimed_elsewhere: HashSet<String>,
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
    Submitted { slot: usize, result: Result<RemoteJob, ApiError> },
    Polled { slot: usize, result: Result<RemoteJob, ApiError> },
    CancelAnswered { slot: usize, result: Result<(), ApiError> },
    Downloaded { slot: usize, files: Vec<FileRecord>, error: Option<String> },
    Listed { slots: Vec<usize>, result: Result<Vec<Candidate>, ApiError> },
}

/// A job and the engine's bookkeeping for it.
#[derive(Debug)]
struct Slot {
    job: JobRecord,
    output_dir: Arc<PathBuf>,
    /// The last poll delay, for the back-off.
    poll_delay: Option<Duration>,
    /// A DELETE for the job timeout was sent.
    cancel_sent: bool,
}

/// The engine. Build with [`Engine::new`], then [`Engine::run`].
pub struct Engine {
    api: Arc<KreaClient>,
    downloader: Downloader,
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
    counts_tx: tokio::sync::watch::Sender<Counts>,
    stopped: Option<StopReason>,
    /// Changes to commit at the end of this turn.
    changes: Vec<Change>,
    /// Jobs that ended this turn, for the manifest once committed.
    ended: Vec<usize>,
    /// When the pacer will next grant a submission, if it is what holds submissions back.
    submit_wake: Option<Instant>,
}

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
        counts_tx: tokio::sync::watch::Sender<Counts>,
    ) -> Self {
        let EngineIo { api, downloader, writer, claimed_elsewhere } = io;
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
            downloader,
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
            clock_samples: VecDeque::new(),
            to_download: VecDeque::new(),
            downloads_running: 0,
            polls: DelayQueue::new(),
            tasks: JoinSet::new(),
            remote_ids: HashMap::new(),
            claimed_elsewhere,
            counts: Counts::default(),
            counts_tx,
            stopped: None,
            changes: Vec::new(),
            ended: Vec::new(),
            submit_wake: None,
        };
        for job in jobs {
            if !job.in_file && job.state == JobState::Pending {
                continue;
            }
            let index = engine.slots.len();
            let output_dir = dirs.get(&job.batch_id).cloned().unwrap_or_default();
            engine.counts.add(job.state);
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
                // Left by a crash or an earlier unanswered POST: reconciled before anything
                // else is submitted.
                JobState::Unknown | JobState::Submitting => {
                    engine.unknown.insert(index);
                }
                _ => {}
            }
            engine.slots.push(Slot { job, output_dir, poll_delay: None, cancel_sent: false });
        }
        engine
    }

    /// Runs until every job has ended (or cannot go further in this run), then returns them.
    pub async fn run(mut self) -> Result<EngineOutcome, StoreError> {
        let mut stop_seen = false;
        loop {
            let send = self.plan_submission();
            self.commit().await?;
            if let Some(slot) = send {
                self.spawn_submit(slot);
            }
            self.start_downloads();
            self.maybe_start_listing();
            self.counts_tx.send_if_modified(|shown| {
                let changed = *shown != self.counts;
                *shown = self.counts;
                changed
            });
            if self.finished() || self.controls.abort.is_cancelled() {
                break;
            }

            let wake = [self.submit_wake, self.reconcile_wake()].into_iter().flatten().min();
            tokio::select! {
                () = self.controls.abort.cancelled() => {}
                () = self.controls.stop_submitting.cancelled(), if !stop_seen => {
                    stop_seen = true;
                    self.stop(StopReason::Interrupted);
                }
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.take(joined);
                    // Take everything else that is ready in the same turn: one commit for all.
                    while let Some(joined) = self.tasks.try_join_next() {
                        self.take(joined);
                    }
                }
                Some(expired) = futures_util::StreamExt::next(&mut self.polls), if !self.polls.is_empty() => {
                    self.spawn_poll(expired.into_inner());
                }
                () = sleep_until_or_forever(wake) => {}
            }
        }
        self.commit().await?;
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
            Err(err) => tracing::error!(%err, "a network task failed"),
        }
    }

    /// True when nothing is left to do in this run.
    fn finished(&self) -> bool {
        let may_submit = self.stopped.is_none() && !self.pending.is_empty();
        !may_submit
            && self.unknown.is_empty()
            && self.tasks.is_empty()
            && self.polls.is_empty()
            && self.to_download.is_empty()
    }

    /// Jobs that may be running at Krea: they count against the cap.
    fn in_flight(&self) -> usize {
        self.counts.in_flight + self.unknown.len()
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.changes);
        self.writer.commit(changes).await?;
        for slot in std::mem::take(&mut self.ended) {
            let slot = &self.slots[slot];
            if let Err(err) = append_manifest(&slot.output_dir, &slot.job) {
                tracing::warn!(%err, "cannot append to the manifest; it is rewritten at the end");
            }
        }
        Ok(())
    }

    /// Moves a job to `state`, queues the write, and keeps the counts. `error` replaces the
    /// recorded error when given; reaching `downloaded` clears it.
    fn set_state(&mut self, slot: usize, state: JobState, error: Option<String>) {
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
            job.finished_at.get_or_insert_with(crate::store::now_ms);
        }
        self.counts.moved(from, state);
        if state.is_final() {
            self.ended.push(slot);
        }
        self.changes.push(Change::Job(Box::new(job.clone())));
    }

    /// Queues a write of the job as it is (a remote status change, new times).
    fn touch(&mut self, slot: usize) {
        self.changes.push(Change::Job(Box::new(self.slots[slot].job.clone())));
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
            StopReason::Interrupted => tracing::warn!(
                in_flight = self.counts.in_flight,
                "stopping: no more submissions; waiting for jobs in flight (press Ctrl-C again \
                 to stop now; a rerun resumes)"
            ),
            StopReason::AuthRefused => {}
        }
    }

    /// Krea refused the key: nothing else can succeed. Stop at once; a rerun resumes.
    fn refuse_auth(&mut self, status: u16, message: &str) {
        tracing::error!(status, %message, "Krea refused the API key; stopping");
        self.stopped = Some(StopReason::AuthRefused);
        self.controls.abort.cancel();
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
