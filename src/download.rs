//! Result files: streamed from their URL into a temporary file beside their final place, checked,
//! synced and renamed into place, so that a file that exists is whole. A JSON sidecar beside each
//! file says where it came from.
//!
//! The download client is separate from the API client and never carries an `Authorization`
//! header: result URLs point at other hosts (`gen.krea.ai`), and neither they nor their redirects
//! may see the key. Redirects are followed only to `https` (or loopback) URLs, at most
//! [`MAX_REDIRECTS`] hops, never in a loop. Nothing the server sends chooses where a file goes:
//! the path comes from the job's name and the index of the URL; only the extension comes from
//! the Content-Type, through a fixed table.

use crate::api::{check_url, error_chain, printable};
use crate::job::hex;
use crate::retry::{RetryPolicy, Verdict};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

/// The most redirects followed for one result URL.
pub const MAX_REDIRECTS: usize = 5;
/// Temporary files start with this, so a restart can find and remove those of a killed run.
pub const PARTIAL_PREFIX: &str = ".krea-part-";

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The host answered with an error status.
    #[error("the result host answered {status} for {url}")]
    Status {
        /// The status code.
        status: u16,
        /// The URL.
        url: String,
    },
    /// The connection failed or broke off.
    #[error("downloading {url} failed: {detail}")]
    Transport {
        /// The URL.
        url: String,
        /// What happened.
        detail: String,
    },
    /// The body ended before its announced length.
    #[error("{url} ended after {got} of {expected} bytes")]
    Truncated {
        /// The URL.
        url: String,
        /// Content-Length.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The file is larger than `limits.max_result_size`.
    #[error("{url} is larger than the {limit}-byte limit (limits.max_result_size)")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The URL (or a redirect) is not allowed: plain http off loopback, a loop, too many hops.
    #[error("refused to download {url}: {reason}")]
    Refused {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Writing to disk failed (a full disk, permissions, a symlink where a folder belongs).
    #[error("cannot write {path}: {source}")]
    Disk {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl DownloadError {
    /// Whether trying again later may help: server errors, broken connections, short bodies and
    /// a full disk (space may be freed); not refusals, 4xx or oversize files.
    #[must_use]
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Status { status, .. } if *status >= 500 || *status == 429 || *status == 408 => {
                Verdict::Retry(None)
            }
            Self::Transport { .. } | Self::Truncated { .. } | Self::Disk { .. } => {
                Verdict::Retry(None)
            }
            Self::Status { .. } | Self::TooLarge { .. } | Self::Refused { .. } => Verdict::GiveUp,
        }
    }
}

/// A file written whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// The path relative to the output directory, `/`-separated.
    pub relative_path: String,
    /// Its size.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// The Content-Type served (the first of its parameters only).
    pub content_type: String,
}

/// The download client.
#[derive(Clone, Debug)]
pub struct Downloader {
    http: reqwest::Client,
    max_bytes: u64,
}

impl Downloader {
    /// A client with the given timeouts (the read timeout bounds each pause, not the whole file,
    /// so large files are never cut) and size limit.
    pub fn new(
        connect_timeout: Duration,
        read_timeout: Duration,
        max_bytes: u64,
    ) -> Result<Self, String> {
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            if attempt.previous().iter().any(|seen| seen == attempt.url()) {
                return attempt.error("a redirect loop");
            }
            match check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(format!("a redirect to {reason}")),
            }
        });
        let http = reqwest::Client::builder()
            .user_agent(crate::api::USER_AGENT)
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .redirect(policy)
            .build()
            .map_err(|err| format!("cannot set up the download client: {err}"))?;
        Ok(Self { http, max_bytes })
    }

    /// Downloads `url` to `<dir>/<stem>.<ext>`, retrying transient failures by `policy`.
    pub async fn fetch_with_retries(
        &self,
        url: &str,
        dir: &Path,
        stem: &str,
        policy: &RetryPolicy,
    ) -> Result<Fetched, DownloadError> {
        crate::retry::retry(
            policy,
            DownloadError::verdict,
            |err, wait| tracing::debug!(%err, ?wait, "download failed; retrying"),
            || self.fetch(url, dir, stem),
        )
        .await
    }

    /// One attempt to download `url` to `<dir>/<stem>.<ext>`. `stem` may contain one `/` (a job
    /// with several results gets a folder); the caller guarantees it is a safe relative path.
    pub async fn fetch(&self, url: &str, dir: &Path, stem: &str) -> Result<Fetched, DownloadError> {
        let refused = |reason: String| DownloadError::Refused { url: url.to_owned(), reason };
        let parsed =
            reqwest::Url::parse(url).map_err(|err| refused(format!("not a URL: {err}")))?;
        check_url(&parsed).map_err(refused)?;
        let transport = |err: &reqwest::Error| {
            let detail = error_chain(err);
            if err.is_redirect() {
                DownloadError::Refused { url: url.to_owned(), reason: detail }
            } else {
                DownloadError::Transport { url: url.to_owned(), detail }
            }
        };
        let mut response = self.http.get(parsed).send().await.map_err(|err| transport(&err))?;
        let status = response.status();
        if !status.is_success() {
            return Err(DownloadError::Status { status: status.as_u16(), url: url.to_owned() });
        }
        let expected = response.content_length();
        if expected.is_some_and(|len| len > self.max_bytes) {
            return Err(DownloadError::TooLarge { url: url.to_owned(), limit: self.max_bytes });
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
            .unwrap_or_default();
        let relative_path = format!("{stem}.{}", extension_for(&content_type));
        let final_path = dir.join(&relative_path);
        let folder = final_path.parent().unwrap_or(dir).to_owned();
        ensure_real_dir(&folder)?;

        // Up to IN_MEMORY bytes are collected and written in one blocking step (most results
        // are small); a larger body goes to the temporary file as it arrives.
        let mut buffer: Vec<u8> = Vec::new();
        let mut streaming: Option<(tokio::io::BufWriter<tokio::fs::File>, tempfile::TempPath)> =
            None;
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(err) => return Err(transport(&err)),
            };
            got += chunk.len() as u64;
            if got > self.max_bytes {
                return Err(DownloadError::TooLarge { url: url.to_owned(), limit: self.max_bytes });
            }
            hasher.update(&chunk);
            if let Some((writer, temp_path)) = &mut streaming {
                writer.write_all(&chunk).await.map_err(disk_error(temp_path))?;
                continue;
            }
            buffer.extend_from_slice(&chunk);
            if buffer.len() > IN_MEMORY {
                let (file, temp_path) = new_partial(&folder)?.into_parts();
                let mut writer =
                    tokio::io::BufWriter::with_capacity(256 << 10, tokio::fs::File::from_std(file));
                writer.write_all(&buffer).await.map_err(disk_error(&temp_path))?;
                buffer = Vec::new();
                streaming = Some((writer, temp_path));
            }
        }
        if let Some(expected) = expected.filter(|expected| *expected != got) {
            return Err(DownloadError::Truncated { url: url.to_owned(), expected, got });
        }
        if let Some((mut writer, temp_path)) = streaming {
            writer.flush().await.map_err(disk_error(&temp_path))?;
            writer.into_inner().sync_all().await.map_err(disk_error(&temp_path))?;
            persist(temp_path, &final_path)?;
        } else {
            let place = final_path.clone();
            tokio::task::spawn_blocking(move || write_whole(&folder, &buffer, &place))
                .await
                .map_err(|err| DownloadError::Disk {
                    path: final_path.clone(),
                    source: std::io::Error::other(err.to_string()),
                })??;
        }
        Ok(Fetched { relative_path, bytes: got, sha256: hex(&hasher.finalize()), content_type })
    }
}

/// The largest result collected in memory before it is written; larger ones are streamed.
const IN_MEMORY: usize = 1 << 20;

/// A new temporary file in `folder`.
fn new_partial(folder: &Path) -> Result<tempfile::NamedTempFile, DownloadError> {
    tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .permissions(public_file())
        .tempfile_in(folder)
        .map_err(disk_error(folder))
}

/// Writes `bytes` to a temporary file in `folder`, syncs it and renames it to `place`.
fn write_whole(folder: &Path, bytes: &[u8], place: &Path) -> Result<(), DownloadError> {
    use std::io::Write as _;
    let mut temp = new_partial(folder)?;
    temp.write_all(bytes).map_err(disk_error(temp.path()))?;
    temp.as_file().sync_all().map_err(disk_error(temp.path()))?;
    persist(temp.into_temp_path(), place)
}

/// Renames a synced temporary file into place. rename(2) replaces whatever is at `place`, a
/// planted symlink included, without following it.
fn persist(temp: tempfile::TempPath, place: &Path) -> Result<(), DownloadError> {
    temp.persist(place)
        .map_err(|err| DownloadError::Disk { path: place.to_owned(), source: err.error })
}

fn disk_error(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + use<> {
    let path = path.to_owned();
    move |source| DownloadError::Disk { path: path.clone(), source }
}

/// Results, sidecars and the manifest are ordinary files (0644 before the umask); only the
/// state file is private.
fn public_file() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::Permissions::from_mode(0o644)
}

/// Creates `dir` (and its parents) if needed, refusing a symlink where a folder belongs so that a
/// link planted in the output directory cannot redirect writes elsewhere.
pub fn ensure_real_dir(dir: &Path) -> Result<(), DownloadError> {
    let disk = |source| DownloadError::Disk { path: dir.to_owned(), source };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => Err(disk(std::io::Error::other(
            "it is a symbolic link; krea-batch writes only into real folders",
        ))),
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(disk(std::io::Error::other("it is a file, not a folder"))),
        Err(_) => std::fs::create_dir_all(dir).map_err(disk),
    }
}

/// The file extension for a Content-Type; unknown types get `bin`, never a name from the server.
#[must_use]
pub fn extension_for(content_type: &str) -> &'static str {
    match content_type {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpg",
        "image/webp" => "webp",
        "image/gif" => "gif",
        "image/avif" => "avif",
        "image/heic" => "heic",
        "image/tiff" => "tiff",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "video/quicktime" => "mov",
        "audio/mpeg" => "mp3",
        "audio/wav" | "audio/x-wav" => "wav",
        "model/gltf-binary" => "glb",
        _ => "bin",
    }
}

/// What a sidecar says about its file.
#[derive(Clone, Debug, Serialize)]
pub struct Sidecar<'a> {
    /// The job's name.
    pub name: &'a str,
    /// The prompt.
    pub prompt: &'a str,
    /// The model path.
    pub model: &'a str,
    /// The request body without the prompt.
    pub params: &'a serde_json::Map<String, serde_json::Value>,
    /// Krea's job id.
    pub job_id: &'a str,
    /// Krea's `created_at`.
    pub created_at: Option<&'a str>,
    /// Krea's `completed_at`.
    pub completed_at: Option<&'a str>,
    /// Which of the job's results this is, from 0.
    pub index: u32,
    /// Where it was downloaded from.
    pub source_url: &'a str,
    /// The file, relative to the output directory.
    pub file: &'a str,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256.
    pub sha256: &'a str,
    /// The Content-Type served.
    pub content_type: &'a str,
}

/// Writes `<dir>/<file>.json` atomically.
///
/// Not fsynced: a sidecar says nothing the state file does not hold, and the engine rewrites
/// a missing or empty one when it starts (after a power cut), so it is derived data, like the
/// manifest. Result files, which cannot be derived, are synced before they are renamed.
pub fn write_sidecar(dir: &Path, sidecar: &Sidecar<'_>) -> Result<(), DownloadError> {
    let mut text = serde_json::to_vec_pretty(sidecar).unwrap_or_default();
    text.push(b'\n');
    write_atomically(&sidecar_path(dir, sidecar.file), &text, false)
}

/// The sidecar of `<dir>/<file>`: `<dir>/<file>.json`.
#[must_use]
pub fn sidecar_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!("{file}.json"))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// partial file; with `synced`, the data is on disk before the rename.
pub fn write_atomically(path: &Path, bytes: &[u8], synced: bool) -> Result<(), DownloadError> {
    use std::io::Write as _;
    let folder = path.parent().unwrap_or_else(|| Path::new("."));
    let disk = |source| DownloadError::Disk { path: path.to_owned(), source };
    let mut temp = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .permissions(public_file())
        .tempfile_in(folder)
        .map_err(disk)?;
    temp.write_all(bytes).map_err(disk)?;
    if synced {
        temp.as_file().sync_all().map_err(disk)?;
    }
    temp.persist(path).map_err(|err| disk(err.error))?;
    Ok(())
}

/// Removes the temporary files a killed run left in `dir` and its immediate sub-folders. Returns
/// how many were removed.
#[must_use]
pub fn remove_partials(dir: &Path) -> usize {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_file() && name.to_string_lossy().starts_with(PARTIAL_PREFIX) {
            removed += usize::from(std::fs::remove_file(entry.path()).is_ok());
        } else if kind.is_dir() && !kind.is_symlink() {
            let Ok(inner) = std::fs::read_dir(entry.path()) else { continue };
            for file in inner.flatten() {
                let is_partial = file.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX);
                if is_partial && file.file_type().is_ok_and(|kind| kind.is_file()) {
                    removed += usize::from(std::fs::remove_file(file.path()).is_ok());
                }
            }
        }
    }
    removed
}

/// A short, printable form of a URL for logs (at most 200 characters).
#[must_use]
pub fn short_url(url: &str) -> String {
    printable(url, 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_come_from_a_fixed_table() {
        assert_eq!(extension_for("image/png"), "png");
        assert_eq!(extension_for("video/mp4"), "mp4");
        assert_eq!(extension_for("application/json"), "bin");
        assert_eq!(extension_for("image/../../etc"), "bin");
    }

    #[test]
    fn transient_and_permanent_failures() {
        let status = |status| DownloadError::Status { status, url: "u".into() };
        assert_eq!(status(503).verdict(), Verdict::Retry(None));
        assert_eq!(status(404).verdict(), Verdict::GiveUp);
        let short = DownloadError::Truncated { url: "u".into(), expected: 10, got: 5 };
        assert_eq!(short.verdict(), Verdict::Retry(None));
        let big = DownloadError::TooLarge { url: "u".into(), limit: 1 };
        assert_eq!(big.verdict(), Verdict::GiveUp);
    }

    #[test]
    fn a_symlink_is_not_a_folder_to_write_into() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("job");
        std::os::unix::fs::symlink(target.path(), &link).expect("symlink");
        assert!(ensure_real_dir(&link).is_err());
        assert!(ensure_real_dir(&dir.path().join("fresh/deeper")).is_ok());
    }

    #[test]
    fn partials_are_cleaned_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".krea-part-abc"), b"half").expect("write");
        std::fs::create_dir(dir.path().join("multi")).expect("mkdir");
        std::fs::write(dir.path().join("multi/.krea-part-x"), b"half").expect("write");
        std::fs::write(dir.path().join("keep.png"), b"whole").expect("write");
        assert_eq!(remove_partials(dir.path()), 2);
        assert!(dir.path().join("keep.png").exists());
    }

    #[test]
    fn atomic_writes_replace_links_without_following_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"precious").expect("write");
        let inside = dir.path().join("file.json");
        std::os::unix::fs::symlink(&outside, &inside).expect("symlink");
        write_atomically(&inside, b"new", true).expect("written");
        assert_eq!(std::fs::read(&outside).expect("read"), b"precious");
        assert_eq!(std::fs::read(&inside).expect("read"), b"new");
        assert!(!std::fs::symlink_metadata(&inside).expect("meta").file_type().is_symlink());
    }
}
