//! A job as krea-batch tracks it: its stable identity, its name, and the local lifecycle with the
//! transitions allowed between states. Pure logic, no I/O: `store` persists these values,
//! `runner` moves jobs through them, `jobfile` creates them.
//!
//! The local lifecycle is separate from Krea's remote status (`api::RemoteStatus`): Krea says
//! where a generation is; the local state says what krea-batch still owes the user for it.
//!
//! ```text
//!   pending ──► submitting ──► submitted ──► completed ──► downloaded
//!      ▲            │   │           │            (download pending)
//!      │            │   └──► unknown (POST answer lost; reconciled before any resubmission)
//!      └────────────┘               │
//!   (402, 429: the job was not created)   failed / cancelled (from any unfinished state)
//! ```

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;

/// The stable identity of a job: a SHA-256 over its model, its full request body and its
/// occurrence index among identical requests in the same job file.
///
/// The name is deliberately not part of it: renaming a job in the file must not pay for it again,
/// while `count: 3` grown to `count: 4` adds exactly one job.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobKey(String);

impl JobKey {
    /// The key of the `occurrence`-th (from 0) job sending `body` to `model`.
    #[must_use]
    pub fn new(model: &str, body: &Map<String, Value>, occurrence: u32) -> Self {
        Self::from_canonical(model, &canonical_json(body), occurrence)
    }

    /// The same, from the body's canonical JSON text ([`canonical_json`]).
    #[must_use]
    pub fn from_canonical(model: &str, canonical: &str, occurrence: u32) -> Self {
        let mut hasher = Sha256::new();
        for part in [model.as_bytes(), b"\0", canonical.as_bytes(), b"\0"] {
            hasher.update(part);
        }
        hasher.update(occurrence.to_le_bytes());
        Self(hex(&hasher.finalize()))
    }

    /// Wraps a key read back from the state file.
    #[must_use]
    pub fn from_stored(text: String) -> Self {
        Self(text)
    }

    /// The key as lowercase hex.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request body as canonical JSON text: `serde_json`'s map is ordered by key (the
/// `preserve_order` feature is off), so the same body always gives the same text, and the same
/// key. This text is what is stored and sent.
#[must_use]
pub(crate) fn canonical_json(body: &Map<String, Value>) -> String {
    serde_json::to_string(body).unwrap_or_default()
}

/// Lowercase hex of `bytes`.
#[must_use]
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Where a job stands from krea-batch's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    /// Not sent to Krea (yet, or again after an answer that proved nothing was created).
    Pending,
    /// The attempt is durably recorded and the POST may be under way. After a crash this means
    /// the same as `Unknown`.
    Submitting,
    /// A POST ended without an answer: Krea may or may not have created (and will bill) the job.
    /// Never resubmitted before reconciliation has looked for it.
    Unknown,
    /// Krea accepted the job and gave it an id; it is being polled.
    Submitted,
    /// Krea completed the job; some of its files are not yet on disk.
    Completed,
    /// Completed and every result file is on disk, whole. Never touched again.
    Downloaded,
    /// Ended without results (refused, failed at Krea, lost, timed out). Not billed.
    Failed,
    /// Cancelled by the user, at Krea or before submission. Not billed.
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Submitting,
        Self::Unknown,
        Self::Submitted,
        Self::Completed,
        Self::Downloaded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The name stored in the state file and shown to users.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Submitting => "submitting",
            Self::Unknown => "unknown",
            Self::Submitted => "submitted",
            Self::Completed => "completed",
            Self::Downloaded => "downloaded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a name written by [`JobState::as_str`].
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    /// True when nothing more will happen to the job.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Downloaded | Self::Failed | Self::Cancelled)
    }

    /// True when the job may exist at Krea and not be finished there: it counts against the cap
    /// on jobs in flight. Unknown jobs count too, since they may be running.
    #[must_use]
    pub fn is_in_flight(self) -> bool {
        matches!(self, Self::Submitting | Self::Unknown | Self::Submitted)
    }

    /// Whether a job in this state may move to `next`. The engine checks every transition it
    /// makes against this table, in one place (its job table, `runner/table.rs`), so a bug
    /// shows up as a refused transition rather than as a job paid for twice. The store does not
    /// check: it records states others decided, including ones that are no transition
    /// (`recover` rebuilding a lost record, `cancel` on a state no process holds).
    #[must_use]
    pub fn may_become(self, next: Self) -> bool {
        use JobState::{
            Cancelled, Completed, Downloaded, Failed, Pending, Submitted, Submitting, Unknown,
        };
        match (self, next) {
            // Staying put is always allowed (a remote status update, a partial download).
            (a, b) if a == b => !a.is_final(),
            (Pending, Submitting | Failed | Cancelled)
            // A POST answered with a refusal that proves nothing was created (402, 429, 400…).
            | (Submitting, Pending | Submitted | Unknown | Failed | Completed)
            // Reconciliation adopts the job, proves it was never created, or gives up on it.
            | (Unknown, Pending | Submitted | Completed | Failed | Cancelled)
            | (Submitted, Completed | Failed | Cancelled)
            | (Completed, Downloaded) => true,
            _ => false,
        }
    }

    /// Whether `krea-batch retry` may put a job in this state back to `Pending`: only a failed
    /// one. This is no transition of the engine's ([`JobState::may_become`] refuses it, so no
    /// bug in the engine can send a failed job again): it is the user's decision, taken by the
    /// command with the cost shown, while no engine holds the state, and the failure it
    /// replaces is kept in the state file (`store/retries.rs`). A failed job is not billed, so
    /// sending it again pays once for one result. Cancelled jobs stay cancelled: that was a
    /// decision too.
    #[must_use]
    pub fn may_be_retried(self) -> bool {
        self == Self::Failed
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest job name accepted; names become file names with an extension and a suffix added.
pub(crate) const MAX_NAME_LEN: usize = 120;

/// A name krea-batch keeps for its own files in an output folder.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reserved {
    /// Exactly this name (ignoring case).
    Exact(&'static str),
    /// Any name starting with this (ignoring case).
    Prefix(&'static str),
    /// `<prefix><digits><suffix>`, as the gallery's later pages (`index-2.html`).
    Numbered(&'static str, &'static str),
}

/// Names a job may not have, because krea-batch writes a file or folder of that name into the
/// output folder (a job's results go to `<name>.<ext>`, or to a folder `<name>/` when it has
/// several, which would clash). Each with what the file is, for the error. The one list: add
/// a name here when krea-batch starts writing a new file beside the results.
pub(crate) const RESERVED_NAMES: &[(Reserved, &str)] = &[
    (Reserved::Exact("manifest.jsonl"), "the manifest"),
    (Reserved::Exact("index.html"), "the gallery"),
    (Reserved::Numbered("index-", ".html"), "a page of the gallery"),
    // The state file (`.krea-batch.sqlite` and its `-wal`, `-shm`, `.lock`), the OpenAPI cache
    // of older versions, partial downloads (`.krea-part-…`) and whatever krea-batch adds later.
    (Reserved::Prefix(".krea"), "krea-batch's own files"),
];

/// What `name` would collide with, if it is reserved ([`RESERVED_NAMES`]).
#[must_use]
pub(crate) fn reserved_name(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    RESERVED_NAMES.iter().find_map(|(pattern, what)| {
        let hit = match pattern {
            Reserved::Exact(reserved) => lower == *reserved,
            Reserved::Prefix(prefix) => lower.starts_with(prefix),
            Reserved::Numbered(prefix, suffix) => {
                lower.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix)).is_some_and(
                    |digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
                )
            }
        };
        hit.then_some(*what)
    })
}

/// Checks that `name` is safe to use as a file name inside the output directory: ASCII letters,
/// digits, `.`, `_` and `-`; not starting with `.` or `-`; at most 120 bytes (`MAX_NAME_LEN`); not a
/// name Windows reserves, nor one of krea-batch's own files (`RESERVED_NAMES`). Returns what
/// is wrong otherwise.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c))) {
        return Err(NameError::Character(bad));
    }
    if let Some(what) = reserved_name(name) {
        return Err(NameError::OwnFile { name: name.to_owned(), what });
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(NameError::Start);
    }
    let stem = name.split('.').next().unwrap_or(name).to_ascii_uppercase();
    let reserved = matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit());
    if reserved {
        return Err(NameError::Device(stem));
    }
    Ok(())
}

/// What is wrong with a job name ([`check_name`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// No name.
    #[error("the name is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`] bytes.
    #[error("the name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    /// A character outside letters, digits, `.`, `_` and `-`.
    #[error("the name contains {0:?}; use only letters, digits, '.', '_' and '-'")]
    Character(char),
    /// The name of one of krea-batch's own files.
    #[error("{name} is the name of {what} in the output folder; give the job another name")]
    OwnFile {
        /// The name.
        name: String,
        /// Which file.
        what: &'static str,
    },
    /// Starting with `.` or `-`.
    #[error("the name must not start with '.' or '-'")]
    Start,
    /// A device name on Windows.
    #[error("{0} is a device name on Windows")]
    Device(String),
}

/// A readable, safe name for a job that has none: its 1-based position in the file and the first
/// words of its prompt, e.g. `007-a-red-fox-in-fresh-snow`.
#[must_use]
pub(crate) fn derive_name(position: usize, prompt: &str) -> String {
    const SLUG_LEN: usize = 40;
    let mut slug = String::new();
    for ch in prompt.chars() {
        if slug.len() >= SLUG_LEN {
            break;
        }
        if ch.is_ascii_alphanumeric() {
            slug.push(ch.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() { format!("{position:03}") } else { format!("{position:03}-{slug}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: &Value) -> Map<String, Value> {
        value.as_object().cloned().expect("test bodies are objects")
    }

    #[test]
    fn key_is_stable_and_ignores_key_order() {
        let a = JobKey::new("image/bfl/flux-1-dev", &body(&json!({"prompt": "x", "seed": 1})), 0);
        let b = JobKey::new("image/bfl/flux-1-dev", &body(&json!({"seed": 1, "prompt": "x"})), 0);
        assert_eq!(a, b);
        assert_eq!(a.as_str().len(), 64);
    }

    #[test]
    fn key_changes_with_model_body_and_occurrence() {
        let base = body(&json!({"prompt": "x"}));
        let key = JobKey::new("image/bfl/flux-1-dev", &base, 0);
        assert_ne!(key, JobKey::new("image/bfl/flux-1-dev", &base, 1));
        assert_ne!(key, JobKey::new("image/krea/krea-2/medium", &base, 0));
        assert_ne!(key, JobKey::new("image/bfl/flux-1-dev", &body(&json!({"prompt": "y"})), 0));
    }

    #[test]
    fn state_names_round_trip() {
        for state in JobState::ALL {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
        assert_eq!(JobState::parse("bogus"), None);
    }

    #[test]
    fn a_known_job_is_never_sent_again() {
        // Once Krea has (or may have) a job, no path leads back to a fresh POST without
        // reconciliation: only `Unknown` may return to `Pending`.
        for from in [JobState::Submitted, JobState::Completed, JobState::Downloaded] {
            assert!(!from.may_become(JobState::Pending), "{from} -> pending");
            assert!(!from.may_become(JobState::Submitting), "{from} -> submitting");
        }
        assert!(JobState::Unknown.may_become(JobState::Pending));
        assert!(!JobState::Unknown.may_become(JobState::Submitting));
    }

    #[test]
    fn only_the_retry_command_sends_a_failed_job_again() {
        assert!(!JobState::Failed.may_become(JobState::Pending), "never the engine's doing");
        let retried: Vec<JobState> =
            JobState::ALL.into_iter().filter(|state| state.may_be_retried()).collect();
        assert_eq!(retried, [JobState::Failed], "not cancelled, not completed");
    }

    #[test]
    fn final_states_are_final() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_final()) {
            for to in JobState::ALL {
                assert!(!from.may_become(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("fox-01.v2").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "-rf", "a\0b", "tab\t", "CON", "com1.png", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn names_of_krea_batchs_own_files_are_refused() {
        for reserved in [
            "manifest.jsonl",
            "MANIFEST.JSONL",
            "index.html",
            "Index.HTML",
            "index-2.html",
            "index-10.html",
        ] {
            let why = check_name(reserved).expect_err(reserved).to_string();
            assert!(why.contains("output folder"), "{reserved}: {why}");
        }
        assert!(reserved_name(".krea-batch.sqlite").is_some());
        assert!(reserved_name(".krea-batch.sqlite-wal").is_some());
        for fine in
            ["manifest", "index", "index-.html", "index-2a.html", "my-index.html", "manifest.json"]
        {
            assert_eq!(check_name(fine), Ok(()), "{fine}");
        }
    }

    #[test]
    fn derived_names_are_safe() {
        assert_eq!(derive_name(7, "A red fox, in fresh snow!"), "007-a-red-fox-in-fresh-snow");
        assert_eq!(derive_name(12, "   ***  "), "012");
        let long = derive_name(1, &"word ".repeat(100));
        assert!(check_name(&long).is_ok(), "{long}");
        assert!(check_name(&derive_name(3, "ünïcödé ☃ prompt")).is_ok());
    }
}
