//! The state file: an SQLite database holding every job, every attempt to submit it, and every
//! result file, so that a rerun, a restart or a crash loses nothing and pays for nothing twice.
//!
//! It knows jobs (`job.rs`) but not HTTP. The engine writes through [`StoreWriter`], a thread that
//! owns the one writing connection and commits each batch of changes in one durable transaction
//! (`synchronous=FULL`: the commit is on disk before the call returns). Readers (`status`) open
//! their own connection; WAL mode lets them read while a run writes.
//!
//! One writer per state file: the writer holds an exclusive lock on `<state>.lock`, so a second
//! run on the same file stops at once with a message, instead of both submitting the same jobs.
//!
//! The schema carries a version (`PRAGMA user_version`) and is migrated forward on open; a file
//! from a newer krea-batch is refused rather than misread.

use crate::job::{JobKey, JobState};
use crate::jobfile::JobSpec;
use crate::pricing::PriceTable;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 2;

/// The schema of version 1, the first.
const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per job file imported (the one-shot run imports one; the daemon one per inbox file).
CREATE TABLE batches (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL UNIQUE,
    output_dir  TEXT NOT NULL,
    imported_at INTEGER NOT NULL
);
CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY,
    batch_id      INTEGER NOT NULL REFERENCES batches(id),
    key           TEXT NOT NULL,
    name          TEXT NOT NULL,
    model         TEXT NOT NULL,
    body          TEXT NOT NULL,
    state         TEXT NOT NULL,
    remote_id     TEXT UNIQUE,
    remote_status TEXT,
    attempt_at    INTEGER,
    attempt_ended INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    submitted_at  INTEGER,
    created_at    TEXT,
    completed_at  TEXT,
    finished_at   INTEGER,
    urls          TEXT,
    error         TEXT,
    price_usd     REAL,
    in_file       INTEGER NOT NULL DEFAULT 1,
    updated_at    INTEGER NOT NULL,
    UNIQUE (batch_id, key),
    UNIQUE (batch_id, name)
);
CREATE INDEX jobs_by_state ON jobs(state);
CREATE TABLE files (
    job_id       INTEGER NOT NULL REFERENCES jobs(id),
    idx          INTEGER NOT NULL,
    url          TEXT NOT NULL,
    path         TEXT NOT NULL,
    bytes        INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    content_type TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
";

/// Version 2: requests from other processes to a running engine (`krea-batch cancel`,
/// `krea-batch resume`), and the content hash of each imported job file, so that the daemon
/// imports the same file only once.
const SCHEMA_V2: &str = "
CREATE TABLE requests (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    job_id     INTEGER,
    created_at INTEGER NOT NULL
);
ALTER TABLE batches ADD COLUMN content_sha256 TEXT;
";

/// What can go wrong with the state file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process is writing to this state file.
    #[error(
        "another krea-batch process is already using the state file {path}; wait for it to \
         finish or stop it (the lock is {lock})"
    )]
    Locked {
        /// The state file.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The file was written by a newer krea-batch.
    #[error(
        "the state file {path} has schema version {found}, newer than this krea-batch knows \
         ({SCHEMA_VERSION}); use the newer krea-batch that wrote it"
    )]
    TooNew {
        /// The state file.
        path: PathBuf,
        /// Its version.
        found: i64,
    },
    /// There is no state file to read.
    #[error("there is no state file at {0}; run a batch first, or pass --state")]
    Missing(PathBuf),
    /// SQLite failed.
    #[error("state file {path}: {source}")]
    Sqlite {
        /// The state file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The file system failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A row does not make sense (edited by hand, or a bug).
    #[error("state file {path}: {message}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The writer thread is gone (it failed earlier, or the engine is shutting down).
    #[error("the state writer has stopped")]
    WriterGone,
    /// A commit by the writer thread failed; the message names the file and the cause.
    #[error("{0}")]
    WriteFailed(String),
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A file that belongs to a job, whole on disk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FileRecord {
    /// Position among the job's result URLs, from 0.
    pub index: u32,
    /// Where it was downloaded from.
    pub url: String,
    /// The path relative to the batch's output directory.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// The Content-Type it was served with.
    pub content_type: String,
}

/// A job as the state file holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Row id, stable for the life of the state file.
    pub id: i64,
    /// The job file it came from.
    pub batch_id: i64,
    /// Its identity.
    pub key: JobKey,
    /// Its name (unique among the jobs writing to the same output directory).
    pub name: String,
    /// The model path.
    pub model: String,
    /// The full request body as JSON text, prompt included: sent as it is, and shared, since
    /// records are cloned for every write.
    pub body: Arc<str>,
    /// The local state.
    pub state: JobState,
    /// Krea's job id, once known.
    pub remote_id: Option<String>,
    /// Krea's last reported status.
    pub remote_status: Option<String>,
    /// When the latest POST attempt was recorded (ms since the epoch).
    pub attempt_at: Option<i64>,
    /// When that POST ended without a usable answer; `None` if it was answered or the process
    /// died during it.
    pub attempt_ended: Option<i64>,
    /// How many POSTs were started for it.
    pub attempts: u32,
    /// When Krea's answer accepting it arrived (ms since the epoch, local clock); `None` for a
    /// job adopted by reconciliation.
    pub submitted_at: Option<i64>,
    /// Krea's `created_at`.
    pub created_at: Option<String>,
    /// Krea's `completed_at`.
    pub completed_at: Option<String>,
    /// When it reached an end at Krea or locally (ms since the epoch).
    pub finished_at: Option<i64>,
    /// The result URLs of a completed job.
    pub urls: Vec<String>,
    /// Why it failed, or why its download is pending.
    pub error: Option<String>,
    /// Its estimated price.
    pub price_usd: Option<f64>,
    /// Whether the job file still has it.
    pub in_file: bool,
    /// The files on disk.
    pub files: Vec<FileRecord>,
}

/// One change to write.
#[derive(Clone, Debug)]
pub enum Change {
    /// Write every mutable column of the job.
    Job(Box<JobRecord>),
    /// Record a file of a job as whole on disk.
    File {
        /// The job's row id.
        job_id: i64,
        /// The file.
        file: FileRecord,
    },
    /// Set a meta value.
    Meta {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
}

/// A request to the engine that holds a state file, from another process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Probe now whether submitting may resume (after a top-up).
    Resume,
    /// Cancel the job with this row id.
    Cancel(i64),
}

/// What importing a job file did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// The batch row of the job file.
    pub batch_id: i64,
    /// Jobs new to the state file.
    pub added: usize,
    /// Jobs already known.
    pub known: usize,
    /// Jobs the state holds but the file no longer has (not cancelled; reported).
    pub removed: usize,
    /// New jobs whose name was taken by an earlier job: (name in the file, name given).
    pub renamed: Vec<(String, String)>,
}

/// The state file, open.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Held for the life of a writing store: the one-writer lock.
    _lock: Option<File>,
    /// Whether commits are fsynced now (`PRAGMA synchronous = FULL`).
    synced: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating it, mode 0600) the state file for writing, taking the one-writer lock and
    /// migrating the schema forward. Jobs left `submitting` by a killed process become `unknown`.
    pub fn open_writer(path: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io { path: path.to_owned(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let lock_path = lock_path(path);
        let lock = open_private(&lock_path).map_err(io)?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked { path: path.to_owned(), lock: lock_path });
        }
        // Create the database file ourselves so that it is private from the first byte; SQLite
        // gives its WAL and shared-memory files the same mode.
        open_private(path).map_err(io)?;
        let conn = Connection::open(path).map_err(sqlite(path))?;
        let mut store = Self { conn, path: path.to_owned(), _lock: Some(lock), synced: true };
        store.configure()?;
        store.migrate()?;
        store.recover_interrupted_submissions()?;
        Ok(store)
    }

    /// Opens an existing state file, without the one-writer lock, to leave requests for the
    /// process that holds it ([`Store::push_request`]); SQLite's own locking keeps the two
    /// writes apart.
    pub fn open_requester(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite(path))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(sqlite(path))?;
        let store = Self { conn, path: path.to_owned(), _lock: None, synced: true };
        let version = store.version()?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                message: format!(
                    "schema version {version}, this krea-batch writes {SCHEMA_VERSION}; use the \
                     krea-batch that is running on it"
                ),
            });
        }
        Ok(store)
    }

    /// Whether the state file holds the writer's lock now (a run or the daemon is using it).
    #[must_use]
    pub fn is_locked(path: &Path) -> bool {
        let Ok(lock) = open_private(&lock_path(path)) else { return false };
        lock.try_lock().is_err()
    }

    /// Leaves a request for the engine that holds the state file (`cancel` with a job row id,
    /// or `resume`).
    pub fn push_request(&self, request: &Request) -> Result<(), StoreError> {
        let (kind, job_id) = match request {
            Request::Resume => ("resume", None),
            Request::Cancel(id) => ("cancel", Some(*id)),
        };
        self.conn
            .execute(
                "INSERT INTO requests (kind, job_id, created_at) VALUES (?1, ?2, ?3)",
                params![kind, job_id, now_ms()],
            )
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    /// Whether requests are still waiting to be taken.
    pub fn has_requests(&self) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT EXISTS (SELECT 1 FROM requests)", [], |row| row.get(0))
            .map_err(sqlite(&self.path))
    }

    /// Takes (and deletes) the waiting requests, oldest first.
    pub fn take_requests(&mut self) -> Result<Vec<Request>, StoreError> {
        let err = sqlite(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let requests = {
            let mut stmt =
                tx.prepare("SELECT kind, job_id FROM requests ORDER BY id").map_err(&err)?;
            let rows = stmt
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?)))
                .map_err(&err)?;
            let mut requests = Vec::new();
            for row in rows {
                match row.map_err(&err)? {
                    (kind, _) if kind == "resume" => requests.push(Request::Resume),
                    (kind, Some(id)) if kind == "cancel" => requests.push(Request::Cancel(id)),
                    (kind, _) => tracing::warn!(%kind, "ignoring an unknown request"),
                }
            }
            requests
        };
        if requests.is_empty() {
            // Nothing to delete: no write, no fsync (the daemon asks every few seconds).
            return Ok(requests);
        }
        tx.execute("DELETE FROM requests", []).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(requests)
    }

    /// Whether a job file with this content was imported before (the daemon imports each
    /// file's content once).
    pub fn content_imported(&self, sha256: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM batches WHERE content_sha256 = ?1)",
                [sha256],
                |row| row.get(0),
            )
            .map_err(sqlite(&self.path))
    }

    /// Records the content hash of a batch's job file.
    pub fn set_content_hash(&self, batch_id: i64, sha256: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE batches SET content_sha256 = ?2 WHERE id = ?1",
                params![batch_id, sha256],
            )
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    /// Opens an existing state file for reading, also while a run writes to it.
    pub fn open_reader(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_owned()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite(path))?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite(path))?;
        let store = Self { conn, path: path.to_owned(), _lock: None, synced: true };
        let version = store.version()?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: path.to_owned(), found: version });
        }
        Ok(store)
    }

    /// The state file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn configure(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA wal_autocheckpoint = 10000;",
            )
            .map_err(sqlite(&self.path))?;
        self.conn.busy_timeout(Duration::from_secs(5)).map_err(sqlite(&self.path))
    }

    fn version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite(&self.path))
    }

    /// Brings the schema to [`SCHEMA_VERSION`], one step at a time, each in a transaction.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let found = self.version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: self.path.clone(), found });
        }
        // Step n takes a file from version n to n + 1.
        let steps: [&str; 2] = [SCHEMA_V1, SCHEMA_V2];
        for (from, step) in steps.iter().enumerate().skip(found as usize) {
            let tx = self.conn.transaction().map_err(sqlite(&self.path))?;
            tx.execute_batch(step).map_err(sqlite(&self.path))?;
            tx.pragma_update(None, "user_version", i64::try_from(from + 1).unwrap_or(i64::MAX))
                .map_err(sqlite(&self.path))?;
            tx.commit().map_err(sqlite(&self.path))?;
        }
        Ok(())
    }

    /// A process killed between recording an attempt and reading the answer leaves the job
    /// `submitting`: whether Krea created it is unknown until reconciliation looks.
    fn recover_interrupted_submissions(&mut self) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE jobs SET state = 'unknown', updated_at = ?1 WHERE state = 'submitting'",
                params![now_ms()],
            )
            .map_err(sqlite(&self.path))
    }

    /// Reads a meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0))
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// Adds the jobs of a job file to the state in one transaction. Known jobs (same key) are
    /// left as they are, except that an unfinished one takes the file's new name; jobs gone from
    /// the file are marked so (never cancelled). A new job whose name is taken, in the same
    /// output directory, by a different earlier job gets the name with its key's first 8 hex
    /// digits appended, so no result already paid for is overwritten.
    pub fn import(
        &mut self,
        source: &str,
        output_dir: &Path,
        specs: &[JobSpec],
        prices: &PriceTable,
    ) -> Result<ImportReport, StoreError> {
        let path = self.path.clone();
        let err = sqlite(&path);
        let now = now_ms();
        let output_text = output_dir.to_string_lossy().into_owned();
        let tx = self.conn.transaction().map_err(&err)?;
        tx.execute(
            "INSERT INTO batches (source, output_dir, imported_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (source) DO UPDATE SET output_dir = excluded.output_dir",
            params![source, output_text, now],
        )
        .map_err(&err)?;
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
                // added or changed); one already sent keeps the price it was committed at.
                let price = prices.price(&spec.model, &spec.body_map());
                tx.execute(
                    "UPDATE jobs SET in_file = 1, name = ?2,
                        price_usd = CASE WHEN state = 'pending' THEN ?3 ELSE price_usd END
                     WHERE id = ?1",
                    params![id, name, price],
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
                "INSERT INTO jobs (batch_id, key, name, model, body, state, price_usd, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
                params![batch_id, key, name, spec.model, spec.body, price, now],
            )
            .map_err(&err)?;
            report.added += 1;
        }
        report.removed = known.keys().filter(|key| !in_file.contains(key.as_str())).count();
        tx.commit().map_err(&err)?;
        Ok(report)
    }

    /// The jobs of one batch, or of all batches, with their files, in file order.
    pub fn jobs(&self, batch_id: Option<i64>) -> Result<Vec<JobRecord>, StoreError> {
        let err = sqlite(&self.path);
        let mut files: HashMap<i64, Vec<FileRecord>> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT files.job_id, idx, url, path, bytes, sha256, content_type FROM files
                 JOIN jobs ON jobs.id = files.job_id WHERE ?1 IS NULL OR jobs.batch_id = ?1
                 ORDER BY files.job_id, idx",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([batch_id], |row| {
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
            .prepare(
                "SELECT id, batch_id, key, name, model, body, state, remote_id, remote_status,
                        attempt_at, attempts, submitted_at, created_at, completed_at, finished_at,
                        urls, error, price_usd, in_file, attempt_ended
                 FROM jobs WHERE ?1 IS NULL OR batch_id = ?1 ORDER BY id",
            )
            .map_err(&err)?;
        let rows = stmt.query_map([batch_id], read_job_row).map_err(&err)?;
        let mut jobs = Vec::new();
        for row in rows {
            let raw = row.map_err(&err)?;
            let mut job = raw.into_record(&self.path)?;
            job.files = files.remove(&job.id).unwrap_or_default();
            jobs.push(job);
        }
        Ok(jobs)
    }

    /// The batch row of a job file, if it was ever imported.
    pub fn batch_id(&self, source: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT id FROM batches WHERE source = ?1", [source], |row| row.get(0))
            .optional()
            .map_err(sqlite(&self.path))
    }

    /// Every Krea job id the state file holds, in every batch: reconciliation never adopts one.
    pub fn remote_ids(&self) -> Result<HashSet<String>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT remote_id FROM jobs WHERE remote_id IS NOT NULL")
            .map_err(&err)?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0)).map_err(&err)?;
        rows.map(|row| row.map_err(&err)).collect()
    }

    /// The output directory of each batch.
    pub fn output_dirs(&self) -> Result<HashMap<i64, PathBuf>, StoreError> {
        let err = sqlite(&self.path);
        let mut stmt = self.conn.prepare("SELECT id, output_dir FROM batches").map_err(&err)?;
        let rows = stmt
            .query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))
            .map_err(&err)?;
        rows.map(|row| row.map(|(id, dir)| (id, PathBuf::from(dir))).map_err(&err)).collect()
    }

    /// Writes `changes` in one durable transaction: on disk (fsynced) when this returns.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        self.apply_with(changes, true)
    }

    /// Writes `changes` in one transaction, fsynced only if `synced`. An unsynced commit is as
    /// atomic and survives a killed process (the write-ahead log is in the operating system's
    /// hands); only a power cut can lose it, and the next synced commit makes it durable too.
    /// The engine syncs the commits that must be on disk before a request: the attempt before
    /// each POST.
    pub fn apply_with(&mut self, changes: &[Change], synced: bool) -> Result<(), StoreError> {
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
    pub fn price_sum(&self, states: &[JobState]) -> Result<(f64, usize), StoreError> {
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
    pub fn names_in(&self, state: JobState, limit: usize) -> Result<Vec<String>, StoreError> {
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

    /// How many jobs are in each state, over one batch or all.
    pub fn count_by_state(
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
            files: Vec::new(),
        })
    }
}

fn parse_state(path: &Path, text: &str) -> Result<JobState, StoreError> {
    JobState::parse(text).ok_or_else(|| StoreError::Corrupt {
        path: path.to_owned(),
        message: format!("unknown job state {text:?}"),
    })
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite { path: path.to_owned(), source }
}

/// `<state>.lock`.
#[must_use]
pub fn lock_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Opens (creating if needed) a file readable by its owner only.
fn open_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// The engine's handle on the state file: a thread that owns the writing connection and commits
/// what it is sent. Requests that queue up while a commit runs are merged into the next one, so
/// a busy engine pays for one fsync per batch rather than per job.
#[derive(Clone, Debug)]
pub struct StoreWriter {
    requests: tokio::sync::mpsc::UnboundedSender<WriteRequest>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Work for the writer thread: changes to commit, or a function to run on the store.
enum WriteRequest {
    /// Changes, whether they must be fsynced, and where to say it is done.
    Commit(Vec<Change>, bool, tokio::sync::oneshot::Sender<Result<(), String>>),
    Call(Box<dyn FnOnce(&mut Store) + Send>),
}

impl StoreWriter {
    /// Moves `store` onto its own thread.
    pub fn spawn(mut store: Store) -> Result<Self, StoreError> {
        let (requests, mut receiver) = tokio::sync::mpsc::unbounded_channel::<WriteRequest>();
        let thread = std::thread::Builder::new()
            .name("krea-batch-store".into())
            .spawn(move || {
                let mut next = receiver.blocking_recv();
                while let Some(request) = next.take() {
                    let (mut changes, mut synced, mut replies) = match request {
                        WriteRequest::Call(call) => {
                            call(&mut store);
                            next = receiver.blocking_recv();
                            continue;
                        }
                        WriteRequest::Commit(changes, synced, reply) => {
                            (changes, synced, vec![reply])
                        }
                    };
                    // Merge the commits queued meanwhile into one transaction.
                    loop {
                        match receiver.try_recv() {
                            Ok(WriteRequest::Commit(more, more_synced, reply)) => {
                                changes.extend(more);
                                synced |= more_synced;
                                replies.push(reply);
                            }
                            Ok(call) => {
                                next = Some(call);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let result = store.apply_with(&changes, synced).map_err(|err| err.to_string());
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                    if next.is_none() {
                        next = receiver.blocking_recv();
                    }
                }
            })
            .map_err(|source| StoreError::Io { path: PathBuf::from("<store thread>"), source })?;
        Ok(Self { requests, thread: Arc::new(std::sync::Mutex::new(Some(thread))) })
    }

    /// Waits until every handle is dropped and the queue is written, then for the thread to
    /// close the state file and release the one-writer lock.
    pub async fn close(self) {
        let thread = self.thread.lock().ok().and_then(|mut thread| thread.take());
        drop(self);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Commits `changes`; returns once they are on disk.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.commit_with(changes, true).await
    }

    /// Commits `changes`, fsynced only if `synced` (see [`Store::apply_with`]).
    pub async fn commit_with(&self, changes: Vec<Change>, synced: bool) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let (reply, done) = tokio::sync::oneshot::channel();
        self.requests
            .send(WriteRequest::Commit(changes, synced, reply))
            .map_err(|_| StoreError::WriterGone)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::WriteFailed(message)),
            Err(_) => Err(StoreError::WriterGone),
        }
    }

    /// Runs `call` on the writer thread with the store (an import, reading requests), after
    /// the commits sent before it.
    pub async fn with_store<T: Send + 'static>(
        &self,
        call: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        let call = Box::new(move |store: &mut Store| {
            let _ = reply.send(call(store));
        });
        self.requests.send(WriteRequest::Call(call)).map_err(|_| StoreError::WriterGone)?;
        done.await.map_err(|_| StoreError::WriterGone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the first-version state file kept in `tests/data/`.
    fn fixture_copy(dir: &Path) -> PathBuf {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/state-v1.sqlite");
        let copy = dir.join("state.sqlite");
        std::fs::copy(source, &copy).expect("fixture copied");
        copy
    }

    #[test]
    fn the_first_schema_version_is_read_and_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fixture_copy(dir.path());
        let store = Store::open_writer(&path).expect("opens and migrates");
        assert_eq!(store.version().expect("version"), SCHEMA_VERSION);
        let jobs = store.jobs(None).expect("jobs");
        let state_of = |name: &str| jobs.iter().find(|job| job.name == name).map(|job| job.state);
        assert_eq!(state_of("lighthouse"), Some(JobState::Downloaded));
        assert_eq!(state_of("blocked"), Some(JobState::Failed));
        assert_eq!(state_of("harbour"), Some(JobState::Pending));
        assert_eq!(state_of("waiting"), Some(JobState::Pending));
        let lighthouse = jobs.iter().find(|job| job.name == "lighthouse").expect("listed");
        assert_eq!(lighthouse.files.len(), 1);
        assert_eq!(lighthouse.files[0].path, "lighthouse.png");
        assert!(lighthouse.remote_id.is_some());
    }

    #[test]
    fn a_newer_schema_is_refused_not_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fixture_copy(dir.path());
        Connection::open(&path)
            .expect("open")
            .pragma_update(None, "user_version", 99)
            .expect("set");
        let message = Store::open_reader(&path).expect_err("refused").to_string();
        assert!(message.contains("newer"), "{message}");
        assert!(matches!(Store::open_writer(&path), Err(StoreError::TooNew { found: 99, .. })));
    }

    #[test]
    fn a_second_writer_is_refused_while_readers_are_welcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.sqlite");
        let first = Store::open_writer(&path).expect("first writer");
        assert!(matches!(Store::open_writer(&path), Err(StoreError::Locked { .. })));
        Store::open_reader(&path).expect("a reader is fine");
        drop(first);
        Store::open_writer(&path).expect("free again");
    }

    #[test]
    fn the_state_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.sqlite");
        drop(Store::open_writer(&path).expect("created"));
        let mode = std::fs::metadata(&path).expect("exists").permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
    }

    #[test]
    fn an_interrupted_submission_becomes_unknown_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = fixture_copy(dir.path());
        {
            let store = Store::open_writer(&path).expect("open");
            store
                .conn
                .execute("UPDATE jobs SET state = 'submitting' WHERE name = 'harbour'", [])
                .expect("set");
        }
        let store = Store::open_writer(&path).expect("reopen");
        let harbour = store
            .jobs(None)
            .expect("jobs")
            .into_iter()
            .find(|job| job.name == "harbour")
            .expect("job");
        assert_eq!(harbour.state, JobState::Unknown);
    }
}
