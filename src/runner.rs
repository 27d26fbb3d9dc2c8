//! The engine: moves every job from `pending` to an end, through submission, polling and
//! download, and records each step in the state file before the network call that depends on it.
//!
//! One task (the loop in [`Engine::run`]) owns all job state and makes every decision; network
//! work runs in spawned tasks whose results come back to the loop as [`Event`]s. Each turn of the
//! loop handles what arrived, plans new submissions, commits every change in one durable
//! transaction, and only then starts the requests that depend on those changes. So:
//!
//! - a POST starts only after its attempt (`submitting`, with the time) is on disk;
//! - a job with a Krea id is polled by that id after any restart, never submitted again;
//! - a POST that ends without an answer leaves the job `unknown`, never retried blindly;
//! - from the first 402 no new POST starts, while everything in flight is polled and downloaded.
//!
//! Polls are timers in one `DelayQueue`, not a task per job, so thousands of jobs in flight cost
//! no busy loops. Shutdown is injected through [`Controls`]; this module installs no signal
//! handlers.

use crate::api::{ApiError, KreaClient, RemoteJob, RemoteStatus};
use crate::download::{Downloader, Sidecar, write_sidecar};
use crate::job::JobState;
use crate::pace::{Pacer, PollSchedule};
use crate::report::{Counts, StopReason, append_manifest};
use crate::retry::{RetryPolicy, Verdict};
use crate::store::{Change, FileRecord, JobRecord, StoreError, StoreWriter, now_ms};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

/// How the engine paces and polls; built from a job file's `limits`.
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

/// The engine's connections to the world: the API, the result hosts, the state file.
#[derive(Debug)]
pub struct EngineIo {
    /// The Krea client.
    pub api: Arc<KreaClient>,
    /// The download client.
    pub downloader: Downloader,
    /// The state file's writer.
    pub writer: StoreWriter,
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
    /// Completed jobs waiting for a download slot.
    to_download: VecDeque<usize>,
    downloads_running: usize,
    polls: DelayQueue<usize>,
    tasks: JoinSet<Event>,
    /// Krea job ids already claimed by a job, so no id is ever recorded twice.
    remote_ids: HashMap<String, usize>,
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
        let pacer = Pacer::new(
            settings.submissions_per_minute,
            settings.burst,
            settings.max_in_flight,
            settings.rate_limit_backoff,
        );
        let dirs: HashMap<i64, Arc<PathBuf>> =
            output_dirs.iter().map(|(id, dir)| (*id, Arc::new(dir.clone()))).collect();
        let EngineIo { api, downloader, writer } = io;
        let mut engine = Self {
            api,
            downloader,
            writer,
            settings,
            controls,
            pacer,
            slots: Vec::with_capacity(jobs.len()),
            pending: VecDeque::new(),
            to_download: VecDeque::new(),
            downloads_running: 0,
            polls: DelayQueue::new(),
            tasks: JoinSet::new(),
            remote_ids: HashMap::new(),
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
            }
            match job.state {
                JobState::Pending => engine.pending.push_back(index),
                // Polled at once: the job may have ended while nobody was looking.
                JobState::Submitted => {
                    engine.polls.insert(index, Duration::ZERO);
                }
                JobState::Completed => engine.to_download.push_back(index),
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
            let sends = self.plan_submissions();
            self.commit().await?;
            for slot in sends {
                self.spawn_submit(slot);
            }
            self.start_downloads();
            self.counts_tx.send_if_modified(|shown| {
                let changed = *shown != self.counts;
                *shown = self.counts;
                changed
            });
            if self.finished() || self.controls.abort.is_cancelled() {
                break;
            }

            let next_submission = self.submit_wake;
            tokio::select! {
                () = self.controls.abort.cancelled() => {}
                () = self.controls.stop_submitting.cancelled(), if !stop_seen => {
                    stop_seen = true;
                    self.stop(StopReason::Interrupted);
                }
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match joined {
                        Ok(event) => self.handle(event),
                        Err(err) => tracing::error!(%err, "a network task failed"),
                    }
                    // Take everything else that is ready in the same turn: one commit for all.
                    while let Some(joined) = self.tasks.try_join_next() {
                        match joined {
                            Ok(event) => self.handle(event),
                            Err(err) => tracing::error!(%err, "a network task failed"),
                        }
                    }
                }
                Some(expired) = futures_util::StreamExt::next(&mut self.polls), if !self.polls.is_empty() => {
                    self.spawn_poll(expired.into_inner());
                }
                () = sleep_until_or_forever(next_submission) => {}
            }
        }
        self.commit().await?;
        self.tasks.abort_all();
        Ok(EngineOutcome {
            jobs: self.slots.into_iter().map(|slot| slot.job).collect(),
            stopped: self.stopped,
        })
    }

    /// True when nothing is left to do in this run.
    fn finished(&self) -> bool {
        let may_submit = self.stopped.is_none() && !self.pending.is_empty();
        !may_submit && self.tasks.is_empty() && self.polls.is_empty() && self.to_download.is_empty()
    }

    /// Jobs that may be running at Krea: they count against the cap.
    fn in_flight(&self) -> usize {
        self.counts.in_flight + self.counts.unknown
    }

    /// Takes as many pending jobs as the stop flag, the in-flight cap and the pacer allow, and
    /// records each attempt (state `submitting`, time, count) for the coming commit.
    fn plan_submissions(&mut self) -> Vec<usize> {
        let mut sends = Vec::new();
        self.submit_wake = None;
        while self.stopped.is_none()
            && !self.pending.is_empty()
            && self.in_flight() < self.pacer.in_flight_cap()
        {
            if let Err(wake) = self.pacer.try_acquire() {
                self.submit_wake = Some(wake);
                break;
            }
            let Some(slot) = self.pending.pop_front() else { break };
            let job = &mut self.slots[slot].job;
            job.attempt_at = Some(now_ms());
            job.attempts += 1;
            self.set_state(slot, JobState::Submitting, None);
            sends.push(slot);
        }
        sends
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

    /// Moves a job to `state`, queues the write, and keeps the counts.
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
            job.finished_at.get_or_insert_with(now_ms);
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
        if self.stopped.is_none() {
            self.stopped = Some(reason);
            match reason {
                StopReason::PaymentRequired => tracing::warn!(
                    waiting = self.counts.pending,
                    in_flight = self.counts.in_flight,
                    "the Krea API balance is exhausted (402): no more submissions; jobs in \
                     flight are finished and downloaded"
                ),
                StopReason::Interrupted => tracing::warn!(
                    in_flight = self.counts.in_flight,
                    "stopping: no more submissions; waiting for jobs in flight (press Ctrl-C \
                     again to stop now; a rerun resumes)"
                ),
                StopReason::AuthRefused => {}
            }
        }
    }

    fn spawn_submit(&mut self, slot: usize) {
        let api = Arc::clone(&self.api);
        let model = self.slots[slot].job.model.clone();
        let body = Arc::clone(&self.slots[slot].job.body);
        self.tasks.spawn(async move {
            let result = api.create_job(&model, &body).await;
            Event::Submitted { slot, result }
        });
    }

    fn spawn_poll(&mut self, slot: usize) {
        let api = Arc::clone(&self.api);
        let Some(job_id) = self.slots[slot].job.remote_id.clone() else { return };
        let policy = self.settings.retry;
        self.tasks.spawn(async move {
            let result = crate::retry::retry(
                &policy,
                |err: &ApiError| match err {
                    ApiError::RateLimited { retry_after, .. } => Verdict::Retry(*retry_after),
                    err if err.is_transient() => Verdict::Retry(None),
                    _ => Verdict::GiveUp,
                },
                |err, wait| tracing::debug!(%err, ?wait, "poll failed; retrying"),
                || api.get_job(&job_id),
            )
            .await;
            Event::Polled { slot, result }
        });
    }

    fn spawn_cancel(&mut self, slot: usize) {
        let api = Arc::clone(&self.api);
        let Some(job_id) = self.slots[slot].job.remote_id.clone() else { return };
        self.slots[slot].cancel_sent = true;
        self.tasks.spawn(async move {
            let result = api.cancel_job(&job_id).await;
            Event::CancelAnswered { slot, result }
        });
    }

    fn start_downloads(&mut self) {
        while self.downloads_running < self.settings.download_concurrency.max(1) {
            let Some(slot) = self.to_download.pop_front() else { break };
            self.downloads_running += 1;
            let task =
                DownloadTask::new(&self.slots[slot], self.downloader.clone(), self.settings.retry);
            self.tasks.spawn(async move {
                let (files, error) = task.run().await;
                Event::Downloaded { slot, files, error }
            });
        }
    }

    fn schedule_poll(&mut self, slot: usize, near_end: bool) {
        let entry = &mut self.slots[slot];
        let schedule = if entry.job.model.starts_with("video/") {
            self.settings.video_poll
        } else {
            self.settings.poll
        };
        let delay = schedule.next_delay(entry.poll_delay, near_end);
        entry.poll_delay = Some(delay);
        self.polls.insert(slot, delay);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Submitted { slot, result } => self.on_submitted(slot, result),
            Event::Polled { slot, result } => self.on_polled(slot, result),
            Event::CancelAnswered { slot, result } => self.on_cancel_answered(slot, result),
            Event::Downloaded { slot, files, error } => self.on_downloaded(slot, files, error),
        }
    }

    fn on_submitted(&mut self, slot: usize, result: Result<RemoteJob, ApiError>) {
        let name = self.slots[slot].job.name.clone();
        match result {
            Ok(remote) => {
                self.pacer.on_accepted();
                if let Some(&owner) = self.remote_ids.get(&remote.job_id) {
                    let owner = self.slots[owner].job.name.clone();
                    let message = format!(
                        "Krea answered with job id {} which already belongs to job {owner}; \
                         not recorded twice, left for reconciliation",
                        remote.job_id
                    );
                    tracing::error!(job = %name, "{message}");
                    self.set_state(slot, JobState::Unknown, Some(message));
                    return;
                }
                self.remote_ids.insert(remote.job_id.clone(), slot);
                let job = &mut self.slots[slot].job;
                job.remote_id = Some(remote.job_id.clone());
                job.submitted_at = Some(now_ms());
                tracing::info!(job = %name, job_id = %remote.job_id, "submitted");
                self.set_state(slot, JobState::Submitted, None);
                self.on_remote_state(slot, &remote);
            }
            Err(ApiError::PaymentRequired { message }) => {
                tracing::debug!(job = %name, %message, "402 on submission");
                self.requeue(slot);
                self.stop(StopReason::PaymentRequired);
            }
            Err(ApiError::Auth { status, message }) => {
                tracing::error!(status, %message, "Krea refused the API key; stopping");
                self.requeue(slot);
                self.stopped = Some(StopReason::AuthRefused);
                self.controls.abort.cancel();
            }
            Err(ApiError::RateLimited { retry_after, message }) => {
                self.requeue(slot);
                let wait = self.pacer.on_rate_limited(retry_after, self.in_flight());
                tracing::info!(
                    %message,
                    wait_ms = wait.as_millis() as u64,
                    cap = self.pacer.in_flight_cap(),
                    "Krea is rate limiting (429); pausing submissions"
                );
            }
            Err(err @ ApiError::NotSent(_)) => {
                // Nothing reached Krea: safe to send again after a pause.
                self.requeue(slot);
                let wait = self.pacer.on_rate_limited(None, usize::MAX);
                tracing::warn!(%err, wait_ms = wait.as_millis() as u64, "cannot reach Krea; pausing submissions");
            }
            Err(err) if err.may_have_created_job() => {
                tracing::warn!(
                    job = %name, %err,
                    "the submission got no usable answer: Krea may have created the job; it is \
                     not sent again before reconciliation"
                );
                self.set_state(slot, JobState::Unknown, Some(err.to_string()));
            }
            Err(err @ (ApiError::ModelGone { .. } | ApiError::NotFound { .. })) => {
                // The model itself is refused: every waiting job of it would be refused too.
                let message = err.to_string();
                tracing::error!(job = %name, model = %self.slots[slot].job.model, %message, "model refused; failing its jobs");
                self.set_state(slot, JobState::Failed, Some(message.clone()));
                self.fail_pending_of_model(slot, &message);
            }
            Err(err) => {
                tracing::warn!(job = %name, %err, "Krea refused the job");
                self.set_state(slot, JobState::Failed, Some(err.to_string()));
            }
        }
    }

    /// Puts a job that was not created back at the head of the queue.
    fn requeue(&mut self, slot: usize) {
        self.set_state(slot, JobState::Pending, None);
        self.pending.push_front(slot);
    }

    fn fail_pending_of_model(&mut self, failed: usize, message: &str) {
        let model = self.slots[failed].job.model.clone();
        let (same, others): (Vec<usize>, Vec<usize>) =
            self.pending.drain(..).partition(|slot| self.slots[*slot].job.model == model);
        self.pending = others.into();
        for slot in same {
            self.set_state(slot, JobState::Failed, Some(message.to_owned()));
        }
    }

    fn on_polled(&mut self, slot: usize, result: Result<RemoteJob, ApiError>) {
        if self.slots[slot].job.state != JobState::Submitted {
            return;
        }
        match result {
            Ok(remote) => self.on_remote_state(slot, &remote),
            Err(ApiError::NotFound { message }) => {
                let job = &self.slots[slot].job;
                let text = format!(
                    "lost: Krea no longer knows job {} ({message})",
                    job.remote_id.as_deref().unwrap_or("?")
                );
                tracing::error!(job = %job.name, "{text}");
                self.set_state(slot, JobState::Failed, Some(text));
            }
            Err(ApiError::Auth { status, message }) => {
                tracing::error!(status, %message, "Krea refused the API key; stopping");
                self.stopped = Some(StopReason::AuthRefused);
                self.controls.abort.cancel();
            }
            Err(err) => {
                tracing::warn!(job = %self.slots[slot].job.name, %err, "polling failed; trying again later");
                let max = self.settings.poll.max;
                self.slots[slot].poll_delay = Some(max);
                self.polls.insert(slot, max);
            }
        }
    }

    /// Takes in what Krea says of a submitted job.
    fn on_remote_state(&mut self, slot: usize, remote: &RemoteJob) {
        let job = &mut self.slots[slot].job;
        let status =
            remote.status.clone().unwrap_or_else(|| RemoteStatus::Other("unstated".into()));
        let changed = job.remote_status.as_deref() != Some(status.as_str());
        job.remote_status = Some(status.to_string());
        if remote.created_at.is_some() {
            job.created_at.clone_from(&remote.created_at);
        }
        if remote.completed_at.is_some() {
            job.completed_at.clone_from(&remote.completed_at);
        }
        let name = job.name.clone();
        match status {
            RemoteStatus::Completed => {
                let urls = remote.result_urls().unwrap_or_default().to_vec();
                if urls.is_empty() {
                    let text = "Krea reported the job completed without result URLs".to_owned();
                    tracing::error!(job = %name, "{text}");
                    self.set_state(slot, JobState::Failed, Some(text));
                    return;
                }
                self.slots[slot].job.urls = urls;
                tracing::info!(job = %name, "completed");
                self.set_state(slot, JobState::Completed, None);
                self.to_download.push_back(slot);
            }
            RemoteStatus::Failed => {
                let reason = remote
                    .error
                    .clone()
                    .unwrap_or_else(|| "failed at Krea (no reason given)".into());
                tracing::warn!(job = %name, %reason, "failed at Krea");
                self.set_state(slot, JobState::Failed, Some(reason));
            }
            RemoteStatus::Cancelled => {
                tracing::info!(job = %name, "cancelled at Krea");
                self.set_state(slot, JobState::Cancelled, None);
            }
            pending => {
                if changed {
                    tracing::debug!(job = %name, status = %pending, "status");
                    self.touch(slot);
                }
                if self.timed_out(slot) && !self.slots[slot].cancel_sent {
                    tracing::warn!(job = %name, "the job timeout passed; cancelling it at Krea");
                    self.spawn_cancel(slot);
                    return;
                }
                let near_end =
                    matches!(pending, RemoteStatus::Sampling | RemoteStatus::IntermediateComplete);
                self.schedule_poll(slot, near_end && changed);
            }
        }
    }

    fn timed_out(&self, slot: usize) -> bool {
        let submitted = self.slots[slot].job.submitted_at.unwrap_or_else(now_ms);
        let age = Duration::from_millis(u64::try_from(now_ms() - submitted).unwrap_or_default());
        age > self.settings.job_timeout
    }

    fn on_cancel_answered(&mut self, slot: usize, result: Result<(), ApiError>) {
        if self.slots[slot].job.state != JobState::Submitted {
            return;
        }
        match result {
            Ok(()) => {
                let text = format!(
                    "gave up after the job timeout ({}); cancelled at Krea, not billed",
                    humantime::format_duration(self.settings.job_timeout)
                );
                tracing::warn!(job = %self.slots[slot].job.name, "{text}");
                self.set_state(slot, JobState::Failed, Some(text));
            }
            Err(err) => {
                // Not cancellable now (it may just have completed): keep polling, try again.
                tracing::debug!(job = %self.slots[slot].job.name, %err, "cancel refused");
                self.slots[slot].cancel_sent = false;
                self.schedule_poll(slot, true);
            }
        }
    }

    fn on_downloaded(&mut self, slot: usize, files: Vec<FileRecord>, error: Option<String>) {
        self.downloads_running = self.downloads_running.saturating_sub(1);
        let job_id = self.slots[slot].job.id;
        for file in files {
            self.changes.push(Change::File { job_id, file: file.clone() });
            let job = &mut self.slots[slot].job;
            job.files.retain(|known| known.index != file.index);
            job.files.push(file);
            job.files.sort_by_key(|file| file.index);
        }
        let name = self.slots[slot].job.name.clone();
        match error {
            None => {
                tracing::info!(job = %name, files = self.slots[slot].job.files.len(), "downloaded");
                self.set_state(slot, JobState::Downloaded, None);
            }
            Some(error) => {
                tracing::warn!(job = %name, %error, "download failed; the job stays completed with its download pending (rerun or `krea-batch download` fetches it)");
                self.slots[slot].job.error = Some(format!("download pending: {error}"));
                self.touch(slot);
            }
        }
    }
}

/// Everything one download needs, detached from the engine.
struct DownloadTask {
    downloader: Downloader,
    policy: RetryPolicy,
    dir: Arc<PathBuf>,
    job: JobRecord,
}

impl DownloadTask {
    fn new(slot: &Slot, downloader: Downloader, policy: RetryPolicy) -> Self {
        Self { downloader, policy, dir: Arc::clone(&slot.output_dir), job: slot.job.clone() }
    }

    /// Downloads every URL not yet on disk; returns what was written and the first error.
    async fn run(self) -> (Vec<FileRecord>, Option<String>) {
        let job = &self.job;
        let several = job.urls.len() > 1;
        let mut params = (*job.body).clone();
        let prompt = params.remove("prompt");
        let prompt = prompt.as_ref().and_then(serde_json::Value::as_str).unwrap_or_default();
        let mut written = Vec::new();
        for (index, url) in job.urls.iter().enumerate() {
            let index = index as u32;
            let done = job
                .files
                .iter()
                .any(|file| file.index == index && self.dir.join(&file.path).is_file());
            if done {
                continue;
            }
            let stem =
                if several { format!("{}/{}", job.name, index + 1) } else { job.name.clone() };
            let fetched =
                match self.downloader.fetch_with_retries(url, &self.dir, &stem, &self.policy).await
                {
                    Ok(fetched) => fetched,
                    Err(err) => return (written, Some(err.to_string())),
                };
            let sidecar = Sidecar {
                name: &job.name,
                prompt,
                model: &job.model,
                params: &params,
                job_id: job.remote_id.as_deref().unwrap_or_default(),
                created_at: job.created_at.as_deref(),
                completed_at: job.completed_at.as_deref(),
                index,
                source_url: url,
                file: &fetched.relative_path,
                bytes: fetched.bytes,
                sha256: &fetched.sha256,
                content_type: &fetched.content_type,
            };
            if let Err(err) = write_sidecar(&self.dir, &sidecar) {
                return (written, Some(err.to_string()));
            }
            written.push(FileRecord {
                index,
                url: url.clone(),
                path: fetched.relative_path,
                bytes: fetched.bytes,
                sha256: fetched.sha256,
                content_type: fetched.content_type,
            });
        }
        (written, None)
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
