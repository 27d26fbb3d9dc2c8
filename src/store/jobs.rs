//! Jobs in the state file: importing a job file's jobs, reading them back, applying the
//! engine's changes, and the counts `status` shows.

use super::{
    Change, FileRecord, ImportReport, InputName, JobRecord, Store, StoreError, now_ms, parse_state,
    sqlite,
};
use crate::job::{JobKey, JobState};
use crate::jobfile::{JobSpec, PLACEHOLDER_PREFIX, placeholders};
use crate::pricing::PriceTable;
use rusqlite::{OptionalExtension, params};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A batch row for `source` (?1) writing into ?2, imported at ?3; an existing one keeps its id.
const UPSERT_BATCH: &str =
    "INSERT INTO batches (source, output_dir, imported_at) VALUES (?1, ?2, ?3)
     ON CONFLICT (source) DO UPDATE SET output_dir = excluded.output_dir";

impl Store {
    /// Records a batch (with no jobs yet) before its identity is written anywhere else: the
    /// output folder's marker names it, and a run killed between the marker and the import
    /// must find the batch the marker names, not take the state for a lost one.
    pub(crate) fn register_batch(
        &mut self,
        source: &str,
        output_dir: &Path,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(UPSERT_BATCH, params![source, output_dir.to_string_lossy(), now_ms()])
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    /// Adds the jobs of a job file to the state in one transaction. Known jobs (same key) are
    /// left as they are, except that an unfinished one takes the file's new name; jobs gone from
    /// the file are marked so (never cancelled). A new job whose name is taken, in the same
    /// output directory, by a different earlier job gets the name with its key's first 8 hex
    /// digits appended, so no result already paid for is overwritten.
    pub(crate) fn import(
        &mut self,
        source: &str,
        output_dir: &Path,
        specs: &[JobSpec],
        prices: &PriceTable,
        reuse: bool,
    ) -> Result<ImportReport, StoreError> {
        let path = self.path.clone();
        let err = sqlite(&path);
        let now = now_ms();
        let output_text = output_dir.to_string_lossy().into_owned();
        let tx = self.conn.transaction().map_err(&err)?;
        tx.execute(UPSERT_BATCH, params![source, output_text, now]).map_err(&err)?;
        let batch_id: i64 = tx
            .query_row("SELECT id FROM batches WHERE source = ?1", [source], |row| row.get(0))
            .map_err(&err)?;

        // Every job writing to this output directory, by key and by name.
        let mut known: HashMap<String, (i64, String, JobState)> = HashMap::new();
        let mut names: HashMap<String, String> = HashMap::new();
        {
            let mut stmt = tx
                .prepare(
                    "SELECT jobs.id, jobs.key, jobs.name, jobs.state, jobs.batch_id FROM jobs
                     JOIN batches ON batches.id = jobs.batch_id WHERE batches.output_dir = ?1",
                )
                .map_err(&err)?;
            let rows = stmt
                .query_map([&output_text], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, i64>(4)?,
                    ))
                })
                .map_err(&err)?;
            for row in rows {
                let (id, key, name, state, job_batch) = row.map_err(&err)?;
                let state = parse_state(&path, &state)?;
                names.insert(name.clone(), key.clone());
                if job_batch == batch_id {
                    known.insert(key, (id, name, state));
                }
            }
        }

        let mut report = ImportReport { batch_id, ..ImportReport::default() };
        let in_file: HashSet<&str> = specs.iter().map(|spec| spec.key.as_str()).collect();
        tx.execute("UPDATE jobs SET in_file = 0 WHERE batch_id = ?1", [batch_id]).map_err(&err)?;
        for spec in specs {
            let key = spec.key.as_str();
            if let Some((id, old_name, state)) = known.get(key) {
                report.known += 1;
                let rename = *old_name != spec.name
                    && !state.is_final()
                    && names.get(&spec.name).is_none_or(|owner| owner == key);
                if rename {
                    names.remove(old_name);
                    names.insert(spec.name.clone(), key.to_owned());
                }
                let name = if rename { &spec.name } else { old_name };
                // A job not yet sent takes today's price (the file's `prices:` may have been
                // added or changed); one already sent keeps the price it was committed at, so
                // only pending jobs are priced (the CASE below ignores the rest's NULL).
                let price = (*state == JobState::Pending)
                    .then(|| prices.price(&spec.model, &spec.body_map()))
                    .flatten();
                tx.execute(
                    "UPDATE jobs SET in_file = 1, name = ?2,
                        price_usd = CASE WHEN state = 'pending' THEN ?3 ELSE price_usd END,
                        chain = ?4
                     WHERE id = ?1",
                    params![id, name, price, priced_chain(spec, prices)],
                )
                .map_err(&err)?;
                continue;
            }
            let mut name = spec.name.clone();
            if names.get(&name).is_some_and(|owner| owner != key) {
                name = format!("{}-{}", spec.name, &key[..8]);
                report.renamed.push((spec.name.clone(), name.clone()));
            }
            names.insert(name.clone(), key.to_owned());
            let price = prices.price(&spec.model, &spec.body_map());
            tx.execute(
                "INSERT INTO jobs (batch_id, key, name, model, body, state, price_usd, updated_at,
                                   chain)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?8)",
                params![
                    batch_id,
                    key,
                    name,
                    spec.model,
                    spec.body,
                    price,
                    now,
                    priced_chain(spec, prices)
                ],
            )
            .map_err(&err)?;
            report.added += 1;
        }
        stages_follow_their_parents(&tx, batch_id).map_err(&err)?;
        report.removed = known.keys().filter(|key| !in_file.contains(key.as_str())).count();
        if reuse {
            report.reusable = reusable_pairs(&tx, batch_id).map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(report)
    }

    /// Inserts the stage jobs that follow job `parent_id` (each once: a job with the same key
    /// in the batch is kept as it is) and returns them as the state now holds them.
    pub(crate) fn insert_stage_jobs(
        &mut self,
        batch_id: i64,
        parent_id: i64,
        jobs: &[crate::chain::NewStageJob],
    ) -> Result<Vec<JobRecord>, StoreError> {
        let path = self.path.clone();
        let err = sqlite(&path);
        let now = now_ms();
        let tx = self.conn.transaction().map_err(&err)?;
        let mut ids = Vec::with_capacity(jobs.len());
        for job in jobs {
            let finished = (job.state != JobState::Pending).then_some(now);
            tx.execute(
                "INSERT INTO jobs (batch_id, key, name, model, body, state, error, price_usd,
                                   updated_at, finished_at, chain, parent_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT DO NOTHING",
                params![
                    batch_id,
                    job.key.as_str(),
                    job.name,
                    job.model,
                    job.body,
                    job.state.as_str(),
                    job.error,
                    job.price_usd,
                    now,
                    finished,
                    job.chain,
                    parent_id
                ],
            )
            .map_err(&err)?;
            let id: Option<i64> = tx
                .query_row(
                    "SELECT id FROM jobs WHERE batch_id = ?1 AND key = ?2",
                    params![batch_id, job.key.as_str()],
                    |row| row.get(0),
                )
                .optional()
                .map_err(&err)?;
            ids.extend(id);
        }
        tx.commit().map_err(&err)?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            records.extend(self.job(id)?);
        }
        Ok(records)
    }

    /// The jobs of one batch, or of all batches, with their files, in file order.
    pub(crate) fn jobs(&self, batch_id: Option<i64>) -> Result<Vec<JobRecord>, StoreError> {
        self.select_jobs(Selection::Batch, batch_id)
    }

    /// One job by its row id, with its files.
    pub(crate) fn job(&self, id: i64) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.select_jobs(Selection::Job, Some(id))?.pop())
    }

    /// The jobs `selection` picks with `value` (a batch, all batches, or one job), with their
    /// files, in file order.
    fn select_jobs(
        &self,
        selection: Selection,
        value: Option<i64>,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let (files_where, jobs_where) = match selection {
            // Separate statements, so that one job is found by its key, not by a scan.
            Selection::Batch => ("?1 IS NULL OR jobs.batch_id = ?1", "?1 IS NULL OR batch_id = ?1"),
            Selection::Job => ("files.job_id = ?1", "id = ?1"),
        };
        let err = sqlite(&self.path);
        let mut files: HashMap<i64, Vec<FileRecord>> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT files.job_id, idx, url, path, bytes, sha256, content_type FROM files
                 JOIN jobs ON jobs.id = files.job_id WHERE {files_where}
                 ORDER BY files.job_id, idx"
            ))
            .map_err(&err)?;
        let rows = stmt
            .query_map([value], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    FileRecord {
                        index: row.get(1)?,
                        url: row.get(2)?,
                        path: row.get(3)?,
                        bytes: u64::try_from(row.get::<_, i64>(4)?).unwrap_or_default(),
                        sha256: row.get(5)?,
                        content_type: row.get(6)?,
                    },
                ))
            })
            .map_err(&err)?;
        for row in rows {
            let (job_id, file) = row.map_err(&err)?;
            files.entry(job_id).or_default().push(file);
        }

        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT id, batch_id, key, name, model, body, state, remote_id, remote_status,
                        attempt_at, attempts, submitted_at, created_at, completed_at, finished_at,
                        urls, error, price_usd, in_file, attempt_ended, reused_from,
                        chain, parent_id
                 FROM jobs WHERE {jobs_where} ORDER BY id"
            ))
            .map_err(&err)?;
        let rows = stmt.query_map([value], read_job_row).map_err(&err)?;
        let mut jobs = Vec::new();
        let mut names: Option<HashMap<String, String>> = None;
        for row in rows {
            let raw = row.map_err(&err)?;
            let mut job = raw.into_record(&self.path)?;
            job.files = files.remove(&job.id).unwrap_or_default();
            if job.body.contains(PLACEHOLDER_PREFIX) {
                let names = match &mut names {
                    Some(names) => names,
                    None => names.insert(self.upload_paths()?),
                };
                job.inputs = placeholders(&job.body)
                    .filter_map(|sha| {
                        let path = names.get(sha)?.clone();
                        Some(InputName { sha256: sha.to_owned(), path })
                    })
                    .collect();
            }
            jobs.push(job);
        }
        Ok(jobs)
    }

    /// The batch row of a job file, if it was ever imported.
    pub(crate) fn batch_id(&self, source: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT id FROM batches WHERE source = ?1", [source], |row| row.get(0))
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// A batch imported before output folders carried a marker: the one whose job file was
    /// `source`, else the one writing into `output_dir`, else, when the state file lives in
    /// that folder (`in_folder`: it can belong to no other), the one imported last. Returns its
    /// identity (`source`).
    pub(crate) fn legacy_batch(
        &self,
        source: &str,
        output_dir: &Path,
        in_folder: bool,
    ) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT source FROM batches
                 WHERE source = ?1 OR output_dir = ?2 OR (?3 AND source NOT LIKE 'inbox:%')
                 ORDER BY source = ?1 DESC, output_dir = ?2 DESC, imported_at DESC, id DESC
                 LIMIT 1",
                params![source, output_dir.to_string_lossy(), in_folder],
                |row| row.get(0),
            )
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// Adds to a batch a job that the job file does not list, known only from the results it
    /// left in the output folder (`krea-batch recover`), with its Krea job id; returns it.
    pub(crate) fn insert_recovered(
        &mut self,
        batch_id: i64,
        name: &str,
        model: &str,
        body: &str,
        remote_id: &str,
    ) -> Result<JobRecord, StoreError> {
        let err = sqlite(&self.path);
        let key = format!("recovered:{remote_id}");
        self.conn
            .execute(
                "INSERT INTO jobs (batch_id, key, name, model, body, state, remote_id, in_file,
                                   updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'submitted', ?6, 0, ?7)",
                params![batch_id, key, name, model, body, remote_id, now_ms()],
            )
            .map_err(&err)?;
        let id = self.conn.last_insert_rowid();
        self.job(id)?.ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            message: format!("job {id} vanished"),
        })
    }

    /// Records that `job` took the result of the Krea job `reused_from` instead of being paid
    /// again: its state, URLs, times and files as given, at no price, in one transaction.
    pub(crate) fn record_reuse(
        &mut self,
        job: &JobRecord,
        reused_from: &str,
    ) -> Result<(), StoreError> {
        let err = sqlite(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let urls = serde_json::to_string(&job.urls).unwrap_or_default();
        tx.execute(
            "UPDATE jobs SET state = ?2, urls = ?3, created_at = ?4, completed_at = ?5,
                finished_at = ?6, price_usd = 0.0, reused_from = ?7, updated_at = ?6
             WHERE id = ?1 AND state = 'pending'",
            params![
                job.id,
                job.state.as_str(),
                urls,
                job.created_at,
                job.completed_at,
                now_ms(),
                reused_from
            ],
        )
        .map_err(&err)?;
        for file in &job.files {
            tx.execute(
                "INSERT OR REPLACE INTO files (job_id, idx, url, path, bytes, sha256, content_type)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    job.id,
                    file.index,
                    file.url,
                    file.path,
                    i64::try_from(file.bytes).unwrap_or(i64::MAX),
                    file.sha256,
                    file.content_type
                ],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    /// The paths of the files a batch's jobs have on disk, relative to its output folder.
    pub(crate) fn file_paths(&self, batch_id: i64) -> Result<HashSet<String>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT files.path FROM files JOIN jobs ON jobs.id = files.job_id
                 WHERE jobs.batch_id = ?1",
            )
            .map_err(&err)?;
        let rows = stmt.query_map([batch_id], |row| row.get::<_, String>(0)).map_err(&err)?;
        rows.map(|row| row.map_err(&err)).collect()
    }

    /// Gives a batch a new identity (a legacy batch adopted by an output folder's marker).
    pub(crate) fn rename_batch(&mut self, from: &str, to: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE batches SET source = ?2 WHERE source = ?1", params![from, to])
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    /// For `check`: the keys of `batch` (when it is known) that were already sent or ended, and
    /// the keys that some other batch completed (results a run could reuse).
    pub(crate) fn preview(
        &self,
        batch: Option<&str>,
    ) -> Result<(HashSet<String>, HashSet<String>), StoreError> {
        let err = sqlite(&self.path);
        let batch_id = match batch {
            Some(batch) => self.batch_id(batch)?,
            None => None,
        };
        let keys = |sql: &str| -> Result<HashSet<String>, StoreError> {
            let mut stmt = self.conn.prepare(sql).map_err(&err)?;
            let rows = stmt.query_map([batch_id], |row| row.get::<_, String>(0)).map_err(&err)?;
            rows.map(|row| row.map_err(&err)).collect()
        };
        let known = keys("SELECT key FROM jobs WHERE batch_id = ?1 AND state != 'pending'")?;
        let reusable = keys(
            "SELECT DISTINCT key FROM jobs WHERE state = 'downloaded'
             AND (?1 IS NULL OR batch_id != ?1)",
        )?;
        Ok((known, reusable))
    }

    /// Every Krea job id the state file holds, in every batch: reconciliation never adopts one.
    pub(crate) fn remote_ids(&self) -> Result<HashSet<String>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                // A retried job's failed attempt is still Krea's job, claimed by this state.
                "SELECT remote_id FROM jobs WHERE remote_id IS NOT NULL
                 UNION SELECT remote_id FROM retries WHERE remote_id IS NOT NULL",
            )
            .map_err(&err)?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0)).map_err(&err)?;
        rows.map(|row| row.map_err(&err)).collect()
    }

    /// The output directory of each batch.
    pub(crate) fn output_dirs(&self) -> Result<HashMap<i64, PathBuf>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self.conn.prepare("SELECT id, output_dir FROM batches").map_err(&err)?;
        let rows = stmt
            .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))
            .map_err(&err)?;
        rows.map(|row| row.map(|(id, dir)| (id, PathBuf::from(dir))).map_err(&err)).collect()
    }

    /// Writes `changes` in one durable transaction: on disk (fsynced) when this returns.
    pub(crate) fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        self.apply_with(changes, true)
    }

    /// Writes `changes` in one transaction, fsynced only if `synced`. An unsynced commit is as
    /// atomic and survives a killed process (the write-ahead log is in the operating system's
    /// hands); only a power cut can lose it, and the next synced commit makes it durable too.
    /// The engine syncs the commits that must be on disk before a request: the attempt before
    /// each POST.
    pub(crate) fn apply_with(
        &mut self,
        changes: &[Change],
        synced: bool,
    ) -> Result<(), StoreError> {
        let err = sqlite(&self.path);
        if synced != self.synced {
            let mode = if synced { "FULL" } else { "NORMAL" };
            self.conn.pragma_update(None, "synchronous", mode).map_err(&err)?;
            self.synced = synced;
        }
        let tx = self.conn.transaction().map_err(&err)?;
        {
            let mut update_job = tx
                .prepare_cached(
                    // Indexed columns that rarely change (name, remote_id) are left out:
                    // setting one, even to the same value, rewrites its index page.
                    "UPDATE jobs SET state = ?2, remote_status = ?3, attempt_at = ?4,
                        attempts = ?5, submitted_at = ?6, created_at = ?7, completed_at = ?8,
                        finished_at = ?9, urls = ?10, error = ?11, updated_at = ?12,
                        attempt_ended = ?13
                     WHERE id = ?1",
                )
                .map_err(&err)?;
            let mut set_remote_id = tx
                .prepare_cached(
                    "UPDATE jobs SET remote_id = ?2 WHERE id = ?1 AND remote_id IS NOT ?2",
                )
                .map_err(&err)?;
            let mut upsert_file = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO files
                        (job_id, idx, url, path, bytes, sha256, content_type)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(&err)?;
            let mut set_meta = tx
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
                .map_err(&err)?;
            let now = now_ms();
            for change in changes {
                match change {
                    Change::Job(job) => {
                        let urls = (!job.urls.is_empty())
                            .then(|| serde_json::to_string(&job.urls).unwrap_or_default());
                        if job.remote_id.is_some() {
                            set_remote_id.execute(params![job.id, job.remote_id]).map_err(&err)?;
                        }
                        update_job
                            .execute(params![
                                job.id,
                                job.state.as_str(),
                                job.remote_status,
                                job.attempt_at,
                                job.attempts,
                                job.submitted_at,
                                job.created_at,
                                job.completed_at,
                                job.finished_at,
                                urls,
                                job.error,
                                now,
                                job.attempt_ended,
                            ])
                            .map_err(&err)?;
                    }
                    Change::File { job_id, file } => {
                        upsert_file
                            .execute(params![
                                job_id,
                                file.index,
                                file.url,
                                file.path,
                                i64::try_from(file.bytes).unwrap_or(i64::MAX),
                                file.sha256,
                                file.content_type,
                            ])
                            .map_err(&err)?;
                    }
                    Change::Meta { key, value } => {
                        set_meta.execute(params![key, value]).map_err(&err)?;
                    }
                }
            }
        }
        tx.commit().map_err(&err)
    }

    /// The sum of the estimated prices of the jobs in `states`, and how many of them have none.
    pub(crate) fn price_sum(&self, states: &[JobState]) -> Result<(f64, usize), StoreError> {
        let list: Vec<String> =
            states.iter().map(|state| format!("'{}'", state.as_str())).collect();
        let sql = format!(
            "SELECT COALESCE(SUM(price_usd), 0.0), COUNT(*) - COUNT(price_usd) FROM jobs
             WHERE state IN ({})",
            list.join(", ")
        );
        self.conn
            .query_row(&sql, [], |row| Ok((row.get(0)?, row.get::<_, i64>(1)?)))
            .map(|(sum, unpriced)| (sum, usize::try_from(unpriced).unwrap_or_default()))
            .map_err(sqlite(&self.path))
    }

    /// The names of at most `limit` jobs in `state`, oldest first.
    pub(crate) fn names_in(
        &self,
        state: JobState,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM jobs WHERE state = ?1 ORDER BY id LIMIT ?2")
            .map_err(&err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows =
            stmt.query_map(params![state.as_str(), limit], |row| row.get(0)).map_err(&err)?;
        rows.map(|row| row.map_err(&err)).collect()
    }

    /// How many jobs are in each state, by job file: (the batch's source, state, count), in
    /// the order the files were imported.
    pub(crate) fn count_by_batch_state(
        &self,
    ) -> Result<Vec<(String, JobState, usize)>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT batches.source, jobs.state, COUNT(*) FROM jobs
                 JOIN batches ON batches.id = jobs.batch_id
                 GROUP BY batches.id, jobs.state ORDER BY batches.id",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?))
            })
            .map_err(&err)?;
        let mut counts = Vec::new();
        for row in rows {
            let (source, state, count) = row.map_err(&err)?;
            counts.push((source, parse_state(&self.path, &state)?, count as usize));
        }
        Ok(counts)
    }

    /// How many jobs are in each state, over one batch or all.
    pub(crate) fn count_by_state(
        &self,
        batch_id: Option<i64>,
    ) -> Result<Vec<(JobState, usize)>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT state, COUNT(*) FROM jobs WHERE ?1 IS NULL OR batch_id = ?1
                 GROUP BY state",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([batch_id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
            .map_err(&err)?;
        let mut counts = Vec::new();
        for row in rows {
            let (state, count) = row.map_err(&err)?;
            counts.push((parse_state(&self.path, &state)?, count as usize));
        }
        counts.sort();
        Ok(counts)
    }
}

/// The unsent jobs of `batch_id` that an identical job of another batch already completed:
/// (the job's row id, the completed job's row id). The same key is the same model, body and
/// occurrence: one completed result per unsent job, the earliest, never one of its own batch.
fn reusable_pairs(
    tx: &rusqlite::Transaction<'_>,
    batch_id: i64,
) -> rusqlite::Result<Vec<(i64, i64)>> {
    let mut stmt = tx.prepare(
        "SELECT jobs.id,
            (SELECT done.id FROM jobs AS done
             WHERE done.key = jobs.key AND done.batch_id != jobs.batch_id
               AND done.state = 'downloaded' ORDER BY done.id LIMIT 1)
         FROM jobs WHERE jobs.batch_id = ?1 AND jobs.state = 'pending' AND jobs.in_file = 1",
    )?;
    let rows = stmt
        .query_map([batch_id], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Option<i64>>(1)?)))?;
    let mut pairs = Vec::new();
    for row in rows {
        if let (id, Some(done)) = row? {
            pairs.push((id, done));
        }
    }
    Ok(pairs)
}

/// Stage jobs are not in the job file: each is in it while its parent is. One pass per stage
/// level settles a chain.
fn stages_follow_their_parents(
    tx: &rusqlite::Transaction<'_>,
    batch_id: i64,
) -> rusqlite::Result<()> {
    for _ in 0..=crate::chain::MAX_STAGES {
        let changed = tx.execute(
            "UPDATE jobs SET in_file = (SELECT parent.in_file FROM jobs AS parent
                                        WHERE parent.id = jobs.parent_id)
             WHERE batch_id = ?1 AND parent_id IS NOT NULL
               AND in_file != (SELECT parent.in_file FROM jobs AS parent
                               WHERE parent.id = jobs.parent_id)",
            [batch_id],
        )?;
        if changed == 0 {
            break;
        }
    }
    Ok(())
}

/// The chain a job file gives `spec`, with each stage's price from `prices`.
fn priced_chain(spec: &JobSpec, prices: &PriceTable) -> Option<String> {
    let mut chain = crate::chain::Chain::parse(spec.chain.as_deref()?)?;
    for stage in &mut chain.stages {
        stage.price_usd = prices.price(&stage.model, &stage.body);
    }
    Some(chain.to_text())
}

/// Which jobs [`Store::select_jobs`] reads.
#[derive(Clone, Copy)]
enum Selection {
    /// Those of one batch (`Some`), or of all (`None`).
    Batch,
    /// One job, by its row id.
    Job,
}

/// A row as read, before its JSON columns are parsed.
struct RawJobRow {
    id: i64,
    batch_id: i64,
    key: String,
    name: String,
    model: String,
    body: String,
    state: String,
    remote_id: Option<String>,
    remote_status: Option<String>,
    attempt_at: Option<i64>,
    attempts: u32,
    submitted_at: Option<i64>,
    created_at: Option<String>,
    completed_at: Option<String>,
    finished_at: Option<i64>,
    urls: Option<String>,
    error: Option<String>,
    price_usd: Option<f64>,
    in_file: bool,
    attempt_ended: Option<i64>,
    reused_from: Option<String>,
    chain: Option<String>,
    parent_id: Option<i64>,
}

fn read_job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawJobRow> {
    Ok(RawJobRow {
        id: row.get(0)?,
        batch_id: row.get(1)?,
        key: row.get(2)?,
        name: row.get(3)?,
        model: row.get(4)?,
        body: row.get(5)?,
        state: row.get(6)?,
        remote_id: row.get(7)?,
        remote_status: row.get(8)?,
        attempt_at: row.get(9)?,
        attempts: row.get(10)?,
        submitted_at: row.get(11)?,
        created_at: row.get(12)?,
        completed_at: row.get(13)?,
        finished_at: row.get(14)?,
        urls: row.get(15)?,
        error: row.get(16)?,
        price_usd: row.get(17)?,
        in_file: row.get(18)?,
        attempt_ended: row.get(19)?,
        reused_from: row.get(20)?,
        chain: row.get(21)?,
        parent_id: row.get(22)?,
    })
}

impl RawJobRow {
    fn into_record(self, path: &Path) -> Result<JobRecord, StoreError> {
        let corrupt = |message: String| StoreError::Corrupt { path: path.to_owned(), message };
        // Parsed when it is needed (a sidecar); a cheap look here catches a hand-edited row.
        if !self.body.trim_start().starts_with('{') {
            return Err(corrupt(format!(
                "job {} has a request body that is not a JSON object",
                self.id
            )));
        }
        let urls = match &self.urls {
            None => Vec::new(),
            Some(text) => serde_json::from_str(text)
                .map_err(|_| corrupt(format!("job {} has unreadable result URLs", self.id)))?,
        };
        Ok(JobRecord {
            id: self.id,
            batch_id: self.batch_id,
            key: JobKey::from_stored(self.key),
            name: self.name,
            model: self.model,
            body: Arc::from(self.body),
            state: parse_state(path, &self.state)?,
            remote_id: self.remote_id,
            remote_status: self.remote_status,
            attempt_at: self.attempt_at,
            attempt_ended: self.attempt_ended,
            attempts: self.attempts,
            submitted_at: self.submitted_at,
            created_at: self.created_at,
            completed_at: self.completed_at,
            finished_at: self.finished_at,
            urls,
            error: self.error,
            price_usd: self.price_usd,
            in_file: self.in_file,
            reused_from: self.reused_from,
            chain: self.chain.map(Arc::from),
            parent_id: self.parent_id,
            files: Vec::new(),
            inputs: Vec::new(),
        })
    }
}
