//! The pure model of a Krea account: jobs and their lifecycle, the concurrency limit and backlog,
//! the balance with its reservations and charges. No I/O and no clock of its own: every call
//! takes the current time (`Millis`, Unix milliseconds), so tests drive it with explicit instants.
//!
//! Time moves lazily. No task runs per job: each call first `advance`s the world to `now`,
//! popping the jobs whose planned end has passed (in time order) from a heap, settling their bill
//! and starting backlogged jobs, in submission order, at the instant a slot freed. A running job's
//! state is then read off the fraction of its job time that has elapsed.

use super::assets::Assets;
use super::config::SimConfig;
use super::ids::{random_seed, rfc3339, uuid_v4};
pub(crate) use super::jobs::{
    CancelError, Failure, JobView, ListQuery, Millis, NewJob, Refusal, Status, parse_status,
    status_name,
};
use super::models::Kind;
use super::picture::Picture;
use super::stats::JobRecord;
use super::world_file::{SavedAccount, SavedEnd, SavedJob, SavedOutcome};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

#[derive(Clone, Debug)]
enum Plan {
    Complete,
    Fail(Failure),
    Stuck,
}

#[derive(Clone, Debug)]
enum Outcome {
    Completed,
    Failed(Failure),
    Cancelled,
}

#[derive(Debug)]
struct Job {
    id: String,
    new: NewJob,
    created_ms: Millis,
    plan: Plan,
    started_ms: Option<Millis>,
    /// The planned end, set when the job starts (none for a stuck job without timeout).
    due: Option<(Millis, Outcome)>,
    ended: Option<(Millis, Outcome)>,
}

/// The settings the model needs, taken from `SimConfig`.
#[derive(Clone, Debug)]
struct Settings {
    concurrency: usize,
    capacity: usize,
    job_ms: Millis,
    video_job_ms: Millis,
    auto_timeout_ms: Option<Millis>,
    moderation_marker: String,
    stuck_marker: String,
    fail_rate: f64,
    undocumented_state: bool,
    cancel_any_pending: bool,
    reuse_job_ids: bool,
}

/// The simulated account.
#[derive(Debug)]
pub(crate) struct World {
    settings: Settings,
    id_rng: fastrand::Rng,
    failure_rng: fastrand::Rng,
    /// In creation order, which is also `created_ms` order (strictly increasing).
    jobs: Vec<Job>,
    by_id: HashMap<String, usize>,
    /// Jobs not yet started, in submission order; cancelled ones are skipped when popped.
    waiting: VecDeque<usize>,
    waiting_count: usize,
    running_count: usize,
    /// Planned ends of running jobs, earliest first.
    due: BinaryHeap<Reverse<(Millis, usize)>>,
    balance: i64,
    reserved: i64,
    spent: i64,
    last_created_ms: Millis,
    creations_by_prompt: BTreeMap<String, u32>,
    /// Jobs created per input URL (the first of each request that had one).
    creations_by_input: BTreeMap<String, u32>,
    /// Uploaded files (`POST /assets`).
    pub(crate) assets: Assets,
}

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) use super::models::usd_to_micros;

impl World {
    pub(crate) fn new(config: &SimConfig) -> Self {
        let concurrency = config.concurrency.max(1);
        let settings = Settings {
            concurrency,
            capacity: concurrency.saturating_add(config.backlog),
            job_ms: millis(config.job_time),
            video_job_ms: millis(config.video_job_time),
            auto_timeout_ms: config.auto_timeout.map(millis),
            moderation_marker: config.moderation_marker.clone(),
            stuck_marker: config.stuck_marker.clone(),
            fail_rate: config.fail_rate,
            undocumented_state: config.quirks.undocumented_state.is_some(),
            cancel_any_pending: config.cancel_any_pending,
            reuse_job_ids: config.reuse_job_ids,
        };
        Self {
            settings,
            // Ids are random as Krea's are, not drawn from `seed`: a restarted simulation must
            // never hand out an id again (the seed keeps only failures and faults reproducible).
            id_rng: fastrand::Rng::with_seed(random_seed()),
            failure_rng: fastrand::Rng::with_seed(config.seed ^ 0x5EED_FA11),
            jobs: Vec::new(),
            by_id: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_count: 0,
            running_count: 0,
            due: BinaryHeap::new(),
            balance: usd_to_micros(config.balance_usd),
            reserved: 0,
            spent: 0,
            last_created_ms: 0,
            creations_by_prompt: BTreeMap::new(),
            creations_by_input: BTreeMap::new(),
            assets: Assets::default(),
        }
    }

    /// Creates a job, or says why not. The returned view is the job as the create response
    /// shows it: `queued` if a slot was free, else `backlogged` (never further along, even if
    /// a zero job time finishes it at once).
    pub(crate) fn create(&mut self, now: Millis, new: NewJob) -> Result<JobView, Refusal> {
        self.advance(now);
        // The reservation rule: a job's price is held from creation until it ends, so jobs
        // in flight can always be paid for and the balance only goes negative after a top-up
        // sets it below what is already reserved.
        if new.price_micros > self.balance.saturating_sub(self.reserved) {
            return Err(Refusal::InsufficientBalance);
        }
        if self.running_count + self.waiting_count >= self.settings.capacity {
            return Err(Refusal::AtCapacity);
        }
        let plan = self.plan_for(&new.prompt);
        // Hostile tests only: the first job's id handed out again (Krea does not do this).
        let reused = self.jobs.first().filter(|_| self.settings.reuse_job_ids);
        let id = match reused.map(|first| first.id.clone()) {
            Some(id) => id,
            None => self.new_id(),
        };
        // Timestamps are unique, so a `cursor` of one job's `created_at` pages without gaps.
        let created_ms = now.max(self.last_created_ms + 1);
        self.last_created_ms = created_ms;
        *self.creations_by_prompt.entry(new.prompt.clone()).or_default() += 1;
        if let Some(input) = &new.input {
            *self.creations_by_input.entry(input.clone()).or_default() += 1;
        }
        self.reserved += new.price_micros;
        let index = self.jobs.len();
        // A reused id keeps pointing at its first job, as a lookup by id can only find one.
        self.by_id.entry(id.clone()).or_insert(index);
        self.jobs.push(Job { id, new, created_ms, plan, started_ms: None, due: None, ended: None });
        self.waiting.push_back(index);
        self.waiting_count += 1;
        self.start_waiting(now);
        let job = &self.jobs[index];
        let status = if job.started_ms.is_some() { Status::Queued } else { Status::Backlogged };
        let view = JobView { status, ended_ms: None, failure: None, ..self.view(index, now) };
        self.advance(now);
        Ok(view)
    }

    /// The job as it is at `now`.
    pub(crate) fn get(&mut self, now: Millis, id: &str) -> Option<JobView> {
        self.advance(now);
        let index = *self.by_id.get(id)?;
        Some(self.view(index, now))
    }

    /// The kind of a job's result files, if the job exists.
    pub(crate) fn kind_of(&self, id: &str) -> Option<Kind> {
        self.by_id.get(id).map(|index| self.jobs[*index].new.kind)
    }

    /// What a job's result files show: its kind, prompt and picture, if the job exists.
    pub(crate) fn looks_of(&self, id: &str) -> Option<(Kind, String, Picture)> {
        let new = &self.jobs[*self.by_id.get(id)?].new;
        Some((new.kind, new.prompt.clone(), new.picture.clone()))
    }

    /// Cancels a job that is in a cancellable state: not billed, its slot freed at once.
    pub(crate) fn cancel(&mut self, now: Millis, id: &str) -> Result<(), CancelError> {
        self.advance(now);
        let index = *self.by_id.get(id).ok_or(CancelError::NotFound)?;
        let status = self.status(index, now);
        let cancellable = if self.settings.cancel_any_pending {
            !status.is_terminal()
        } else {
            matches!(status, Status::Queued | Status::Processing)
        };
        if !cancellable {
            return Err(CancelError::NotCancellable(status));
        }
        self.finish(index, now, Outcome::Cancelled);
        self.start_waiting(now);
        self.advance(now);
        Ok(())
    }

    /// Jobs newest first, with the cursor for the next page when there is one.
    pub(crate) fn list(
        &mut self,
        now: Millis,
        query: &ListQuery,
    ) -> (Vec<JobView>, Option<Millis>) {
        self.advance(now);
        let end = query.before_ms.map_or(self.jobs.len(), |before| {
            self.jobs.partition_point(|job| job.created_ms < before)
        });
        let mut items: Vec<JobView> = Vec::new();
        for index in (0..end).rev() {
            let job = &self.jobs[index];
            if query
                .types
                .as_ref()
                .is_some_and(|types| !types.iter().any(|t| t == job.new.job_type))
            {
                continue;
            }
            if query.status.is_some_and(|wanted| wanted != self.status(index, now)) {
                continue;
            }
            if items.len() == query.limit {
                let cursor = items.last().map(|last| last.created_ms);
                return (items, cursor);
            }
            items.push(self.view(index, now));
        }
        (items, None)
    }

    /// Sets the balance (a top-up); reservations stay as they are.
    pub(crate) fn set_balance(&mut self, micros: i64) {
        self.balance = micros;
    }

    pub(crate) fn balance(&self) -> i64 {
        self.balance
    }

    pub(crate) fn reserved(&self) -> i64 {
        self.reserved
    }

    pub(crate) fn spent(&self) -> i64 {
        self.spent
    }

    pub(crate) fn creations_by_prompt(&self) -> &BTreeMap<String, u32> {
        &self.creations_by_prompt
    }

    pub(crate) fn creations_by_input(&self) -> &BTreeMap<String, u32> {
        &self.creations_by_input
    }

    /// The account as the world file keeps it: money, and every job with its timings.
    pub(crate) fn save(&self) -> SavedAccount {
        let end = |(at_ms, outcome): &(Millis, Outcome)| SavedEnd {
            at_ms: *at_ms,
            outcome: match outcome {
                Outcome::Completed => SavedOutcome::Completed,
                Outcome::Cancelled => SavedOutcome::Cancelled,
                Outcome::Failed(failure) => saved_failure(failure),
            },
        };
        let jobs = self
            .jobs
            .iter()
            .map(|job| SavedJob {
                id: job.id.clone(),
                model: job.new.model.clone(),
                prompt: job.new.prompt.clone(),
                price_micros: job.new.price_micros,
                picture: job.new.picture.clone(),
                created_ms: job.created_ms,
                plan: match &job.plan {
                    Plan::Complete => SavedOutcome::Completed,
                    Plan::Stuck => SavedOutcome::Stuck,
                    Plan::Fail(failure) => saved_failure(failure),
                },
                started_ms: job.started_ms,
                due: job.due.as_ref().map(end),
                ended: job.ended.as_ref().map(end),
            })
            .collect();
        SavedAccount {
            balance_micros: self.balance,
            spent_micros: self.spent,
            last_created_ms: self.last_created_ms,
            creations_by_prompt: self.creations_by_prompt.clone(),
            creations_by_input: self.creations_by_input.clone(),
            jobs,
            assets: self.assets.save(),
        }
    }

    /// The world of `config` holding a saved account: its jobs as they were (time moves them on
    /// at the next call), its balance; reservations, the backlog and the running count are
    /// recomputed from the jobs. Fails on a job whose model the table no longer knows.
    pub(crate) fn restore(config: &SimConfig, account: SavedAccount) -> Result<Self, String> {
        let mut world = Self::new(config);
        world.balance = account.balance_micros;
        world.spent = account.spent_micros;
        world.last_created_ms = account.last_created_ms;
        world.creations_by_prompt = account.creations_by_prompt;
        world.creations_by_input = account.creations_by_input;
        world.assets = Assets::restore(account.assets);
        for saved in account.jobs {
            let spec = super::models::find(&saved.model).ok_or_else(|| {
                format!(
                    "job {} is of the model {}, which the simulation no longer has",
                    saved.id, saved.model
                )
            })?;
            let outcome = |outcome: SavedOutcome| match outcome {
                SavedOutcome::Completed | SavedOutcome::Stuck => Outcome::Completed,
                SavedOutcome::Cancelled => Outcome::Cancelled,
                SavedOutcome::Failed { code, message } => {
                    Outcome::Failed(Failure { code: failure_code(&code), message })
                }
            };
            let plan = match saved.plan {
                SavedOutcome::Completed | SavedOutcome::Cancelled => Plan::Complete,
                SavedOutcome::Stuck => Plan::Stuck,
                SavedOutcome::Failed { code, message } => {
                    Plan::Fail(Failure { code: failure_code(&code), message })
                }
            };
            let index = world.jobs.len();
            let job = Job {
                id: saved.id,
                new: NewJob {
                    model: saved.model,
                    prompt: saved.prompt,
                    kind: spec.kind,
                    job_type: spec.job_type,
                    price_micros: saved.price_micros,
                    input: None,
                    picture: saved.picture,
                },
                created_ms: saved.created_ms,
                plan,
                started_ms: saved.started_ms,
                due: saved.due.map(|end| (end.at_ms, outcome(end.outcome))),
                ended: saved.ended.map(|end| (end.at_ms, outcome(end.outcome))),
            };
            if job.ended.is_none() {
                world.reserved += job.new.price_micros;
                if job.started_ms.is_some() {
                    world.running_count += 1;
                } else {
                    world.waiting.push_back(index);
                    world.waiting_count += 1;
                }
                if let Some((at, _)) = &job.due {
                    world.due.push(Reverse((*at, index)));
                }
            }
            world.by_id.entry(job.id.clone()).or_insert(index);
            world.jobs.push(job);
        }
        Ok(world)
    }

    /// Every job, oldest first, as the statistics record them.
    pub(crate) fn job_records(&mut self, now: Millis, undocumented: &str) -> Vec<JobRecord> {
        self.advance(now);
        (0..self.jobs.len())
            .map(|index| {
                let job = &self.jobs[index];
                JobRecord {
                    id: job.id.clone(),
                    prompt: job.new.prompt.clone(),
                    model: job.new.model.clone(),
                    status: status_name(self.status(index, now), undocumented).to_owned(),
                    created_at: rfc3339(job.created_ms),
                    price_usd: job.new.price_micros as f64 / super::models::MICROS_PER_USD,
                    charged: matches!(job.ended, Some((_, Outcome::Completed))),
                }
            })
            .collect()
    }

    /// Settles every job whose planned end is at or before `now`, in time order, starting
    /// backlogged jobs as slots free.
    pub(crate) fn advance(&mut self, now: Millis) {
        while let Some(&Reverse((at, index))) = self.due.peek() {
            if at > now {
                break;
            }
            self.due.pop();
            let job = &mut self.jobs[index];
            if job.ended.is_some() {
                continue; // cancelled before its planned end
            }
            if let Some((_, outcome)) = job.due.take() {
                self.finish(index, at, outcome);
                self.start_waiting(at);
            }
        }
    }

    fn start_waiting(&mut self, at: Millis) {
        while self.running_count < self.settings.concurrency {
            let Some(index) = self.waiting.pop_front() else { break };
            if self.jobs[index].ended.is_some() {
                continue; // cancelled while backlogged; already uncounted
            }
            self.waiting_count -= 1;
            self.running_count += 1;
            let duration = self.duration(index);
            let timeout = self.settings.auto_timeout_ms;
            let job = &mut self.jobs[index];
            job.started_ms = Some(at);
            let mut due = match &job.plan {
                Plan::Complete => Some((at.saturating_add(duration), Outcome::Completed)),
                // A doomed job fails halfway, while `processing`.
                Plan::Fail(failure) => {
                    Some((at.saturating_add(duration / 2), Outcome::Failed(failure.clone())))
                }
                Plan::Stuck => None,
            };
            if let Some(limit) = timeout.map(|timeout| at.saturating_add(timeout))
                && due.as_ref().is_none_or(|(end, _)| *end > limit)
            {
                let message = format!("The job timed out after {} s", timeout.unwrap_or(0) / 1000);
                due = Some((limit, Outcome::Failed(Failure { code: "timeout", message })));
            }
            if let Some((end, _)) = &due {
                self.due.push(Reverse((*end, index)));
            }
            job.due = due;
        }
    }

    fn finish(&mut self, index: usize, at: Millis, outcome: Outcome) {
        let job = &mut self.jobs[index];
        if job.started_ms.is_some() {
            self.running_count -= 1;
        } else {
            self.waiting_count -= 1;
        }
        self.reserved -= job.new.price_micros;
        if matches!(outcome, Outcome::Completed) {
            self.balance = self.balance.saturating_sub(job.new.price_micros);
            self.spent += job.new.price_micros;
        }
        job.due = None;
        job.ended = Some((at, outcome));
    }

    fn duration(&self, index: usize) -> Millis {
        match self.jobs[index].new.kind {
            Kind::Video => self.settings.video_job_ms,
            Kind::Image | Kind::Enhance => self.settings.job_ms,
        }
    }

    fn status(&self, index: usize, now: Millis) -> Status {
        let job = &self.jobs[index];
        match (&job.ended, job.started_ms) {
            (Some((_, Outcome::Completed)), _) => Status::Completed,
            (Some((_, Outcome::Failed(_))), _) => Status::Failed,
            (Some((_, Outcome::Cancelled)), _) => Status::Cancelled,
            (None, None) => Status::Backlogged,
            (None, Some(started)) => {
                let elapsed = now.saturating_sub(started);
                let phase = Status::running(
                    elapsed,
                    self.duration(index),
                    self.settings.undocumented_state,
                );
                if matches!(job.plan, Plan::Complete) {
                    phase
                } else {
                    phase.min(Status::Processing)
                }
            }
        }
    }

    fn view(&self, index: usize, now: Millis) -> JobView {
        let job = &self.jobs[index];
        JobView {
            id: job.id.clone(),
            status: self.status(index, now),
            kind: job.new.kind,
            job_type: job.new.job_type,
            created_ms: job.created_ms,
            ended_ms: job.ended.as_ref().map(|(at, _)| *at),
            failure: match &job.ended {
                Some((_, Outcome::Failed(failure))) => Some(failure.clone()),
                _ => None,
            },
        }
    }

    fn plan_for(&mut self, prompt: &str) -> Plan {
        let marked = |marker: &str| !marker.is_empty() && prompt.contains(marker);
        if marked(&self.settings.moderation_marker) {
            let message = "The output was flagged by content moderation.".to_owned();
            Plan::Fail(Failure { code: "content_moderation", message })
        } else if marked(&self.settings.stuck_marker) {
            Plan::Stuck
        } else if self.settings.fail_rate > 0.0 && self.failure_rng.f64() < self.settings.fail_rate
        {
            let message = "The provider failed to generate the output.".to_owned();
            Plan::Fail(Failure { code: "provider_error", message })
        } else {
            Plan::Complete
        }
    }

    /// A random version-4 UUID that no job of this world holds.
    fn new_id(&mut self) -> String {
        loop {
            let id = uuid_v4(&mut self.id_rng);
            if !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }
}

/// A failure as the world file keeps it.
fn saved_failure(failure: &Failure) -> SavedOutcome {
    SavedOutcome::Failed { code: failure.code.to_owned(), message: failure.message.clone() }
}

/// The failure code the simulation uses that is named `code` (a provider error if none is).
fn failure_code(code: &str) -> &'static str {
    ["content_moderation", "timeout"]
        .into_iter()
        .find(|known| *known == code)
        .unwrap_or("provider_error")
}

#[cfg(test)]
#[path = "world_tests.rs"]
mod tests;
