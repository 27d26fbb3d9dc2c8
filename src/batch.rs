//! The one-shot commands wired end to end: `run` (job file → state file → engine → manifest and
//! summary), `check` (the plan, nothing sent) and `status` (a state file read, also during a run).
//!
//! The engine (`runner.rs`) does the work; this module decides where things live: the output
//! directory, the state file beside it, the API base URL, and refuses to mix jobs of two APIs
//! in one state file.

use crate::api::{self, ClientSettings, KreaClient};
use crate::download::{DownloadSettings, Downloader};
use crate::files::{ensure_real_dir, remove_partials};
use crate::job::JobState;
use crate::jobfile::{Budget, JobFile, Limits};
use crate::key::ApiKey;
use crate::openapi::{SchemaReport, Source, obtain};
use crate::output::{self, Marker, OutputError};
use crate::pace::PollSchedule;
use crate::pricing::{Estimate, PriceTable, usd};
use crate::report::{Counts, EngineStatus, MANIFEST, Summary, rewrite_manifest};
use crate::retry::RetryPolicy;
use crate::runner::{Controls, Engine, EngineIo, EngineSettings};
use crate::store::{Change, JobRecord, Store, StoreWriter};
use anyhow::Context as _;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The state file's name inside the output directory, unless `--state` says otherwise.
pub const STATE_FILE: &str = ".krea-batch.sqlite";
/// Meta key: the API base URL the state's jobs were submitted to.
const META_API_BASE: &str = "api_base";

/// Bad input or usage (exit code 2), as opposed to a failure while running.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything: import the file, submit, poll, reconcile, download.
    Run,
    /// Only fetch the missing files of completed jobs from their stored URLs (`krea-batch
    /// download`): nothing is imported, submitted or polled, and no key is needed.
    DownloadOnly,
}

/// How request bodies are checked against Krea's schemas before anything is sent.
#[derive(Clone, Debug, Default)]
pub struct SchemaChoice {
    /// `--openapi FILE`: this document instead of `<api>/openapi.json`.
    pub openapi: Option<PathBuf>,
    /// `--offline`: the cached document only.
    pub offline: bool,
    /// `--no-validate`: run even with problems (they are still logged).
    pub skip: bool,
}

/// Checks `file`'s bodies against the OpenAPI document `choice` names (cached per user, or
/// beside `state` when the user has no cache folder: [`crate::openapi::cache_path`]).
pub async fn schema_report(
    file: &JobFile,
    base: &reqwest::Url,
    state: &Path,
    choice: &SchemaChoice,
) -> SchemaReport {
    let source = match &choice.openapi {
        Some(path) => Source::File(path.clone()),
        None => Source::Api {
            base: base.clone(),
            cache: crate::openapi::cache_path(base, state),
            offline: choice.offline,
        },
    };
    let document = obtain(&source).await;
    SchemaReport::of(document.as_ref().map_err(String::as_str), file)
}

/// Refuses to start a run whose bodies Krea would refuse, unless `--no-validate`; logs the
/// warnings (a model the document does not know, no document at all).
async fn enforce_schema(
    file: &JobFile,
    base: &reqwest::Url,
    state: &Path,
    choice: &SchemaChoice,
) -> Result<(), InputError> {
    let report = schema_report(file, base, state, choice).await;
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    if report.problems.is_empty() {
        return Ok(());
    }
    let listed = report.problems.join("\n  ");
    if choice.skip {
        tracing::warn!("--no-validate: sending bodies Krea may refuse:\n  {listed}");
        return Ok(());
    }
    Err(InputError(format!(
        "Krea would refuse these request bodies (checked against {}):\n  {listed}\n\
         Fix the job file, or run with --no-validate to send them anyway.",
        report.origin
    )))
}

/// What `run` needs besides the job file.
#[derive(Debug)]
pub struct RunOptions {
    /// What to do.
    pub mode: Mode,
    /// Schema checking before the run.
    pub schema: SchemaChoice,
    /// `--state`.
    pub state: Option<PathBuf>,
    /// `--api-base` or `KREA_API_BASE`, overriding the job file.
    pub api_base: Option<String>,
    /// The API key (not needed to download).
    pub key: Option<ApiKey>,
    /// Results go to `<output>-simulated` with their own state: a simulated run never mixes
    /// with real results.
    pub simulated: bool,
    /// `--fresh`: new generations even for jobs this state already completed for another job
    /// file (the job file's `reuse: false` does the same).
    pub fresh: bool,
    /// `--force`: write into an output folder that holds files krea-batch did not write (it
    /// still never replaces them).
    pub force: bool,
    /// Stop requests from the outside (signals).
    pub controls: Controls,
    /// Live counts for a progress display.
    pub status: tokio::sync::watch::Sender<EngineStatus>,
}

/// Where a job file's results and state go.
#[derive(Clone, Debug)]
pub struct Places {
    /// The output directory.
    pub output_dir: PathBuf,
    /// The state file.
    pub state: PathBuf,
}

impl Places {
    /// Whether the state file lives in the output folder itself (the default), where it can
    /// belong to no other folder.
    #[must_use]
    pub fn state_in_folder(&self) -> bool {
        let parent = self.state.parent().and_then(|parent| std::fs::canonicalize(parent).ok());
        parent.is_some() && parent == std::fs::canonicalize(&self.output_dir).ok()
    }
}

/// The output directory and state file of `file`, honouring `--state` and `--simulate`.
#[must_use]
pub fn places(file: &JobFile, state: Option<&Path>, simulated: bool) -> Places {
    let output_dir = if simulated {
        let mut name = file.output_dir.as_os_str().to_owned();
        name.push("-simulated");
        PathBuf::from(name)
    } else {
        file.output_dir.clone()
    };
    let state = state.map_or_else(|| output_dir.join(STATE_FILE), Path::to_owned);
    Places { output_dir, state }
}

/// The engine settings for a job file's limits.
#[must_use]
pub fn engine_settings(limits: &Limits) -> EngineSettings {
    EngineSettings {
        submissions_per_minute: limits.submissions_per_minute,
        burst: limits.burst,
        max_in_flight: limits.max_in_flight,
        poll: PollSchedule { first: limits.poll_interval, max: limits.poll_interval_max },
        video_poll: PollSchedule {
            first: limits.video_poll_interval,
            max: limits.poll_interval_max,
        },
        job_timeout: limits.job_timeout,
        download_concurrency: limits.download_concurrency as usize,
        download_grace: limits.download_grace,
        retry: RetryPolicy::transient(limits.retry_backoff),
        rate_limit_backoff: limits.retry_backoff,
        request_timeout: limits.request_timeout,
        reconcile_after: limits.reconcile_after,
        pause_probe: None,
        heartbeat: None,
        budget: None,
    }
}

/// Every job's estimated price, summed per model: one pass over the request bodies for the
/// plan, the budget's checks and the warning at the start of a run.
struct Costs<'f> {
    total: Estimate,
    /// Per model: its jobs and their estimate.
    by_model: BTreeMap<&'f str, (usize, Estimate)>,
}

impl<'f> Costs<'f> {
    fn of(file: &'f JobFile) -> Self {
        let prices = PriceTable::with_overrides(file.prices.clone());
        let mut costs = Self { total: Estimate::default(), by_model: BTreeMap::new() };
        for job in &file.jobs {
            let price = prices.price(&job.model, &job.body_map());
            costs.total.add(price);
            let (jobs, estimate) = costs.by_model.entry(&job.model).or_default();
            *jobs += 1;
            estimate.add(price);
        }
        costs
    }

    /// Why these jobs cannot run under a budget: some have no known price, so what they
    /// commit cannot be counted. `None` when every job is priced.
    fn unpriced_refusal(&self, file: &JobFile) -> Option<String> {
        let unpriced: Vec<(&str, usize)> = self
            .by_model
            .iter()
            .filter(|(_, (_, estimate))| estimate.unpriced > 0)
            .map(|(model, (_, estimate))| (*model, estimate.unpriced))
            .collect();
        let (first, _) = unpriced.first()?;
        let listed: Vec<String> =
            unpriced.iter().map(|(model, jobs)| format!("{model} ({jobs} jobs)")).collect();
        Some(format!(
            "{}: a budget is set, but krea-batch knows no price for {}; add each under \
             `prices:` (USD per generation, e.g. `prices: {{{first}: 0.05}}`) so the budget can \
             count them",
            file.source.display(),
            listed.join(", "),
        ))
    }
}

/// Why `file`'s jobs cannot run under a budget (see [`Costs::unpriced_refusal`]); for the
/// service's inbox.
#[must_use]
pub fn unpriced_under_budget(file: &JobFile) -> Option<String> {
    Costs::of(file).unpriced_refusal(file)
}

/// Refuses to start a run under a budget with jobs of unknown price, and says at the start
/// when the estimate is above the total cap (the run will stop at the cap).
fn enforce_budget(file: &JobFile) -> Result<(), InputError> {
    let Some(budget) = file.budget else { return Ok(()) };
    let costs = Costs::of(file);
    if let Some(refusal) = costs.unpriced_refusal(file) {
        return Err(InputError(refusal));
    }
    if let Some(cap) = budget.max_usd.filter(|cap| costs.total.usd > *cap) {
        tracing::warn!(
            "the jobs are estimated at {}, above the budget of {}; submitting stops before the \
             budget would be exceeded (jobs already done count against it)",
            usd(costs.total.usd),
            usd(cap)
        );
    }
    Ok(())
}

/// The API base URL: the command line, else the job file, else Krea's.
pub fn base_url(file: &JobFile, override_url: Option<&str>) -> Result<reqwest::Url, InputError> {
    let text = override_url.or(file.api.base_url.as_deref()).unwrap_or(api::DEFAULT_BASE_URL);
    api::parse_base_url(text).map_err(|err| InputError(format!("API base URL: {err}")))
}

/// What `run` ended with.
#[derive(Debug)]
pub struct RunResult {
    /// The summary.
    pub summary: Summary,
}

/// `krea-batch run`: imports the job file into the state, runs every job to its end (or to a
/// stop), rewrites the manifest and summarises.
pub async fn run(file: JobFile, mut options: RunOptions) -> anyhow::Result<RunResult> {
    let started = Instant::now();
    let mut base = base_url(&file, options.api_base.as_deref())?;
    let mut places = places(&file, options.state.as_deref(), options.simulated);
    ensure_real_dir(&places.output_dir)
        .map_err(|err| InputError(format!("output directory: {err}")))?;
    // An absolute folder: every file created under a relative one costs a getcwd.
    if let Ok(absolute) = std::fs::canonicalize(&places.output_dir) {
        places.output_dir = absolute;
    }
    let mut store = Store::open_writer(&places.state).map_err(|err| match err {
        err @ crate::store::StoreError::Locked { .. } => {
            anyhow::Error::new(InputError(err.to_string()))
        }
        err => anyhow::Error::new(err),
    })?;
    // After the state's own lock, so that a second run on the same state says that; this one
    // keeps a run with another state file out of the same folder.
    let _output_lock = match options.mode {
        Mode::Run => Some(output::lock(&places.output_dir).map_err(output_error)?),
        Mode::DownloadOnly => None,
    };
    if options.mode == Mode::Run {
        enforce_schema(&file, &base, &places.state, &options.schema).await?;
        enforce_budget(&file)?;
    }
    let (batch_id, key) = take_batch(&mut store, &file, &places, &base, &mut options)?;
    if options.mode == Mode::DownloadOnly {
        base = submitted_to(&mut store, base)?;
    }
    // The jobs are in the state now; free the parsed file before the engine loads its own copy.
    let limits = file.limits;
    let budget = file.budget;
    drop(file.jobs);
    let removed = remove_partials(&places.output_dir);
    if removed > 0 {
        tracing::info!(removed, "removed partial downloads left by an earlier run");
    }
    let mut jobs = store.jobs(Some(batch_id))?;
    let claimed_elsewhere = store.remote_ids()?;
    let output_dirs = store.output_dirs()?;
    rewrite_manifest(&places.output_dir, &jobs, true).context("while writing the manifest")?;
    tracing::info!(
        jobs = jobs.len(),
        state = %places.state.display(),
        output = %places.output_dir.display(),
        "starting"
    );
    let engine_jobs = match options.mode {
        Mode::Run => std::mem::take(&mut jobs),
        Mode::DownloadOnly => {
            jobs.iter().filter(|job| job.state == JobState::Completed).cloned().collect()
        }
    };

    let (client, downloader) = clients(base, &limits, key)?;
    let writer = StoreWriter::spawn(store)?;
    let engine = Engine::new(
        EngineIo { api: Arc::new(client), downloader, writer: writer.clone(), claimed_elsewhere },
        engine_jobs,
        &output_dirs,
        EngineSettings { budget, ..engine_settings(&limits) },
        options.controls,
        options.status,
    );
    // `krea-batch cancel` and `resume` leave requests in the state file; read them meanwhile.
    let (commands, command_rx) = tokio::sync::mpsc::unbounded_channel();
    let requests = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::control::REQUESTS_EVERY);
            loop {
                every.tick().await;
                crate::control::forward_requests(&writer, &commands).await;
            }
        })
    };
    let outcome = engine.with_commands(command_rx).run().await;
    requests.abort();
    let _ = requests.await;
    writer.close().await;
    let outcome = outcome?;
    // Jobs the engine did not take (download only) keep their place in the list.
    let mut ended = outcome.jobs;
    if !jobs.is_empty() {
        let by_id: HashMap<i64, JobRecord> = ended.drain(..).map(|job| (job.id, job)).collect();
        ended = jobs.into_iter().map(|job| by_id.get(&job.id).cloned().unwrap_or(job)).collect();
    }

    rewrite_manifest(&places.output_dir, &ended, false).context("while writing the manifest")?;
    crate::gallery::write(&places.output_dir, &ended).context("while writing the gallery")?;
    let summary = Summary::of(&ended, outcome.stopped, &places.output_dir, started.elapsed());
    Ok(RunResult { summary })
}

/// The batch of the state that this run works on, and the key to work with: for a run, the
/// output folder's (claimed, and the job file imported into it); for downloads, the one the
/// folder's marker names, without claiming or importing anything.
fn take_batch(
    store: &mut Store,
    file: &JobFile,
    places: &Places,
    base: &reqwest::Url,
    options: &mut RunOptions,
) -> anyhow::Result<(i64, ApiKey)> {
    let source = std::fs::canonicalize(&file.source).unwrap_or_else(|_| file.source.clone());
    let source = source.to_string_lossy();
    let chosen = match options.mode {
        Mode::Run => {
            guard_api_base(store, base)?;
            let key = options.key.take().ok_or_else(|| InputError("no API key".into()))?;
            let batch = claim_output(store, places, &file.source, &source, options.force)?;
            let reuse = file.reuse && !options.fresh;
            (import(store, file, &batch, &places.output_dir, reuse)?, key)
        }
        Mode::DownloadOnly => {
            let batch = if let Some(marker) =
                output::read_marker(&places.output_dir).map_err(output_error)?
            {
                Some(marker.batch)
            } else {
                store.legacy_batch(&source, &places.output_dir, places.state_in_folder())?
            };
            let batch_id = match batch {
                Some(batch) => store.batch_id(&batch)?,
                None => None,
            };
            let batch_id = batch_id.ok_or_else(|| {
                InputError(format!(
                    "{} has no record of the results in {}: run it first",
                    places.state.display(),
                    places.output_dir.display()
                ))
            })?;
            // Downloads never carry the key; the API client is built but never called.
            (batch_id, ApiKey::new("unused-by-downloads")?)
        }
    };
    Ok(chosen)
}

/// The API client and the download client for `limits`.
pub(crate) fn clients(
    base: reqwest::Url,
    limits: &Limits,
    key: ApiKey,
) -> anyhow::Result<(KreaClient, Downloader)> {
    let settings = ClientSettings {
        base_url: base,
        connect_timeout: Duration::from_secs(10),
        request_timeout: limits.request_timeout,
    };
    let client = KreaClient::new(&settings, key).map_err(InputError)?;
    let downloader = Downloader::new(&DownloadSettings {
        connect_timeout: settings.connect_timeout,
        read_timeout: limits.request_timeout,
        max_bytes: limits.max_result_size,
        timeout: limits.download_timeout,
        min_rate: limits.download_min_rate,
        // Loopback and private result hosts only beside an API on loopback (the simulation).
        internal_addresses: crate::api::is_loopback(&settings.base_url),
    })
    .map_err(anyhow::Error::msg)?;
    Ok((client, downloader))
}

/// Imports the job file's jobs into the state and reports what changed; returns the batch.
fn import(
    store: &mut Store,
    file: &JobFile,
    batch: &str,
    output_dir: &Path,
    reuse: bool,
) -> anyhow::Result<i64> {
    let prices = PriceTable::with_overrides(file.prices.clone());
    let report = store.import(batch, output_dir, &file.jobs, &prices, reuse)?;
    if !report.reusable.is_empty() {
        let taken = crate::reuse::take_results(store, &report.reusable, &store.output_dirs()?)?;
        tracing::info!(taken, "jobs took results this state already paid for: not paid again");
    }
    if report.added > 0 {
        tracing::info!(added = report.added, "new jobs in the job file");
    }
    for (wanted, given) in &report.renamed {
        tracing::warn!(
            "an earlier, different job already wrote results as {wanted}; the new job {wanted} \
             writes as {given} so nothing already paid for is overwritten"
        );
    }
    if report.removed > 0 {
        tracing::info!(
            removed = report.removed,
            "jobs in the state file are no longer in the job file: unsent ones are left alone, \
             sent ones are still finished and downloaded"
        );
    }
    Ok(report.batch_id)
}

/// The API the state's jobs were submitted to (else `base`): the result URLs came from it, so
/// its base decides whether they may point at loopback (the simulation) or only at public hosts.
fn submitted_to(store: &mut Store, base: reqwest::Url) -> anyhow::Result<reqwest::Url> {
    let recorded = store.meta(META_API_BASE)?;
    Ok(recorded.and_then(|text| api::parse_base_url(&text).ok()).unwrap_or(base))
}

/// An output folder's refusal as the error a user acts on (exit 2), or a disk failure.
fn output_error(err: OutputError) -> anyhow::Error {
    if err.is_input() { InputError(err.to_string()).into() } else { err.into() }
}

/// Decides whether this run may write into its output folder, and which batch of the state
/// the folder's results belong to (its identity, `batch:<id>`); writes the folder's marker.
///
/// The folder is the batch: a job file renamed, moved or copied under another name resumes the
/// same batch when it writes into the same folder. A folder marked by another state file, or
/// holding results this state does not know (the state was lost), or holding files krea-batch
/// did not write (unless `force`), is refused before anything is sent.
fn claim_output(
    store: &mut Store,
    places: &Places,
    job_file: &Path,
    legacy_source: &str,
    force: bool,
) -> anyhow::Result<String> {
    let dir = &places.output_dir;
    let state_id = store.state_id()?;
    let state_text = places.state.display().to_string();
    let lost = |evidence: String| {
        output_error(OutputError::LostState {
            dir: dir.clone(),
            state: state_text.clone(),
            job_file: job_file.display().to_string(),
            evidence,
        })
    };
    let (batch, foreign, rewrite) = match output::read_marker(dir).map_err(output_error)? {
        Some(marker) if marker.state_id == state_id => {
            let moved = marker.state_file != state_text;
            (marker.batch, marker.foreign, moved)
        }
        Some(marker) => {
            let owner = Path::new(&marker.state_file);
            let same_file =
                std::fs::canonicalize(owner).ok() == std::fs::canonicalize(&places.state).ok();
            if !same_file && Store::id_of(owner).as_deref() == Some(marker.state_id.as_str()) {
                return Err(output_error(OutputError::OwnedByOther {
                    dir: dir.clone(),
                    owner: marker.state_file,
                    state: state_text,
                }));
            }
            let named = if same_file {
                "its marker names this state file, which was deleted, emptied or replaced since"
                    .to_owned()
            } else {
                format!("its marker names the state file {}, which is gone", marker.state_file)
            };
            return Err(lost(named));
        }
        None => {
            let foreign = output::foreign_entries(dir, &places.state).map_err(output_error)?;
            if let Some(legacy) =
                store.legacy_batch(legacy_source, dir, places.state_in_folder())?
            {
                // Written by a krea-batch from before the marker: adopt it under a new identity.
                let batch = format!("batch:{}", output::random_id());
                store.rename_batch(&legacy, &batch)?;
                (batch, Vec::new(), true)
            } else {
                let none = HashSet::new();
                let unknown = output::unknown_jobs(dir, &none, &none, 1);
                if let Some(first) = unknown.first() {
                    return Err(lost(format!(
                        "job {} with Krea id {}, and no marker naming a state file",
                        first.name,
                        first.job_id.as_deref().unwrap_or_default()
                    )));
                }
                refuse_foreign(dir, &foreign, force)?;
                (format!("batch:{}", output::random_id()), foreign, true)
            }
        }
    };
    // The marker matches, but the state may have been rolled back (a deleted or garbled
    // write-ahead log): results naming Krea jobs it does not know give that away.
    let known = store.remote_ids()?;
    let recorded: HashSet<String> = match store.batch_id(&batch)? {
        Some(batch_id) => store
            .jobs(Some(batch_id))?
            .into_iter()
            .flat_map(|job| job.files.into_iter().map(|file| file.path))
            .collect(),
        None if !rewrite => {
            return Err(lost("its marker names a batch this state file does not hold".into()));
        }
        None => HashSet::new(),
    };
    let unknown = output::unknown_jobs(dir, &known, &recorded, 3);
    if !unknown.is_empty() {
        let listed: Vec<String> = unknown
            .iter()
            .map(|job| format!("{} ({})", job.name, job.job_id.as_deref().unwrap_or_default()))
            .collect();
        return Err(lost(format!("Krea jobs {}", listed.join(", "))));
    }
    if rewrite {
        let marker = Marker::new(&state_id, &places.state, &batch, foreign);
        output::write_marker(dir, &marker).map_err(output_error)?;
    }
    Ok(batch)
}

/// With files krea-batch did not write in the folder: refused without `force`; with it, still
/// refused when one of them is a file krea-batch would have to replace (its manifest, its
/// gallery), since a file it did not write is never replaced.
fn refuse_foreign(dir: &Path, foreign: &[String], force: bool) -> anyhow::Result<()> {
    if foreign.is_empty() {
        return Ok(());
    }
    if !force {
        return Err(output_error(OutputError::Foreign {
            dir: dir.to_owned(),
            listed: output::listed(foreign),
        }));
    }
    let own_names: Vec<String> = foreign
        .iter()
        .filter(|name| {
            let html = Path::new(name).extension().is_some_and(|ext| ext == "html");
            name.as_str() == MANIFEST || (name.starts_with("index") && html)
        })
        .cloned()
        .collect();
    if !own_names.is_empty() {
        return Err(InputError(format!(
            "the output folder {} holds {} that krea-batch did not write and would have to \
             replace; even with --force it never replaces a file it did not write: move them \
             away or choose another folder",
            dir.display(),
            output::listed(&own_names)
        ))
        .into());
    }
    tracing::warn!(
        folder = %dir.display(),
        files = %output::listed(foreign),
        "--force: writing into a folder that holds files krea-batch did not write; they are \
         left as they are"
    );
    Ok(())
}

/// Refuses to poll, with one API, jobs that were submitted to another: their ids mean nothing
/// there, and a job that seemed lost could be submitted (and paid for) again.
pub(crate) fn guard_api_base(store: &mut Store, base: &reqwest::Url) -> anyhow::Result<()> {
    let current = base.as_str().trim_end_matches('/').to_owned();
    if let Some(recorded) = store.meta(META_API_BASE)? {
        let has_remote_work = store
            .jobs(None)?
            .iter()
            .any(|job| job.remote_id.is_some() || job.state == JobState::Unknown);
        if recorded != current && has_remote_work {
            return Err(InputError(format!(
                "the state file {} holds jobs submitted to {recorded}, but this run uses \
                 {current}; use the same API, or another --state / output directory",
                store.path().display()
            ))
            .into());
        }
    }
    store.apply(&[Change::Meta { key: META_API_BASE.into(), value: current }])?;
    Ok(())
}

/// The plan `check` prints.
#[derive(Debug, Serialize)]
pub struct Plan {
    /// The job file.
    pub file: String,
    /// Jobs in all (after `count`).
    pub jobs: usize,
    /// Jobs and estimated cost per model.
    pub models: Vec<ModelPlan>,
    /// The estimated total, USD.
    pub estimated_usd: f64,
    /// Jobs whose model has no known price.
    pub unpriced: usize,
    /// Where results go.
    pub output_dir: String,
    /// The state file.
    pub state: String,
    /// The API.
    pub api_base: String,
    /// The check of the request bodies against Krea's schemas.
    pub schema: SchemaReport,
    /// How the estimate compares with the file's `budget:`, when it has one.
    pub budget: Option<BudgetFit>,
    /// What a run would do now, given the state file (absent before the first run).
    pub resume: Option<Resume>,
}

/// What a run of the job file would send now, given what its state file already holds.
#[derive(Debug, Default, Serialize)]
pub struct Resume {
    /// Jobs already sent or ended: not sent again.
    pub done: usize,
    /// Jobs that would take a result this state already paid for (`reuse:`).
    pub reused: usize,
    /// Jobs that would be submitted and paid for.
    pub to_pay: usize,
    /// Their estimated cost, USD.
    pub to_pay_usd: f64,
    /// Why a run would refuse to start, if it would (its output folder is not its own).
    pub refusal: Option<String>,
}

impl Resume {
    /// Reads the state file of `file`'s output folder, when there is one.
    fn of(file: &JobFile) -> Option<Self> {
        let places = places(file, None, false);
        let store = Store::open_reader(&places.state).ok();
        let marker = output::read_marker(&places.output_dir);
        if store.is_none() && !matches!(marker, Ok(Some(_))) {
            return None;
        }
        let mut resume = Self::default();
        let state_id = store.as_ref().and_then(|_| Store::id_of(&places.state));
        let batch = match marker {
            Ok(Some(marker)) if Some(&marker.state_id) == state_id.as_ref() => Some(marker.batch),
            Ok(Some(_)) => {
                resume.refusal = Some(format!(
                    "the output folder {} belongs to another or a lost state file: a run would \
                     refuse to start (it says what to do)",
                    places.output_dir.display()
                ));
                None
            }
            // Written by a krea-batch from before the marker: the run adopts the same batch.
            Ok(None) => store.as_ref().and_then(|store| {
                let source = std::fs::canonicalize(&file.source).ok()?;
                let dir = std::fs::canonicalize(&places.output_dir).ok()?;
                let in_folder = places.state_in_folder();
                store.legacy_batch(&source.to_string_lossy(), &dir, in_folder).ok().flatten()
            }),
            Err(err) => {
                resume.refusal = Some(err.to_string());
                None
            }
        };
        let (known, reusable) = store
            .as_ref()
            .and_then(|store| store.preview(batch.as_deref()).ok())
            .unwrap_or_default();
        let prices = PriceTable::with_overrides(file.prices.clone());
        for job in &file.jobs {
            if known.contains(job.key.as_str()) {
                resume.done += 1;
            } else if file.reuse && reusable.contains(job.key.as_str()) {
                resume.reused += 1;
            } else {
                resume.to_pay += 1;
                resume.to_pay_usd += prices.price(&job.model, &job.body_map()).unwrap_or(0.0);
            }
        }
        Some(resume)
    }
}

/// The estimate against a budget, as `check` prints it.
#[derive(Debug, Serialize)]
pub struct BudgetFit {
    /// The total cap, USD.
    pub max_usd: Option<f64>,
    /// The daily cap, USD.
    pub per_day_usd: Option<f64>,
    /// Whether the whole file can run under the total cap: every job priced and the estimate
    /// at most `max_usd` (a daily cap only spreads the jobs over days).
    pub fits: bool,
    /// When jobs have no known price: why the run would be refused.
    pub unpriced: Option<String>,
}

impl BudgetFit {
    fn of(file: &JobFile, budget: Budget, costs: &Costs<'_>) -> Self {
        let unpriced = costs.unpriced_refusal(file);
        let within = budget.max_usd.is_none_or(|cap| costs.total.usd <= cap + 1e-9);
        Self {
            max_usd: budget.max_usd,
            per_day_usd: budget.per_day_usd,
            fits: unpriced.is_none() && within,
            unpriced,
        }
    }
}

/// One model's share of a plan.
#[derive(Debug, Serialize)]
pub struct ModelPlan {
    /// The model path.
    pub model: String,
    /// Its jobs.
    pub jobs: usize,
    /// Their estimated cost, USD (None when no price is known).
    pub estimated_usd: Option<f64>,
}

/// `krea-batch check`: the plan, without sending anything (the schema check is done by the
/// caller, [`schema_report`], and included).
pub fn plan(file: &JobFile, base: &reqwest::Url, schema: SchemaReport) -> Result<Plan, InputError> {
    let places = places(file, None, false);
    let costs = Costs::of(file);
    let models = costs
        .by_model
        .iter()
        .map(|(model, (jobs, estimate))| ModelPlan {
            model: (*model).to_owned(),
            jobs: *jobs,
            estimated_usd: (estimate.unpriced == 0).then_some(estimate.usd),
        })
        .collect();
    Ok(Plan {
        file: file.source.display().to_string(),
        jobs: file.jobs.len(),
        models,
        estimated_usd: costs.total.usd,
        unpriced: costs.total.unpriced,
        output_dir: places.output_dir.display().to_string(),
        state: places.state.display().to_string(),
        api_base: base.to_string(),
        schema,
        budget: file.budget.map(|budget| BudgetFit::of(file, budget, &costs)),
        resume: Resume::of(file),
    })
}

impl Plan {
    fn write_budget(
        &self,
        f: &mut std::fmt::Formatter<'_>,
        budget: &BudgetFit,
    ) -> std::fmt::Result {
        if let Some(why) = &budget.unpriced {
            return writeln!(f, "budget: does not fit: {why}");
        }
        if let Some(cap) = budget.max_usd {
            let verdict = if budget.fits { "fits" } else { "does NOT fit" };
            write!(f, "budget: {}: the estimate {verdict}", usd(cap))?;
            if !budget.fits {
                write!(f, "; the run would stop before exceeding it, leaving jobs unsent")?;
            }
            writeln!(f)?;
        }
        if let Some(daily) = budget.per_day_usd {
            // The jobs of one day may cost `daily`: spread over that many UTC days at least.
            let days = if daily > 0.0 { (self.estimated_usd / daily).ceil().max(1.0) } else { 0.0 };
            if days > 0.0 {
                writeln!(
                    f,
                    "daily budget: {}: the estimate takes at least {days} day(s)",
                    usd(daily)
                )?;
            } else {
                writeln!(f, "daily budget: $0.00: nothing would be sent")?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}: {} jobs, valid", self.file, self.jobs)?;
        for model in &self.models {
            let cost = model
                .estimated_usd
                .map_or_else(|| "no known price".into(), |usd| format!("${usd:.4}"));
            writeln!(f, "  {:<40} {:>6} jobs  {cost}", model.model, model.jobs)?;
        }
        write!(f, "estimated cost: ${:.4}", self.estimated_usd)?;
        if self.unpriced > 0 {
            write!(f, " (+ {} jobs with no known price)", self.unpriced)?;
        }
        writeln!(f)?;
        if let Some(budget) = &self.budget {
            self.write_budget(f, budget)?;
        }
        if let Some(resume) = &self.resume {
            writeln!(
                f,
                "a run now: {} jobs already sent or done, {} would reuse results already paid for, \
                 {} to submit (estimated ${:.4})",
                resume.done, resume.reused, resume.to_pay, resume.to_pay_usd
            )?;
            if let Some(refusal) = &resume.refusal {
                writeln!(f, "warning: {refusal}")?;
            }
        }
        writeln!(
            f,
            "results: {}\nstate:   {}\napi:     {}",
            self.output_dir, self.state, self.api_base
        )?;
        if !self.schema.origin.is_empty() {
            let verdict = if self.schema.problems.is_empty() { "fit" } else { "do not fit" };
            writeln!(f, "request bodies {verdict} the schemas of {}", self.schema.origin)?;
        }
        for problem in &self.schema.problems {
            writeln!(f, "  {problem}")?;
        }
        for warning in &self.schema.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}

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
        spent_usd,
        in_flight_usd,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counts;
        writeln!(f, "{}: {} jobs", self.state_file, c.total)?;
        for (label, count) in [
            ("completed", c.completed),
            ("download pending", c.download_pending),
            ("in flight", c.in_flight),
            ("unknown (awaiting reconciliation)", c.unknown),
            ("not submitted", c.pending),
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
        for name in &self.unknown {
            writeln!(f, "  unknown: {name}")?;
        }
        for name in &self.download_pending {
            writeln!(f, "  download pending: {name}")?;
        }
        Ok(())
    }
}
