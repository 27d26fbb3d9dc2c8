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

//!
//! Files: this one opens the state file (the lock, the private mode, the readers) and holds the
//! types; `schema.rs` has the tables and the forward migrations; `jobs.rs` imports job files
//! and reads and updates jobs; `retries.rs` puts failed jobs back to pending for
//! `krea-batch retry`, keeping their failures; `uploads.rs` records the uploads of local input files;
//! `writer.rs` is the engine's writer thread.

mod jobs;
mod retries;
mod schema;
mod uploads;
mod writer;

#[cfg(test)]
mod tests;

pub(crate) use schema::SCHEMA_VERSION;
pub(crate) use uploads::{UploadRecord, UploadState};
pub(crate) use writer::StoreWriter;

use crate::job::{JobKey, JobState};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What can go wrong with the state file.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
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
    /// A commit by the writer thread failed (shared by the commits it merged); it names the
    /// file and the cause.
    #[error(transparent)]
    WriteFailed(std::sync::Arc<StoreError>),
}

/// Meta key: the state file's random id ([`Store::state_id`]).
const META_STATE_ID: &str = "state_id";

/// A new random id for a state file or a batch: 128 bits as hex.
#[must_use]
pub(crate) fn random_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub(crate) fn now_ms() -> i64 {
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

/// A local file a job takes as an input, for people: the content its body holds as a
/// placeholder (`krea-batch-file:sha256:…`), and the path the job file names it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputName {
    /// The content's SHA-256, lowercase hex.
    pub sha256: String,
    /// The file as the job file names it (`photos/cat.png`).
    pub path: String,
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
    /// The Krea job id whose result this job took instead of being paid again (`reuse:`).
    pub reused_from: Option<String>,
    /// Its place in a chain of stages and the stages after it (`chain.rs`), as JSON text.
    pub chain: Option<Arc<str>>,
    /// The job whose result this stage job takes (row id).
    pub parent_id: Option<i64>,
    /// The files on disk.
    pub files: Vec<FileRecord>,
    /// The local files its body holds as placeholders, by name, in the order they appear:
    /// what the manifest and the gallery show. Read from the uploads the state recorded; a run
    /// names them as its job file does (`uploads::name_inputs`).
    pub inputs: Vec<InputName>,
}

/// One change to write.
#[derive(Clone, Debug)]
pub(crate) enum Change {
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
pub(crate) enum Request {
    /// Probe now whether submitting may resume (after a top-up).
    Resume,
    /// Cancel the job with this row id.
    Cancel(i64),
}

/// What importing a job file did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImportReport {
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
    /// Unsent jobs of this batch that an identical job of another batch already completed:
    /// (the job's row id, the completed job's row id). Empty unless reuse was asked for.
    pub reusable: Vec<(i64, i64)>,
}

/// The state file, open.
pub(crate) struct Store {
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
    pub(crate) fn open_writer(path: &Path) -> Result<Self, StoreError> {
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
    pub(crate) fn open_requester(path: &Path) -> Result<Self, StoreError> {
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
    pub(crate) fn is_locked(path: &Path) -> bool {
        let Ok(lock) = open_private(&lock_path(path)) else { return false };
        lock.try_lock().is_err()
    }

    /// Leaves a request for the engine that holds the state file (`cancel` with a job row id,
    /// or `resume`).
    pub(crate) fn push_request(&self, request: &Request) -> Result<(), StoreError> {
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
    pub(crate) fn has_requests(&self) -> Result<bool, StoreError> {
        self.conn
            .query_row("SELECT EXISTS (SELECT 1 FROM requests)", [], |row| row.get(0))
            .map_err(sqlite(&self.path))
    }

    /// Takes (and deletes) the waiting requests, oldest first.
    pub(crate) fn take_requests(&mut self) -> Result<Vec<Request>, StoreError> {
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
    pub(crate) fn content_imported(&self, sha256: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM batches WHERE content_sha256 = ?1)",
                [sha256],
                |row| row.get(0),
            )
            .map_err(sqlite(&self.path))
    }

    /// Records the content hash of a batch's job file.
    pub(crate) fn set_content_hash(&self, batch_id: i64, sha256: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE batches SET content_sha256 = ?2 WHERE id = ?1",
                params![batch_id, sha256],
            )
            .map(drop)
            .map_err(sqlite(&self.path))
    }

    /// Opens an existing state file for reading, also while a run writes to it.
    pub(crate) fn open_reader(path: &Path) -> Result<Self, StoreError> {
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
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The state file's own random id, made on first use: an output folder's marker names the
    /// state that owns it by this id, which survives the state file being moved or renamed.
    pub(crate) fn state_id(&mut self) -> Result<String, StoreError> {
        if let Some(id) = self.meta(META_STATE_ID)? {
            return Ok(id);
        }
        let id = random_id();
        self.apply(&[Change::Meta { key: META_STATE_ID.into(), value: id.clone() }])?;
        Ok(id)
    }

    /// The id of the state file at `path`, read without taking its lock; `None` when it has
    /// none or cannot be read.
    #[must_use]
    pub(crate) fn id_of(path: &Path) -> Option<String> {
        Self::open_reader(path).ok()?.recorded_id()
    }

    /// This state file's id, if it has one yet (reading never makes one).
    #[must_use]
    pub(crate) fn recorded_id(&self) -> Option<String> {
        self.meta(META_STATE_ID).ok().flatten()
    }

    /// Reads a meta value.
    pub(crate) fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get(0))
            .optional()
            .map_err(sqlite(&self.path))
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
pub(crate) fn lock_path(state: &Path) -> PathBuf {
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
