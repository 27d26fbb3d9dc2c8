//! Result files: streamed from their URL into a temporary file beside their final place, checked,
//! synced and renamed into place, so that a file that exists is whole. A JSON sidecar beside each
//! file says where it came from.
//!
//! The download client is separate from the API client and never carries an `Authorization`
//! header: result URLs point at other hosts (`gen.krea.ai`), and neither they nor their redirects
//! may see the key. Redirects are followed only to `https` (or loopback) URLs, at most
//! [`MAX_REDIRECTS`] hops, never in a loop, never to a URL with a `user:password@`. Unless the
//! API itself is on loopback, no URL or hop may reach a loopback, private or link-local address
//! (`address.rs`). A URL in which the API client found the key (and put [`REDACTED`] in its
//! place) is refused: fetching it would hand the key to the result host.
//!
//! No download can hang: the headers must come within `limits.download_timeout`, the whole
//! file within that plus its announced size at `limits.download_min_rate`, and every
//! [`RATE_WINDOW`] must bring at least that rate. Nothing the server sends chooses where a file
//! goes: the path comes from the job's name and the index of the URL; only the extension comes
//! from the Content-Type, through a fixed table. The Content-Type kept is short and printable.

use crate::address::{HostError, PublicResolver, check_host};
use crate::api::{UrlError, check_url, display_url, error_chain};
use crate::files::{FileError, PARTIAL_PREFIX, ensure_real_dir, public_file, write_atomically};
use crate::job::hex;
use crate::key::REDACTED;
use crate::retry::{RetryPolicy, Verdict};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;

/// The most redirects followed for one result URL.
pub(crate) const MAX_REDIRECTS: usize = 5;
/// Every window this long must bring at least `limits.download_min_rate` bytes per second.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(30);
/// The longest Content-Type kept (in sidecars and the state); a longer one is cut.
pub(crate) const MAX_CONTENT_TYPE: usize = 100;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DownloadError {
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
    /// The URL (or a redirect) is not allowed: plain http off loopback, an internal address, a
    /// URL that carried the key, a loop, too many hops.
    #[error("refused to download {url}: {reason}")]
    Refused {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        reason: Refusal,
    },
    /// The file did not come within its deadline, or came slower than the minimum rate.
    #[error("gave up downloading {url}: {detail}")]
    TooSlow {
        /// The URL.
        url: String,
        /// Which limit it broke.
        detail: String,
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

/// Why a result URL, or a redirect from it, is not fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The API client found the key in it and put [`REDACTED`] in its place.
    #[error(
        "the API answer quoted the API key in this URL (removed here); fetching it would send \
         the key to the result host, so it is not fetched"
    )]
    KeyInUrl,
    /// It does not parse.
    #[error("not a URL: {0}")]
    NotAUrl(#[source] crate::api::UrlParseError),
    /// It carries a `user:password@`.
    #[error("the URL carries a user name or password")]
    UserInfo,
    /// Its scheme is not allowed.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// Its host is internal.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A redirect the policy refused (a loop, too many hops, one of the above), as the HTTP
    /// client reported it, without the URL (a redirect's could carry a password).
    #[error("{0}")]
    Redirect(String),
}

impl From<FileError> for DownloadError {
    fn from(err: FileError) -> Self {
        Self::Disk { path: err.path, source: err.source }
    }
}

impl DownloadError {
    /// Whether trying again later may help: server errors, broken connections, short bodies and
    /// a full disk (space may be freed); not refusals, 4xx or oversize files. A download that
    /// broke its deadline or the minimum rate is not retried in this run either (each try would
    /// take the whole deadline again): the job stays download pending for the next run or
    /// `krea-batch download`.
    #[must_use]
    pub(crate) fn verdict(&self) -> Verdict {
        match self {
            Self::Status { status, .. } if *status >= 500 || *status == 429 || *status == 408 => {
                Verdict::Retry(None)
            }
            Self::Transport { .. } | Self::Truncated { .. } | Self::Disk { .. } => {
                Verdict::Retry(None)
            }
            Self::Status { .. }
            | Self::TooLarge { .. }
            | Self::Refused { .. }
            | Self::TooSlow { .. } => Verdict::GiveUp,
        }
    }
}

/// A file written whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fetched {
    /// The path relative to the output directory, `/`-separated.
    pub relative_path: String,
    /// Its size.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// The Content-Type served (the first of its parameters only).
    pub content_type: String,
}

/// How downloads are bounded; built from a job file's `limits`.
#[derive(Clone, Debug)]
pub(crate) struct DownloadSettings {
    /// The longest wait for a connection.
    pub connect_timeout: Duration,
    /// The longest pause between two pieces of a body.
    pub read_timeout: Duration,
    /// The largest file accepted (`limits.max_result_size`).
    pub max_bytes: u64,
    /// The headers must come within this, and the whole file within this plus its size at
    /// `min_rate` (`limits.download_timeout`).
    pub timeout: Duration,
    /// Bytes per second every [`RATE_WINDOW`] must bring (`limits.download_min_rate`).
    pub min_rate: u64,
    /// Whether URLs may reach loopback, private and link-local addresses: only when the API
    /// base itself is on loopback (the simulation, tests).
    pub internal_addresses: bool,
}

/// The download client.
#[derive(Clone, Debug)]
pub(crate) struct Downloader {
    http: reqwest::Client,
    max_bytes: u64,
    timeout: Duration,
    min_rate: u64,
    rate_window: Duration,
    internal_addresses: bool,
    /// One `host:port` exempt from the address policy (unit tests only: a redirect from an
    /// allowed host needs an allowed host on loopback).
    trusted: Option<String>,
}

impl Downloader {
    /// A client with the given bounds (the read timeout bounds each pause; the deadline grows
    /// with the file's size, so large files are never cut for being large).
    pub(crate) fn new(settings: &DownloadSettings) -> Result<Self, reqwest::Error> {
        Self::build(settings, None)
    }

    fn build(settings: &DownloadSettings, trusted: Option<String>) -> Result<Self, reqwest::Error> {
        let internal_addresses = settings.internal_addresses;
        let exempt = trusted.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            if attempt.previous().iter().any(|seen| seen == attempt.url()) {
                return attempt.error("a redirect loop");
            }
            let url = attempt.url();
            if !url.username().is_empty() || url.password().is_some() {
                return attempt.error("a redirect to a URL with a user name or password");
            }
            let checked = check_url(url).map_err(Refusal::from).and_then(|()| {
                if internal_addresses || exempt.as_deref() == Some(&origin_of(url)) {
                    Ok(())
                } else {
                    check_host(url).map_err(Refusal::from)
                }
            });
            match checked {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(format!("a redirect to {reason}")),
            }
        });
        let mut builder = reqwest::Client::builder()
            .user_agent(crate::api::USER_AGENT)
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .redirect(policy);
        if !internal_addresses {
            builder = builder.dns_resolver(PublicResolver);
        }
        let http = builder.build()?;
        Ok(Self {
            http,
            max_bytes: settings.max_bytes,
            timeout: settings.timeout,
            min_rate: settings.min_rate.max(1),
            rate_window: RATE_WINDOW,
            internal_addresses,
            trusted,
        })
    }

    /// Checks a result URL before anything is sent to it.
    fn check(&self, url: &str) -> Result<reqwest::Url, Refusal> {
        if url.contains(REDACTED) {
            return Err(Refusal::KeyInUrl);
        }
        let parsed = reqwest::Url::parse(url).map_err(Refusal::NotAUrl)?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Refusal::UserInfo);
        }
        check_url(&parsed)?;
        if !self.internal_addresses && self.trusted.as_deref() != Some(&origin_of(&parsed)) {
            check_host(&parsed)?;
        }
        Ok(parsed)
    }

    /// Downloads `url` to `<dir>/<stem>.<ext>` for the Krea job `owner`, retrying transient
    /// failures by `policy` (see [`Downloader::fetch_for`]).
    pub(crate) async fn fetch_with_retries(
        &self,
        url: &str,
        dir: &Path,
        stem: &str,
        owner: Option<&str>,
        policy: &RetryPolicy,
    ) -> Result<Fetched, DownloadError> {
        // The try about to be made after a failure: 2 after the first.
        let next_try = std::sync::atomic::AtomicU32::new(1);
        crate::retry::retry(
            policy,
            DownloadError::verdict,
            |err, wait| {
                let next = next_try.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                tracing::info!(file = %stem, "{}", retry_line(err, wait, next, policy.attempts));
            },
            || self.fetch_for(url, dir, stem, owner),
        )
        .await
    }

    /// One attempt to download `url` to `<dir>/<stem>.<ext>`, for no job in particular.
    #[cfg(test)]
    pub(crate) async fn fetch(
        &self,
        url: &str,
        dir: &Path,
        stem: &str,
    ) -> Result<Fetched, DownloadError> {
        self.fetch_for(url, dir, stem, None).await
    }

    /// One attempt to download `url` to `<dir>/<stem>.<ext>`. `stem` may contain one `/` (a job
    /// with several results gets a folder); the caller guarantees it is a safe relative path.
    ///
    /// A file already at that place is never replaced unless it is this result again (the same
    /// bytes) or an earlier download for the same Krea job `owner` (its sidecar says so): a
    /// paid result, or a file krea-batch did not write, stays as it is, and this one is saved
    /// as `<stem>-2.<ext>` (or the next free number) with a warning.
    pub(crate) async fn fetch_for(
        &self,
        url: &str,
        dir: &Path,
        stem: &str,
        owner: Option<&str>,
    ) -> Result<Fetched, DownloadError> {
        let shown = shown_url(url);
        let url = shown.as_str();
        let parsed = self
            .check(url)
            .map_err(|reason| DownloadError::Refused { url: url.to_owned(), reason })?;
        let transport = |err: reqwest::Error| {
            // Without the URL reqwest would print: a redirect's could carry a password.
            let redirect = err.is_redirect();
            let detail = error_chain(&err.without_url());
            if redirect {
                DownloadError::Refused { url: url.to_owned(), reason: Refusal::Redirect(detail) }
            } else {
                DownloadError::Transport { url: url.to_owned(), detail }
            }
        };
        let started = Instant::now();
        let too_slow = |detail: String| DownloadError::TooSlow { url: url.to_owned(), detail };
        let mut response =
            tokio::time::timeout_at(started + self.timeout, self.http.get(parsed).send())
                .await
                .map_err(|_| {
                    too_slow(format!(
                        "no answer within {} (limits.download_timeout)",
                        humantime::format_duration(self.timeout)
                    ))
                })?
                .map_err(transport)?;
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
            .map(|value| bounded_content_type(value.as_bytes()))
            .unwrap_or_default();
        let deadline = started + self.deadline_for(expected);
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
        let mut body_pace = Pace::new(started, deadline, self.min_rate, self.rate_window);
        loop {
            let chunk = match body_pace.next(&mut response).await.map_err(too_slow)? {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(err) => return Err(transport(err)),
            };
            let got = body_pace.got;
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
        let got = body_pace.got;
        if let Some(expected) = expected.filter(|expected| *expected != got) {
            return Err(DownloadError::Truncated { url: url.to_owned(), expected, got });
        }
        let sha256 = hex(&hasher.finalize());
        let body = match streaming {
            Some((writer, temp_path)) => Body::Streamed(writer, temp_path),
            None => Body::InMemory(buffer),
        };
        let placed = body.put_in_place(folder, final_path, &sha256, owner).await?;
        let relative_path = placed
            .strip_prefix(dir)
            .map_or(relative_path, |path| path.to_string_lossy().into_owned());
        Ok(Fetched { relative_path, bytes: got, sha256, content_type })
    }
}

impl Downloader {
    /// The whole file's deadline, from the request: `timeout`, plus the announced size at the
    /// minimum rate.
    fn deadline_for(&self, expected: Option<u64>) -> Duration {
        let at_min_rate = expected.map_or(0, |len| len / self.min_rate);
        self.timeout.saturating_add(Duration::from_secs(at_min_rate))
    }
}

/// The deadline and the rate floor of one download's body.
struct Pace {
    started: Instant,
    deadline: Instant,
    min_rate: u64,
    rate_window: Duration,
    window_start: Instant,
    window_bytes: u64,
    /// Bytes received so far.
    got: u64,
}

impl Pace {
    fn new(started: Instant, deadline: Instant, min_rate: u64, rate_window: Duration) -> Self {
        let window_start = Instant::now();
        Self { started, deadline, min_rate, rate_window, window_start, window_bytes: 0, got: 0 }
    }

    /// The next piece of the body (or the transport's error), unless the download broke its
    /// deadline or the rate floor: then what it broke, as an outer error.
    async fn next(
        &mut self,
        response: &mut reqwest::Response,
    ) -> Result<Result<Option<bytes::Bytes>, reqwest::Error>, String> {
        let Ok(next) = tokio::time::timeout_at(self.deadline, response.chunk()).await else {
            return Err(format!(
                "not finished within {} (limits.download_timeout, plus the announced size at \
                 limits.download_min_rate); {} bytes came",
                humantime::format_duration(self.deadline - self.started),
                self.got
            ));
        };
        if let Ok(Some(chunk)) = &next {
            self.got += chunk.len() as u64;
            self.window_bytes += chunk.len() as u64;
            let elapsed = self.window_start.elapsed();
            if elapsed >= self.rate_window {
                #[allow(clippy::cast_precision_loss, reason = "a rate needs no 53-bit precision")]
                let (bytes, floor) = (self.window_bytes as f64, self.min_rate as f64);
                if bytes < floor * elapsed.as_secs_f64() {
                    return Err(format!(
                        "{} bytes in {}, below limits.download_min_rate ({} bytes/s)",
                        self.window_bytes,
                        humantime::format_duration(Duration::from_secs(elapsed.as_secs())),
                        self.min_rate
                    ));
                }
                self.window_start = Instant::now();
                self.window_bytes = 0;
            }
        }
        Ok(next)
    }
}

/// `host:port` of a URL, for the test-only exemption.
fn origin_of(url: &reqwest::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0))
}

/// A URL as it may appear in a message or a record: without `user:password@`.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            display_url(&parsed)
        }
        _ => url.to_owned(),
    }
}

/// The Content-Type kept: its media type only (no parameters), lowercase, printable ASCII,
/// at most [`MAX_CONTENT_TYPE`] characters. It goes into sidecars, the state and the gallery.
fn bounded_content_type(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    text.split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(MAX_CONTENT_TYPE)
        .collect::<String>()
        .to_ascii_lowercase()
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

/// A downloaded body on its way to its place.
enum Body {
    /// Small: still in memory.
    InMemory(Vec<u8>),
    /// Large: written to a temporary file as it came.
    Streamed(tokio::io::BufWriter<tokio::fs::File>, tempfile::TempPath),
}

impl Body {
    /// Syncs the body to disk and moves it to `final_path` (or another name, see [`place`]);
    /// returns where it is.
    async fn put_in_place(
        self,
        folder: PathBuf,
        final_path: PathBuf,
        sha256: &str,
        owner: Option<&str>,
    ) -> Result<PathBuf, DownloadError> {
        let (sha256, owner) = (sha256.to_owned(), owner.map(str::to_owned));
        let shown = final_path.clone();
        let placed = match self {
            Self::Streamed(mut writer, temp_path) => {
                writer.flush().await.map_err(disk_error(&temp_path))?;
                writer.into_inner().sync_all().await.map_err(disk_error(&temp_path))?;
                tokio::task::spawn_blocking(move || {
                    place(temp_path, &final_path, &sha256, owner.as_deref())
                })
                .await
            }
            Self::InMemory(buffer) => {
                tokio::task::spawn_blocking(move || {
                    let temp = write_whole(&folder, &buffer)?;
                    place(temp, &final_path, &sha256, owner.as_deref())
                })
                .await
            }
        };
        placed.map_err(|err| DownloadError::Disk {
            path: shown,
            source: std::io::Error::other(err),
        })?
    }
}

/// Writes `bytes` to a temporary file in `folder` and syncs it.
fn write_whole(folder: &Path, bytes: &[u8]) -> Result<tempfile::TempPath, DownloadError> {
    use std::io::Write as _;
    let mut temp = new_partial(folder)?;
    temp.write_all(bytes).map_err(disk_error(temp.path()))?;
    temp.as_file().sync_all().map_err(disk_error(temp.path()))?;
    Ok(temp.into_temp_path())
}

/// How many other names a result tries when its place is taken.
const MAX_OTHER_NAMES: u32 = 100;

/// Moves a synced temporary file to `wanted`, or to `<stem>-N.<ext>` when `wanted` holds a
/// file that is neither this result (same SHA-256: then that file stays and is the result)
/// nor an earlier download for the Krea job `owner`. Returns where the result now is. The move
/// never replaces anything else (link and unlink, refusing an existing name), and never
/// follows a link.
fn place(
    temp: tempfile::TempPath,
    wanted: &Path,
    sha256: &str,
    owner: Option<&str>,
) -> Result<PathBuf, DownloadError> {
    let mut temp = temp;
    let mut candidate = wanted.to_owned();
    for number in 2..=MAX_OTHER_NAMES + 1 {
        let taken = match temp.persist_noclobber(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(err) if err.error.kind() == std::io::ErrorKind::AlreadyExists => err.path,
            Err(err) => return Err(disk_error(&candidate)(err.error)),
        };
        if is_same_file_content(&candidate, sha256) {
            return Ok(candidate);
        }
        if owner.is_some() && sidecar_job_id(&candidate).as_deref() == owner {
            // Our own earlier download of this job: a rename replaces it whole.
            taken.persist(&candidate).map_err(|err| disk_error(&candidate)(err.error))?;
            return Ok(candidate);
        }
        temp = taken;
        if number == 2 {
            tracing::warn!(
                file = %candidate.display(),
                "a file krea-batch did not download for this job is already there; it is left                  as it is and the result is saved under another name"
            );
        }
        candidate = numbered(wanted, number);
    }
    Err(disk_error(wanted)(std::io::Error::other(format!(
        "{MAX_OTHER_NAMES} other names are taken too"
    ))))
}

/// `<stem>-<number>.<ext>` beside `path`.
fn numbered(path: &Path, number: u32) -> PathBuf {
    let stem = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{number}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{number}"),
    };
    path.with_file_name(name)
}

/// Whether `path` is a regular file (not a link) whose SHA-256 is `sha256`.
fn is_same_file_content(path: &Path, sha256: &str) -> bool {
    let regular = std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_file());
    regular
        && std::fs::File::open(path)
            .and_then(|mut file| {
                let mut hasher = Sha256::new();
                std::io::copy(&mut file, &mut hasher)?;
                Ok(hex(&hasher.finalize()))
            })
            .is_ok_and(|found| found == sha256)
}

/// The Krea job id the sidecar of `path` names, if it has a readable one (not a link).
fn sidecar_job_id(path: &Path) -> Option<String> {
    /// The one field of a sidecar read here.
    #[derive(serde::Deserialize)]
    struct Owner {
        job_id: Option<String>,
    }
    let sidecar = PathBuf::from(format!("{}.json", path.display()));
    crate::files::read_small_json::<Owner>(&sidecar)?.job_id
}

fn disk_error(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + use<> {
    let path = path.to_owned();
    move |source| DownloadError::Disk { path: path.clone(), source }
}

/// The file extension for a Content-Type; unknown types get `bin`, never a name from the server.
#[must_use]
pub(crate) fn extension_for(content_type: &str) -> &'static str {
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
pub(crate) struct Sidecar<'a> {
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

/// The log line of a download that failed and will be tried again: what failed, when the next
/// try comes and which it is (`download failed: … ; try 2 of 6 in 2s`).
fn retry_line(err: &DownloadError, wait: Duration, next_try: u32, tries: u32) -> String {
    let wait = humantime::format_duration(Duration::from_millis(
        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
    ));
    format!("download failed: {err}; try {next_try} of {tries} in {wait}")
}

/// Writes `<dir>/<file>.json` atomically.
///
/// Not fsynced: a sidecar says nothing the state file does not hold, and the engine rewrites
/// a missing or empty one when it starts (after a power cut), so it is derived data, like the
/// manifest. Result files, which cannot be derived, are synced before they are renamed.
pub(crate) fn write_sidecar(dir: &Path, sidecar: &Sidecar<'_>) -> Result<(), DownloadError> {
    let mut text = serde_json::to_vec_pretty(sidecar).unwrap_or_default();
    text.push(b'\n');
    Ok(write_atomically(&sidecar_path(dir, sidecar.file), &text, false)?)
}

/// The sidecar of `<dir>/<file>`: `<dir>/<file>.json`.
#[must_use]
pub(crate) fn sidecar_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!("{file}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A one-answer HTTP server on loopback: every connection gets `answer`, its head written
    /// at once and its body one byte every `drip` (all at once when zero). Counts connections.
    struct TestServer {
        port: u16,
        hits: Arc<AtomicUsize>,
    }

    impl TestServer {
        async fn start(answer: String, drip: Duration) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let hits = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&hits);
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let answer = answer.clone();
                    tokio::spawn(async move {
                        use tokio::io::AsyncReadExt as _;
                        let mut request = [0u8; 4096];
                        let _ = stream.read(&mut request).await;
                        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
                        let _ = stream.write_all(format!("{head}\r\n\r\n").as_bytes()).await;
                        if drip.is_zero() {
                            let _ = stream.write_all(body.as_bytes()).await;
                        } else {
                            for byte in body.bytes() {
                                tokio::time::sleep(drip).await;
                                if stream.write_all(&[byte]).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let _ = stream.shutdown().await;
                    });
                }
            });
            Self { port, hits }
        }

        fn url(&self, host: &str) -> String {
            format!("http://{host}:{}/r.png", self.port)
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn settings(internal_addresses: bool) -> DownloadSettings {
        DownloadSettings {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(20),
            min_rate: 1,
            internal_addresses,
        }
    }

    fn png_answer(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_before_any_request() {
        let server = TestServer::start(png_answer("png"), Duration::ZERO).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let strict = Downloader::new(&settings(false)).expect("client");
        for host in ["127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]"] {
            let err = strict.fetch(&server.url(host), dir.path(), "r").await.expect_err(host);
            assert!(matches!(err, DownloadError::Refused { .. }), "{host}: {err}");
            assert_eq!(err.verdict(), Verdict::GiveUp);
        }
        assert_eq!(server.hits(), 0, "the local server received no request");
        let beside_the_simulation = Downloader::new(&settings(true)).expect("client");
        beside_the_simulation
            .fetch(&server.url("127.0.0.1"), dir.path(), "r")
            .await
            .expect("allowed when the API is on loopback");
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn a_redirect_from_an_allowed_host_to_loopback_is_refused() {
        let inside = TestServer::start(png_answer("secret"), Duration::ZERO).await;
        let mut followed = 0;
        for target in [
            inside.url("127.0.0.1"),
            inside.url("localhost"),
            inside.url("[::1]"),
            inside.url("2130706433"),
            "https://169.254.169.254/latest/meta-data".to_owned(),
            format!("http://user:pw@127.0.0.1:{}/r.png", inside.port),
        ] {
            let answer =
                format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n");
            let outer = TestServer::start(answer, Duration::ZERO).await;
            let trusted = format!("127.0.0.1:{}", outer.port);
            let client = Downloader::build(&settings(false), Some(trusted)).expect("client");
            let dir = tempfile::tempdir().expect("tempdir");
            let err = client
                .fetch(&outer.url("127.0.0.1"), dir.path(), "r")
                .await
                .expect_err("redirect refused");
            assert!(matches!(err, DownloadError::Refused { .. }), "{target}: {err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
            followed += outer.hits();
        }
        assert_eq!(followed, 6, "each allowed host was asked once");
        assert_eq!(inside.hits(), 0, "no redirect reached the loopback server");
    }

    #[tokio::test]
    async fn a_dripping_download_ends_at_its_deadline_or_below_the_minimum_rate() {
        let body = "x".repeat(64);
        let server = TestServer::start(png_answer(&body), Duration::from_millis(100)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        // The deadline: 300 ms, plus 64 bytes at 1 MiB/s (nothing).
        let deadline = DownloadSettings {
            timeout: Duration::from_millis(300),
            min_rate: 1 << 20,
            ..settings(true)
        };
        let client = Downloader::new(&deadline).expect("client");
        let err = client.fetch(&server.url("127.0.0.1"), dir.path(), "r").await.expect_err("cut");
        assert!(
            matches!(&err, DownloadError::TooSlow { detail, .. } if detail.contains("download_timeout")),
            "{err}"
        );
        assert_eq!(err.verdict(), Verdict::GiveUp, "not retried in this run");

        let mut slow = Downloader::new(&DownloadSettings { min_rate: 1000, ..settings(true) })
            .expect("client");
        slow.rate_window = Duration::from_millis(250);
        let err = slow.fetch(&server.url("127.0.0.1"), dir.path(), "r").await.expect_err("cut");
        assert!(
            matches!(&err, DownloadError::TooSlow { detail, .. } if detail.contains("download_min_rate")),
            "{err}"
        );
        assert_eq!(files_in(dir.path()), 0, "nothing left behind");
    }

    fn files_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).expect("dir").count()
    }

    #[tokio::test]
    async fn a_url_that_quoted_the_key_is_never_fetched() {
        let server = TestServer::start(png_answer("png"), Duration::ZERO).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let client = Downloader::new(&settings(true)).expect("client");
        let url = format!("{}?token={REDACTED}", server.url("127.0.0.1"));
        let err = client.fetch(&url, dir.path(), "r").await.expect_err("refused");
        assert!(err.to_string().contains("API key"), "{err}");
        assert_eq!(err.verdict(), Verdict::GiveUp);
        assert_eq!(server.hits(), 0);
    }

    /// A download that fails and will be tried again says so in the log, at the default level.
    #[tokio::test]
    async fn a_retried_download_is_logged() {
        let server = TestServer::start(
            "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".into(),
            Duration::ZERO,
        )
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let client = Downloader::new(&settings(true)).expect("client");
        let policy = RetryPolicy {
            first: Duration::from_millis(10),
            max: Duration::from_millis(10),
            attempts: 2,
        };
        let (lines, _guard) = crate::testlog::capture();
        let url = server.url("127.0.0.1");
        let err = client.fetch_with_retries(&url, dir.path(), "fox", None, &policy).await;
        assert!(matches!(err, Err(DownloadError::Status { status: 503, .. })), "{err:?}");
        assert_eq!(server.hits(), 2);
        let text = lines.text();
        let retried: Vec<&str> =
            text.lines().filter(|line| line.contains("download failed")).collect();
        assert_eq!(retried.len(), 1, "one line per retry, none for the last failure: {text}");
        assert!(retried[0].contains(" INFO "), "{text}");
        assert!(retried[0].contains(&format!("answered 503 for {url}; try 2 of 2 in")), "{text}");
        assert!(retried[0].contains("file=fox"), "{text}");
    }

    /// A retried download says what failed and when the next try comes.
    #[test]
    fn retries_say_what_failed_and_when_the_next_try_comes() {
        let err = DownloadError::Status { status: 503, url: "http://files/r.png".into() };
        let line = retry_line(&err, Duration::from_micros(2_345_678), 2, 6);
        assert!(
            line.starts_with(
                "download failed: the result host answered 503 for http://files/r.png; "
            ),
            "{line}"
        );
        assert!(line.ends_with("; try 2 of 6 in 2s 345ms"), "{line}");
    }

    #[test]
    fn content_types_are_short_and_printable() {
        assert_eq!(bounded_content_type(b"image/PNG; charset=x"), "image/png");
        assert_eq!(bounded_content_type(b"ima\x1b[2Jge/png\xff"), "ima[2jge/png");
        assert_eq!(bounded_content_type(&[b'a'; 5000]).len(), MAX_CONTENT_TYPE);
    }

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
}
