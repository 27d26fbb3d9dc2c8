//! Chains of stages in the engine: when a job that has stages after it ends, its next stage's
//! jobs are inserted into the state file (once, by key; `chain.rs` says what they are) and
//! taken on like any job: a stage job then goes through the same attempt, commit, POST, poll
//! and download as the job before it. A stage starts as soon as its own input is on disk,
//! whatever the rest of the batch is doing.
//!
//! A job the user cancelled stops its chain there: its later stages are recorded as cancelled,
//! also when Krea refused the cancel and ran the job (`chains_cancelled`).
//!
//! The parent's end is committed before its stage jobs are inserted (the hook is the list of
//! jobs that ended, taken after the turn's commit), and the insert is a call on the writer
//! after that commit. A run stopped between the two, or a stage insert cut off, is finished by
//! the next run: every ended job whose next stage has no job yet is looked at again when the
//! engine takes it on.

use super::{Engine, Event};
use crate::chain::{Chain, ParentOutcome, file_image_size, next_jobs};
use crate::job::JobState;
use crate::store::{JobRecord, StoreError};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// The stage jobs of one parent, as the state file now holds them.
pub(super) type StagesAdded = Result<Vec<JobRecord>, StoreError>;

/// Whether `job` has stages after it that its end should start (or fail).
pub(super) fn has_stages_after(job: &JobRecord) -> bool {
    job.state.is_final()
        && job.chain.as_deref().and_then(Chain::parse).is_some_and(|chain| !chain.stages.is_empty())
}

impl Engine {
    /// Inserts the next stage's jobs of every ended job in `stages_due` that has none yet.
    pub(super) fn start_stages(&mut self) {
        if self.stages_due.is_empty() || self.draining || !self.settings.start_stages {
            return;
        }
        let parents_with_children: HashSet<i64> =
            self.table.jobs().filter_map(|(_, job)| job.parent_id).collect();
        for slot in std::mem::take(&mut self.stages_due) {
            let job = self.table.job(slot);
            if parents_with_children.contains(&job.id) {
                continue;
            }
            let Some(chain) = job.chain.as_deref().and_then(Chain::parse) else { continue };
            let dir = Arc::clone(self.table.output_dir(slot));
            let results = job
                .urls
                .iter()
                .enumerate()
                .map(|(index, url)| {
                    let file = job.files.iter().find(|file| file.index as usize == index);
                    (url.as_str(), file.and_then(|file| file_image_size(&dir.join(&file.path))))
                })
                .collect();
            let mut outcome = ParentOutcome {
                key: &job.key,
                name: &job.name,
                state: job.state,
                error: job.error.as_deref(),
                results,
            };
            if self.chains_cancelled.contains(&job.id) && job.state != JobState::Cancelled {
                outcome.state = JobState::Cancelled;
                outcome.error = Some("the user cancelled it (Krea ran it all the same)");
            }
            let jobs = next_jobs(&chain, &outcome);
            if jobs.is_empty() {
                continue;
            }
            if job.state == JobState::Downloaded {
                tracing::info!(job = %job.name, stage_jobs = jobs.len(), "next stage starts");
            }
            let (batch_id, parent_id) = (job.batch_id, job.id);
            let writer = self.writer.clone();
            self.tasks.spawn(async move {
                let inserted = writer
                    .with_store(move |store| store.insert_stage_jobs(batch_id, parent_id, &jobs))
                    .await;
                Event::StagesAdded { batch_id, dir, result: inserted.and_then(|result| result) }
            });
        }
    }

    /// Takes on the stage jobs just inserted.
    pub(super) fn on_stages_added(&mut self, batch_id: i64, dir: Arc<PathBuf>, added: StagesAdded) {
        match added {
            Ok(jobs) => {
                let dirs = HashMap::from([(batch_id, dir)]);
                self.add_jobs(jobs, &dirs);
            }
            Err(err) => {
                tracing::error!(%err, "cannot record the next stage's jobs; a rerun records them");
            }
        }
    }
}
