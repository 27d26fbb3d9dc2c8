//! Results already paid for, taken instead of paid again: a job whose model and request body
//! (and occurrence) match one that the same state completed for another job file gets a link
//! to (or, across file systems, a copy of) that job's files in its own output folder, with its
//! own sidecars, at no cost.
//!
//! `Store::import` finds the pairs (same key, the other job downloaded); this module writes the
//! files and records them. A job whose earlier result is no longer on disk is marked completed
//! with the earlier job's URLs instead, so the download step fetches them again, still without
//! paying. `reuse: false` in the job file (or `run --fresh`) asks for new generations.

use crate::job::JobState;
use crate::runner::write_sidecar_of;
use crate::store::{FileRecord, JobRecord, Store, StoreError};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

/// Why a result could not be reused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReuseError {
    /// The state file failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be linked or copied.
    #[error("cannot put {} in place: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Links or copies the results of `pairs` (a job's row id, the completed job's row id) into
/// their jobs' output folders and records them; returns how many jobs took a result.
pub(crate) fn take_results<S: BuildHasher>(
    store: &mut Store,
    pairs: &[(i64, i64)],
    output_dirs: &HashMap<i64, PathBuf, S>,
) -> Result<usize, ReuseError> {
    let mut taken = 0;
    for &(id, done_id) in pairs {
        let (Some(mut job), Some(done)) = (store.job(id)?, store.job(done_id)?) else { continue };
        let (Some(dir), Some(done_dir)) =
            (output_dirs.get(&job.batch_id), output_dirs.get(&done.batch_id))
        else {
            continue;
        };
        let Some(done_remote) = done.remote_id.clone() else { continue };
        job.remote_id.clone_from(&done.remote_id);
        job.created_at.clone_from(&done.created_at);
        job.completed_at.clone_from(&done.completed_at);
        job.urls.clone_from(&done.urls);
        job.files = place_files(&job, &done, dir, done_dir)?;
        job.state = if job.files.len() == done.files.len() && !done.files.is_empty() {
            JobState::Downloaded
        } else {
            JobState::Completed
        };
        for file in &job.files {
            if let Err(err) = write_sidecar_of(dir, &job, file) {
                tracing::warn!(%err, "cannot write a sidecar of a reused result");
            }
        }
        // The sidecars name the Krea job that made the result; the record keeps it apart.
        job.remote_id = None;
        store.record_reuse(&job, &done_remote)?;
        tracing::info!(
            job = %job.name,
            from = %done.name,
            krea_job = %done_remote,
            "not paid again: this state already completed the same request; its result is \
             linked here (reuse: false in the job file asks for a new generation)"
        );
        taken += 1;
    }
    Ok(taken)
}

/// Links (or copies) each of `done`'s files that is still whole on disk to the place `job`'s
/// own download would have written it; a place taken by another file is left alone.
fn place_files(
    job: &JobRecord,
    done: &JobRecord,
    dir: &Path,
    done_dir: &Path,
) -> Result<Vec<FileRecord>, ReuseError> {
    let several = done.urls.len() > 1;
    let mut placed = Vec::new();
    for file in &done.files {
        let from = done_dir.join(&file.path);
        if !from.is_file() {
            continue;
        }
        let extension = Path::new(&file.path).extension().and_then(|ext| ext.to_str());
        let stem =
            if several { format!("{}/{}", job.name, file.index + 1) } else { job.name.clone() };
        let relative = match extension {
            Some(ext) => format!("{stem}.{ext}"),
            None => stem,
        };
        let to = dir.join(&relative);
        if to.exists() {
            tracing::warn!(file = %to.display(), "a file is already there; the reused result is not put in its place");
            continue;
        }
        let io = |source| ReuseError::Io { path: to.clone(), source };
        if let Some(folder) = to.parent() {
            crate::files::ensure_real_dir(folder).map_err(|err| io(err.source))?;
        }
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(io)?;
        }
        placed.push(FileRecord { path: relative, ..file.clone() });
    }
    Ok(placed)
}
