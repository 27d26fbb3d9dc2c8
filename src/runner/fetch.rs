//! Downloads of completed jobs: at most `download_concurrency` at once, each fetching the job's
//! missing files with retries and writing a sidecar beside each. A failed download leaves the
//! job `completed` with its download pending; it is never a reason to generate again.
//!
//! A download under way when the run is asked to stop (the first Ctrl-C or SIGTERM, or the
//! service's drain) has `download_grace` left, counted from the request or from its own start
//! if later; then it is stopped and its job left download pending. An abort stops it at once.

use super::phase::IllegalTransition;
use super::{Controls, Engine, Event, ResultFetcher};
use crate::download::{DownloadError, Sidecar, sidecar_path, write_sidecar};
use crate::retry::RetryPolicy;
use crate::store::{FileRecord, JobRecord};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

impl Engine {
    pub(super) fn start_downloads(&mut self) {
        while self.downloads_running < self.settings.download_concurrency.max(1) {
            let Some(slot) = self.table.next_download() else { break };
            self.downloads_running += 1;
            let stop = DownloadStop {
                controls: self.controls.clone(),
                grace: self.settings.download_grace,
            };
            let task = DownloadTask {
                fetcher: Arc::clone(&self.fetcher),
                policy: self.settings.retry,
                dir: Arc::clone(self.table.output_dir(slot)),
                job: self.table.job(slot).clone(),
                stop,
            };
            self.tasks.spawn(async move {
                let (files, error) = task.run().await;
                Event::Downloaded { slot, files, error }
            });
        }
    }

    pub(super) fn on_downloaded(
        &mut self,
        slot: usize,
        files: Vec<FileRecord>,
        error: Option<String>,
    ) -> Result<(), IllegalTransition> {
        self.downloads_running = self.downloads_running.saturating_sub(1);
        for file in files {
            self.status.downloads_total += 1;
            self.status.download_bytes_total += file.bytes;
            self.table.file_written(slot, file);
        }
        let job = self.table.job(slot);
        match error {
            None => {
                tracing::info!(job = %job.name, files = job.files.len(), "downloaded");
                self.table.downloaded(slot, self.clock.now_ms())
            }
            Some(error) => {
                tracing::warn!(
                    job = %job.name, %error,
                    "download failed; the job stays completed with its download pending (a \
                     rerun or `krea-batch download` fetches it)"
                );
                self.table.download_pending(slot, &error);
                Ok(())
            }
        }
    }
}

/// When a download must stop because the run is stopping.
struct DownloadStop {
    controls: Controls,
    grace: Duration,
}

impl DownloadStop {
    /// Resolves when the download must stop, saying why.
    async fn requested(&self) -> String {
        let controls = &self.controls;
        let interrupted = async {
            tokio::select! {
                () = controls.stop_submitting.cancelled() => {}
                () = controls.drain.cancelled() => {}
            }
            tokio::time::sleep(self.grace).await;
        };
        tokio::select! {
            () = controls.abort.cancelled() => "the run was stopped at once".to_owned(),
            () = interrupted => format!(
                "the run was asked to stop (Ctrl-C or SIGTERM) and the download did not end \
                 within limits.download_grace ({})",
                humantime::format_duration(self.grace)
            ),
        }
    }
}

/// Everything one download needs, detached from the engine.
struct DownloadTask {
    fetcher: Arc<dyn ResultFetcher>,
    policy: RetryPolicy,
    dir: Arc<PathBuf>,
    job: JobRecord,
    stop: DownloadStop,
}

impl DownloadTask {
    /// Downloads every URL not yet on disk; returns what was written and the first error.
    /// Stopped between or within files when the run stops (see the module docs); a file cut
    /// off leaves no trace (its temporary file is removed).
    async fn run(self) -> (Vec<FileRecord>, Option<String>) {
        let stop = self.stop.requested();
        tokio::pin!(stop);
        let job = &self.job;
        let several = job.urls.len() > 1;
        let mut written = Vec::new();
        for (index, url) in job.urls.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let done = job
                .files
                .iter()
                .any(|file| file.index == index && self.dir.join(&file.path).is_file());
            if done {
                continue;
            }
            // One result: `<name>.<ext>`; several: a folder, `<name>/<i>.<ext>`.
            let stem =
                if several { format!("{}/{}", job.name, index + 1) } else { job.name.clone() };
            let owner = job.remote_id.as_deref().or(job.reused_from.as_deref());
            let fetch = self.fetcher.fetch(url, &self.dir, &stem, owner, &self.policy);
            let fetched = tokio::select! {
                biased;
                reason = &mut stop => return (written, Some(format!("stopped: {reason}"))),
                result = fetch => match result {
                    Ok(fetched) => fetched,
                    Err(err) => return (written, Some(err.to_string())),
                },
            };
            let file = FileRecord {
                index,
                url: url.clone(),
                path: fetched.relative_path,
                bytes: fetched.bytes,
                sha256: fetched.sha256,
                content_type: fetched.content_type,
            };
            if let Err(err) = write_sidecar_of(&self.dir, job, &file) {
                return (written, Some(err.to_string()));
            }
            written.push(file);
        }
        (written, None)
    }
}

/// Writes the sidecar of one of a job's files.
pub(crate) fn write_sidecar_of(
    dir: &Path,
    job: &JobRecord,
    file: &FileRecord,
) -> Result<(), DownloadError> {
    let mut params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&job.body).unwrap_or_default();
    let prompt = params.remove("prompt");
    let sidecar = Sidecar {
        name: &job.name,
        prompt: prompt.as_ref().and_then(serde_json::Value::as_str).unwrap_or_default(),
        model: &job.model,
        params: &params,
        job_id: job.remote_id.as_deref().unwrap_or_default(),
        created_at: job.created_at.as_deref(),
        completed_at: job.completed_at.as_deref(),
        index: file.index,
        source_url: &file.url,
        file: &file.path,
        bytes: file.bytes,
        sha256: &file.sha256,
        content_type: &file.content_type,
    };
    write_sidecar(dir, &sidecar)
}

/// Rewrites the sidecars of downloaded jobs that are missing or empty: sidecars are not synced
/// (they are derived from the state), so a power cut may have taken one. Returns how many.
pub(super) fn repair_sidecars(job: &JobRecord, dir: &Path) -> usize {
    let mut repaired = 0;
    for file in &job.files {
        let path = sidecar_path(dir, &file.path);
        let whole = std::fs::metadata(&path).is_ok_and(|meta| meta.len() > 0);
        if !whole && dir.join(&file.path).is_file() {
            match write_sidecar_of(dir, job, file) {
                Ok(()) => repaired += 1,
                Err(err) => tracing::warn!(%err, "cannot rewrite a sidecar"),
            }
        }
    }
    repaired
}
