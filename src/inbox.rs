//! The daemon's inbox: a folder operators drop job files into (written elsewhere and renamed in,
//! or copied in directly). [`Inbox::scan`] is a cheap `read_dir`, called every few seconds, that
//! returns only the files that are complete. [`Inbox::quarantine`] moves a file into
//! `processing/` before it is parsed; [`Inbox::accept`] and [`Inbox::reject`] then move it into
//! `accepted/` or `rejected/`, never overwriting one. A file found in `processing/` at start-up
//! was being read when the service stopped (perhaps killed for the memory it took): the daemon
//! files it away instead of reading it again into the same end ([`Inbox::interrupted`]).
//!
//! When is a file complete? The kernel says so (inotify, on Linux): a file renamed into the
//! inbox is complete at once; a file written in place is complete once its writer has closed it
//! (`IN_CLOSE_WRITE` after its last write), and not before, however long the writer pauses.
//! Either way it must also be seen unchanged (same size, times and inode) by two scans, and a
//! file written in place must have been left alone for `settle`. Where the kernel cannot say,
//! the settle time alone decides: for files already in the inbox when the service starts, after
//! the kernel's event queue overflowed, or where inotify is unavailable (then a file written in
//! place with a pause longer than `settle` may be taken early). An accepted file that changes
//! afterwards is reported with a warning naming it: its writer was not done.
//!
//! Validating and importing a job file is the daemon's job, not this module's: it hands over the
//! bytes as read (at most [`MAX_FILE_SIZE`] + 1, so the loader's size message still applies) and
//! their SHA-256. Nothing here follows a symbolic link or reads anything but regular files.

use crate::files::{FileError, ensure_real_dir, write_atomically};
use crate::job::{check_name, hex};
use crate::jobfile::MAX_FILE_SIZE;
use inotify::{EventMask, WatchMask};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The sub-folder accepted files are moved to.
pub(crate) const ACCEPTED: &str = "accepted";
/// The sub-folder rejected files (and their `.error.txt`) are moved to.
pub(crate) const REJECTED: &str = "rejected";
/// The sub-folder a file is moved to while it is read and imported.
pub(crate) const PROCESSING: &str = "processing";
/// Why a file found in `processing/` at start-up is rejected.
pub(crate) const INTERRUPTED: &str = "the service stopped while reading this file (it may need more \
    memory than the service may use: see \"Memory\" in krea-batch's README); split it into \
    smaller files, or fix it";
/// Appended to a rejected file's name for the note explaining why.
pub(crate) const ERROR_SUFFIX: &str = ".error.txt";
/// The longest batch name derived from a file name, in bytes.
const MAX_BATCH_NAME: usize = 100;
/// How many accepted files are watched for changes after they were taken.
const TAKEN_KEPT: usize = 256;

/// The inbox folder and what earlier scans saw in it.
#[derive(Debug)]
pub(crate) struct Inbox {
    dir: PathBuf,
    accepted: PathBuf,
    rejected: PathBuf,
    processing: PathBuf,
    settle: Duration,
    /// The kernel's events about the inbox folder; `None` where inotify is unavailable.
    events: Option<Events>,
    /// What the events said last about each name.
    written: HashMap<OsString, Written>,
    /// Files moved to `accepted/` and how they were then, newest last, to report a change.
    taken: Vec<(PathBuf, Content)>,
    /// The most bytes read of a file: one past the loader's limit, so its size message applies.
    max_read: u64,
    /// Candidate files by name; entries whose files are gone are forgotten on each scan.
    seen: HashMap<OsString, Seen>,
    /// Names already warned about (symlinks, folders, non-YAML files), so each is warned once.
    warned: HashSet<OsString>,
}

/// A complete job file, ready to be validated and imported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReadyFile {
    /// Where it is now: in the inbox, or in `processing/` once [`Inbox::quarantine`] moved it.
    pub path: PathBuf,
    /// Its file name, e.g. `catalogue-2026.yaml`.
    pub file_name: String,
    /// A safe folder name for its outputs, from the stem: `catalogue-2026` (passes
    /// [`check_name`]). Different files may share one; the daemon decides what to do then.
    pub batch_name: String,
    /// Its content as read (at most [`MAX_FILE_SIZE`] + 1 bytes).
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`, lowercase hex.
    pub sha256: String,
}

/// An inotify watch on the inbox folder.
struct Events {
    inotify: inotify::Inotify,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

/// What the kernel's events say about a name in the inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Written {
    /// Created or written to, and not closed since: a writer is (or may be) at work.
    Open,
    /// Closed by a writer after its last write.
    Closed,
    /// Renamed into the inbox: complete as it arrived.
    MovedIn,
}

/// A file's size and modification time: what changes when it is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Content {
    len: u64,
    modified: SystemTime,
}

impl Content {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        Some(Self { len: meta.len(), modified: meta.modified().ok()? })
    }
}

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Signature {
    len: u64,
    modified: SystemTime,
    changed: (i64, i64),
    inode: (u64, u64),
}

impl Signature {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            len: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            changed: (meta.ctime(), meta.ctime_nsec()),
            inode: (meta.dev(), meta.ino()),
        }
    }
}

#[derive(Debug)]
struct Seen {
    signature: Signature,
    since: Instant,
    /// Returned by a scan already: not again until it changes (its move may have failed).
    returned: bool,
    warned_unreadable: bool,
    /// Logged once that it waits for its writer to close it.
    noted_open: bool,
}

impl Inbox {
    /// Opens the inbox at `dir`, creating it and its `accepted/`, `rejected/` and
    /// `processing/` folders (a symbolic link where one of them belongs is refused), and starts
    /// watching it (see the module's documentation for when a file counts as complete).
    pub(crate) fn open(dir: &Path, settle: Duration) -> io::Result<Self> {
        let mut inbox = Self {
            dir: dir.to_owned(),
            accepted: dir.join(ACCEPTED),
            rejected: dir.join(REJECTED),
            processing: dir.join(PROCESSING),
            settle,
            events: None,
            written: HashMap::new(),
            taken: Vec::new(),
            max_read: MAX_FILE_SIZE + 1,
            seen: HashMap::new(),
            warned: HashSet::new(),
        };
        for folder in [&inbox.dir, &inbox.accepted, &inbox.rejected, &inbox.processing] {
            ensure_real_dir(folder).map_err(into_io)?;
        }
        inbox.events = match watch(dir) {
            Ok(events) => Some(events),
            Err(err) => {
                tracing::warn!(%err, inbox = %dir.display(), "cannot watch the inbox for closed \
                    files (inotify); files written in place are taken after the settle time alone");
                None
            }
        };
        Ok(inbox)
    }

    /// The inbox folder.
    #[must_use]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The files that are complete now and were not returned before (unless they changed since),
    /// in name order. Only failing to list the folder is an error; a file that cannot be read is
    /// skipped with a warning and tried again on the next scan.
    pub(crate) fn scan(&mut self) -> io::Result<Vec<ReadyFile>> {
        self.read_events();
        for path in self.changed_since_taken() {
            tracing::warn!(
                file = %path.display(),
                "an accepted job file changed after it was taken: its writer was not done, and \
                 only what it held then was imported; drop the complete file into the inbox \
                 again (write it elsewhere and rename it in)"
            );
        }
        let mut present = HashSet::new();
        let mut ready = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            if let Some(file) = self.look_at(&entry, &name) {
                ready.push(file);
            }
            present.insert(name);
        }
        self.seen.retain(|name, _| present.contains(name));
        self.warned.retain(|name| present.contains(name));
        self.written.retain(|name, _| present.contains(name));
        ready.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok(ready)
    }

    /// Moves `file` into `accepted/` under its name, or with a `.2`, `.3`… before the extension
    /// if that is taken. Returns the new path.
    pub(crate) fn accept(&mut self, file: &ReadyFile) -> io::Result<PathBuf> {
        self.accept_path(&file.path, &file.file_name)
    }

    /// [`Inbox::accept`] for the file at `path`, named `file_name` when it was dropped.
    pub(crate) fn accept_path(&mut self, path: &Path, file_name: &str) -> io::Result<PathBuf> {
        ensure_real_dir(&self.accepted).map_err(into_io)?;
        let target = free_name(&self.accepted, file_name, false)?;
        // Before the move: a writer still at work may write again as soon as it is done.
        let content = Content::of(path);
        std::fs::rename(path, &target)?;
        sync_dir(&self.accepted);
        if let Some(content) = content {
            if self.taken.len() == TAKEN_KEPT {
                self.taken.remove(0);
            }
            self.taken.push((target.clone(), content));
        }
        Ok(target)
    }

    /// Moves `file` into `processing/` (under a free name) before it is parsed, and points
    /// `file.path` there. Its name and bytes stay as they were.
    pub(crate) fn quarantine(&self, file: &mut ReadyFile) -> io::Result<()> {
        ensure_real_dir(&self.processing).map_err(into_io)?;
        let target = free_name(&self.processing, &file.file_name, false)?;
        std::fs::rename(&file.path, &target)?;
        sync_dir(&self.processing);
        file.path = target;
        Ok(())
    }

    /// Moves `file` back from `processing/` to `to`, where it was dropped (unless something is
    /// there now), and treats it as returned already: it is not taken again until it changes.
    pub(crate) fn put_back(&mut self, file: &mut ReadyFile, to: &Path) -> io::Result<()> {
        if exists(to)? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} was dropped again meanwhile", to.display()),
            ));
        }
        std::fs::rename(&file.path, to)?;
        to.clone_into(&mut file.path);
        let now = std::fs::symlink_metadata(to)?;
        let name = OsString::from(&file.file_name);
        let seen =
            self.seen.entry(name).or_insert_with(|| Seen::new(Signature::of(&now), Instant::now()));
        seen.signature = Signature::of(&now);
        seen.returned = true;
        Ok(())
    }

    /// The files left in `processing/`: the service stopped while it read or imported them.
    /// Regular files only, in name order; the caller accepts those whose content was imported
    /// and rejects the others with [`INTERRUPTED`].
    pub(crate) fn interrupted(&self) -> io::Result<Vec<(PathBuf, String)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.processing)? {
            let entry = entry?;
            let name = entry.file_name();
            if let (true, Some(text)) = (entry.file_type()?.is_file(), name.to_str()) {
                found.push((entry.path(), text.to_owned()));
            } else {
                tracing::warn!(file = ?name, dir = %self.processing.display(),
                    "ignoring an entry that is not a job file the service left");
            }
        }
        found.sort();
        Ok(found)
    }

    /// The SHA-256 of the first bytes of `path` that a scan would read, as in
    /// [`ReadyFile::sha256`], without holding them.
    pub(crate) fn sha256_of(&self, path: &Path) -> io::Result<String> {
        let mut hasher = Sha256::new();
        io::copy(&mut std::fs::File::open(path)?.take(self.max_read), &mut hasher)?;
        Ok(hex(&hasher.finalize()))
    }

    /// Moves `file` into `rejected/` (never overwriting, as [`Inbox::accept`]) with a note
    /// `<new name>.error.txt` beside it saying what is wrong and what to do. The note is written
    /// first, so a rejected file always has one; if the move fails the note is removed again.
    pub(crate) fn reject(&self, file: &ReadyFile, error: &str) -> io::Result<PathBuf> {
        self.reject_path(&file.path, &file.file_name, error)
    }

    /// [`Inbox::reject`] for the file at `path`, named `file_name` when it was dropped.
    pub(crate) fn reject_path(
        &self,
        path: &Path,
        file_name: &str,
        error: &str,
    ) -> io::Result<PathBuf> {
        ensure_real_dir(&self.rejected).map_err(into_io)?;
        let target = free_name(&self.rejected, file_name, true)?;
        let note_path = with_suffix(&target, ERROR_SUFFIX);
        // The error names the file as it was dropped (lines and columns are the same); the
        // note also says where it lies now, which is what the operator opens to fix it.
        let note = format!(
            "krea-batch did not take the job file {:?} from the inbox:\n\n{}\n\n\
             The file now lies at {}.\n\
             Fix the file and drop it into the inbox again (write it elsewhere and rename it in).\n",
            file_name,
            error.trim_end(),
            target.display(),
        );
        write_atomically(&note_path, note.as_bytes(), true).map_err(into_io)?;
        if let Err(err) = std::fs::rename(path, &target) {
            let _ = std::fs::remove_file(&note_path);
            return Err(err);
        }
        sync_dir(&self.rejected);
        Ok(target)
    }

    /// Decides about one directory entry; returns it if it is ready.
    fn look_at(&mut self, entry: &std::fs::DirEntry, name: &OsStr) -> Option<ReadyFile> {
        let text = name.to_string_lossy();
        if text.starts_with('.') {
            return None; // hidden files, editors' swap files, our own temporary files
        }
        let Ok(kind) = entry.file_type() else { return None };
        if kind.is_dir() {
            if name != ACCEPTED && name != REJECTED && name != PROCESSING {
                // A folder of images that job files name (`from: photos/`) is expected here.
                self.warn_once(
                    name,
                    "a folder; only files directly in the inbox are read as job files (a job \
                     file's `from: folder/` reads its images)",
                );
            }
            return None;
        }
        if kind.is_symlink() {
            self.warn_once(name, "a symbolic link; the inbox does not follow links");
            return None;
        }
        let lower = text.to_ascii_lowercase();
        let temporary = [".tmp", ".part", ".swp", "~"].iter().any(|end| lower.ends_with(end));
        // Data files that job files read rows from (`from: prompts.csv`) and local input files
        // (`image_url: cat.png`) sit beside them, in the inbox, and stay there: not job files,
        // but expected.
        let data = [
            ".csv", ".jsonl", ".ndjson", ".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif",
            ".mp4", ".m4v", ".mov", ".webm", ".glb", ".wav", ".mp3",
        ]
        .iter()
        .any(|end| lower.ends_with(end));
        if temporary || data {
            return None;
        }
        // `.json`: Krea's pipeline files (`jobfile/pipeline.rs`), and job files written as JSON.
        let extension = Path::new(name).extension().unwrap_or_default();
        if !["yaml", "yml", "json"].iter().any(|known| extension.eq_ignore_ascii_case(known)) {
            self.warn_once(name, "not a job file (the inbox takes .yaml, .yml and .json files)");
            return None;
        }
        let Some(file_name) = name.to_str() else {
            self.warn_once(name, "its name is not valid UTF-8; rename it");
            return None;
        };
        if !kind.is_file() {
            self.warn_once(name, "not a regular file");
            return None;
        }
        let signature = Signature::of(&entry.metadata().ok()?);
        let now = Instant::now();
        let Some(seen) = self.seen.get_mut(name) else {
            self.seen.insert(name.to_owned(), Seen::new(signature, now));
            return None;
        };
        if seen.signature != signature {
            *seen = Seen::new(signature, now);
            return None;
        }
        if seen.returned {
            return None;
        }
        // Settled: modified `settle` ago, or (a clock ahead of ours) unchanged here that long.
        let age = SystemTime::now().duration_since(signature.modified).unwrap_or_default();
        let settled = age >= self.settle || now.duration_since(seen.since) >= self.settle;
        match self.written.get(name) {
            Some(Written::MovedIn) => {}
            Some(Written::Closed) | None if settled => {}
            Some(Written::Open) => {
                if settled && !seen.noted_open {
                    seen.noted_open = true;
                    tracing::info!(file = %file_name, "an inbox file is still open for writing; \
                        it is taken once its writer closes it");
                }
                return None;
            }
            Some(Written::Closed) | None => return None,
        }
        let path = entry.path();
        let bytes = match read_unchanged(&path, signature, self.max_read) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None, // it changed while being read; the next scan sees that
            Err(err) => {
                if !seen.warned_unreadable {
                    tracing::warn!(file = ?file_name, %err, "cannot read an inbox file; will retry");
                    seen.warned_unreadable = true;
                }
                return None;
            }
        };
        seen.returned = true;
        let sha256 = hex(&Sha256::digest(&bytes));
        Some(ReadyFile {
            path,
            batch_name: batch_name(file_name),
            file_name: file_name.to_owned(),
            bytes,
            sha256,
        })
    }

    fn warn_once(&mut self, name: &OsStr, why: &str) {
        if self.warned.insert(name.to_owned()) {
            tracing::warn!(file = ?name, dir = %self.dir.display(), "ignoring an inbox entry: {why}");
        }
    }
}

impl Seen {
    fn new(signature: Signature, since: Instant) -> Self {
        Self { signature, since, returned: false, warned_unreadable: false, noted_open: false }
    }
}

impl Inbox {
    /// Takes in the kernel's events since the last scan. An overflowed queue forgets what the
    /// lost events would have said (the settle time decides); a lost watch is not renewed.
    fn read_events(&mut self) {
        let Some(events) = &mut self.events else { return };
        loop {
            let read = match events.inotify.read_events(&mut events.buffer) {
                Ok(read) => read,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    tracing::warn!(%err, "cannot read the inbox's events; the settle time decides");
                    self.events = None;
                    self.written.clear();
                    return;
                }
            };
            for event in read {
                let mask = event.mask;
                if mask.contains(EventMask::Q_OVERFLOW) {
                    tracing::warn!(
                        "the inbox's event queue overflowed; the settle time decides \
                        for the files written meanwhile"
                    );
                    self.written.clear();
                    continue;
                }
                if mask.contains(EventMask::IGNORED) {
                    tracing::warn!("the inbox is no longer watched; the settle time decides");
                    self.events = None;
                    self.written.clear();
                    return;
                }
                let Some(name) = event.name else { continue };
                if mask.intersects(EventMask::MOVED_FROM | EventMask::DELETE) {
                    self.written.remove(name);
                } else if mask.contains(EventMask::MOVED_TO) {
                    self.written.insert(name.to_owned(), Written::MovedIn);
                } else if mask.intersects(EventMask::CREATE | EventMask::MODIFY) {
                    self.written.insert(name.to_owned(), Written::Open);
                } else if mask.contains(EventMask::CLOSE_WRITE) {
                    self.written.insert(name.to_owned(), Written::Closed);
                }
            }
        }
    }

    /// The accepted files whose size or time changed since they were taken (each reported
    /// once); files moved away or deleted since are forgotten.
    fn changed_since_taken(&mut self) -> Vec<PathBuf> {
        let mut changed = Vec::new();
        self.taken.retain(|(path, content)| match Content::of(path) {
            Some(now) if now == *content => true,
            Some(_) => {
                changed.push(path.clone());
                false
            }
            None => false,
        });
        changed
    }
}

/// Starts watching `dir` for files created, written, closed and moved in or out.
fn watch(dir: &Path) -> io::Result<Events> {
    let inotify = inotify::Inotify::init()?;
    let mask = WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW;
    inotify.watches().add(dir, mask)?;
    Ok(Events { inotify, buffer: vec![0; 16 << 10] })
}

/// Reads at most `limit` bytes of `path`, if it is still the file `expected` describes before and
/// after reading (a link swapped in, or a write meanwhile, gives `None`).
fn read_unchanged(path: &Path, expected: Signature, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    if Signature::of(&file.metadata()?) != expected {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    (&file).take(limit).read_to_end(&mut bytes)?;
    Ok((Signature::of(&file.metadata()?) == expected).then_some(bytes))
}

/// A safe batch (folder) name from a job file's name: the stem without `.yaml`/`.yml`/`.json`, runs of
/// characters other than ASCII letters, digits, `.`, `_` and `-` replaced by one `-`, leading
/// `.`/`-` and trailing `-` trimmed, cut to 100 bytes; `job-file` if nothing is left, `job-`
/// before a name Windows or krea-batch reserves. The result always passes [`check_name`].
#[must_use]
pub(crate) fn batch_name(file_name: &str) -> String {
    let lower = file_name.to_ascii_lowercase();
    let stem = [".yaml", ".yml", ".json"]
        .iter()
        .find(|ext| lower.ends_with(*ext))
        .and_then(|ext| file_name.get(..file_name.len() - ext.len()))
        .unwrap_or(file_name);
    let mut name = String::new();
    for ch in stem.chars() {
        if ch.is_ascii_alphanumeric() || "._-".contains(ch) {
            name.push(ch);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let mut name = name.trim_start_matches(['.', '-']).to_owned();
    name.truncate(MAX_BATCH_NAME); // ASCII only by now
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        "job-file".to_owned()
    } else if check_name(name).is_err() {
        format!("job-{name}") // CON, NUL, COM1…, index.html: the only names left that fail
    } else {
        name.to_owned()
    }
}

/// `dir/name`, or `dir/<stem>.N.<ext>` for the first N from 2 where nothing exists (and, with
/// `with_note`, no `.error.txt` beside it either).
fn free_name(dir: &Path, name: &str, with_note: bool) -> io::Result<PathBuf> {
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    for n in 1..10_000 {
        let candidate = match n {
            1 => dir.join(name),
            _ if ext.is_empty() => dir.join(format!("{name}.{n}")),
            _ => dir.join(format!("{stem}.{n}.{ext}")),
        };
        let taken =
            exists(&candidate)? || (with_note && exists(&with_suffix(&candidate, ERROR_SUFFIX))?);
        if !taken {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} holds too many files named like {name:?}", dir.display()),
    ))
}

/// Whether anything (a dangling link included) is at `path`.
fn exists(path: &Path) -> io::Result<bool> {
    let found = std::fs::symlink_metadata(path);
    if found.as_ref().is_err_and(|err| err.kind() == io::ErrorKind::NotFound) {
        Ok(false)
    } else {
        found.map(|_| true)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut text = path.as_os_str().to_owned();
    text.push(suffix);
    PathBuf::from(text)
}

/// Makes a rename into `dir` durable; best effort (a failure loses nothing but the guarantee).
fn sync_dir(dir: &Path) {
    let _ = std::fs::File::open(dir).and_then(|folder| folder.sync_all());
}

/// The I/O error under a helper's [`FileError`] (the inbox's callers name the file themselves).
fn into_io(err: FileError) -> io::Error {
    err.source
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const HOUR: Duration = Duration::from_hours(1);

    fn setup() -> (tempfile::TempDir, Inbox) {
        let root = tempfile::tempdir().expect("a temporary folder");
        let inbox = Inbox::open(&root.path().join("inbox"), Duration::from_secs(2)).expect("open");
        (root, inbox)
    }

    /// Writes `path` and dates it an hour back, as a file written a while ago.
    fn write_old(path: &Path, text: &str) {
        fs::write(path, text).expect("write");
        let file = fs::File::options().write(true).open(path).expect("open for times");
        file.set_modified(SystemTime::now() - HOUR).expect("set mtime");
    }

    fn names(files: &[ReadyFile]) -> Vec<&str> {
        files.iter().map(|file| file.file_name.as_str()).collect()
    }

    #[test]
    fn a_file_renamed_in_is_ready_on_the_second_scan_once() {
        let (root, mut inbox) = setup();
        assert!(inbox.dir().join(ACCEPTED).is_dir() && inbox.dir().join(REJECTED).is_dir());
        let outside = root.path().join("catalogue-2026.yaml");
        write_old(&outside, "jobs: []\n");
        fs::rename(&outside, inbox.dir().join("catalogue-2026.yaml")).expect("rename in");
        write_old(&inbox.dir().join("b.YML"), "b");
        write_old(&inbox.dir().join("a.json"), "{}");
        assert!(inbox.scan().expect("scan").is_empty());
        let ready = inbox.scan().expect("scan");
        assert_eq!(names(&ready), ["a.json", "b.YML", "catalogue-2026.yaml"]);
        let file = &ready[2];
        assert_eq!(file.batch_name, "catalogue-2026");
        assert_eq!(file.bytes, b"jobs: []\n");
        assert_eq!(file.sha256, hex(&Sha256::digest(b"jobs: []\n")));
        assert!(inbox.scan().expect("scan").is_empty(), "returned once only");
    }

    #[test]
    fn a_growing_or_fresh_file_is_not_ready() {
        let root = tempfile::tempdir().expect("a temporary folder");
        let mut inbox = Inbox::open(root.path(), HOUR).expect("open");
        let path = root.path().join("slow.yaml");
        write_old(&path, "jobs:\n");
        assert!(inbox.scan().expect("scan").is_empty());
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("append")
            .set_len(100)
            .expect("grow");
        assert!(inbox.scan().expect("scan").is_empty(), "it changed since the last scan");
        assert!(inbox.scan().expect("scan").is_empty(), "modified less than `settle` ago");
        write_old(&path, "jobs:\n  - prompt: done\n");
        assert!(inbox.scan().expect("scan").is_empty(), "a change is seen, not taken");
        assert_eq!(names(&inbox.scan().expect("scan")), ["slow.yaml"]);
    }

    #[test]
    fn hidden_temporary_other_and_linked_entries_are_ignored() {
        let (root, mut inbox) = setup();
        for name in [".hidden.yaml", "x.yaml~", "x.yaml.tmp", "x.yaml.part", "x.yaml.swp"] {
            write_old(&inbox.dir().join(name), "jobs: []");
        }
        write_old(&inbox.dir().join("notes.txt"), "not a job file");
        fs::create_dir(inbox.dir().join("sub.yaml")).expect("a folder");
        let target = root.path().join("elsewhere.yaml");
        write_old(&target, "jobs: []");
        std::os::unix::fs::symlink(&target, inbox.dir().join("link.yaml")).expect("symlink");
        std::os::unix::fs::symlink(root.path(), inbox.dir().join("dir.yaml")).expect("symlink");
        for _ in 0..3 {
            assert!(inbox.scan().expect("scan").is_empty());
        }
        assert_eq!(inbox.warned.len(), 4, "notes.txt, sub.yaml and the two links, once each");
        assert!(!inbox.warned.contains(OsStr::new(PROCESSING)), "its own folders are expected");
        assert!(inbox.seen.is_empty());
        fs::remove_file(inbox.dir().join("notes.txt")).expect("remove");
        inbox.scan().expect("scan");
        assert_eq!(inbox.warned.len(), 3, "a name that is gone is forgotten");
    }

    #[test]
    fn accept_and_reject_move_files_and_never_overwrite() {
        let (_root, mut inbox) = setup();
        let mut accepted = Vec::new();
        for text in ["first", "second"] {
            write_old(&inbox.dir().join("same.yaml"), text);
            inbox.scan().expect("scan");
            let ready = inbox.scan().expect("scan");
            assert_eq!(names(&ready), ["same.yaml"]);
            accepted.push(inbox.accept(&ready[0]).expect("accept"));
        }
        let folder = inbox.dir().join(ACCEPTED);
        assert_eq!(accepted, [folder.join("same.yaml"), folder.join("same.2.yaml")]);
        assert_eq!(fs::read_to_string(&accepted[0]).expect("read"), "first");
        assert_eq!(fs::read_to_string(&accepted[1]).expect("read"), "second");
        assert!(!inbox.dir().join("same.yaml").exists());

        let folder = inbox.dir().join(REJECTED);
        write_old(&folder.join("bad.yaml.error.txt"), "a note left from before");
        write_old(&inbox.dir().join("bad.yaml"), "jobs: 7");
        inbox.scan().expect("scan");
        let ready = inbox.scan().expect("scan");
        let moved = inbox.reject(&ready[0], "line 1: `jobs` must be a list\n").expect("reject");
        assert_eq!(moved, folder.join("bad.2.yaml"), "a stale note is not overwritten either");
        assert_eq!(fs::read_to_string(&moved).expect("read"), "jobs: 7");
        let note = fs::read_to_string(folder.join("bad.2.yaml.error.txt")).expect("note");
        assert!(note.contains("\"bad.yaml\"") && note.contains("`jobs` must be a list"), "{note}");
        assert!(note.contains("drop it into the inbox again"), "{note}");
        let lies = format!("The file now lies at {}.", folder.join("bad.2.yaml").display());
        assert!(note.contains(&lies), "where it lies now: {note}");
        assert!(!inbox.dir().join("bad.yaml").exists());
    }

    #[test]
    fn a_file_that_could_not_be_moved_is_not_returned_again_until_it_changes() {
        let (_root, mut inbox) = setup();
        let path = inbox.dir().join("stuck.yaml");
        write_old(&path, "jobs: []");
        fs::remove_dir(inbox.dir().join(ACCEPTED)).expect("rmdir");
        write_old(&inbox.dir().join(ACCEPTED), "a file where a folder belongs");
        inbox.scan().expect("scan");
        let ready = inbox.scan().expect("scan");
        assert!(inbox.accept(&ready[0]).is_err());
        assert!(path.exists());
        for _ in 0..3 {
            assert!(inbox.scan().expect("scan").is_empty());
        }
        write_old(&path, "jobs: [] # edited");
        assert!(inbox.scan().expect("scan").is_empty());
        assert_eq!(inbox.scan().expect("scan")[0].bytes, b"jobs: [] # edited");
    }

    #[test]
    fn an_oversized_file_is_returned_but_read_only_past_the_limit() {
        let (_root, mut inbox) = setup();
        assert_eq!(inbox.max_read, MAX_FILE_SIZE + 1);
        inbox.max_read = 5; // reading 64 MiB and hashing it unoptimised is slow
        write_old(&inbox.dir().join("huge.yaml"), "jobs: [1, 2, 3]");
        inbox.scan().expect("scan");
        assert_eq!(inbox.scan().expect("scan")[0].bytes, b"jobs:");
    }

    #[test]
    fn a_file_still_open_for_writing_is_not_taken_however_long_its_writer_pauses() {
        let (_root, mut inbox) = setup();
        assert!(inbox.events.is_some(), "inotify works here");
        let path = inbox.dir().join("half.yaml");
        let mut writer = fs::File::create(&path).expect("create");
        std::io::Write::write_all(&mut writer, b"jobs:\n  - prompt: one\n").expect("write");
        // Dated an hour back by the writer itself (no close): the settle time alone would say
        // it is complete.
        writer.set_modified(SystemTime::now() - HOUR).expect("set mtime");
        for _ in 0..3 {
            assert!(inbox.scan().expect("scan").is_empty(), "the writer has not closed it");
        }
        drop(writer);
        assert_eq!(names(&inbox.scan().expect("scan")), ["half.yaml"], "closed: taken");

        // Without events (inotify unavailable) the settle time decides, as it did before.
        let path = inbox.dir().join("other.yaml");
        let writer = fs::File::create(&path).expect("create");
        writer.set_modified(SystemTime::now() - HOUR).expect("set mtime");
        inbox.events = None;
        inbox.written.clear();
        inbox.scan().expect("scan");
        assert_eq!(names(&inbox.scan().expect("scan")), ["other.yaml"]);
    }

    #[test]
    fn a_file_renamed_in_is_complete_without_waiting_for_the_settle_time() {
        let root = tempfile::tempdir().expect("a temporary folder");
        let mut inbox = Inbox::open(&root.path().join("inbox"), HOUR).expect("open");
        let staging = root.path().join("a.yaml");
        fs::write(&staging, "jobs: []\n").expect("write");
        fs::rename(&staging, inbox.dir().join("a.yaml")).expect("rename in");
        assert!(inbox.scan().expect("scan").is_empty(), "seen once");
        assert_eq!(names(&inbox.scan().expect("scan")), ["a.yaml"], "unchanged: taken");
        // The fallback: without events, a fresh file waits the settle time (an hour).
        inbox.events = None;
        let staging = root.path().join("c.yaml");
        fs::write(&staging, "jobs: []\n").expect("write");
        fs::rename(&staging, inbox.dir().join("c.yaml")).expect("rename in");
        for _ in 0..3 {
            assert!(inbox.scan().expect("scan").is_empty());
        }
    }

    #[test]
    fn an_accepted_file_that_changes_afterwards_is_reported_once() {
        let (_root, mut inbox) = setup();
        write_old(&inbox.dir().join("grows.yaml"), "jobs:\n  - prompt: one\n");
        write_old(&inbox.dir().join("stays.yaml"), "jobs:\n  - prompt: two\n");
        inbox.scan().expect("scan");
        let ready = inbox.scan().expect("scan");
        let grows = inbox.accept(&ready[0]).expect("accept");
        inbox.accept(&ready[1]).expect("accept");
        assert!(inbox.changed_since_taken().is_empty());
        let mut writer = fs::OpenOptions::new().append(true).open(&grows).expect("append");
        std::io::Write::write_all(&mut writer, b"  - prompt: three\n").expect("write");
        assert_eq!(inbox.changed_since_taken(), [grows]);
        assert!(inbox.changed_since_taken().is_empty(), "reported once");
        assert_eq!(inbox.taken.len(), 1, "stays.yaml is still watched");
    }

    #[test]
    fn a_file_is_read_from_processing_and_one_left_there_is_found_at_the_next_start() {
        let (_root, mut inbox) = setup();
        let dropped = inbox.dir().join("big.yaml");
        write_old(&dropped, "jobs: []");
        inbox.scan().expect("scan");
        let mut file = inbox.scan().expect("scan").remove(0);
        inbox.quarantine(&mut file).expect("quarantine");
        assert_eq!(file.path, inbox.dir().join(PROCESSING).join("big.yaml"));
        assert!(!dropped.exists() && file.path.is_file());

        // Put back (the import failed): not taken again until it changes.
        inbox.put_back(&mut file, &dropped).expect("put back");
        assert_eq!(file.path, dropped);
        for _ in 0..3 {
            assert!(inbox.scan().expect("scan").is_empty());
        }
        inbox.quarantine(&mut file).expect("quarantine");

        // The service stops here; the next start finds the file and rejects it.
        let mut inbox = Inbox::open(inbox.dir(), Duration::from_secs(2)).expect("open again");
        let left = inbox.interrupted().expect("listed");
        assert_eq!(left, [(file.path.clone(), "big.yaml".to_owned())]);
        assert_eq!(inbox.sha256_of(&file.path).expect("hash"), file.sha256);
        inbox.reject_path(&left[0].0, &left[0].1, INTERRUPTED).expect("rejected");
        let note =
            fs::read_to_string(inbox.dir().join("rejected/big.yaml.error.txt")).expect("note");
        assert!(note.contains("the service stopped while reading this file"), "{note}");
        assert!(inbox.interrupted().expect("listed").is_empty());
        assert!(inbox.scan().expect("scan").is_empty());
    }

    #[test]
    fn batch_names_are_safe() {
        let long = format!("{}.yaml", "a".repeat(300));
        for (file, expected) in [
            ("catalogue-2026.yaml", "catalogue-2026"),
            ("my job (v2).yaml", "my-job-v2"),
            ("Spring.Drop.YML", "Spring.Drop"),
            (".yaml", "job-file"),
            ("...yaml", "job-file"),
            ("-x.yaml", "x"),
            ("日本語.yaml", "job-file"),
            ("café au lait.yml", "caf-au-lait"),
            ("con.yaml", "job-con"),
            ("car-pipeline.JSON", "car-pipeline"),
            (long.as_str(), &"a".repeat(100)),
        ] {
            let name = batch_name(file);
            assert_eq!(name, expected, "{file}");
            assert_eq!(check_name(&name), Ok(()), "{file}");
        }
    }
}
