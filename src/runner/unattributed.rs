//! Krea jobs that reconciliation found but could not attribute (`reconcile.rs`, "What cannot be
//! told apart"): several POSTs were on the wire together, their answers were lost, and the
//! unclaimed jobs Krea created meanwhile cannot be paired with them without a guess.
//!
//! Nothing is guessed and nothing is paid again: the jobs of the group stay `unknown` in the
//! state file (set aside, never submitted again), and each of these Krea jobs is polled to its
//! end here and its results downloaded to `<output>/unattributed/<krea id>-<n>.<ext>`, with a
//! sidecar that names every candidate job (name, prompt, model, parameters) instead of one, and
//! the Krea job as `krea_job_id`, not `job_id`: what reads a sidecar as one job's result (the
//! output folder's evidence check, `recover`) must not take it for any job's. The run reports
//! them. They are not rows of the state file: the set-aside jobs are reconciled
//! again by the next run, which finds the same jobs and skips the files already on disk.
//!
//! Polled and downloaded outside the job table (they belong to no job), at the slow end of the
//! poll schedule; an interrupt lets them finish like jobs in flight, a drain or an abort leaves
//! them to the next run.

use super::{Engine, Event};
use crate::api::{ApiError, RemoteJob, RemoteStatus};
use crate::download::sidecar_path;
use crate::files::write_atomically;
use crate::store::JobRecord;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::time::Instant;

/// The folder, inside a batch's output folder, that receives unattributed results.
pub(super) const UNATTRIBUTED_DIR: &str = "unattributed";

/// The unattributed Krea jobs of this run.
#[derive(Debug, Default)]
pub(super) struct Unattributed {
    jobs: Vec<Orphan>,
}

/// One Krea job that cannot be attributed, and the jobs of ours it may belong to.
#[derive(Debug)]
struct Orphan {
    remote_id: String,
    dir: Arc<PathBuf>,
    candidates: Vec<JobRecord>,
    step: Step,
    reported: bool,
    created_at: Option<String>,
    completed_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    /// Poll it at this time.
    PollAt(Instant),
    /// Download these results.
    Download(Vec<String>),
    /// A poll or the download is under way.
    Busy,
    /// Ended: downloaded, or failed or cancelled at Krea (not billed), or lost.
    Done,
}

impl Unattributed {
    /// When the next poll is due, if one waits.
    pub(super) fn wake(&self) -> Option<Instant> {
        self.jobs
            .iter()
            .filter_map(|orphan| match orphan.step {
                Step::PollAt(at) => Some(at),
                _ => None,
            })
            .min()
    }

    /// Whether nothing is left to do for them.
    pub(super) fn is_idle(&self) -> bool {
        self.jobs.iter().all(|orphan| orphan.step == Step::Done)
    }
}

impl Engine {
    /// The job in `slot` may be the one that created each of `jobs`: they are polled and
    /// downloaded to `unattributed/`, naming it among their candidates.
    pub(super) fn add_unattributed(&mut self, slot: usize, jobs: Vec<RemoteJob>) {
        let dir = Arc::clone(self.table.output_dir(slot));
        let candidate = self.table.job(slot).clone();
        for job in jobs {
            let known = self
                .unattributed
                .jobs
                .iter_mut()
                .find(|o| o.remote_id == job.job_id && o.dir == dir);
            let orphan = if let Some(orphan) = known {
                orphan
            } else {
                self.unattributed.jobs.push(Orphan {
                    remote_id: job.job_id.clone(),
                    dir: Arc::clone(&dir),
                    candidates: Vec::new(),
                    step: Step::PollAt(Instant::now()),
                    reported: false,
                    created_at: job.created_at.clone(),
                    completed_at: None,
                });
                self.unattributed.jobs.last_mut().expect("just pushed")
            };
            if !orphan.candidates.iter().any(|known| known.id == candidate.id) {
                orphan.candidates.push(candidate.clone());
            }
        }
    }

    /// Reports the unattributed jobs not reported yet: one warning per Krea job.
    pub(super) fn report_unattributed(&mut self) {
        for orphan in self.unattributed.jobs.iter_mut().filter(|o| !o.reported) {
            orphan.reported = true;
            let names: Vec<&str> = orphan.candidates.iter().map(|job| job.name.as_str()).collect();
            tracing::warn!(
                job_id = %orphan.remote_id,
                candidates = %names.join(", "),
                folder = %orphan.dir.join(UNATTRIBUTED_DIR).display(),
                "Krea created this job for one of the candidate jobs, but which one cannot be \
                 told (their answers were lost while several submissions were on the wire); its \
                 results are downloaded to the folder with every candidate named in the \
                 sidecar, and no candidate is submitted again"
            );
        }
    }

    /// Starts the polls that are due and the downloads that wait, unless the run drains.
    pub(super) fn start_unattributed(&mut self) {
        if self.draining || self.controls.abort.is_cancelled() {
            return;
        }
        let now = Instant::now();
        for (index, orphan) in self.unattributed.jobs.iter_mut().enumerate() {
            match std::mem::replace(&mut orphan.step, Step::Busy) {
                Step::PollAt(at) if at <= now => {
                    let api = Arc::clone(&self.api);
                    let id = orphan.remote_id.clone();
                    self.tasks.spawn(async move {
                        let result = api.get_job(&id).await;
                        Event::UnattributedPolled { index, result }
                    });
                }
                Step::Download(urls) => {
                    let fetcher = Arc::clone(&self.fetcher);
                    let policy = self.settings.retry;
                    let orphan = OrphanFiles {
                        remote_id: orphan.remote_id.clone(),
                        dir: Arc::clone(&orphan.dir),
                        candidates: orphan.candidates.clone(),
                        created_at: orphan.created_at.clone(),
                        completed_at: orphan.completed_at.clone(),
                    };
                    self.tasks.spawn(async move {
                        let error = orphan.download(&*fetcher, &urls, &policy).await.err();
                        Event::UnattributedDownloaded { index, error }
                    });
                }
                step => orphan.step = step,
            }
        }
    }

    pub(super) fn on_unattributed_polled(
        &mut self,
        index: usize,
        result: Result<RemoteJob, ApiError>,
    ) {
        let again = Instant::now() + self.settings.poll.max;
        let Some(orphan) = self.unattributed.jobs.get_mut(index) else { return };
        orphan.step = match result {
            Ok(job) => match job.status {
                Some(RemoteStatus::Completed) => {
                    orphan.created_at = job.created_at.or(orphan.created_at.take());
                    orphan.completed_at = job.completed_at;
                    Step::Download(job.urls)
                }
                Some(status @ (RemoteStatus::Failed | RemoteStatus::Cancelled)) => {
                    tracing::info!(
                        job_id = %orphan.remote_id, status = %status.as_str(),
                        "an unattributed job ended without results (not billed)"
                    );
                    Step::Done
                }
                _ => Step::PollAt(again),
            },
            Err(ApiError::NotFound { message }) => {
                tracing::warn!(job_id = %orphan.remote_id, %message, "an unattributed job is gone at Krea");
                Step::Done
            }
            Err(err) => {
                tracing::debug!(job_id = %orphan.remote_id, %err, "polling an unattributed job failed; trying again");
                Step::PollAt(again)
            }
        };
    }

    pub(super) fn on_unattributed_downloaded(&mut self, index: usize, error: Option<String>) {
        let Some(orphan) = self.unattributed.jobs.get_mut(index) else { return };
        orphan.step = Step::Done;
        let folder = orphan.dir.join(UNATTRIBUTED_DIR);
        match error {
            None => tracing::warn!(
                job_id = %orphan.remote_id, folder = %folder.display(),
                "results of an unattributed job downloaded; its sidecars name the candidate jobs"
            ),
            Some(error) => tracing::warn!(
                job_id = %orphan.remote_id, %error,
                "cannot download the results of an unattributed job; the next run tries again"
            ),
        }
    }
}

/// What downloading one unattributed job's results needs, detached from the engine.
struct OrphanFiles {
    remote_id: String,
    dir: Arc<PathBuf>,
    candidates: Vec<JobRecord>,
    created_at: Option<String>,
    completed_at: Option<String>,
}

impl OrphanFiles {
    /// Downloads each result not yet on disk (its sidecar is written last, so a sidecar means
    /// a whole file) and writes its sidecar.
    async fn download(
        &self,
        fetcher: &dyn super::ResultFetcher,
        urls: &[String],
        policy: &crate::retry::RetryPolicy,
    ) -> Result<(), String> {
        let folder = self.dir.join(UNATTRIBUTED_DIR);
        crate::files::ensure_real_dir(&folder).map_err(|err| err.to_string())?;
        let base = file_stem(&self.remote_id);
        for (index, url) in urls.iter().enumerate() {
            let stem = format!("{base}-{}", index + 1);
            if has_sidecar(&folder, &stem) {
                continue;
            }
            let relative = format!("{UNATTRIBUTED_DIR}/{stem}");
            let file = fetcher
                .fetch(url, &self.dir, &relative, Some(&self.remote_id), policy)
                .await
                .map_err(|err| err.to_string())?;
            let sidecar = self.sidecar(index, url, &file);
            let mut text = serde_json::to_vec_pretty(&sidecar).unwrap_or_default();
            text.push(b'\n');
            write_atomically(&sidecar_path(&self.dir, &file.relative_path), &text, false)
                .map_err(|err| err.to_string())?;
        }
        Ok(())
    }

    fn sidecar(
        &self,
        index: usize,
        url: &str,
        fetched: &crate::download::Fetched,
    ) -> serde_json::Value {
        let candidates: Vec<serde_json::Value> = self
            .candidates
            .iter()
            .map(|job| {
                let mut params: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&job.body).unwrap_or_default();
                let prompt = params.remove("prompt").unwrap_or_default();
                serde_json::json!({
                    "name": job.name,
                    "prompt": prompt,
                    "model": job.model,
                    "params": params,
                })
            })
            .collect();
        serde_json::json!({
            "unattributed": true,
            "note": "Krea created this job for one of the candidates, but which one cannot be \
                     told: their submissions were on the wire together and the answers were \
                     lost. It was paid once; no candidate was submitted again.",
            "krea_job_id": self.remote_id,
            "candidates": candidates,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "index": index,
            "source_url": url,
            "file": fetched.relative_path,
            "bytes": fetched.bytes,
            "sha256": fetched.sha256,
            "content_type": fetched.content_type,
        })
    }
}

/// A file name from a Krea job id: its letters, digits, `-` and `_`, others as `_`, at most
/// 100 characters (an id comes from Krea's list and may hold anything).
fn file_stem(remote_id: &str) -> String {
    let stem: String = remote_id
        .chars()
        .take(100)
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if stem.is_empty() { "job".to_owned() } else { stem }
}

/// Whether `<folder>/<stem>.<ext>.json` exists for some extension: that result is on disk.
fn has_sidecar(folder: &Path, stem: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(folder) else { return false };
    let prefix = format!("{stem}.");
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.starts_with(&prefix) && name.ends_with(".json")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stems_keep_to_plain_characters() {
        assert_eq!(file_stem("job-0001"), "job-0001");
        assert_eq!(file_stem("../x/y"), "___x_y");
        assert_eq!(file_stem(""), "job");
        assert_eq!(file_stem(&"a".repeat(300)).len(), 100);
    }
}
