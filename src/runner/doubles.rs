//! In-memory doubles of the engine's seam, for the in-process tests (`tests.rs`): a fake Krea
//! whose jobs take tokio time and whose POSTs can be scripted, a fetcher that writes bytes to
//! the output folder, and a clock that follows tokio's (paused) time; and job records as the
//! state file would hold them, for the unit tests of the engine's parts.

use crate::api::{ApiError, JobPage, RemoteJob, RemoteStatus};
use crate::asset::{Asset, AssetPage, AssetUpload};
use crate::download::Fetched;
use crate::reconcile::format_time_ms;
use crate::retry::RetryPolicy;
use crate::seam::{ApiFuture, Clock, FetchFuture, KreaApi, ResultFetcher};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Wall-clock ms derived from tokio's clock: paused time moves it.
#[derive(Debug)]
pub(super) struct TestClock {
    base_ms: i64,
    start: Instant,
}

impl TestClock {
    /// 2026-01-01T00:00:00Z at the moment of creation.
    pub(super) fn new() -> Self {
        Self { base_ms: 1_767_225_600_000, start: Instant::now() }
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.base_ms + i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX)
    }
}

/// What the fake answers to one POST.
#[derive(Clone, Debug)]
pub(super) enum Post {
    /// Creates the job and answers with it.
    Accept,
    /// 429, with or without `Retry-After`; creates nothing.
    RateLimited(Option<Duration>),
    /// 402; creates nothing.
    PaymentRequired,
    /// 401; creates nothing.
    Auth,
    /// 500; creates nothing.
    ServerError,
    /// Creates the job, but the answer is lost.
    DroppedButCreated,
    /// The answer is lost, and nothing was created.
    DroppedNothingCreated,
    /// The answer is lost; the job was created, and so was another (someone else's) in the same
    /// moment: reconciliation cannot tell which is ours.
    DroppedCreatedTwice,
}

/// Krea's answer when the account's concurrency and backlog are full.
const CONCURRENCY_FULL: &str = "You have reached the maximum number of concurrent jobs.";

/// One job at the fake Krea.
#[derive(Clone, Debug)]
pub(super) struct FakeJob {
    pub(super) id: String,
    /// The prompt of the POST that created it (`None` for one made by `create_now`).
    pub(super) prompt: Option<String>,
    created_ms: i64,
    started: Instant,
    duration: Duration,
    pub(super) cancelled: bool,
    /// Shows `sampling` for the last quarter of its run ([`CancelRefusals`]).
    samples: bool,
    /// How many result URLs it ends with.
    outputs: usize,
}

/// What the fake saw, for assertions.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// When each POST arrived, and what it was answered.
    pub(super) posts: Vec<(Instant, String)>,
    /// When each POST was sent and when its answer (or its loss) came back, in answer order.
    pub(super) post_spans: Vec<(Instant, Instant)>,
    /// The most POSTs on the wire at once.
    pub(super) max_posts_on_wire: usize,
    pub(super) gets: usize,
    /// When each DELETE arrived, and for which job.
    pub(super) cancels: Vec<(Instant, String)>,
    /// When each listing was asked for.
    pub(super) lists: Vec<Instant>,
    /// Sweeps (`GET /jobs` reading the jobs in flight), counted apart from the listings.
    pub(super) sweeps: usize,
    /// The most jobs that ran at once.
    pub(super) max_running: usize,
    /// The most jobs that waited backlogged at once.
    pub(super) max_backlogged: usize,
    /// The most jobs held at once (running or backlogged).
    pub(super) max_held: usize,
    /// The model and body of every POST, in arrival order.
    pub(super) bodies: Vec<(String, String)>,
}

#[derive(Debug)]
struct State {
    script: VecDeque<Post>,
    /// POSTs on the wire now.
    posts_on_wire: usize,
    jobs: Vec<FakeJob>,
    seen: Seen,
    next_id: u32,
    /// When the recent accepted POSTs arrived, for the request-rate limit.
    accepted_at: VecDeque<Instant>,
}

/// A Krea in memory. Jobs run `concurrency` at a time in submission order (all at once when
/// `None`); a job that must wait is `backlogged`, and starts when a slot frees. Running, it is
/// `queued` for its first quarter, then `processing`, then `completed` after `job_duration` of
/// tokio time. Unscripted POSTs are accepted, or refused with a 429 without `Retry-After`:
/// with Krea's concurrency text when `concurrency` jobs run and `backlog` more wait (as Krea
/// does when the account's concurrency and backlog are full), and with another text when
/// more than `rate_limit` POSTs arrived within its window.
#[derive(Debug)]
pub(super) struct FakeKrea {
    clock: Arc<TestClock>,
    state: Mutex<State>,
    /// How long each job runs.
    pub(super) job_duration: Duration,
    /// How long a POST takes to be answered.
    pub(super) post_latency: Duration,
    /// Jobs the account may run at once.
    pub(super) concurrency: Option<usize>,
    /// Jobs the account keeps backlogged beyond `concurrency` before it answers 429.
    pub(super) backlog: usize,
    /// At most this many POSTs accepted within this window (a request-rate limit).
    pub(super) rate_limit: Option<(usize, Duration)>,
    /// The states in which Krea refuses a cancel (none by default).
    pub(super) cancel_refusals: CancelRefusals,
    /// How many result URLs each job ends with (1 by default).
    pub(super) outputs: usize,
    /// POSTs whose prompt contains this are refused with a 400.
    pub(super) refuse_prompt: Option<String>,
    /// Models this account's plan does not include: their POSTs get a plan-402.
    pub(super) plan_required: Vec<String>,
}

/// Krea's answer (a 402) for a model the account's plan does not include.
pub(super) const PLAN_REQUIRED: &str = "This model requires a higher plan. Upgrade to use it.";

/// The states in which Krea refuses a `DELETE` (krea-api.md: it cancels only `queued` and
/// `processing` jobs), for the cancel tests. Off by default, so the other tests see jobs go
/// only `queued`, `processing`, `completed`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CancelRefusals {
    /// Each job waits `backlogged` this long after its creation before it starts.
    pub(super) backlog: Duration,
    /// Each job is `sampling` for the last quarter of its run.
    pub(super) sampling: bool,
}

impl FakeKrea {
    pub(super) fn new(clock: Arc<TestClock>) -> Self {
        Self {
            clock,
            state: Mutex::new(State {
                script: VecDeque::new(),
                posts_on_wire: 0,
                jobs: Vec::new(),
                seen: Seen::default(),
                next_id: 1,
                accepted_at: VecDeque::new(),
            }),
            job_duration: Duration::from_secs(3),
            post_latency: Duration::from_millis(100),
            concurrency: None,
            backlog: 0,
            rate_limit: None,
            cancel_refusals: CancelRefusals::default(),
            outputs: 1,
            refuse_prompt: None,
            plan_required: Vec::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("the fake's lock")
    }

    /// Answers the next POSTs so, in order; then POSTs are accepted.
    pub(super) fn script(&self, posts: impl IntoIterator<Item = Post>) {
        self.state().script.extend(posts);
    }

    /// What the fake saw so far.
    pub(super) fn seen<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.state().seen)
    }

    /// The jobs created so far.
    pub(super) fn jobs(&self) -> Vec<FakeJob> {
        self.state().jobs.clone()
    }

    /// Creates a job as if a POST had, now; returns its id.
    pub(super) fn create_now(&self) -> String {
        let mut state = self.state();
        self.create(&mut state, None)
    }

    fn create(&self, state: &mut State, prompt: Option<&str>) -> String {
        let id = format!("job-{:04}", state.next_id);
        state.next_id += 1;
        let now = Instant::now();
        // Every job lasts `job_duration`, so jobs end in the order they start: a new one starts
        // when the job `concurrency` places before it (not cancelled) ends.
        let started = self.concurrency.map_or(now, |slots| {
            let mut ends: Vec<Instant> = state
                .jobs
                .iter()
                .filter(|job| !job.cancelled)
                .map(|job| job.started + job.duration)
                .collect();
            ends.sort_unstable_by(|a, b| b.cmp(a));
            ends.get(slots.saturating_sub(1)).map_or(now, |end| now.max(*end))
        });
        state.jobs.push(FakeJob {
            id: id.clone(),
            prompt: prompt.map(str::to_owned),
            created_ms: self.clock.now_ms(),
            started: started + self.cancel_refusals.backlog,
            duration: self.job_duration,
            cancelled: false,
            samples: self.cancel_refusals.sampling,
            outputs: self.outputs,
        });
        let running = state.jobs.iter().filter(|job| Self::running(job)).count();
        let backlogged = state.jobs.iter().filter(|job| Self::backlogged(job)).count();
        state.seen.max_running = state.seen.max_running.max(running);
        state.seen.max_backlogged = state.seen.max_backlogged.max(backlogged);
        state.seen.max_held = state.seen.max_held.max(running + backlogged);
        id
    }

    fn running(job: &FakeJob) -> bool {
        let now = Instant::now();
        !job.cancelled && job.started <= now && now < job.started + job.duration
    }

    fn backlogged(job: &FakeJob) -> bool {
        !job.cancelled && Instant::now() < job.started
    }

    fn describe(job: &FakeJob) -> RemoteJob {
        let age = Instant::now().saturating_duration_since(job.started);
        let status = if job.cancelled {
            RemoteStatus::Cancelled
        } else if Self::backlogged(job) {
            RemoteStatus::Backlogged
        } else if age >= job.duration {
            RemoteStatus::Completed
        } else if age < job.duration / 4 {
            RemoteStatus::Queued
        } else if job.samples && age >= job.duration / 4 * 3 {
            RemoteStatus::Sampling
        } else {
            RemoteStatus::Processing
        };
        let done = status == RemoteStatus::Completed;
        RemoteJob {
            job_id: job.id.clone(),
            status: Some(status),
            created_at: Some(format_time_ms(job.created_ms)),
            completed_at: None,
            urls: if done {
                (0..job.outputs)
                    .map(|index| match index {
                        0 => format!("https://results.test/{}.png", job.id),
                        _ => format!("https://results.test/{}-{index}.png", job.id),
                    })
                    .collect()
            } else {
                vec![]
            },
            error: None,
        }
    }

    fn answer_post(&self, body: &str) -> Result<RemoteJob, ApiError> {
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let prompt = parsed.get("prompt").and_then(serde_json::Value::as_str);
        let mut state = self.state();
        let running = state.jobs.iter().filter(|job| Self::running(job)).count();
        let backlogged = state.jobs.iter().filter(|job| Self::backlogged(job)).count();
        let full = self.concurrency.is_some_and(|cap| running >= cap && backlogged >= self.backlog);
        let now = Instant::now();
        let too_fast = self.rate_limit.is_some_and(|(most, window)| {
            while state.accepted_at.front().is_some_and(|at| now - *at >= window) {
                state.accepted_at.pop_front();
            }
            state.accepted_at.len() >= most
        });
        if self
            .refuse_prompt
            .as_deref()
            .is_some_and(|marker| prompt.unwrap_or_default().contains(marker))
        {
            state.seen.posts.push((now, "Rejected".into()));
            return Err(ApiError::Rejected { status: 400, message: "refused prompt".into() });
        }
        let scripted = state.script.pop_front();
        let unscripted = scripted.is_none();
        let post = scripted.unwrap_or(if full || too_fast {
            Post::RateLimited(None)
        } else {
            Post::Accept
        });
        state.seen.posts.push((now, format!("{post:?}")));
        // A scripted 429 says nothing of concurrency (a request-rate 429); a full account
        // answers with Krea's own text for the concurrency 429.
        let message = || match (unscripted, full) {
            (true, true) => CONCURRENCY_FULL.to_owned(),
            (true, false) => "Too Many Requests".to_owned(),
            (false, _) => "scripted".to_owned(),
        };
        match post {
            Post::Accept => {
                state.accepted_at.push_back(now);
                let id = self.create(&mut state, prompt);
                let job = state.jobs.iter().find(|job| job.id == id).expect("just created");
                Ok(Self::describe(job))
            }
            Post::RateLimited(retry_after) => {
                Err(ApiError::RateLimited { retry_after, message: message() })
            }
            Post::PaymentRequired => Err(ApiError::PaymentRequired { message: message() }),
            Post::Auth => Err(ApiError::Auth { status: 401, message: message() }),
            Post::ServerError => {
                Err(ApiError::Server { status: 500, message: "Internal Server Error".into() })
            }
            Post::DroppedButCreated => {
                self.create(&mut state, prompt);
                Err(ApiError::NoAnswer("connection reset".into()))
            }
            Post::DroppedNothingCreated => Err(ApiError::NoAnswer("connection reset".into())),
            Post::DroppedCreatedTwice => {
                self.create(&mut state, prompt);
                self.create(&mut state, None);
                Err(ApiError::NoAnswer("connection reset".into()))
            }
        }
    }
}

impl KreaApi for FakeKrea {
    fn create_job<'a>(&'a self, model: &'a str, body: &'a str) -> ApiFuture<'a, RemoteJob> {
        Box::pin(async move {
            let sent = Instant::now();
            {
                let mut state = self.state();
                state.posts_on_wire += 1;
                state.seen.max_posts_on_wire =
                    state.seen.max_posts_on_wire.max(state.posts_on_wire);
            }
            self.state().seen.bodies.push((model.to_owned(), body.to_owned()));
            tokio::time::sleep(self.post_latency).await;
            let answer = if self.plan_required.iter().any(|refused| refused == model) {
                self.state().seen.posts.push((Instant::now(), "PlanRequired".into()));
                Err(ApiError::PlanRequired { message: PLAN_REQUIRED.into() })
            } else {
                self.answer_post(body)
            };
            let mut state = self.state();
            state.posts_on_wire -= 1;
            state.seen.post_spans.push((sent, Instant::now()));
            answer
        })
    }

    fn get_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, RemoteJob> {
        Box::pin(async move {
            let mut state = self.state();
            state.seen.gets += 1;
            state
                .jobs
                .iter()
                .find(|job| job.id == job_id)
                .map(Self::describe)
                .ok_or_else(|| ApiError::NotFound { message: job_id.to_owned() })
        })
    }

    fn cancel_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, ()> {
        Box::pin(async move {
            let mut state = self.state();
            state.seen.cancels.push((Instant::now(), job_id.to_owned()));
            let job = state
                .jobs
                .iter_mut()
                .find(|job| job.id == job_id)
                .ok_or_else(|| ApiError::NotFound { message: job_id.to_owned() })?;
            if job.cancelled || Instant::now() >= job.started + job.duration {
                return Err(ApiError::Rejected { status: 409, message: "not cancellable".into() });
            }
            // As Krea answers: 404 with its reason.
            let status = Self::describe(job).status.unwrap_or(RemoteStatus::Queued);
            if matches!(status, RemoteStatus::Backlogged | RemoteStatus::Sampling) {
                let message = format!("Job cannot be cancelled in state {}", status.as_str());
                return Err(ApiError::NotFound { message });
            }
            job.cancelled = true;
            Ok(())
        })
    }

    fn list_jobs<'a>(&'a self, _cursor: Option<&'a str>, _limit: u32) -> ApiFuture<'a, JobPage> {
        Box::pin(async move {
            let mut state = self.state();
            state.seen.lists.push(Instant::now());
            let items = state.jobs.iter().rev().map(Self::describe).collect();
            Ok(JobPage { items, unreadable: Vec::new(), next_cursor: None })
        })
    }
    /// A sweep reads the same list, but is counted apart from reconciliation's listings.
    fn sweep_jobs(&self, _limit: u32) -> ApiFuture<'_, JobPage> {
        Box::pin(async move {
            let mut state = self.state();
            state.seen.sweeps += 1;
            let items = state.jobs.iter().rev().map(Self::describe).collect();
            Ok(JobPage { items, unreadable: Vec::new(), next_cursor: None })
        })
    }
    /// Minimal: every upload is answered with an asset named after its description; the
    /// engine never uploads (`uploads.rs` does, before it), so nothing here counts them.
    fn upload_asset<'a>(&'a self, upload: AssetUpload<'a>) -> ApiFuture<'a, Asset> {
        let description = upload.description.to_owned();
        Box::pin(std::future::ready(Ok(Asset {
            id: description.clone(),
            url: format!("https://assets.example/{description}"),
            description,
        })))
    }

    fn list_assets<'a>(
        &'a self,
        _cursor: Option<&'a str>,
        _limit: u32,
    ) -> ApiFuture<'a, AssetPage> {
        Box::pin(std::future::ready(Ok(AssetPage { items: Vec::new(), next_cursor: None })))
    }
}

/// A result host in memory: writes a few bytes for each URL, after `latency` of tokio time.
#[derive(Debug, Default)]
pub(super) struct FakeFetcher {
    pub(super) latency: Duration,
    fetched: Mutex<Vec<String>>,
}

impl FakeFetcher {
    /// The URLs fetched so far.
    pub(super) fn fetched(&self) -> Vec<String> {
        self.fetched.lock().expect("the fetcher's lock").clone()
    }
}

impl ResultFetcher for FakeFetcher {
    fn fetch<'a>(
        &'a self,
        url: &'a str,
        dir: &'a Path,
        stem: &'a str,
        _owner: Option<&'a str>,
        _policy: &'a RetryPolicy,
    ) -> FetchFuture<'a> {
        Box::pin(async move {
            tokio::time::sleep(self.latency).await;
            let relative_path = format!("{stem}.png");
            // A 32×32 PNG's header, then the URL: stages read the size (`chain.rs`).
            let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x20\0\0\0\x20".to_vec();
            bytes.extend_from_slice(format!("result of {url}").as_bytes());
            let path = dir.join(&relative_path);
            let io = |err: std::io::Error| crate::download::DownloadError::Transport {
                url: url.to_owned(),
                detail: err.to_string(),
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(&path, &bytes).map_err(io)?;
            self.fetched.lock().expect("the fetcher's lock").push(url.to_owned());
            Ok(Fetched {
                relative_path,
                bytes: bytes.len() as u64,
                sha256: "0".repeat(64),
                content_type: "image/png".into(),
            })
        })
    }
}

/// A job as the state file would hold it: row `id`, named `job-<id>`, in `state`, with a Krea
/// id (`krea-<id>`) when the state implies one, priced at 0.25 USD.
pub(super) fn job_record(id: i64, state: crate::job::JobState) -> crate::store::JobRecord {
    use crate::job::JobState;
    let known = matches!(state, JobState::Submitted | JobState::Completed | JobState::Downloaded);
    crate::store::JobRecord {
        id,
        batch_id: 1,
        key: crate::job::JobKey::from_stored(format!("key-{id}")),
        name: format!("job-{id}"),
        model: "image/bfl/flux-1-dev".into(),
        body: Arc::from("{}"),
        state,
        remote_id: known.then(|| format!("krea-{id}")),
        remote_status: None,
        attempt_at: None,
        attempt_ended: None,
        attempts: 0,
        submitted_at: None,
        created_at: None,
        completed_at: None,
        finished_at: None,
        urls: Vec::new(),
        error: None,
        price_usd: Some(0.25),
        in_file: true,
        reused_from: None,
        chain: None,
        parent_id: None,
        files: Vec::new(),
        inputs: Vec::new(),
    }
}
