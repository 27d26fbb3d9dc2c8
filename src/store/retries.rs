//! Failed jobs put back to pending by `krea-batch retry`: the one way a job leaves `failed`
//! (see [`JobState::may_be_retried`]). Each retry keeps the failure it replaces in the
//! `retries` table (its reason, Krea id, attempts and end), so the state still tells what
//! happened, and the failed attempt's Krea id stays claimed: reconciliation never adopts it.

use super::{Store, StoreError, now_ms, sqlite};
use crate::job::JobState;
use rusqlite::params;

/// Deletes the later stages of job `id` that were recorded failed or cancelled without ever
/// being sent (its chain stopped at its failure): they hold no input, and once the retried job
/// is downloaded the engine makes them again, by the same keys, with it. Stages that were sent
/// are kept, as every job Krea saw is.
fn forget_stages_not_run(tx: &rusqlite::Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    let mut found = Vec::new();
    let mut parents = vec![id];
    while let Some(parent) = parents.pop() {
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM jobs WHERE parent_id = ?1 AND attempts = 0
               AND state IN ('failed', 'cancelled')",
        )?;
        let children: Vec<i64> =
            stmt.query_map([parent], |row| row.get(0))?.collect::<Result<_, _>>()?;
        parents.extend(&children);
        found.extend(children);
    }
    // Children before their parents: each row's parent_id must name a row.
    for id in found.iter().rev() {
        tx.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
    }
    Ok(())
}

/// One earlier failure of a job that was retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RetriedFailure {
    /// Why it failed then.
    pub error: Option<String>,
    /// Krea's id of the failed job, if Krea had one.
    pub remote_id: Option<String>,
}

impl Store {
    /// Puts the jobs with these row ids back to pending, in one durable transaction, each with
    /// its failure recorded; jobs not failed (any more) are left alone, and so are later stages
    /// that were never sent (they have no input: retrying the job before them makes them again).
    /// Returns how many moved.
    /// The caller holds the writer lock ([`Store::open_writer`]), so no engine has them.
    pub(crate) fn retry_failed(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        debug_assert!(JobState::Failed.may_be_retried());
        let err = sqlite(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut moved = 0;
        {
            let mut keep = tx
                .prepare(
                    "INSERT INTO retries (job_id, retried_at, remote_id, error, attempts, finished_at)
                     SELECT id, ?2, remote_id, error, attempts, finished_at FROM jobs
                     WHERE id = ?1 AND state = 'failed' AND NOT (parent_id IS NOT NULL AND attempts = 0)",
                )
                .map_err(&err)?;
            // `attempts` is kept: the next POST counts as one more attempt of the same job.
            let mut reset = tx
                .prepare(
                    "UPDATE jobs SET state = 'pending', remote_id = NULL, remote_status = NULL,
                        attempt_at = NULL, attempt_ended = NULL, submitted_at = NULL,
                        created_at = NULL, completed_at = NULL, finished_at = NULL, urls = NULL,
                        error = NULL, updated_at = ?2
                     WHERE id = ?1 AND state = 'failed' AND NOT (parent_id IS NOT NULL AND attempts = 0)",
                )
                .map_err(&err)?;
            let now = now_ms();
            for id in ids {
                keep.execute(params![id, now]).map_err(&err)?;
                let reset_now = reset.execute(params![id, now]).map_err(&err)?;
                if reset_now > 0 {
                    forget_stages_not_run(&tx, *id).map_err(&err)?;
                }
                moved += reset_now;
            }
        }
        tx.commit().map_err(&err)?;
        Ok(moved)
    }

    /// The earlier failures of the job with this row id, oldest first.
    pub(crate) fn retried_failures(&self, id: i64) -> Result<Vec<RetriedFailure>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT error, remote_id FROM retries WHERE job_id = ?1 ORDER BY rowid")
            .map_err(&err)?;
        let rows = stmt
            .query_map(params![id], |row| {
                Ok(RetriedFailure { error: row.get(0)?, remote_id: row.get(1)? })
            })
            .map_err(&err)?;
        rows.map(|row| row.map_err(&err)).collect()
    }
}
