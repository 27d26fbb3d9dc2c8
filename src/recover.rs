//! `krea-batch recover`: rebuilds a lost, emptied or rolled-back state file from what the
//! output folder holds (its manifest and the sidecars beside the results) and from Krea's own
//! records, without submitting anything.
//!
//! A run refuses to write into a folder whose results its state does not know (`output.rs`):
//! running would buy those jobs again. `recover` is the way out. It imports the job file into
//! the state, gives each job that the folder names its Krea job id, its files (each checked
//! against the SHA-256 its sidecar recorded) and its state, asking Krea (`GET /jobs/{id}`)
//! where a job stands when the folder cannot say. Jobs the folder names but the job file no
//! longer lists are recorded too, so that their results stay known. Finally it lists the jobs
//! Krea has created since the folder's first result that no record claims: they may be jobs
//! whose record was lost before anything was written (they are reported, never guessed).
//!
//! What it cannot know: a job submitted by a run whose record was lost before its manifest line
//! or sidecar was written has no trace in the folder. Such jobs appear among the unclaimed
//! ones, and the next run submits their job-file entries again; README "Nothing paid twice,
//! nothing lost" states this limit.

use crate::api::{ApiError, KreaClient, RemoteStatus};
use crate::error::InputError;
use crate::job::JobState;
use crate::jobfile::JobFile;
use crate::key::ApiKey;
use crate::output::{self, Marker};
use crate::report::{MANIFEST, count};
use crate::setup::{Places, base_url, clients, guard_api, places};
use crate::store::{Change, FileRecord, JobRecord, Store};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// What `recover` needs besides the job file.
#[derive(Debug)]
pub struct RecoverOptions {
    /// `--state`.
    pub state: Option<PathBuf>,
    /// `--api-base` or `KREA_API_BASE`.
    pub api_base: Option<String>,
    /// The API key (Krea is asked where the recovered jobs stand).
    pub key: ApiKey,
    /// The results of a `--simulate` run.
    pub simulated: bool,
    /// The identity of the simulated world `api_base` serves (`--simulate`): the same world
    /// is the same API whatever port it listens on.
    pub simulation: Option<String>,
}

/// What `recover` did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RecoverReport {
    /// The state file written.
    pub state: String,
    /// Jobs given back their Krea job id.
    pub recovered: usize,
    /// Of them: every file on disk, whole.
    pub downloaded: usize,
    /// Of them: completed, with files still to download.
    pub download_pending: usize,
    /// Of them: still running at Krea (the next run polls them).
    pub in_flight: usize,
    /// Of them: failed or cancelled.
    pub ended_without_result: usize,
    /// Recovered jobs the job file no longer lists.
    pub not_in_file: usize,
    /// Jobs of the job file with no trace in the folder: the next run submits them.
    pub without_record: usize,
    /// Krea jobs created since the folder's first result that no record claims.
    pub unclaimed: Vec<String>,
}

impl std::fmt::Display for RecoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} recovered into {}:", count(self.recovered, "job"), self.state)?;
        for (label, count) in [
            ("downloaded, every file whole", self.downloaded),
            ("download pending", self.download_pending),
            ("still running at Krea", self.in_flight),
            ("failed or cancelled", self.ended_without_result),
            ("no longer in the job file", self.not_in_file),
        ] {
            writeln!(f, "  {label:<36} {count:>7}")?;
        }
        writeln!(
            f,
            "{} of the job file with no record in the folder: the next run submits them",
            count(self.without_record, "job")
        )?;
        if !self.unclaimed.is_empty() {
            writeln!(
                f,
                "{} at Krea, created since the first result here, claimed by no record \
                 (they may be jobs whose record was lost; they are not attributed): {}",
                count(self.unclaimed.len(), "job"),
                output::listed(&self.unclaimed)
            )?;
        }
        Ok(())
    }
}

/// One job as the folder remembers it.
#[derive(Debug, Default)]
struct Trace {
    job_id: Option<String>,
    model: Option<String>,
    /// The manifest's status, if it lists the job.
    status: Option<String>,
    error: Option<String>,
    /// Files the manifest lists for it.
    listed_files: Vec<String>,
    /// Files whose sidecar names it, each checked whole.
    files: Vec<FileRecord>,
    created_at: Option<String>,
    completed_at: Option<String>,
    /// The request body rebuilt from a sidecar (prompt and params).
    body: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A manifest line, as far as recover reads it.
#[derive(Deserialize)]
struct ManifestEntry {
    name: String,
    status: Option<String>,
    job_id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    files: Vec<String>,
    error: Option<String>,
}

/// A sidecar, as far as recover reads it.
#[derive(Deserialize)]
struct SidecarEntry {
    name: String,
    job_id: String,
    model: Option<String>,
    prompt: Option<String>,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
    created_at: Option<String>,
    completed_at: Option<String>,
    index: u32,
    source_url: String,
    file: String,
    bytes: u64,
    sha256: String,
    #[serde(default)]
    content_type: String,
}

/// Reads the folder's manifest and sidecars into one trace per job name.
fn read_traces(dir: &Path) -> BTreeMap<String, Trace> {
    let mut traces: BTreeMap<String, Trace> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) {
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<ManifestEntry>(line) else { continue };
            // The last line of a job wins: the manifest is appended to as jobs end.
            let trace = traces.entry(entry.name).or_default();
            trace.job_id = entry.job_id.or(trace.job_id.take());
            trace.model = entry.model.or(trace.model.take());
            trace.status = entry.status;
            trace.error = entry.error;
            trace.listed_files = entry.files;
        }
    }
    for sidecar in output::sidecars(dir) {
        let path = dir.join(&sidecar.path);
        let Some(entry) = crate::files::read_small_json::<SidecarEntry>(&path) else { continue };
        // A sidecar speaks for the file beside it only: one that names another file is ignored.
        if entry.file != sidecar.result || entry.job_id.is_empty() {
            continue;
        }
        let trace = traces.entry(entry.name).or_default();
        if trace.job_id.as_deref().is_some_and(|id| id != entry.job_id) {
            tracing::warn!(
                file = %sidecar.result,
                "the sidecar names another Krea job than the manifest; the file is not recovered"
            );
            continue;
        }
        trace.job_id = Some(entry.job_id);
        trace.model = trace.model.take().or(entry.model);
        trace.created_at = entry.created_at;
        trace.completed_at = entry.completed_at;
        if trace.body.is_none() {
            let mut body = entry.params;
            if let Some(prompt) = entry.prompt {
                body.insert("prompt".into(), prompt.into());
            }
            trace.body = Some(body);
        }
        let whole = sha256_file(&dir.join(&entry.file))
            .is_ok_and(|(bytes, sha256)| bytes == entry.bytes && sha256 == entry.sha256);
        if whole {
            trace.files.push(FileRecord {
                index: entry.index,
                url: entry.source_url,
                path: entry.file,
                bytes: entry.bytes,
                sha256: entry.sha256,
                content_type: entry.content_type,
            });
        } else {
            tracing::warn!(file = %sidecar.result, "a result file is missing or not whole; it will be downloaded again");
        }
    }
    for trace in traces.values_mut() {
        trace.files.sort_by_key(|file| file.index);
        trace.files.dedup_by_key(|file| file.index);
    }
    traces
}

/// `krea-batch recover`: see the module documentation.
pub async fn recover(file: JobFile, options: RecoverOptions) -> anyhow::Result<RecoverReport> {
    let base = base_url(&file, options.api_base.as_deref())?;
    let mut places = places(&file, options.state.as_deref(), options.simulated);
    places.output_dir = std::fs::canonicalize(&places.output_dir).map_err(|err| {
        let message = format!(
            "the output folder {} cannot be read ({err}): there is nothing to recover",
            places.output_dir.display()
        );
        InputError::because(message, err)
    })?;
    let dir = places.output_dir.clone();
    let _lock = output::lock(&dir).map_err(InputError::new)?;
    let mut store = open_for_recovery(&places)?;
    guard_api(&mut store, &base, options.simulation.as_deref())?;
    let state_id = store.state_id()?;
    let marker = match output::read_marker(&dir) {
        Ok(marker) => marker,
        Err(err) => {
            tracing::warn!("{err}; it is written anew");
            None
        }
    };
    let batch = marker.as_ref().map_or_else(
        || format!("batch:{}", crate::store::random_id()),
        |marker| marker.batch.clone(),
    );
    let foreign = marker.map(|marker| marker.foreign).unwrap_or_default();
    let prices = crate::pricing::PriceTable::with_overrides(file.prices.clone());
    let batch_id = store.import(&batch, &dir, &file.jobs, &prices, false)?.batch_id;
    let limits = file.limits;

    let mut traces = read_traces(&dir);
    let (client, _) = clients(base, &limits, options.key)?;
    let mut report =
        RecoverReport { state: places.state.display().to_string(), ..Default::default() };
    let mut claimed = store.remote_ids()?;
    let mut changes = Vec::new();
    for mut job in store.jobs(Some(batch_id))? {
        let trace = traces.remove(&job.name);
        if job.remote_id.is_some() || job.state != JobState::Pending {
            continue;
        }
        let Some(trace) = trace else {
            report.without_record += 1;
            continue;
        };
        let Some(job_id) = trace.job_id.clone().filter(|id| !claimed.contains(id)) else {
            report.without_record += 1;
            continue;
        };
        claimed.insert(job_id.clone());
        settle(&client, &mut job, job_id, trace, &mut report).await;
        changes.push(Change::Job(Box::new(job.clone())));
        changes.extend(
            job.files.iter().map(|file| Change::File { job_id: job.id, file: file.clone() }),
        );
    }
    store.apply(&changes)?;

    // Results of jobs the job file no longer lists: recorded all the same, so that the folder
    // holds nothing its state does not know.
    for (name, trace) in traces {
        let Some(job_id) = trace.job_id.clone().filter(|id| !claimed.contains(id)) else {
            continue;
        };
        claimed.insert(job_id.clone());
        let model = trace.model.clone().unwrap_or_default();
        let body = serde_json::to_string(&trace.body.clone().unwrap_or_default())
            .unwrap_or_else(|_| "{}".into());
        let mut job = store.insert_recovered(batch_id, &name, &model, &body, &job_id)?;
        settle(&client, &mut job, job_id, trace, &mut report).await;
        report.not_in_file += 1;
        let mut changes = vec![Change::Job(Box::new(job.clone()))];
        changes.extend(
            job.files.iter().map(|file| Change::File { job_id: job.id, file: file.clone() }),
        );
        store.apply(&changes)?;
    }

    report.unclaimed = unclaimed_at_krea(&client, &store, &claimed).await;
    output::write_marker(&dir, &Marker::new(&state_id, &places.state, &batch, foreign))?;
    crate::report::rewrite_manifest(&dir, &store.jobs(Some(batch_id))?, false)?;
    Ok(report)
}

/// Opens the state file to rebuild it, or says what to do with one SQLite cannot read.
fn open_for_recovery(places: &Places) -> anyhow::Result<Store> {
    Store::open_writer(&places.state).map_err(|err| match err {
        err @ crate::store::StoreError::Locked { .. } => InputError::new(err).into(),
        crate::store::StoreError::Sqlite { path, source } => {
            let message = format!(
                "the state file {} cannot be read ({source}); move it aside (for example `mv {0} \
                 {0}.damaged`) and run recover again",
                path.display()
            );
            InputError::because(message, source).into()
        }
        err => anyhow::Error::new(err),
    })
}

/// Gives `job` its Krea id, its whole files and the state that the folder and Krea agree on.
async fn settle(
    client: &KreaClient,
    job: &mut JobRecord,
    job_id: String,
    trace: Trace,
    report: &mut RecoverReport,
) {
    report.recovered += 1;
    job.remote_id = Some(job_id.clone());
    job.created_at = trace.created_at;
    job.completed_at = trace.completed_at;
    job.files = trace.files;
    job.attempts = job.attempts.max(1);
    let listed_whole = trace.status.as_deref() == Some("completed")
        && !trace.listed_files.is_empty()
        && trace.listed_files.iter().all(|path| job.files.iter().any(|file| &file.path == path));
    if listed_whole {
        job.urls = job.files.iter().map(|file| file.url.clone()).collect();
        job.state = JobState::Downloaded;
        report.downloaded += 1;
        return;
    }
    match client.get_job(&job_id).await {
        Ok(remote) => {
            job.remote_status = remote.status.as_ref().map(|status| status.as_str().to_owned());
            job.created_at = remote.created_at.or(job.created_at.take());
            job.completed_at = remote.completed_at.or(job.completed_at.take());
            match remote.status {
                Some(RemoteStatus::Completed) => {
                    job.urls = remote.urls;
                    let count = job.urls.len() as u32;
                    job.files.retain(|file| file.index < count);
                    let whole = (0..count).all(|i| job.files.iter().any(|f| f.index == i));
                    if whole {
                        job.state = JobState::Downloaded;
                        report.downloaded += 1;
                    } else {
                        job.state = JobState::Completed;
                        report.download_pending += 1;
                    }
                }
                Some(RemoteStatus::Failed) => {
                    job.state = JobState::Failed;
                    job.error = remote.error.or(trace.error);
                    report.ended_without_result += 1;
                }
                Some(RemoteStatus::Cancelled) => {
                    job.state = JobState::Cancelled;
                    report.ended_without_result += 1;
                }
                _ => {
                    job.state = JobState::Submitted;
                    report.in_flight += 1;
                }
            }
        }
        Err(err) => {
            // Krea cannot say now: what the folder holds stands, and the run polls the rest.
            tracing::warn!(job = %job.name, %err, "Krea could not say where this job stands");
            match trace.status.as_deref() {
                Some("failed") => {
                    job.state = JobState::Failed;
                    job.error = trace.error;
                    report.ended_without_result += 1;
                }
                Some("cancelled") => {
                    job.state = JobState::Cancelled;
                    report.ended_without_result += 1;
                }
                _ if !job.files.is_empty() && matches!(err, ApiError::NotFound { .. }) => {
                    job.urls = job.files.iter().map(|file| file.url.clone()).collect();
                    job.state = JobState::Downloaded;
                    report.downloaded += 1;
                }
                _ => {
                    job.state = JobState::Submitted;
                    report.in_flight += 1;
                }
            }
        }
    }
}

/// How many pages of Krea's job list are read looking for unclaimed jobs.
const MAX_PAGES: usize = 20;

/// Krea's jobs created since the earliest `created_at` the state holds that no record claims.
async fn unclaimed_at_krea(
    client: &KreaClient,
    store: &Store,
    claimed: &HashSet<String>,
) -> Vec<String> {
    let earliest =
        store.jobs(None).unwrap_or_default().into_iter().filter_map(|job| job.created_at).min();
    let Some(earliest) = earliest else { return Vec::new() };
    let mut unclaimed = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let page = match client.list_jobs(cursor.as_deref(), 1000).await {
            Ok(page) => page,
            Err(err) => {
                tracing::warn!(%err, "cannot list Krea's jobs; unclaimed jobs are not looked for");
                break;
            }
        };
        let mut older = false;
        for job in &page.items {
            // RFC 3339 times of one writer compare as text.
            if job.created_at.as_deref().is_some_and(|created| created < earliest.as_str()) {
                older = true;
            } else if !claimed.contains(&job.job_id) {
                unclaimed.push(job.job_id.clone());
            }
        }
        match page.next_cursor {
            Some(next) if !older && !page.items.is_empty() => cursor = Some(next),
            _ => break,
        }
    }
    unclaimed
}

/// The size and SHA-256 of a file, streamed.
fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::Digest as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher)?;
    Ok((bytes, crate::job::hex(&hasher.finalize())))
}
