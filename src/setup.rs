//! Setting a run up and taking it down, shared by every command that works on a state file
//! (`run`, `download`, `cancel`, `recover` and the daemon): where a job file's results and
//! state live, opening and guarding the state (its writer lock, the API it was submitted to,
//! the output folder's claim from `output.rs`), building the API and download clients, spawning
//! the state's writer, building the engine, forwarding the requests `krea-batch cancel` and
//! `krea-batch resume` leave in the state file, and closing the writer.
//!
//! It decides nothing a command decides (which jobs, which mode): the commands call it in the
//! order they need.

use crate::api::{self, ClientSettings, KreaClient};
use crate::download::{DownloadSettings, Downloader};
use crate::error::InputError;
use crate::job::JobState;
use crate::jobfile::{JobFile, Limits};
use crate::key::ApiKey;
use crate::output::{self, Marker, OutputError, OutputLock};
use crate::pace::PollSchedule;
use crate::report::MANIFEST;
use crate::retry::RetryPolicy;
use crate::runner::controller::Ceilings;
use crate::runner::{
    Controls, Engine, EngineCommand, EngineIo, EngineOutcome, EngineSettings, EngineStatus,
    KreaApi, RunKind,
};
use crate::store::{Change, JobRecord, Request, Store, StoreError, StoreWriter};
use anyhow::Context as _;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// The state file's name inside the output directory, unless `--state` says otherwise.
pub const STATE_FILE: &str = ".krea-batch.sqlite";
/// Meta key: the API base URL the state's jobs were submitted to.
const META_API_BASE: &str = "api_base";
/// The state's meta key naming the simulated world its jobs were sent to ("" for none).
const META_SIMULATION: &str = "simulation";
/// How often a running process reads the requests.
pub(crate) const REQUESTS_EVERY: Duration = Duration::from_secs(2);
/// The longest wait for a connection, to Krea or a result host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    places_in(&file.output_dir, state, simulated)
}

/// [`places`] for the job file at `job_file`, reading no more of it than its `output:` line
/// (for the commands that only need to find its state).
pub fn places_of(
    job_file: &Path,
    state: Option<&Path>,
    simulated: bool,
) -> Result<Places, crate::jobfile::JobFileError> {
    Ok(places_in(&crate::jobfile::output_dir_of(job_file)?, state, simulated))
}

fn places_in(output_dir: &Path, state: Option<&Path>, simulated: bool) -> Places {
    let output_dir = if simulated { simulated_dir(output_dir) } else { output_dir.to_owned() };
    let state = state.map_or_else(|| output_dir.join(STATE_FILE), Path::to_owned);
    Places { output_dir, state }
}

/// `<dir>-simulated`: where `--simulate` keeps results, state and simulated account.
fn simulated_dir(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push("-simulated");
    PathBuf::from(name)
}

/// Refuses, as a usage error, a command that reads a state file that is not there: such a
/// command never creates one. The message says where it looked and what to do, and points at
/// the simulated results when they are what the user ran.
pub fn existing_state(state: &Path) -> Result<(), InputError> {
    if state.exists() {
        return Ok(());
    }
    let simulated = state
        .parent()
        .filter(|dir| !dir.to_string_lossy().ends_with("-simulated"))
        .map(|dir| simulated_dir(dir).join(STATE_FILE))
        .filter(|simulated| simulated.exists());
    let hint = match simulated {
        Some(found) => format!(
            "the results of `run --simulate` are in {}: add --simulate",
            found.parent().unwrap_or(&found).display()
        ),
        None => "run the job file first (`krea-batch run FILE`), or name the state file with \
                 --state"
            .to_owned(),
    };
    Err(InputError::msg(format!("there is no state file at {}; {hint}", state.display())))
}

/// The API base URL: the command line, else the job file, else Krea's.
pub fn base_url(file: &JobFile, override_url: Option<&str>) -> Result<reqwest::Url, InputError> {
    api_base_url(override_url.or(file.api.base_url.as_deref()))
}

/// The API base URL `text` names (`--api-base`), else Krea's, for a command without a job file.
pub fn api_base_url(text: Option<&str>) -> Result<reqwest::Url, InputError> {
    let text = text.unwrap_or(api::DEFAULT_BASE_URL);
    api::parse_base_url(text)
        .map_err(|err| InputError::because(format!("API base URL: {err}"), err))
}

/// Opens the state file to write to it; another process holding it is the user's to resolve
/// (exit 2).
pub(crate) fn open_store(state: &Path) -> anyhow::Result<Store> {
    Store::open_writer(state).map_err(|err| match err {
        err @ StoreError::Locked { .. } => anyhow::Error::new(InputError::new(err)),
        err => anyhow::Error::new(err),
    })
}

/// Refuses to poll, with one API, jobs that were submitted to another: their ids mean nothing
/// there, and a job that seemed lost could be submitted (and paid for) again.
pub(crate) fn guard_api_base(store: &mut Store, base: &reqwest::Url) -> anyhow::Result<()> {
    guard_api(store, base, None)
}

/// [`guard_api_base`] for a run against `simulation` (a simulated world's identity, when
/// simulated): the same world is the same API whatever its address.
pub(crate) fn guard_api(
    store: &mut Store,
    base: &reqwest::Url,
    simulation: Option<&str>,
) -> anyhow::Result<()> {
    let current = base.as_str().trim_end_matches('/').to_owned();
    if let Some(recorded) = store.meta(META_API_BASE)? {
        let recorded_world = store.meta(META_SIMULATION)?.filter(|world| !world.is_empty());
        let same = match simulation {
            Some(world) => recorded_world.as_deref() == Some(world),
            None => recorded == current && recorded_world.is_none(),
        };
        let has_remote_work = store
            .jobs(None)?
            .iter()
            .any(|job| job.remote_id.is_some() || job.state == JobState::Unknown);
        if !same && has_remote_work {
            let sent_to = match recorded_world {
                Some(_) => format!("a simulation ({recorded}) whose world is not this one"),
                None => recorded,
            };
            let now = match simulation {
                Some(_) => format!("a new simulation ({current})"),
                None => current,
            };
            return Err(InputError::msg(format!(
                "the state file {} holds jobs submitted to {sent_to}, but this run uses {now}; \
                 use the same API, or another --state / output directory (a simulated folder \
                 whose world file .krea-batch-sim.json is gone is started over by deleting it)",
                store.path().display()
            ))
            .into());
        }
    }
    store.apply(&[
        Change::Meta { key: META_API_BASE.into(), value: current },
        Change::Meta { key: META_SIMULATION.into(), value: simulation.unwrap_or_default().into() },
    ])?;
    Ok(())
}

/// The API base URL the state's jobs were submitted to, as recorded (the text, unparsed).
pub(crate) fn recorded_api_base(store: &Store) -> Result<Option<String>, StoreError> {
    store.meta(META_API_BASE)
}

/// An output folder's refusal as the error a user acts on (exit 2), or a disk failure.
pub(crate) fn output_error(err: OutputError) -> anyhow::Error {
    if err.is_input() { InputError::new(err).into() } else { err.into() }
}

/// Takes the output folder's lock, after the state's own (so that a second run on the same
/// state says that): it keeps a run with another state file out of the same folder.
pub(crate) fn lock_output(dir: &Path) -> anyhow::Result<OutputLock> {
    output::lock(dir).map_err(output_error)
}

/// Decides whether this run may write into its output folder, and which batch of the state
/// the folder's results belong to (its identity, `batch:<id>`); writes the folder's marker.
///
/// The folder is the batch: a job file renamed, moved or copied under another name resumes the
/// same batch when it writes into the same folder. A folder marked by another state file, or
/// holding results this state does not know (the state was lost), or holding files krea-batch
/// did not write (unless `force`), is refused before anything is sent.
pub(crate) fn claim_output(
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
    let job_file_name = job_file.file_name().map(|name| name.to_string_lossy().into_owned());
    // A marker that is right but for the job file's name (the gallery's title) is rewritten
    // with it, without the checks a new or moved batch needs.
    let mut retitle = false;
    let (batch, foreign, rewrite) = match output::read_marker(dir).map_err(output_error)? {
        Some(marker) if marker.state_id == state_id => {
            let moved = marker.state_file != state_text;
            retitle = marker.job_file != job_file_name;
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
                let batch = format!("batch:{}", crate::store::random_id());
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
                (format!("batch:{}", crate::store::random_id()), foreign, true)
            }
        }
    };
    // The marker matches, but the state may have been rolled back (a deleted or garbled
    // write-ahead log): results naming Krea jobs it does not know give that away.
    let known = store.remote_ids()?;
    let recorded: HashSet<String> = match store.batch_id(&batch)? {
        Some(batch_id) => store.file_paths(batch_id)?,
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
        // The batch is on disk before the marker names it (see `Store::register_batch`).
        store.register_batch(&batch, dir)?;
    }
    if rewrite || retitle {
        let marker = Marker::new(&state_id, &places.state, &batch, foreign).with_job_file(job_file);
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
        return Err(InputError::msg(format!(
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

/// The Krea API client for `base`, with `request_timeout` per request.
pub(crate) fn api_client(
    base: reqwest::Url,
    request_timeout: Duration,
    key: ApiKey,
) -> Result<KreaClient, InputError> {
    let settings =
        ClientSettings { base_url: base, connect_timeout: CONNECT_TIMEOUT, request_timeout };
    KreaClient::new(&settings, key).map_err(InputError::new)
}

/// The API client and the download client for `limits`.
pub(crate) fn clients(
    base: reqwest::Url,
    limits: &Limits,
    key: ApiKey,
) -> anyhow::Result<(KreaClient, Downloader)> {
    let downloader = downloader(&base, limits)?;
    let client = api_client(base, limits.request_timeout, key)?;
    Ok((client, downloader))
}

/// The download client for `limits`, beside the API at `base`.
pub(crate) fn downloader(base: &reqwest::Url, limits: &Limits) -> anyhow::Result<Downloader> {
    Downloader::new(&DownloadSettings {
        connect_timeout: CONNECT_TIMEOUT,
        read_timeout: limits.request_timeout,
        max_bytes: limits.max_result_size,
        timeout: limits.download_timeout,
        min_rate: limits.download_min_rate,
        // Loopback and private result hosts only beside an API on loopback (the simulation).
        internal_addresses: crate::api::is_loopback(base),
    })
    .context("cannot set up the download client")
}

/// The engine settings for a job file's limits.
#[must_use]
pub(crate) fn engine_settings(limits: &Limits) -> EngineSettings {
    EngineSettings {
        ceilings: Ceilings::from_limits(limits),
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
        kind: RunKind::OneShot,
        heartbeat: None,
        budget: None,
        start_stages: true,
    }
}

/// An engine ready to run, with the state's writer and the way to hand it commands.
pub(crate) struct Started {
    /// The engine, commands wired.
    pub engine: Engine,
    /// The state's writer (the engine holds a clone).
    pub writer: StoreWriter,
    /// Commands to the engine (requests, new jobs, new settings).
    pub commands: UnboundedSender<EngineCommand>,
}

/// Hands the state to its writer thread and builds the engine over `jobs` with `clients` (the
/// API, or one that refuses every call for downloads only, and the download client).
pub(crate) fn start_engine(
    store: Store,
    clients: (Arc<dyn KreaApi>, Downloader),
    jobs: Vec<JobRecord>,
    settings: EngineSettings,
    controls: Controls,
    status: tokio::sync::watch::Sender<EngineStatus>,
) -> anyhow::Result<Started> {
    let output_dirs = store.output_dirs()?;
    let claimed_elsewhere = store.remote_ids()?;
    let (client, downloader) = clients;
    let writer = StoreWriter::spawn(store)?;
    let (commands, command_rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::new(
        EngineIo::new(client, downloader, writer.clone(), claimed_elsewhere),
        jobs,
        &output_dirs,
        settings,
        controls,
        status,
    )
    .with_commands(command_rx);
    Ok(Started { engine, writer, commands })
}

/// Runs a one-shot engine to its end, forwarding the requests `krea-batch cancel` and `resume`
/// leave in the state file meanwhile, then closes the writer (everything is written).
pub(crate) async fn run_to_end(started: Started) -> Result<EngineOutcome, StoreError> {
    let Started { engine, writer, commands } = started;
    let requests = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REQUESTS_EVERY);
            loop {
                every.tick().await;
                forward_requests(&writer, &commands).await;
            }
        })
    };
    let outcome = engine.run().await;
    requests.abort();
    let _ = requests.await;
    if let Ok(outcome) = &outcome {
        keep_cancels(&writer, &outcome.cancels_left).await;
    }
    writer.close().await;
    outcome
}

/// Keeps the cancels a stopped engine had not carried out (Krea refused so far, or had not
/// named the job yet) as requests in the state file: the next run, or the next start of the
/// service, asks Krea again. Called once nothing takes requests any more.
pub(crate) async fn keep_cancels(writer: &StoreWriter, ids: &[i64]) {
    if ids.is_empty() {
        return;
    }
    let (count, ids) = (ids.len(), ids.to_vec());
    let kept = writer
        .with_store(move |store| {
            ids.iter().try_for_each(|id| store.push_request(&Request::Cancel(*id)))
        })
        .await;
    match kept.and_then(|pushed| pushed) {
        Ok(()) => tracing::warn!(
            jobs = count,
            "cancels Krea has not carried out yet are kept: the next run asks Krea again; until \
             then these jobs run on at Krea and are billed if they complete"
        ),
        Err(err) => tracing::error!(
            jobs = count,
            %err,
            "cannot keep the cancels Krea has not carried out yet; run `krea-batch cancel` again"
        ),
    }
}

/// Hands the requests waiting in the state file to the engine (in the process that holds it).
pub(crate) async fn forward_requests(
    writer: &StoreWriter,
    commands: &UnboundedSender<EngineCommand>,
) {
    let requests = match writer.with_store(Store::take_requests).await {
        Ok(Ok(requests)) => requests,
        Ok(Err(err)) => return tracing::warn!(%err, "cannot read requests"),
        Err(_) => return,
    };
    let mut cancel = Vec::new();
    for request in requests {
        match request {
            Request::Resume => {
                let _ = commands.send(EngineCommand::Probe);
            }
            Request::Cancel(id) => cancel.push(id),
        }
    }
    if !cancel.is_empty() {
        let _ = commands.send(EngineCommand::Cancel(cancel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run killed after the output folder's marker was written but before its job file was
    /// imported must not find its own state "lost" on the next run: the batch the marker names
    /// is in the state from before the marker.
    #[test]
    fn a_kill_between_the_marker_and_the_import_is_resumed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let places = Places {
            output_dir: dir.path().join("out"),
            state: dir.path().join("out").join(STATE_FILE),
        };
        std::fs::create_dir_all(&places.output_dir).expect("output folder");
        let job_file = dir.path().join("jobs.yaml");
        let first = {
            let mut store = Store::open_writer(&places.state).expect("state opens");
            claim_output(&mut store, &places, &job_file, "jobs.yaml", false).expect("claimed")
            // Killed here: the marker is written, nothing imported.
        };
        let mut store = Store::open_writer(&places.state).expect("state opens again");
        let again = claim_output(&mut store, &places, &job_file, "jobs.yaml", false)
            .expect("the same folder is claimed again, not refused as lost");
        assert_eq!(again, first, "the batch the marker names is resumed");
    }
}
