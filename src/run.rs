//! `krea-batch run` and `krea-batch download`: a job file run end to end (job file → state
//! file → engine → manifest, gallery and summary), or only the missing files of its completed
//! jobs fetched again.
//!
//! `setup.rs` opens and guards the state and builds the engine; this module decides what a run
//! takes on: the schema and budget checks, the batch it works on (the job file imported into
//! it), and which jobs the engine gets.

use crate::api;
use crate::download::Downloader;
use crate::error::InputError;
use crate::files::{ensure_real_dir, remove_partials};
use crate::job::JobState;
use crate::jobfile::JobFile;
use crate::key::ApiKey;
use crate::openapi::{SchemaChoice, enforce_schema};
use crate::output;
use crate::pricing::PriceTable;
use crate::report::{Summary, rewrite_manifest};
use crate::runner::{Controls, EngineSettings, EngineStatus, KreaApi, RefusingApi};
use crate::setup::{self, Places, claim_output, output_error, places};
use crate::store::{JobRecord, Store};
use anyhow::Context as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything: import the file, submit, poll, reconcile, download.
    Run,
    /// Only fetch the missing files of completed jobs from their stored URLs (`krea-batch
    /// download`): nothing is imported, submitted or polled, and no key is needed.
    DownloadOnly,
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
    /// The identity of the simulated world this run talks to (`--simulate`): the same world
    /// may listen on another port from one run to the next, and its jobs are still there.
    pub simulation: Option<String>,
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
    let mut base = setup::base_url(&file, options.api_base.as_deref())?;
    let mut places = places(&file, options.state.as_deref(), options.simulated);
    if options.mode == Mode::DownloadOnly {
        // Downloads read a state; they never start an empty one.
        setup::existing_state(&places.state)?;
    }
    ensure_real_dir(&places.output_dir)
        .map_err(|err| InputError::because(format!("output directory: {err}"), err))?;
    // An absolute folder: every file created under a relative one costs a getcwd.
    if let Ok(absolute) = std::fs::canonicalize(&places.output_dir) {
        places.output_dir = absolute;
    }
    let mut store = setup::open_store(&places.state)?;
    let _output_lock = match options.mode {
        Mode::Run => Some(setup::lock_output(&places.output_dir)?),
        Mode::DownloadOnly => None,
    };
    if options.mode == Mode::Run {
        enforce_schema(&file, &base, &places.state, &options.schema).await?;
        crate::costs::enforce_budget(&file)?;
    }
    let (batch_id, key) = take_batch(&mut store, &file, &places, &base, &mut options)?;
    if options.mode == Mode::DownloadOnly {
        base = submitted_to(&store, base)?;
    }
    // The jobs are in the state now; free the parsed file before the engine loads its own copy.
    let limits = file.limits;
    let budget = file.budget;
    let local_files = file.local_files;
    drop(file.jobs);
    let removed = remove_partials(&places.output_dir);
    if removed > 0 {
        tracing::info!(removed, "removed partial downloads left by an earlier run");
    }
    let mut jobs = store.jobs(Some(batch_id))?;
    crate::uploads::name_inputs(&mut jobs, &local_files);
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

    // Downloads only: no key, and an API that refuses every call.
    let clients: (Arc<dyn KreaApi>, Downloader) = match key {
        Some(key) => {
            let api_base = base.as_str().trim_end_matches('/').to_owned();
            let (client, downloader) = setup::clients(base, &limits, key)?;
            // Local input files are uploaded before the engine starts; it sends through an
            // API that puts their URLs into the bodies (`uploads.rs`).
            let client = crate::uploads::prepare(
                &mut store,
                Arc::new(client),
                &api_base,
                &local_files,
                &engine_jobs,
                limits.retry_backoff,
                &crate::uploads::Stops {
                    stop: options.controls.stop_submitting.clone(),
                    abort: options.controls.abort.clone(),
                },
            )
            .await?;
            (client, downloader)
        }
        None => (Arc::new(RefusingApi), setup::downloader(&base, &limits)?),
    };
    let engine = setup::start_engine(
        store,
        clients,
        engine_jobs,
        EngineSettings {
            budget,
            start_stages: options.mode == Mode::Run,
            ..setup::engine_settings(&limits)
        },
        options.controls,
        options.status,
    )?;
    // `krea-batch cancel` and `resume` leave requests in the state file; read them meanwhile.
    let outcome = setup::run_to_end(engine).await;
    let outcome = outcome?;
    // Jobs the engine did not take (download only) keep their place in the list.
    let mut ended = outcome.jobs;
    if !jobs.is_empty() {
        let by_id: HashMap<i64, JobRecord> = ended.drain(..).map(|job| (job.id, job)).collect();
        ended = jobs.into_iter().map(|job| by_id.get(&job.id).cloned().unwrap_or(job)).collect();
    }

    rewrite_manifest(&places.output_dir, &ended, false).context("while writing the manifest")?;
    crate::gallery::write(&places.output_dir, &ended).context("while writing the gallery")?;
    let mut summary = Summary::of(&ended, outcome.stopped, &places.output_dir, started.elapsed());
    summary.cancels_refused = outcome.cancels_refused;
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
) -> anyhow::Result<(i64, Option<ApiKey>)> {
    let source = std::fs::canonicalize(&file.source).unwrap_or_else(|_| file.source.clone());
    let source = source.to_string_lossy();
    let chosen = match options.mode {
        Mode::Run => {
            setup::guard_api(store, base, options.simulation.as_deref())?;
            let key = options.key.take().ok_or_else(|| InputError::msg("no API key"))?;
            let batch = claim_output(store, places, &file.source, &source, options.force)?;
            let reuse = file.reuse && !options.fresh;
            (import(store, file, &batch, &places.output_dir, reuse)?, Some(key))
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
                InputError::msg(format!(
                    "{} has no record of the results in {}: run it first",
                    places.state.display(),
                    places.output_dir.display()
                ))
            })?;
            // Downloads never carry the key, and never call the API (`RefusingApi`).
            (batch_id, None)
        }
    };
    Ok(chosen)
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
fn submitted_to(store: &Store, base: reqwest::Url) -> anyhow::Result<reqwest::Url> {
    let recorded = setup::recorded_api_base(store)?;
    Ok(recorded.and_then(|text| api::parse_base_url(&text).ok()).unwrap_or(base))
}
