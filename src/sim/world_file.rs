//! The simulated world on disk: a persistent account (its jobs with their ids, states and
//! timings, its balance) that a restarted simulation takes up again, as Krea's account outlives
//! any client. `run --simulate` keeps one beside its output (`.krea-batch-sim.json`),
//! `simulate-api --world FILE` wherever it is told.
//!
//! The file is JSON, rewritten whole (a temporary file renamed over it) after every change that
//! time alone does not explain: a job created or cancelled, a top-up. States that follow from
//! time (a job completing) are recomputed from the stored timings when the world is read again,
//! so a job that was running when the simulation stopped has run on meanwhile, as it would at
//! Krea. The ports the simulation listened on are kept too: a restarted simulation listens on
//! them again when they are free, so result URLs recorded by an earlier run still download.
//!
//! A lock file beside it (`<file>.lock`) is held while a simulation serves the world: a second
//! simulation of the same world is refused, and a top-up of a world being served goes to the
//! simulation serving it (over HTTP) instead of into the file.

use super::jobs::Millis;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The world file's name in a simulated output folder (`run --simulate`). Its name starts
/// with `.krea-batch`, which marks krea-batch's own files in an output folder.
pub const WORLD_FILE: &str = ".krea-batch-sim.json";

/// The version of the file's layout.
const VERSION: u32 = 1;

/// What the file says about itself, for whoever opens it.
const ABOUT: &str = "The simulated Krea account of krea-batch's simulation: its jobs and balance \
                     (micro-USD), kept across restarts. Delete this file (and the results made \
                     with it) to start the simulation over.";

/// Why a world file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorldFileError {
    /// Reading or writing failed.
    #[error("simulated world {}: {source}", path.display())]
    Io {
        /// The file (or its lock).
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a world this version can read.
    #[error(
        "simulated world {}: {detail}; delete it (and the simulated results made with it) to \
         start the simulation over",
        path.display()
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Another simulation serves this world.
    #[error(
        "simulated world {} is in use by another simulation (a `run --simulate` of the same \
         folder, or `simulate-api --world`); wait for it to end",
        path.display()
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
}

/// The ports a simulation listened on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedPorts {
    pub api: u16,
    pub files: u16,
    pub redirect: u16,
}

/// The whole file.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SavedWorld {
    pub about: String,
    pub version: u32,
    /// Stays the same for the life of the world: what a client may record as "the same API".
    pub world_id: String,
    pub ports: SavedPorts,
    pub account: SavedAccount,
}

/// The account: money and jobs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct SavedAccount {
    pub balance_micros: i64,
    pub spent_micros: i64,
    pub last_created_ms: Millis,
    pub creations_by_prompt: BTreeMap<String, u32>,
    /// Jobs created per input URL (absent in files from before stages).
    #[serde(default)]
    pub creations_by_input: BTreeMap<String, u32>,
    pub jobs: Vec<SavedJob>,
    /// Uploaded assets (their metadata; absent in files from before uploads).
    #[serde(default)]
    pub assets: Vec<super::assets::Asset>,
}

/// One job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SavedJob {
    pub id: String,
    pub model: String,
    pub prompt: String,
    pub price_micros: i64,
    /// What its pictures show besides the prompt (square without a seed in older files).
    #[serde(default)]
    pub picture: super::picture::Picture,
    pub created_ms: Millis,
    pub plan: SavedOutcome,
    pub started_ms: Option<Millis>,
    pub due: Option<SavedEnd>,
    pub ended: Option<SavedEnd>,
}

/// When a job ends (or ended), and how.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SavedEnd {
    pub at_ms: Millis,
    pub outcome: SavedOutcome,
}

/// How a job is planned to end or ended (`stuck` is a plan only).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SavedOutcome {
    Completed,
    Cancelled,
    Stuck,
    Failed { code: String, message: String },
}

impl SavedAccount {
    /// The balance once the jobs not yet ended have ended: less the price of each that is to
    /// complete (the file holds the balance as of its last write; charges come on completion).
    fn settled_balance_micros(&self) -> i64 {
        let to_charge: i64 = self
            .jobs
            .iter()
            .filter(|job| job.ended.is_none())
            .filter(|job| match &job.due {
                Some(end) => matches!(end.outcome, SavedOutcome::Completed),
                None => matches!(job.plan, SavedOutcome::Completed),
            })
            .map(|job| job.price_micros)
            .sum();
        self.balance_micros.saturating_sub(to_charge)
    }
}

impl SavedWorld {
    pub(crate) fn new(world_id: String, ports: SavedPorts, account: SavedAccount) -> Self {
        Self { about: ABOUT.to_owned(), version: VERSION, world_id, ports, account }
    }
}

/// An open world file whose lock this process holds.
#[derive(Debug)]
pub(crate) struct WorldFile {
    path: PathBuf,
    /// Held while open; the lock goes with it.
    _lock: File,
}

impl WorldFile {
    /// Takes the world's lock (creating its folder) and reads the world, if the file exists.
    pub(crate) fn open(path: &Path) -> Result<(Self, Option<SavedWorld>), WorldFileError> {
        let lock = take_lock(path)?.ok_or_else(|| WorldFileError::InUse { path: path.into() })?;
        let saved = read(path)?;
        Ok((Self { path: path.to_owned(), _lock: lock }, saved))
    }

    /// Writes the world whole, replacing the file atomically.
    pub(crate) fn save(&self, world: &SavedWorld) -> Result<(), WorldFileError> {
        write(&self.path, world)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// What a top-up of a world file did.
#[derive(Debug, PartialEq)]
pub enum FileTopUp {
    /// No simulation serves the world: the file now holds a balance this much higher (USD,
    /// counting the charges of jobs still running).
    Saved {
        /// The balance before.
        before_usd: f64,
        /// The balance now.
        balance_usd: f64,
    },
    /// A simulation serves the world on this API port: top it up there.
    Served {
        /// The API port it listens on.
        api_port: u16,
    },
}

/// Adds `usd` to the balance of the world in `path`, unless a simulation serves it (then says
/// where, so the top-up goes to that simulation).
pub fn top_up_file(path: &Path, usd: f64) -> Result<FileTopUp, WorldFileError> {
    // Checked first, so that a mistyped path creates nothing.
    if !path.is_file() {
        return Err(WorldFileError::Io {
            path: path.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file (a simulated run writes it beside its results)",
            ),
        });
    }
    let Some(_lock) = take_lock(path)? else {
        let world = read(path)?.ok_or_else(|| WorldFileError::Unreadable {
            path: path.into(),
            detail: "it went away while being topped up".into(),
        })?;
        return Ok(FileTopUp::Served { api_port: world.ports.api });
    };
    let mut world = read(path)?.ok_or_else(|| WorldFileError::Unreadable {
        path: path.into(),
        detail: "it went away while being topped up".into(),
    })?;
    let added = super::models::usd_to_micros(usd);
    world.account.balance_micros = world.account.balance_micros.saturating_add(added);
    write(path, &world)?;
    let usd = |micros: i64| micros as f64 / super::models::MICROS_PER_USD;
    let balance = world.account.settled_balance_micros();
    Ok(FileTopUp::Saved { before_usd: usd(balance - added), balance_usd: usd(balance) })
}

/// The lock file of a world.
fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The world's lock, or `None` when another process holds it.
fn take_lock(path: &Path) -> Result<Option<File>, WorldFileError> {
    let io = |source| WorldFileError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let lock = lock_path(path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| WorldFileError::Io { path: lock.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(source)) => Err(WorldFileError::Io { path: lock, source }),
    }
}

fn read(path: &Path) -> Result<Option<SavedWorld>, WorldFileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(WorldFileError::Io { path: path.to_owned(), source }),
    };
    let unreadable = |detail: String| WorldFileError::Unreadable { path: path.to_owned(), detail };
    let world: SavedWorld = serde_json::from_slice(&bytes)
        .map_err(|err| unreadable(format!("not a simulated world ({err})")))?;
    if world.version != VERSION {
        return Err(unreadable(format!(
            "layout version {} (this krea-batch reads {VERSION})",
            world.version
        )));
    }
    Ok(Some(world))
}

fn write(path: &Path, world: &SavedWorld) -> Result<(), WorldFileError> {
    let io = |source| WorldFileError::Io { path: path.to_owned(), source };
    let mut text = serde_json::to_vec_pretty(world).map_err(|err| io(err.into()))?;
    text.push(b'\n');
    let folder = path.parent().filter(|parent| !parent.as_os_str().is_empty());
    let mut temp = tempfile::Builder::new()
        .prefix(".krea-batch-sim.tmp")
        .tempfile_in(folder.unwrap_or(Path::new(".")))
        .map_err(io)?;
    temp.write_all(&text).map_err(io)?;
    temp.persist(path).map_err(|err| io(err.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(balance_micros: i64) -> SavedWorld {
        let account = SavedAccount { balance_micros, ..SavedAccount::default() };
        SavedWorld::new("w-1".into(), SavedPorts { api: 1, files: 2, redirect: 3 }, account)
    }

    #[test]
    fn a_world_is_locked_while_open_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/.krea-batch-sim.json");
        let (file, saved) = WorldFile::open(&path).unwrap();
        assert!(saved.is_none(), "a new world");
        file.save(&world(7_000)).unwrap();
        assert!(matches!(WorldFile::open(&path), Err(WorldFileError::InUse { .. })));
        assert_eq!(top_up_file(&path, 1.0).unwrap(), FileTopUp::Served { api_port: 1 });
        drop(file);
        let topped = top_up_file(&path, 1.0).unwrap();
        assert_eq!(topped, FileTopUp::Saved { before_usd: 0.007, balance_usd: 1.007 });
        let (_file, saved) = WorldFile::open(&path).unwrap();
        let saved = saved.expect("saved");
        assert_eq!((saved.world_id.as_str(), saved.account.balance_micros), ("w-1", 1_007_000));
    }

    #[test]
    fn a_file_that_is_no_world_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("world.json");
        std::fs::write(&path, "{}").unwrap();
        let err = WorldFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a simulated world") && err.contains("delete it"), "{err}");
        let missing = top_up_file(&dir.path().join("none.json"), 1.0).unwrap_err().to_string();
        assert!(missing.contains("no such file"), "{missing}");
    }
}
