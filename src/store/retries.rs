//! Failed jobs put back to pending by `krea-batch retry`: the one way a job leaves `failed`
//! (see [`JobState::may_be_retried`]). Each retry keeps the failure it replaces in the
//! `retries` table (its reason, Krea id, attempts and end), so the state still tells what
//! happened, and the failed attempt's Krea id stays claimed: reconciliation never adopts it.

use super::{Store, StoreError, now_ms, sqlite};
use crate::job::JobState;
use rusqlite::params;

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
    /// its failure recorded; jobs not failed (any more) are left alone. Returns how many moved.
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
                     WHERE id = ?1 AND state = 'failed'",
                )
                .map_err(&err)?;
            // `attempts` is kept: the next POST counts as one more attempt of the same job.
            let mut reset = tx
                .prepare(
                    "UPDATE jobs SET state = 'pending', remote_id = NULL, remote_status = NULL,
                        attempt_at = NULL, attempt_ended = NULL, submitted_at = NULL,
                        created_at = NULL, completed_at = NULL, finished_at = NULL, urls = NULL,
                        error = NULL, updated_at = ?2
                     WHERE id = ?1 AND state = 'failed'",
                )
                .map_err(&err)?;
            let now = now_ms();
            for id in ids {
                keep.execute(params![id, now]).map_err(&err)?;
                moved += reset.execute(params![id, now]).map_err(&err)?;
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
