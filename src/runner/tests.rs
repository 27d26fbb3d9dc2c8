//! The engine driven in-process on paused tokio time, through the seam (`seam.rs`) with the
//! doubles of `doubles.rs` and the state writer inline: each test runs a whole batch in
//! milliseconds, and times are asserted in virtual time (`tokio::time::Instant`).

use super::doubles::{FakeFetcher, FakeKrea, Post, TestClock};
use super::*;
use crate::pace::{Pacer, PollSchedule};
use crate::pricing::PriceTable;
use crate::store::Store;
use std::time::Duration;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

/// Settings that let each behaviour under test show on its own: pacing wide open, polls every
/// second or two, reconciliation 10 s after an unanswered POST.
fn settings() -> EngineSettings {
    let poll = PollSchedule { first: SECOND, max: 2 * SECOND };
    EngineSettings {
        ceilings: Ceilings {
            submissions_per_minute: Some(6000),
            burst: Some(100),
            max_in_flight: Some(100),
            submission_concurrency: None,
        },
        poll,
        video_poll: poll,
        job_timeout: Duration::from_hours(1),
        download_concurrency: 4,
        download_grace: 10 * SECOND,
        retry: RetryPolicy { first: SECOND, max: 4 * SECOND, attempts: 3 },
        rate_limit_backoff: 2 * SECOND,
        request_timeout: 30 * SECOND,
        reconcile_after: 10 * SECOND,
        kind: RunKind::OneShot,
        heartbeat: None,
        budget: None,
        start_stages: true,
    }
}

/// One engine over `n` jobs, its doubles and its state file.
struct Rig {
    dir: tempfile::TempDir,
    output: PathBuf,
    clock: Arc<TestClock>,
    krea: FakeKrea,
    fetcher: FakeFetcher,
    writer: StoreWriter,
    jobs: Vec<JobRecord>,
    output_dirs: HashMap<i64, PathBuf>,
    settings: EngineSettings,
    controls: Controls,
    /// K fixed instead of chosen by the controller, and the ceilings taken as fixed limits, for
    /// the tests of the POST window itself.
    fixed_posts: Option<u32>,
}

impl Rig {
    fn new(n: usize) -> Self {
        let text = format!("jobs:\n  - prompt: a fox\n    model: bfl/flux-1-dev\n    count: {n}\n");
        let rig = Self::of(&text);
        assert_eq!(rig.jobs.len(), n);
        rig
    }

    /// One engine over the jobs of the job file `text`.
    fn of(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let output = dir.path().join("out");
        std::fs::create_dir_all(&output).expect("the output folder");
        let file = crate::jobfile::parse(text.as_bytes(), &dir.path().join("jobs.yaml"))
            .expect("the job file");
        let mut store = Store::open_writer(&dir.path().join("state.db")).expect("the state");
        store
            .import("jobs.yaml", &output, &file.jobs, &PriceTable::with_overrides([].into()), false)
            .expect("the import");
        let jobs = store.jobs(None).expect("the jobs");
        let output_dirs = store.output_dirs().expect("the folders");
        let clock = Arc::new(TestClock::new());
        Self {
            dir,
            output,
            krea: FakeKrea::new(Arc::clone(&clock)),
            clock,
            fetcher: FakeFetcher::default(),
            writer: StoreWriter::inline(store),
            jobs,
            output_dirs,
            settings: settings(),
            controls: Controls::default(),
            fixed_posts: None,
        }
    }

    /// The engine, with `krea` and `fetcher` moved behind the seam; returns handles on them.
    fn engine(self) -> (Engine, Handles) {
        let krea = Arc::new(self.krea);
        let fetcher = Arc::new(self.fetcher);
        let (status_tx, status) = tokio::sync::watch::channel(EngineStatus::default());
        let (commands, command_rx) = tokio::sync::mpsc::unbounded_channel();
        let io = EngineIo {
            api: Arc::clone(&krea) as Arc<dyn KreaApi>,
            fetcher: Arc::clone(&fetcher) as Arc<dyn ResultFetcher>,
            clock: self.clock,
            writer: self.writer.clone(),
            claimed_elsewhere: HashSet::new(),
        };
        let mut engine = Engine::new(
            io,
            self.jobs,
            &self.output_dirs,
            self.settings,
            self.controls.clone(),
            status_tx,
        )
        .with_commands(command_rx);
        engine.fixed_posts = self.fixed_posts;
        engine.pacer = Pacer::new(engine.pace(), engine.settings.rate_limit_backoff);
        let handles = Handles {
            _dir: self.dir,
            output: self.output,
            krea,
            fetcher,
            writer: self.writer,
            controls: self.controls,
            status,
            commands,
            started: Instant::now(),
        };
        (engine, handles)
    }

    /// Runs the engine to its end.
    async fn run(self) -> (EngineOutcome, Handles) {
        let (engine, handles) = self.engine();
        let outcome = engine.run().await.expect("the engine's run");
        (outcome, handles)
    }
}

struct Handles {
    _dir: tempfile::TempDir,
    output: PathBuf,
    krea: Arc<FakeKrea>,
    fetcher: Arc<FakeFetcher>,
    writer: StoreWriter,
    controls: Controls,
    status: tokio::sync::watch::Receiver<EngineStatus>,
    commands: tokio::sync::mpsc::UnboundedSender<EngineCommand>,
    started: Instant,
}

impl Handles {
    fn posts(&self) -> Vec<Duration> {
        self.krea
            .seen(|seen| seen.posts.iter().map(|(at, _)| at.duration_since(self.started)).collect())
    }

    fn lists(&self) -> Vec<Duration> {
        self.krea.seen(|seen| seen.lists.iter().map(|at| at.duration_since(self.started)).collect())
    }

    fn cancels(&self) -> Vec<Duration> {
        self.krea.seen(|seen| {
            seen.cancels.iter().map(|(at, _)| at.duration_since(self.started)).collect()
        })
    }

    /// The jobs as the state file has them.
    async fn stored(&self) -> Vec<JobRecord> {
        self.writer.with_store(|store| store.jobs(None)).await.expect("the writer").expect("jobs")
    }

    /// The pause the engine last wrote to the state file (empty: none).
    async fn pause_written(&self) -> String {
        let written = self.writer.with_store(|store| store.meta(status::META_PAUSE)).await;
        written.expect("the writer").expect("readable").expect("written")
    }

    /// Waits (in virtual time) until the published status satisfies `done`.
    async fn until(&mut self, done: impl Fn(&EngineStatus) -> bool) {
        let waited = tokio::time::timeout(Duration::from_hours(48), self.status.wait_for(done));
        waited.await.expect("the state within 48 virtual hours").expect("the engine is running");
    }
}

/// `later - earlier`, which the test expects in that order.
fn gap(later: Duration, earlier: Duration) -> Duration {
    later.checked_sub(earlier).expect("in order")
}

fn states(jobs: &[JobRecord]) -> Vec<JobState> {
    jobs.iter().map(|job| job.state).collect()
}

fn count(jobs: &[JobRecord], state: JobState) -> usize {
    jobs.iter().filter(|job| job.state == state).count()
}

#[tokio::test(start_paused = true)]
async fn every_job_is_submitted_once_polled_and_downloaded() {
    let (outcome, h) = Rig::new(3).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 3]);
    assert_eq!(outcome.stopped, None);
    assert_eq!(h.posts().len(), 3, "one POST per job");
    assert_eq!(h.fetcher.fetched().len(), 3);
    for job in &outcome.jobs {
        assert!(h.output.join(&job.files[0].path).is_file(), "{job:?}");
    }
    assert_eq!(states(&h.stored().await), [JobState::Downloaded; 3], "the state file agrees");
    // Jobs take 3 s; polls come every 1 to 2 s.
    let took = h.started.elapsed();
    assert!(took >= 3 * SECOND && took <= 6 * SECOND, "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn submissions_go_in_a_burst_then_at_the_rate() {
    let mut rig = Rig::new(5);
    rig.settings.ceilings.submissions_per_minute = Some(60);
    rig.settings.ceilings.burst = Some(2);
    let (outcome, h) = rig.run().await;
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 5);
    let posts = h.posts();
    assert_eq!(posts.len(), 5);
    assert!(posts[1] < SECOND, "the burst goes at once: {posts:?}");
    for pair in posts[1..].windows(2) {
        let gap = gap(pair[1], pair[0]);
        assert!(gap >= Duration::from_millis(900), "one a second after the burst: {posts:?}");
        assert!(gap <= Duration::from_millis(1300), "no slower than the rate: {posts:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_rate_spaces_every_submission() {
    let mut rig = Rig::new(3);
    rig.settings.ceilings.submissions_per_minute = Some(6);
    rig.settings.ceilings.burst = Some(1);
    let (_, h) = rig.run().await;
    let posts = h.posts();
    assert_eq!(posts.len(), 3);
    assert!(gap(posts[1], posts[0]) >= Duration::from_millis(9900), "{posts:?}");
    assert!(gap(posts[2], posts[1]) >= Duration::from_millis(9900), "{posts:?}");
    assert!(posts[2] <= 21 * SECOND, "{posts:?}");
}

#[tokio::test(start_paused = true)]
async fn the_in_flight_cap_holds_submissions_back() {
    let mut rig = Rig::new(5);
    rig.settings.ceilings.max_in_flight = Some(2);
    rig.krea.job_duration = 10 * SECOND;
    let (outcome, h) = rig.run().await;
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 5);
    assert_eq!(h.krea.seen(|seen| seen.max_running), 2, "never more than the cap at Krea");
    let posts = h.posts();
    assert!(posts[2] >= 10 * SECOND, "the third waits for a job to end: {posts:?}");
    assert!(posts[4] >= 20 * SECOND, "{posts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_429_lowers_the_cap_to_what_krea_accepts() {
    let mut rig = Rig::new(6);
    rig.krea.concurrency = Some(2);
    rig.krea.job_duration = 10 * SECOND;
    let (outcome, mut h) = rig.run().await;
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 6);
    let refused = h.krea.seen(|seen| {
        seen.posts.iter().filter(|(_, answer)| answer.starts_with("RateLimited")).count()
    });
    // The cap drops to 2 at the first 429 and probes upwards only after two rounds accepted.
    assert!((1..=2).contains(&refused), "{refused} 429s, not one per job");
    assert_eq!(h.posts().len(), 6 + refused);
    assert_eq!(h.status.borrow_and_update().rate_limited_total, refused as u64);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let rig = Rig::new(1);
    rig.krea.script([Post::RateLimited(Some(7 * SECOND))]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded]);
    let posts = h.posts();
    assert_eq!(posts.len(), 2);
    let wait = gap(posts[1], posts[0]);
    assert!(wait >= 7 * SECOND && wait <= 8 * SECOND, "{wait:?}");
}

#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_and_nothing_in_flight_backs_off_and_grows() {
    let rig = Rig::new(1);
    rig.krea.script([Post::RateLimited(None), Post::RateLimited(None)]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded]);
    let posts = h.posts();
    assert_eq!(posts.len(), 3);
    // rate_limit_backoff 2 s with ±25 % jitter, then three times that.
    let first = gap(posts[1], posts[0]);
    let second = gap(posts[2], posts[1]);
    assert!(first >= Duration::from_millis(1500) && first <= Duration::from_millis(2700));
    assert!(second >= Duration::from_millis(4500) && second <= Duration::from_millis(7700));
}

#[tokio::test(start_paused = true)]
async fn a_402_stops_a_run_and_finishes_what_is_in_flight() {
    let mut rig = Rig::new(4);
    // One POST at a time, so what is in flight at the 402 is exactly the job accepted before.
    rig.settings.ceilings.submission_concurrency = Some(1);
    rig.krea.script([Post::Accept, Post::PaymentRequired]);
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, Some(StopReason::PaymentRequired));
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 1, "the job in flight is finished");
    assert_eq!(count(&outcome.jobs, JobState::Pending), 3);
    assert_eq!(h.posts().len(), 2, "nothing is sent after the 402");
}

/// With several POSTs on the wire (K chosen by the controller), what was sent before the 402's
/// answer arrived is answered as Krea answers it; nothing is sent after it.
#[tokio::test(start_paused = true)]
async fn after_a_402_no_post_starts_even_with_several_on_the_wire() {
    let rig = Rig::new(8);
    rig.krea.script([Post::Accept, Post::Accept, Post::Accept, Post::PaymentRequired]);
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, Some(StopReason::PaymentRequired));
    let posts = h.krea.seen(|seen| seen.posts.clone());
    let refused_at = posts
        .iter()
        .find(|(_, answer)| answer == "PaymentRequired")
        .map(|(at, _)| *at)
        .expect("the 402");
    // The fake answers each POST 100 ms after it arrives.
    let answered_at = refused_at + Duration::from_millis(100);
    assert!(h.krea.seen(|seen| seen.max_posts_on_wire) > 1, "several on the wire: {posts:?}");
    assert!(posts.iter().all(|(at, _)| *at < answered_at), "a POST after the 402: {posts:?}");
    let accepted = posts.iter().filter(|(_, answer)| answer == "Accept").count();
    assert!(accepted >= 3, "{posts:?}");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), accepted, "what Krea took is finished");
}

#[tokio::test(start_paused = true)]
async fn a_402_pauses_the_service_which_probes_periodically() {
    let mut rig = Rig::new(2);
    rig.settings.kind = RunKind::Service { probe_every: Duration::from_mins(1) };
    rig.krea.script([Post::PaymentRequired, Post::PaymentRequired]);
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.paused == Some(StopReason::PaymentRequired)).await;
    h.until(|status| status.counts.completed == 2).await;
    let posts = h.posts();
    assert_eq!(posts.len(), 4, "two 402s, then both jobs: {posts:?}");
    for pair in posts[..3].windows(2) {
        let gap = gap(pair[1], pair[0]);
        assert!(gap >= Duration::from_mins(1) && gap <= Duration::from_secs(61), "{posts:?}");
    }
    assert!(gap(posts[3], posts[2]) < SECOND, "the accepted probe resumes submitting");
    assert_eq!(h.status.borrow().paused, None);
    assert!(!running.is_finished(), "the service waits for more jobs");
    h.controls.drain.cancel();
    let outcome = running.await.expect("the task").expect("the run");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 2);
}

#[tokio::test(start_paused = true)]
async fn a_plan_402_fails_that_models_jobs_with_kreas_message_and_the_others_go_on() {
    let rig = Rig::of(
        "jobs:\n  - prompt: a fox\n    model: video/kling/kling-2.5\n    count: 3\n  \
         - prompt: a cat\n    model: bfl/flux-1-dev\n    count: 3\n",
    );
    let mut rig = rig;
    rig.krea.plan_required = vec!["video/kling/kling-2.5".into()];
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, None, "a plan-402 is not an empty balance");
    for job in &outcome.jobs {
        if job.model == "video/kling/kling-2.5" {
            assert_eq!(job.state, JobState::Failed, "{}", job.name);
            let error = job.error.as_deref().unwrap_or_default();
            assert!(error.contains(super::doubles::PLAN_REQUIRED), "Krea's text is shown: {error}");
        } else {
            assert_eq!(job.state, JobState::Downloaded, "{}", job.name);
        }
    }
    let plan_posts = h
        .krea
        .seen(|seen| seen.posts.iter().filter(|(_, answer)| answer == "PlanRequired").count());
    assert_eq!(plan_posts, 1, "the model's other jobs are failed without a POST each");
    assert_eq!(h.status.borrow().payment_required_total, 0);
}

#[tokio::test(start_paused = true)]
async fn a_probe_command_resumes_the_paused_service_at_once() {
    let mut rig = Rig::new(1);
    rig.settings.kind = RunKind::Service { probe_every: Duration::from_hours(1) };
    rig.krea.script([Post::PaymentRequired]);
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.paused.is_some()).await;
    tokio::time::sleep(10 * SECOND).await;
    assert_eq!(h.posts().len(), 1, "no probe before it is due");
    // Why and since when are in the state file for `krea-batch status`: the 402 was answered
    // after `post_latency` (100 ms) on a clock started at 2026-01-01T00:00:00Z.
    let pause: Pause = serde_json::from_str(&h.pause_written().await).expect("the pause as JSON");
    assert_eq!(pause.reason, StopReason::PaymentRequired);
    let since = pause.since_ms - TestClock::new().now_ms();
    assert!((100..1000).contains(&since), "paused at the 402's answer: {pause:?}");
    assert_eq!(pause.until_ms, None);
    assert_eq!(pause.message, "scripted", "Krea's message is kept");
    h.commands.send(EngineCommand::Probe).expect("the engine listens");
    h.until(|status| status.counts.completed == 1).await;
    assert_eq!(h.pause_written().await, "", "a resumed service clears it");
    let posts = h.posts();
    assert_eq!(posts.len(), 2);
    assert!(posts[1] >= 10 * SECOND && posts[1] < 11 * SECOND, "{posts:?}");
    h.controls.drain.cancel();
    running.await.expect("the task").expect("the run");
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_submitting_before_it_is_exceeded() {
    let mut rig = Rig::new(5);
    rig.settings.budget = Some(Budget { max_usd: Some(0.25), per_day_usd: None });
    for job in &mut rig.jobs {
        job.price_usd = Some(0.1);
    }
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, Some(StopReason::BudgetReached));
    assert_eq!(h.posts().len(), 2, "0.3 would exceed 0.25");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 2);
    assert_eq!(count(&outcome.jobs, JobState::Pending), 3);
}

#[tokio::test(start_paused = true)]
async fn a_daily_budget_stops_a_run_as_a_daily_stop() {
    let mut rig = Rig::new(3);
    rig.settings.budget = Some(Budget { max_usd: None, per_day_usd: Some(0.15) });
    for job in &mut rig.jobs {
        job.price_usd = Some(0.1);
    }
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, Some(StopReason::DailyBudgetReached));
    assert_eq!(h.posts().len(), 1, "0.2 would exceed 0.15 today");
}

#[tokio::test(start_paused = true)]
async fn a_daily_budget_pauses_the_service_until_midnight_utc() {
    let mut rig = Rig::new(2);
    rig.settings.kind = RunKind::Service { probe_every: Duration::from_mins(1) };
    rig.settings.budget = Some(Budget { max_usd: None, per_day_usd: Some(0.15) });
    for job in &mut rig.jobs {
        job.price_usd = Some(0.1);
    }
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.paused == Some(StopReason::DailyBudgetReached)).await;
    let pause = h.status.borrow().pause.clone().expect("the pause is published");
    let next_midnight = TestClock::new().now_ms() + 86_400_000;
    assert_eq!(pause.until_ms, Some(next_midnight), "until midnight UTC: {pause:?}");
    assert!(pause.message.contains("daily budget"), "{pause:?}");
    h.until(|status| status.counts.completed == 2).await;
    let posts = h.posts();
    assert_eq!(posts.len(), 2);
    // The test clock starts at midnight UTC: the second job waits for the next day.
    let day = Duration::from_hours(24);
    assert!(posts[1] >= day && posts[1] <= day + SECOND, "{posts:?}");
    h.controls.drain.cancel();
    running.await.expect("the task").expect("the run");
}

#[tokio::test(start_paused = true)]
async fn reconciliation_waits_for_reconcile_after_and_holds_submissions() {
    let rig = Rig::new(2);
    rig.krea.script([Post::DroppedButCreated]);
    let (_, h) = rig.run().await;
    let (posts, lists) = (h.posts(), h.lists());
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert!(gap(lists[0], posts[0]) >= 10 * SECOND, "not before reconcile_after: {lists:?}");
    assert!(gap(lists[0], posts[0]) <= 11 * SECOND, "{lists:?}");
    assert!(posts[1] > lists[0], "nothing is sent while a job is unknown: {posts:?}");
}

#[tokio::test(start_paused = true)]
async fn reconciliation_adopts_a_job_whose_answer_was_lost() {
    let rig = Rig::new(2);
    rig.krea.script([Post::DroppedButCreated]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 2]);
    assert_eq!(h.posts().len(), 2, "the lost one is adopted, not paid again");
    assert_eq!(h.krea.jobs().len(), 2);
    let adopted = &outcome.jobs[0];
    assert_eq!(adopted.remote_id.as_deref(), Some(h.krea.jobs()[0].id.as_str()));
}

#[tokio::test(start_paused = true)]
async fn a_500_that_created_nothing_is_sent_again_after_its_backoff() {
    let rig = Rig::new(1);
    rig.krea.script([Post::ServerError]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded]);
    let (posts, lists) = (h.posts(), h.lists());
    assert_eq!(posts.len(), 2);
    assert_eq!(h.krea.jobs().len(), 1, "paid once");
    assert_eq!(lists.len(), 1);
    // Its own back-off: rate_limit_backoff (2 s) for the first unanswered attempt.
    assert!(gap(posts[1], lists[0]) >= 2 * SECOND, "{posts:?} {lists:?}");
    assert!(gap(posts[1], lists[0]) <= 3 * SECOND, "{posts:?} {lists:?}");
}

#[tokio::test(start_paused = true)]
async fn a_post_without_an_answer_that_created_nothing_is_sent_again() {
    let rig = Rig::new(1);
    rig.krea.script([Post::DroppedNothingCreated]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded]);
    assert_eq!(h.posts().len(), 2);
    assert_eq!(h.lists().len(), 1, "sent again only once shown not to exist");
    assert_eq!(h.krea.jobs().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_listing_sets_the_job_aside_unknown() {
    let rig = Rig::new(1);
    rig.krea.script([Post::DroppedCreatedTwice]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Unknown], "never sent again");
    assert_eq!(h.posts().len(), 1);
    let error = outcome.jobs[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("cannot be told"), "{error}");
    let stored = h.stored().await;
    assert_eq!(stored[0].error.as_deref(), Some(error), "reported in the state file");
}

#[tokio::test(start_paused = true)]
async fn a_job_fails_after_max_unanswered_posts_that_created_nothing() {
    let rig = Rig::new(1);
    rig.krea.script(vec![Post::ServerError; MAX_UNANSWERED_POSTS]);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Failed]);
    let error = outcome.jobs[0].error.as_deref().unwrap_or_default();
    assert!(error.starts_with("Krea answered 500 to 6 attempts"), "{error}");
    let posts = h.posts();
    assert_eq!(posts.len(), MAX_UNANSWERED_POSTS);
    assert!(h.krea.jobs().is_empty());
    let gaps: Vec<Duration> = posts.windows(2).map(|pair| gap(pair[1], pair[0])).collect();
    assert!(gaps.windows(2).all(|pair| pair[1] > pair[0]), "growing back-offs: {gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_key_stops_a_run_at_once() {
    let rig = Rig::new(3);
    rig.krea.script([Post::Auth]);
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, Some(StopReason::AuthRefused));
    assert_eq!(states(&outcome.jobs), [JobState::Pending; 3]);
    assert_eq!(h.posts().len(), 1);
    assert!(h.started.elapsed() < SECOND, "{:?}", h.started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn ctrl_c_stops_submitting_and_waits_for_jobs_in_flight() {
    let mut rig = Rig::new(3);
    rig.settings.ceilings.submissions_per_minute = Some(6);
    rig.settings.ceilings.burst = Some(1);
    rig.krea.job_duration = 20 * SECOND;
    let stop = rig.controls.stop_submitting.clone();
    tokio::spawn(async move {
        tokio::time::sleep(5 * SECOND).await;
        stop.cancel();
    });
    let (outcome, h) = rig.run().await;
    assert_eq!(outcome.stopped, Some(StopReason::Interrupted));
    assert_eq!(h.posts().len(), 1);
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 1, "the job in flight is finished");
    assert_eq!(count(&outcome.jobs, JobState::Pending), 2);
    assert!(h.started.elapsed() >= 20 * SECOND, "it waited for the job");
}

#[tokio::test(start_paused = true)]
async fn ctrl_c_leaves_an_unknown_job_to_the_next_run() {
    let rig = Rig::new(2);
    rig.krea.script([Post::DroppedButCreated]);
    let stop = rig.controls.stop_submitting.clone();
    tokio::spawn(async move {
        tokio::time::sleep(2 * SECOND).await;
        stop.cancel();
    });
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Unknown, JobState::Pending]);
    assert!(h.lists().is_empty(), "no waiting for reconciliation after Ctrl-C");
    assert!(h.started.elapsed() < 3 * SECOND, "{:?}", h.started.elapsed());
    assert_eq!(states(&h.stored().await), [JobState::Unknown, JobState::Pending]);
}

#[tokio::test(start_paused = true)]
async fn sigterm_drains_the_service_leaving_jobs_running_at_krea() {
    let mut rig = Rig::new(2);
    rig.settings.kind = RunKind::Service { probe_every: Duration::from_mins(1) };
    rig.krea.job_duration = Duration::from_hours(1);
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.counts.in_flight == 2).await;
    tokio::time::sleep(5 * SECOND).await;
    let drained_at = Instant::now();
    h.controls.drain.cancel();
    let outcome = running.await.expect("the task").expect("the run");
    assert!(drained_at.elapsed() < 3 * SECOND, "{:?}", drained_at.elapsed());
    assert_eq!(states(&outcome.jobs), [JobState::Submitted; 2], "polled again at the next start");
    assert!(h.cancels().is_empty(), "nothing is cancelled at Krea");
    assert_eq!(states(&h.stored().await), [JobState::Submitted; 2]);
}

/// Why the service exits within its `drain_time` even with a download under way: the download
/// has `download_grace` (the daemon sets it below the drain time), then stops with its job left
/// download pending. Measured here in virtual time, in place of the daemon integration test's
/// wall-clock bound on its exit.
#[tokio::test(start_paused = true)]
async fn sigterm_stops_a_download_under_way_after_its_grace() {
    let mut rig = Rig::new(1);
    rig.settings.kind = RunKind::Service { probe_every: Duration::from_mins(1) };
    rig.settings.download_grace = 2 * SECOND;
    rig.fetcher.latency = Duration::from_hours(1);
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.counts.download_pending == 1).await;
    tokio::time::sleep(5 * SECOND).await;
    let drained_at = Instant::now();
    h.controls.drain.cancel();
    let outcome = running.await.expect("the task").expect("the run");
    let took = drained_at.elapsed();
    assert!(took >= 2 * SECOND && took < 3 * SECOND, "the grace, then no longer: {took:?}");
    assert_eq!(states(&outcome.jobs), [JobState::Completed], "its download is pending");
    assert!(h.fetcher.fetched().is_empty());
    assert_eq!(states(&h.stored().await), [JobState::Completed]);
}

#[tokio::test(start_paused = true)]
async fn abort_returns_at_once_with_the_state_saved() {
    let mut rig = Rig::new(2);
    rig.krea.job_duration = Duration::from_hours(1);
    rig.fetcher.latency = Duration::from_hours(1);
    let abort = rig.controls.abort.clone();
    tokio::spawn(async move {
        tokio::time::sleep(5 * SECOND).await;
        abort.cancel();
    });
    let (outcome, h) = rig.run().await;
    let took = h.started.elapsed();
    assert!(took >= 5 * SECOND && took < 6 * SECOND, "{took:?}");
    assert_eq!(states(&outcome.jobs), [JobState::Submitted; 2]);
    assert_eq!(states(&h.stored().await), [JobState::Submitted; 2]);
}

#[tokio::test(start_paused = true)]
async fn a_job_past_its_timeout_is_cancelled_at_krea() {
    let mut rig = Rig::new(1);
    rig.settings.job_timeout = 30 * SECOND;
    rig.krea.job_duration = Duration::from_hours(1);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Failed]);
    let error = outcome.jobs[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("job timeout (30s)"), "{error}");
    let cancels = h.cancels();
    assert_eq!(cancels.len(), 1);
    // The next poll after 30 s sends the DELETE: polls come at most 2 s apart.
    assert!(cancels[0] >= 30 * SECOND && cancels[0] <= 33 * SECOND, "{cancels:?}");
    assert!(h.krea.jobs()[0].cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_job_submitted_without_a_remote_id_is_reconciled_and_adopted() {
    let mut rig = Rig::new(1);
    let remote = rig.krea.create_now();
    let now = rig.clock.now_ms();
    let job = &mut rig.jobs[0];
    job.state = JobState::Submitted;
    job.attempts = 1;
    job.attempt_at = Some(now - 200);
    job.attempt_ended = Some(now + 100);
    job.submitted_at = Some(now + 100);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded], "{outcome:?}");
    assert_eq!(outcome.jobs[0].remote_id.as_deref(), Some(remote.as_str()));
    assert!(h.posts().is_empty(), "found at Krea, not paid again");
    assert_eq!(h.lists().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_submitted_without_a_remote_id_that_krea_lacks_is_sent_again() {
    let mut rig = Rig::new(1);
    let now = rig.clock.now_ms();
    let job = &mut rig.jobs[0];
    job.state = JobState::Submitted;
    job.attempts = 1;
    job.attempt_at = Some(now - 200);
    job.submitted_at = Some(now - 100);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded]);
    assert_eq!(h.lists().len(), 1, "looked for first");
    assert_eq!(h.posts().len(), 1);
    assert_eq!(outcome.jobs[0].attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn the_refusing_api_refuses_everything_without_a_key() {
    let api: Arc<dyn KreaApi> = Arc::new(RefusingApi);
    let created = api.create_job("m", "{}").await;
    assert!(matches!(created, Err(ApiError::NotSent(_))), "{created:?}");
    assert!(matches!(api.get_job("j").await, Err(ApiError::NotSent(_))));
    assert!(matches!(api.cancel_job("j").await, Err(ApiError::NotSent(_))));
    assert!(matches!(api.list_jobs(None, 10).await, Err(ApiError::NotSent(_))));
}

#[tokio::test(start_paused = true)]
async fn downloads_only_need_no_api() {
    let mut rig = Rig::new(2);
    for (index, job) in rig.jobs.iter_mut().enumerate() {
        job.state = JobState::Completed;
        job.remote_id = Some(format!("done-{index}"));
        job.urls = vec![format!("https://results.test/done-{index}.png")];
    }
    let fetcher = Arc::new(FakeFetcher::default());
    // As `krea-batch download` builds it: no key, an API that refuses every call.
    let io = EngineIo {
        api: Arc::new(RefusingApi),
        fetcher: Arc::clone(&fetcher) as Arc<dyn ResultFetcher>,
        clock: rig.clock,
        writer: rig.writer,
        claimed_elsewhere: HashSet::new(),
    };
    let (status_tx, _) = tokio::sync::watch::channel(EngineStatus::default());
    let engine = Engine::new(io, rig.jobs, &rig.output_dirs, rig.settings, rig.controls, status_tx);
    let outcome = engine.run().await.expect("the run");
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 2]);
    assert_eq!(fetcher.fetched().len(), 2);
}

/// Settings as a job file without `limits` gives them: no ceilings, everything discovered.
fn discovering(mut rig: Rig) -> Rig {
    rig.settings.ceilings = Ceilings::default();
    rig
}

fn rate_limited(h: &Handles) -> usize {
    h.krea.seen(|seen| seen.posts.iter().filter(|(_, a)| a.starts_with("RateLimited")).count())
}

#[tokio::test(start_paused = true)]
async fn with_no_limits_the_engine_finds_the_capacity_and_keeps_the_account_busy() {
    let mut rig = discovering(Rig::new(100));
    rig.krea.concurrency = Some(8);
    rig.krea.backlog = 20; // Krea would hold a deep backlog: the engine must not use it.
    rig.krea.job_duration = 10 * SECOND;
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.counts.completed == 40).await;
    let midway = h.status.borrow().clone();
    let outcome = running.await.expect("the task").expect("the run");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 100);
    assert_eq!(h.krea.seen(|seen| seen.max_running), 8, "the account ran full");
    let backlog = h.krea.seen(|seen| seen.max_backlogged);
    assert!((1..=2).contains(&backlog), "a shallow backlog, max(2, 25 %) of 8: {backlog}");
    assert_eq!(rate_limited(&h), 0, "the backlog was never filled");
    // The account's bound: 100 jobs × 10 s ÷ 8 at a time, and one job time.
    let bound = (10 * SECOND).mul_f64(100.0 / 8.0) + 10 * SECOND;
    let took = h.started.elapsed();
    assert!(took <= bound.mul_f64(1.15), "{took:?} against a bound of {bound:?}");
    assert_eq!(midway.capacity, Some(8));
    assert!(midway.learned.starts_with("account runs about 8 at a time"), "{}", midway.learned);
    assert_eq!(midway.allowed_in_flight, 10, "the capacity and a backlog of 2");
    // Kept in the state file for `krea-batch status` in another process.
    let kept = h.writer.with_store(|store| store.meta(status::META_LEARNED)).await;
    let kept = kept.expect("the writer").expect("the meta").unwrap_or_default();
    assert!(kept.starts_with("account runs about 8 at a time"), "{kept}");
}

#[tokio::test(start_paused = true)]
async fn with_no_limits_slow_start_ramps_the_window_up() {
    let mut rig = discovering(Rig::new(40));
    rig.krea.job_duration = Duration::from_mins(1);
    let (_, h) = rig.run().await;
    let posts = h.posts();
    // One POST at a time, 100 ms each: a window of 2, then 4, 8, 16, 32, each opened as soon
    // as the one before was answered running; nothing waits for a job to end.
    assert_eq!(posts.len(), 40);
    assert!(posts[31] < 4 * SECOND, "the window doubled to 32 at once: {posts:?}");
    assert!(posts[32] < 5 * SECOND, "and to 64: {posts:?}");
    assert_eq!(rate_limited(&h), 0);
}

#[tokio::test(start_paused = true)]
async fn a_max_in_flight_ceiling_is_never_exceeded() {
    let mut rig = discovering(Rig::new(20));
    rig.settings.ceilings.max_in_flight = Some(3);
    rig.krea.concurrency = Some(8);
    rig.krea.backlog = 20;
    rig.krea.job_duration = 5 * SECOND;
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.counts.completed >= 10).await;
    assert_eq!(h.status.borrow().allowed_in_flight, 3);
    let outcome = running.await.expect("the task").expect("the run");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 20);
    assert_eq!(h.krea.seen(|seen| seen.max_held), 3, "up to the ceiling, never above");
}

#[tokio::test(start_paused = true)]
async fn a_request_rate_429_lowers_the_pace_below_the_limit() {
    let mut rig = discovering(Rig::new(60));
    // At most 5 POSTs a second; one at a time at 100 ms each would send 10.
    rig.krea.rate_limit = Some((5, SECOND));
    rig.krea.job_duration = 2 * SECOND;
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.rate_limited_total == 1).await;
    h.until(|status| status.counts.completed >= 5).await;
    let pace = h.status.borrow().pace_per_second.expect("a pace was learned");
    assert!(pace < 5.0, "below the limit: {pace}");
    let outcome = running.await.expect("the task").expect("the run");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 60);
    let limited = rate_limited(&h);
    assert!((1..=2).contains(&limited), "one 429 taught the pace, not one per second: {limited}");
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_429_caps_what_is_in_flight_without_slowing_the_pace() {
    let mut rig = discovering(Rig::new(12));
    rig.krea.concurrency = Some(3);
    rig.krea.job_duration = 5 * SECOND;
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.rate_limited_total == 1).await;
    h.until(|status| status.counts.completed >= 3).await;
    let status = h.status.borrow().clone();
    assert_eq!(status.pace_per_second, None, "a concurrency 429 says nothing of the rate");
    assert_eq!(status.allowed_in_flight, 3, "held at what Krea held");
    let outcome = running.await.expect("the task").expect("the run");
    assert_eq!(count(&outcome.jobs, JobState::Downloaded), 12);
    assert_eq!(rate_limited(&h), 1, "one 429 taught the window");
}

#[tokio::test(start_paused = true)]
async fn a_reconfigure_keeps_what_was_learned_and_applies_new_ceilings() {
    let mut rig = discovering(Rig::new(40));
    rig.settings.kind = RunKind::Service { probe_every: Duration::from_mins(1) };
    rig.krea.concurrency = Some(4);
    rig.krea.backlog = 20;
    rig.krea.job_duration = 5 * SECOND;
    let mut reloaded = rig.settings.clone();
    reloaded.ceilings.max_in_flight = Some(2);
    let (engine, mut h) = rig.engine();
    let running = tokio::spawn(engine.run());
    h.until(|status| status.capacity == Some(4)).await;
    h.commands.send(EngineCommand::Reconfigure(Box::new(reloaded))).expect("the engine listens");
    h.until(|status| status.allowed_in_flight == 2).await;
    assert_eq!(h.status.borrow().capacity, Some(4), "the account is not learned again");
    h.until(|status| status.counts.completed == 40).await;
    h.controls.drain.cancel();
    running.await.expect("the task").expect("the run");
}

// --- Cancels Krea refuses (`cancel.rs`) -------------------------------------------------------

/// The engine's log as a user reads it (plain text, info and above), captured on this test's
/// thread (the paused-time runtime runs the engine's tasks there too).
struct Logs {
    text: Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    fn capture() -> Self {
        let text = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&text);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .with_ansi(false)
            .with_target(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        Self { text, _guard: tracing::subscriber::set_default(subscriber) }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().expect("the log")).into_owned()
    }
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("the log").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one job to its end, asking the engine to cancel it `after` the start.
async fn cancel_after(rig: Rig, after: Duration) -> (EngineOutcome, Handles) {
    let id = rig.jobs[0].id;
    let (engine, h) = rig.engine();
    let running = tokio::spawn(engine.run());
    tokio::time::sleep(after).await;
    h.commands.send(EngineCommand::Cancel(vec![id])).expect("the engine listens");
    let outcome = running.await.expect("the engine's task").expect("the engine's run");
    (outcome, h)
}

#[tokio::test(start_paused = true)]
async fn a_cancel_refused_in_the_backlog_is_said_and_sent_again_once_the_job_is_queued() {
    let logs = Logs::capture();
    let mut rig = Rig::new(1);
    rig.krea.cancel_refusals.backlog = 20 * SECOND;
    rig.krea.job_duration = 40 * SECOND;
    let (outcome, h) = cancel_after(rig, 2 * SECOND).await;
    assert_eq!(states(&outcome.jobs), [JobState::Cancelled]);
    assert!(h.krea.jobs()[0].cancelled, "cancelled at Krea, so not billed");
    let log = logs.text();
    let said = "Krea refused to cancel the job now: Job cannot be cancelled in state backlogged";
    assert_eq!(log.matches(said).count(), 1, "said once, with Krea's reason:\n{log}");
    // Asked at once (refused), then not again until Krea shows it queued, 20 s after creation.
    let cancels = h.cancels();
    assert_eq!(cancels.len(), 2, "{cancels:?}");
    assert!(cancels[0] < 3 * SECOND, "{cancels:?}");
    assert!(cancels[1] >= 20 * SECOND && cancels[1] <= 23 * SECOND, "{cancels:?}");
    assert!(outcome.cancels_refused.is_empty(), "carried out in the end");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_refused_while_sampling_ends_billed_and_in_the_summary() {
    let logs = Logs::capture();
    let mut rig = Rig::new(1);
    rig.krea.cancel_refusals.sampling = true;
    rig.krea.job_duration = 8 * SECOND;
    let name = rig.jobs[0].name.clone();
    // Sampling from 6 s to 8 s: asked in the middle of it.
    let (outcome, h) = cancel_after(rig, 7 * SECOND).await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded], "it ran to its end");
    assert!(!h.krea.jobs()[0].cancelled);
    assert_eq!(h.cancels().len(), 1, "not asked again: sampling goes straight to the end");
    let reason = "Job cannot be cancelled in state sampling".to_owned();
    assert_eq!(
        outcome.cancels_refused,
        [RefusedCancel { job: name.clone(), reason: reason.clone(), after_timeout: false }]
    );
    let log = logs.text();
    assert!(log.contains(&format!("Krea refused to cancel the job now: {reason}")), "{log}");
    assert!(log.contains("completed and billed although it was to be cancelled"), "{log}");
    let mut summary = crate::report::Summary::of(&outcome.jobs, None, &h.output, SECOND);
    summary.cancels_refused = outcome.cancels_refused;
    let summary = summary.to_string();
    assert!(summary.contains("1 cancel refused by Krea: this job ran and was billed"), "{summary}");
    assert!(summary.contains(&format!("  {name}: {reason}")), "{summary}");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_cancel_refused_in_the_backlog_is_said_and_sent_again() {
    let logs = Logs::capture();
    let mut rig = Rig::new(1);
    rig.settings.job_timeout = 5 * SECOND;
    rig.krea.cancel_refusals.backlog = 20 * SECOND;
    rig.krea.job_duration = 40 * SECOND;
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Failed]);
    let error = outcome.jobs[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("job timeout (5s)"), "{error}");
    let log = logs.text();
    let said = "the job timeout passed, but Krea refused to cancel the job: Job cannot be \
                cancelled in state backlogged";
    assert!(log.contains(said), "{log}");
    let cancels = h.cancels();
    assert_eq!(cancels.len(), 2, "{cancels:?}");
    assert!(cancels[1] >= 20 * SECOND, "sent again once queued: {cancels:?}");
    assert!(h.krea.jobs()[0].cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_job_cancelled_while_its_post_is_on_the_wire_is_cancelled_once_krea_names_it() {
    let logs = Logs::capture();
    let mut rig = Rig::new(1);
    rig.krea.post_latency = 5 * SECOND;
    rig.krea.job_duration = 40 * SECOND;
    let (outcome, h) = cancel_after(rig, SECOND).await;
    assert_eq!(states(&outcome.jobs), [JobState::Cancelled]);
    assert!(h.krea.jobs()[0].cancelled, "cancelled at Krea, not billed");
    let cancels = h.cancels();
    assert_eq!(cancels.len(), 1);
    assert!(cancels[0] >= 5 * SECOND && cancels[0] < 6 * SECOND, "once answered: {cancels:?}");
    let log = logs.text();
    assert!(log.contains("cancelled as soon as Krea's answer is known"), "{log}");
    assert!(
        !log.contains("submitting") && !log.contains("state="),
        "no internal state names:\n{log}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_not_carried_out_when_the_run_stops_is_handed_back_for_the_next_run() {
    let mut rig = Rig::new(2);
    rig.krea.cancel_refusals.backlog = 60 * SECOND;
    rig.krea.job_duration = 60 * SECOND;
    let ids: Vec<i64> = rig.jobs.iter().map(|job| job.id).collect();
    let (engine, h) = rig.engine();
    let running = tokio::spawn(engine.run());
    tokio::time::sleep(2 * SECOND).await;
    h.commands.send(EngineCommand::Cancel(vec![ids[0]])).expect("the engine listens");
    tokio::time::sleep(3 * SECOND).await;
    h.controls.abort.cancel();
    let outcome = running.await.expect("the engine's task").expect("the engine's run");
    assert_eq!(h.cancels().len(), 1, "asked once, refused: the job is backlogged");
    assert_eq!(states(&outcome.jobs), [JobState::Submitted; 2]);
    assert_eq!(outcome.cancels_left, [ids[0]], "only the job the user asked to cancel");
}

// --- Several POSTs on the wire (`submission_concurrency`)--------------------------------

/// Gives each job a prompt of its own ("fox <i>"), so the fake's record of which prompt
/// created which job shows whether results went to the right job.
fn distinct_prompts(rig: &mut Rig) {
    for (index, job) in rig.jobs.iter_mut().enumerate() {
        job.body = Arc::from(format!(r#"{{"prompt":"fox {index}"}}"#));
    }
}

/// `n` jobs with prompts of their own, up to `k` POSTs on the wire, the first POSTs answered
/// as `script` says.
fn on_the_wire(n: usize, k: u32, script: impl IntoIterator<Item = Post>) -> Rig {
    let mut rig = Rig::new(n);
    distinct_prompts(&mut rig);
    rig.fixed_posts = Some(k);
    rig.krea.script(script);
    rig
}

fn prompt_of(job: &JobRecord) -> String {
    let body: serde_json::Value = serde_json::from_str(&job.body).expect("a JSON body");
    body["prompt"].as_str().expect("a prompt").to_owned()
}

/// No prompt created two jobs at the fake Krea, and every job holding a Krea id holds one its
/// own prompt created.
fn assert_exactly_once_and_attributed(jobs: &[JobRecord], krea: &FakeKrea) {
    let created = krea.jobs();
    let mut prompts: Vec<&str> = created.iter().filter_map(|job| job.prompt.as_deref()).collect();
    let total = prompts.len();
    prompts.sort_unstable();
    prompts.dedup();
    assert_eq!(prompts.len(), total, "a prompt created two jobs: {created:?}");
    for job in jobs {
        let Some(id) = &job.remote_id else { continue };
        let at_krea = created.iter().find(|made| &made.id == id).expect("a job Krea made");
        assert_eq!(
            at_krea.prompt.as_deref(),
            Some(prompt_of(job).as_str()),
            "{} holds {id}",
            job.name
        );
    }
}

/// POST spans (sent, answered) from the start of the test, in send order.
fn spans(h: &Handles) -> Vec<(Duration, Duration)> {
    let mut spans: Vec<(Duration, Duration)> = h.krea.seen(|seen| {
        seen.post_spans
            .iter()
            .map(|(sent, answered)| {
                (sent.duration_since(h.started), answered.duration_since(h.started))
            })
            .collect()
    });
    spans.sort();
    spans
}

fn overlaps(a: (Duration, Duration), b: (Duration, Duration)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[tokio::test(start_paused = true)]
async fn k_posts_go_on_the_wire_at_once() {
    let mut rig = Rig::new(8);
    distinct_prompts(&mut rig);
    rig.fixed_posts = Some(4);
    rig.krea.post_latency = SECOND;
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 8]);
    assert_eq!(h.krea.seen(|seen| seen.max_posts_on_wire), 4, "never more than K, and K reached");
    let spans = spans(&h);
    assert_eq!(spans.len(), 8);
    assert!(spans[3].0 < spans[0].1, "four sent before the first answer: {spans:?}");
    assert!(spans[4].0 >= spans[0].1, "the fifth waits for an answer: {spans:?}");
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn one_unanswered_post_narrows_submissions_to_one_until_krea_answers_again() {
    let run = super::submit::NARROWED_RUN as usize;
    let jobs = run + 5;
    let (outcome, h) =
        on_the_wire(jobs, 3, [Post::Accept, Post::DroppedNothingCreated, Post::Accept]).run().await;
    assert_eq!(states(&outcome.jobs), vec![JobState::Downloaded; jobs]);
    let (spans, lists) = (spans(&h), h.lists());
    assert_eq!(lists.len(), 1, "{lists:?}");
    assert_eq!(h.krea.seen(|seen| seen.max_posts_on_wire), 3);
    let lost_at = spans[1].1;
    assert!(
        spans.iter().all(|span| span.0 <= lost_at || span.0 >= lists[0]),
        "nothing sent while the job is unknown: {spans:?} {lists:?}"
    );
    // After reconciliation POSTs go alone until Krea has accepted a run of them; then several
    // go at once again.
    let after: Vec<(Duration, Duration)> =
        spans.iter().copied().filter(|s| s.0 >= lists[0]).collect();
    assert_eq!(after.len(), jobs - 2, "{spans:?}");
    for (i, alone) in after[..run].iter().enumerate() {
        let others = after.iter().enumerate().filter(|&(j, _)| j != i);
        assert!(others.clone().all(|(_, other)| !overlaps(*alone, *other)), "{after:?}");
    }
    assert!(after[run..].windows(2).any(|pair| overlaps(pair[0], pair[1])), "widened: {after:?}");
    assert_eq!(h.krea.jobs().len(), jobs);
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn two_lost_answers_on_the_wire_together_go_to_unattributed_and_are_not_sent_again() {
    let (outcome, h) =
        on_the_wire(3, 2, [Post::DroppedButCreated, Post::DroppedButCreated]).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Unknown, JobState::Unknown, JobState::Downloaded]);
    assert_eq!(h.posts().len(), 3, "neither lost one is sent again");
    let created = h.krea.jobs();
    assert_eq!(created.len(), 3, "paid once each");
    let names = [outcome.jobs[0].name.as_str(), outcome.jobs[1].name.as_str()];
    for made in &created[..2] {
        let file = h.output.join("unattributed").join(format!("{}-1.png", made.id));
        assert!(file.is_file(), "{} is downloaded to unattributed/", made.id);
        let sidecar: serde_json::Value = serde_json::from_slice(
            &std::fs::read(file.with_extension("png.json")).expect("its sidecar"),
        )
        .expect("JSON");
        assert_eq!(sidecar["krea_job_id"], made.id.as_str());
        assert_eq!(sidecar["unattributed"], true);
        let mut candidates: Vec<&str> = sidecar["candidates"]
            .as_array()
            .expect("candidates")
            .iter()
            .map(|c| c["name"].as_str().expect("a name"))
            .collect();
        candidates.sort_unstable();
        let mut expected = names;
        expected.sort_unstable();
        assert_eq!(candidates, expected, "both candidates named");
    }
    let stored = h.stored().await;
    for job in &stored[..2] {
        let error = job.error.as_deref().unwrap_or_default();
        assert!(error.contains("unattributed/"), "reported in the state file: {error}");
        assert!(error.contains(&created[0].id) && error.contains(&created[1].id), "{error}");
        assert_eq!(job.remote_id, None, "attributed to neither");
    }
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn one_lost_answer_among_posts_on_the_wire_is_attributed() {
    let (outcome, h) =
        on_the_wire(3, 3, [Post::Accept, Post::DroppedButCreated, Post::Accept]).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 3]);
    assert_eq!(h.posts().len(), 3, "the lost one is adopted, not paid again");
    assert_eq!(h.lists().len(), 1);
    assert!(!h.output.join("unattributed").exists());
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_that_created_nothing_is_sent_again_only_after_the_listing() {
    let (outcome, h) = on_the_wire(4, 4, [Post::Accept, Post::DroppedNothingCreated]).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 4]);
    let (spans, lists) = (spans(&h), h.lists());
    assert_eq!(spans.len(), 5, "four, and the lost one once more");
    assert_eq!(lists.len(), 1);
    assert!(spans[4].0 > lists[0], "sent again only once shown not to exist: {spans:?}");
    assert_eq!(h.krea.jobs().len(), 4);
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

/// A state file left by a run killed with three POSTs on the wire: three jobs `submitting`
/// (the store hands them over as they were), a fourth pending.
fn killed_with_three_posts_on_the_wire(rig: &mut Rig) {
    distinct_prompts(rig);
    rig.fixed_posts = Some(4);
    let now = rig.clock.now_ms();
    for (index, job) in rig.jobs.iter_mut().take(3).enumerate() {
        job.state = JobState::Submitting;
        job.attempts = 1;
        job.attempt_at = Some(now - 300 + 10 * i64::try_from(index).expect("small"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_with_several_attempts_submitting_pays_nothing_twice() {
    let mut rig = Rig::new(4);
    killed_with_three_posts_on_the_wire(&mut rig);
    // Two of the three POSTs reached Krea before the kill.
    rig.krea.create_now();
    rig.krea.create_now();
    let (outcome, h) = rig.run().await;
    let states = states(&outcome.jobs);
    assert_eq!(
        states,
        [JobState::Unknown, JobState::Unknown, JobState::Unknown, JobState::Downloaded]
    );
    assert_eq!(h.posts().len(), 1, "only the pending job is sent");
    assert!(h.posts()[0] > h.lists()[0], "after reconciliation");
    assert_eq!(h.krea.jobs().len(), 3);
    for made in &h.krea.jobs()[..2] {
        let file = h.output.join("unattributed").join(format!("{}-1.png", made.id));
        assert!(file.is_file(), "{} still reaches the user", made.id);
    }
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn a_restart_with_several_attempts_that_created_nothing_sends_each_once() {
    let mut rig = Rig::new(4);
    killed_with_three_posts_on_the_wire(&mut rig);
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 4]);
    let (posts, lists) = (h.posts(), h.lists());
    assert_eq!(lists.len(), 1);
    assert_eq!(posts.len(), 4, "one POST per job");
    assert!(posts.iter().all(|&post| post > lists[0]), "{posts:?} {lists:?}");
    assert_eq!(h.krea.jobs().len(), 4);
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn refusals_429_of_posts_on_the_wire_together_back_off_once() {
    let (outcome, h) = on_the_wire(3, 3, vec![Post::RateLimited(None); 3]).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 3]);
    let posts = h.posts();
    assert_eq!(posts.len(), 6, "{posts:?}");
    // One refusal of a full account, not three growing back-offs (2 s, then 6 s, then 18 s):
    // the three go again together after the one back-off (the controller's first, 2 s).
    assert!(posts[3] < 3 * SECOND, "one back-off, not a grown one: {posts:?}");
    assert!(gap(posts[5], posts[3]) < SECOND, "sent again together: {posts:?}");
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

#[tokio::test(start_paused = true)]
async fn a_job_set_aside_is_never_taken_for_a_later_lost_answers() {
    // Two POSTs on the wire lose their answers, one of them having created a job: it cannot be
    // told whose, so it is set aside. Then a third POST loses its answer having created
    // nothing; with no earlier POST to bound Krea's clock its window is wide and holds the job
    // set aside, which must not be adopted for it.
    let script =
        [Post::DroppedButCreated, Post::DroppedNothingCreated, Post::DroppedNothingCreated];
    let (outcome, h) = on_the_wire(3, 2, script).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Unknown, JobState::Unknown, JobState::Downloaded]);
    assert_eq!(h.lists().len(), 2);
    assert_eq!(h.krea.jobs().len(), 2, "the set-aside job and the third job's, once");
    let set_aside = &h.krea.jobs()[0];
    assert!(h.output.join("unattributed").join(format!("{}-1.png", set_aside.id)).is_file());
    assert_exactly_once_and_attributed(&outcome.jobs, &h.krea);
}

/// Three jobs, each a chain of three stages: generate, enhance, animate.
const CHAINS: &str = "model: bfl/flux-1-dev
jobs:
  - {name: castle, prompt: a castle, then: &stages [{model: enhance/topaz/standard-enhance, params: {model: Standard V2}}, {model: video/kling/kling-2.5, prompt: push in}]}
  - {name: fox, prompt: a fox, then: *stages}
  - {name: owl, prompt: an owl, then: *stages}
";

fn named<'a>(jobs: &'a [JobRecord], name: &str) -> &'a JobRecord {
    jobs.iter().find(|job| job.name == name).unwrap_or_else(|| panic!("no job {name}"))
}

#[tokio::test(start_paused = true)]
async fn each_stage_of_each_chain_runs_once_fed_its_parent_result() {
    let (outcome, h) = Rig::of(CHAINS).run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 9], "{:#?}", outcome.jobs);
    let bodies = h.krea.seen(|seen| seen.bodies.clone());
    assert_eq!(bodies.len(), 9, "one POST per stage of each job");
    let stored = h.stored().await;
    for base in ["castle", "fox", "owl"] {
        let generated = named(&stored, &format!("{base}/0-flux-1-dev"));
        let enhanced = named(&stored, &format!("{base}/1-standard-enhance"));
        let animated = named(&stored, &format!("{base}/2-kling-2.5"));
        assert_eq!(enhanced.parent_id, Some(generated.id));
        assert_eq!(animated.parent_id, Some(enhanced.id));
        let enhance_body: serde_json::Value = serde_json::from_str(&enhanced.body).expect("json");
        assert_eq!(enhance_body["image_url"], generated.urls[0].as_str());
        // The size comes from the downloaded file's header (the fetcher writes 32×32).
        assert_eq!(
            (enhance_body["width"].as_u64(), enhance_body["height"].as_u64()),
            (Some(32), Some(32))
        );
        let video_body: serde_json::Value = serde_json::from_str(&animated.body).expect("json");
        assert_eq!(video_body["start_image"], enhanced.urls[0].as_str());
        assert_eq!(video_body["prompt"], "push in");
        // Each stage starts once its own input is on disk, not when the batch's stage ends.
        assert!(h.output.join(&animated.files[0].path).is_file());
        assert_eq!(animated.files[0].path, format!("{base}/2-kling-2.5.png"));
        let posted = bodies.iter().filter(|(_, body)| body == &*enhanced.body).count();
        assert_eq!(posted, 1, "the enhance stage of {base} was sent once");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_stage_fails_only_the_later_stages_of_its_own_job() {
    let mut rig = Rig::of(&CHAINS.replace("a fox", "a fox REFUSE"));
    rig.krea.refuse_prompt = Some("REFUSE".into());
    let (outcome, h) = rig.run().await;
    let fox_later = ["fox/1-standard-enhance", "fox/2-kling-2.5"];
    for job in &outcome.jobs {
        let expected =
            if job.name.starts_with("fox/") { JobState::Failed } else { JobState::Downloaded };
        assert_eq!(job.state, expected, "{job:?}");
    }
    assert_eq!(outcome.jobs.len(), 9, "the fox's later stages are recorded, as failed");
    let enhance = named(&outcome.jobs, fox_later[0]);
    let reason = enhance.error.as_deref().unwrap_or_default();
    assert!(reason.contains("fox/0-flux-1-dev") && reason.contains("failed"), "{reason}");
    let animate = named(&outcome.jobs, fox_later[1]);
    assert!(animate.error.as_deref().unwrap_or_default().contains(fox_later[0]));
    assert_eq!(h.krea.seen(|seen| seen.bodies.len()), 7, "nothing sent for the fox's later stages");
}

#[tokio::test(start_paused = true)]
async fn a_stage_fans_out_over_several_results_of_its_input() {
    let mut rig = Rig::of(
        "model: bfl/flux-1-dev\njobs:\n  - {name: castle, prompt: a castle, then: [{model: enhance/topaz/standard-enhance}, {model: video/kling/kling-2.5}]}\n",
    );
    rig.krea.outputs = 2;
    let (outcome, h) = rig.run().await;
    let mut names: Vec<&str> = outcome.jobs.iter().map(|job| job.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "castle/0-flux-1-dev",
            "castle/1-standard-enhance-1",
            "castle/1-standard-enhance-2",
            "castle/2-kling-2.5-1-1",
            "castle/2-kling-2.5-1-2",
            "castle/2-kling-2.5-2-1",
            "castle/2-kling-2.5-2-2",
        ]
    );
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 7]);
    assert_eq!(h.krea.seen(|seen| seen.bodies.len()), 7, "one POST per stage job");
    let second = named(&outcome.jobs, "castle/1-standard-enhance-2");
    let body: serde_json::Value = serde_json::from_str(&second.body).expect("json");
    assert_eq!(body["image_url"], named(&outcome.jobs, "castle/0-flux-1-dev").urls[1].as_str());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_stops_its_chain_even_when_krea_ran_it() {
    let mut rig = Rig::of(
        "model: bfl/flux-1-dev\njobs:\n  - {name: castle, prompt: a castle, then: [{model: enhance/topaz/standard-enhance}, {model: video/kling/kling-2.5}]}\n",
    );
    rig.krea.cancel_refusals.sampling = true;
    rig.krea.job_duration = 8 * SECOND;
    // Sampling from 6 s to 8 s: Krea refuses the cancel and runs the job to its end.
    let (outcome, h) = cancel_after(rig, 7 * SECOND).await;
    assert_eq!(named(&outcome.jobs, "castle/0-flux-1-dev").state, JobState::Downloaded);
    for later in ["castle/1-standard-enhance", "castle/2-kling-2.5"] {
        assert_eq!(named(&outcome.jobs, later).state, JobState::Cancelled, "{later}");
    }
    assert_eq!(h.krea.seen(|seen| seen.bodies.len()), 1, "no stage was sent");
    let reason = named(&outcome.jobs, "castle/1-standard-enhance").error.clone();
    assert!(reason.unwrap_or_default().contains("the user cancelled it"));
}

#[tokio::test(start_paused = true)]
async fn an_engine_that_sends_nothing_new_starts_no_stage() {
    let mut rig = Rig::of(CHAINS);
    rig.settings.start_stages = false;
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 3]);
    assert_eq!(h.stored().await.len(), 3, "no stage job recorded");
}

// --- Sweeps (`sweep.rs`) ----------------------------------------------------------------------

/// While jobs are in flight, sweeps (one `GET /jobs` for all of them) see each end within a
/// sweep's interval, and no job needs a poll of its own: 3 jobs of 3 s end by about 3.1 s (POST
/// latency 100 ms), where their own polls (1 s, then 1.5 s, then 2 s) would see them at 4.6 s.
#[tokio::test(start_paused = true)]
async fn sweeps_see_jobs_end_promptly_and_spare_their_own_polls() {
    let rig = Rig::new(3);
    let started = Instant::now();
    let (outcome, h) = rig.run().await;
    assert_eq!(states(&outcome.jobs), [JobState::Downloaded; 3]);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(3500), "seen ending {took:?} after the start");
    let (gets, sweeps) = h.krea.seen(|seen| (seen.gets, seen.sweeps));
    assert_eq!(gets, 0, "every job was seen by a sweep, none polled on its own");
    assert!(sweeps >= 3, "{sweeps} sweeps");
}
