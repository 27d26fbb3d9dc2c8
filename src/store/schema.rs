//! The state file's tables, by version, and the forward migration between them.

use super::{Store, StoreError, now_ms, sqlite};
use rusqlite::params;
use std::time::Duration;

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = 6;

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

/// Version 3: a job may take the result of an identical job completed earlier in the same
/// state instead of being paid again (`reused_from`: that job's Krea id), found by its key.
const SCHEMA_V3: &str = "
ALTER TABLE jobs ADD COLUMN reused_from TEXT;
CREATE INDEX jobs_by_key ON jobs(key);
";

/// Version 4: local files uploaded as job inputs (`POST /assets`), once per content and API,
/// each committed before its POST (`state`: attempting, unknown, uploaded).
const SCHEMA_V4: &str = "
CREATE TABLE uploads (
    sha256     TEXT NOT NULL,
    api        TEXT NOT NULL,
    path       TEXT NOT NULL,
    state      TEXT NOT NULL,
    url        TEXT,
    attempt_at INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (sha256, api)
);
";

/// Version 5: the failures of jobs that `krea-batch retry` put back to pending, one row per
/// retry, so the state keeps what happened (and the Krea id of the failed attempt, which
/// reconciliation must still never adopt) while the job goes round again.
const SCHEMA_V5: &str = "
CREATE TABLE retries (
    job_id     INTEGER NOT NULL REFERENCES jobs(id),
    retried_at INTEGER NOT NULL,
    remote_id  TEXT,
    error      TEXT,
    attempts   INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX retries_by_job ON retries(job_id);
";

/// Version 6: chains of stages (`then:`). `chain` is a job's place in its chain and the stages
/// after it (JSON, `chain.rs`); `parent_id` is the job whose result a stage job takes. A stage
/// job is inserted once, by its key, when its input exists.
const SCHEMA_V6: &str = "
ALTER TABLE jobs ADD COLUMN chain TEXT;
ALTER TABLE jobs ADD COLUMN parent_id INTEGER REFERENCES jobs(id);
";

impl Store {
    pub(super) fn configure(&self) -> Result<(), StoreError> {
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

    pub(super) fn version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite(&self.path))
    }

    /// Brings the schema to [`SCHEMA_VERSION`], one step at a time, each in a transaction.
    pub(super) fn migrate(&mut self) -> Result<(), StoreError> {
        let found = self.version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: self.path.clone(), found });
        }
        // Step n takes a file from version n to n + 1.
        let steps: [&str; 6] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6];
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
    pub(super) fn recover_interrupted_submissions(&mut self) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE jobs SET state = 'unknown', updated_at = ?1 WHERE state = 'submitting'",
                params![now_ms()],
            )
            .map_err(sqlite(&self.path))
    }
}
