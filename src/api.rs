//! The Krea HTTP client: requests, lenient parsing of Krea's answers, and the classification of
//! every status code into what the runner must do about it.
//!
//! It knows HTTP and Krea's wire format, not krea-batch's job states: it answers "Krea said the
//! balance is exhausted" or "the POST got no answer, a job may exist", and `runner` decides.
//!
//! Safety rules kept here, in one place:
//! - the API key goes only to the API's own origin: the API client follows no redirects, and the
//!   download client (`download.rs`) never carries an `Authorization` header;
//! - only `https` URLs, or `http` on loopback (tests, the simulation): [`check_url`];
//! - response bodies are read up to a cap, never buffered whole;
//! - every text taken from a response (the JSON body, whatever its shape, error bodies, and the
//!   headers read) has the key redacted in [`KreaClient::call`], the one place where server
//!   text enters, before any of it reaches a job, a log, the state or a file;
//! - a `user:password@` in a URL (the API base, result URLs) is removed, never stored or logged.

use crate::asset::{Asset, AssetPage, AssetUpload};
use crate::key::ApiKey;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// The `User-Agent` every request carries (the CDN in front of Krea blocks anonymous clients).
pub(crate) const USER_AGENT: &str = concat!("krea-batch/", env!("CARGO_PKG_VERSION"));
/// The production API.
pub(crate) const DEFAULT_BASE_URL: &str = "https://api.krea.ai";
/// The largest JSON answer read; past it the answer counts as malformed (a hostile or broken
/// server cannot make krea-batch buffer 100 MB).
pub(crate) const MAX_JSON_BYTES: usize = 4 << 20;

/// Why a text is not a URL (the `url` crate's `ParseError`, named through reqwest's `Url`).
pub(crate) type UrlParseError = <Url as std::str::FromStr>::Err;

/// Why a URL may not be contacted, or is no API base URL. The URLs it names are shown without
/// their `user:password@`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UrlError {
    /// The text does not parse as a URL.
    #[error("{shown} is not a URL: {source}")]
    NotAUrl {
        /// The text, quoted, or "the API base URL" when it might carry a password.
        shown: String,
        /// Why it does not parse.
        #[source]
        source: UrlParseError,
    },
    /// Plain http off loopback.
    #[error(
        "{0} uses plain http; only https is allowed, except on loopback (127.0.0.1, ::1, localhost)"
    )]
    PlainHttp(String),
    /// Another scheme than http(s). Not quoted: without a host, a URL of another scheme keeps
    /// any password in its path.
    #[error("the URL uses the scheme {0}; only https is allowed")]
    Scheme(String),
    /// An API base URL with a query or a fragment.
    #[error("the API base URL {0} must not have a query or fragment")]
    QueryOrFragment(String),
}

/// Checks that `url` may be contacted: `https`, or `http` to a loopback address.
pub(crate) fn check_url(url: &Url) -> Result<(), UrlError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        "http" => Err(UrlError::PlainHttp(display_url(url))),
        other => Err(UrlError::Scheme(other.to_owned())),
    }
}

/// Whether `url`'s host is a loopback address or `localhost`.
#[must_use]
pub(crate) fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `url` without its `user:password@`, for messages: a password never reaches a log.
#[must_use]
pub(crate) fn display_url(url: &Url) -> String {
    let mut clean = url.clone();
    strip_userinfo(&mut clean);
    printable(clean.as_str(), 300)
}

/// Removes `user:password@` from `url`; true if there was one.
pub(crate) fn strip_userinfo(url: &mut Url) -> bool {
    let had = !url.username().is_empty() || url.password().is_some();
    if had {
        // Both fail only for URLs that cannot have a user (no host), which have none.
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    had
}

/// Parses and checks an API base URL (from the job file, `--api-base` or `KREA_API_BASE`).
/// A `user:password@` in it is removed (with a warning), so it is never stored or logged.
pub(crate) fn parse_base_url(text: &str) -> Result<Url, UrlError> {
    let mut url = Url::parse(text.trim()).map_err(|source| {
        // Quoted only without an '@': it might carry a password.
        let shown =
            if text.contains('@') { "the API base URL".to_owned() } else { format!("{text:?}") };
        UrlError::NotAUrl { shown, source }
    })?;
    if strip_userinfo(&mut url) {
        tracing::warn!(
            base = %url,
            "the API base URL carried a user name or password; removed (Krea authenticates with \
             the API key only, and a password in a URL would end up in logs and the state file)"
        );
    }
    check_url(&url)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(UrlError::QueryOrFragment(url.to_string()));
    }
    Ok(url)
}

/// One of the nine documented job states, or a state Krea added since (counted as pending).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RemoteStatus {
    /// Waiting behind the account's concurrency limit.
    Backlogged,
    /// Queued.
    Queued,
    /// Scheduled.
    Scheduled,
    /// Processing.
    Processing,
    /// Sampling: the end is near.
    Sampling,
    /// Previews are available; they are not the results.
    IntermediateComplete,
    /// Done; the result URLs are the results. Billed.
    Completed,
    /// Failed. Not billed.
    Failed,
    /// Cancelled. Not billed.
    Cancelled,
    /// A state the documentation does not list: treated as still pending.
    Other(String),
}

impl RemoteStatus {
    /// Parses Krea's state name.
    #[must_use]
    pub(crate) fn parse(text: &str) -> Self {
        match text {
            "backlogged" => Self::Backlogged,
            "queued" => Self::Queued,
            "scheduled" => Self::Scheduled,
            "processing" => Self::Processing,
            "sampling" => Self::Sampling,
            "intermediate-complete" => Self::IntermediateComplete,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" | "canceled" => Self::Cancelled,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Krea's name for the state.
    #[must_use]
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Backlogged => "backlogged",
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Processing => "processing",
            Self::Sampling => "sampling",
            Self::IntermediateComplete => "intermediate-complete",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Other(text) => text,
        }
    }

    /// True for `completed`, `failed` and `cancelled`.
    #[must_use]
    pub(crate) fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for RemoteStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job as Krea describes it, parsed leniently: Krea's pages disagree on where errors live, some
/// answers omit `status`, some outputs come as `{url}` objects.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RemoteJob {
    /// Krea's job id.
    pub job_id: String,
    /// The state; `None` when the answer had none (some create answers), meaning pending.
    pub status: Option<RemoteStatus>,
    /// When Krea created the job (RFC 3339), as Krea wrote it.
    pub created_at: Option<String>,
    /// When it ended, as Krea wrote it.
    pub completed_at: Option<String>,
    /// `result.urls`. Results only when `status` is `completed`; see [`RemoteJob::result_urls`].
    pub urls: Vec<String>,
    /// The failure reason, wherever Krea put it.
    pub error: Option<String>,
}

/// Why a JSON answer is not a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JobShapeError {
    /// `[]`.
    #[error("an empty array instead of a job")]
    EmptyArray,
    /// A string, a number, `null`.
    #[error("the answer is not a JSON object")]
    NotAnObject,
    /// No `job_id` (or `id`) that can name a job safely.
    #[error("the job has no usable job_id (present, at most 200 bytes, not . or ..)")]
    NoJobId,
}

impl RemoteJob {
    /// Parses one job object (or the first of an array, as a node app answers).
    pub(crate) fn from_json(value: &Value) -> Result<Self, JobShapeError> {
        let value = match value {
            Value::Array(items) => items.first().ok_or(JobShapeError::EmptyArray)?,
            other => other,
        };
        let object = value.as_object().ok_or(JobShapeError::NotAnObject)?;
        let job_id = ["job_id", "id"]
            .iter()
            .find_map(|field| object.get(*field).and_then(Value::as_str))
            .filter(|id| usable_job_id(id))
            .ok_or(JobShapeError::NoJobId)?
            .to_owned();
        let text = |field: &str| object.get(field).and_then(Value::as_str).map(str::to_owned);
        let result = object.get("result").filter(|r| r.is_object());
        let urls = result
            .and_then(|r| r.get("urls").or_else(|| r.get("url")))
            .map(collect_urls)
            .unwrap_or_default();
        let error = result
            .and_then(|r| r.get("error"))
            .and_then(error_text)
            .or_else(|| object.get("error").and_then(error_text));
        Ok(Self {
            job_id,
            status: text("status").map(|s| RemoteStatus::parse(&s)),
            created_at: text("created_at"),
            completed_at: text("completed_at"),
            urls,
            error,
        })
    }

    /// The result URLs, only when the job is `completed` (previews are never results).
    #[must_use]
    pub(crate) fn result_urls(&self) -> Option<&[String]> {
        (self.status == Some(RemoteStatus::Completed)).then_some(self.urls.as_slice())
    }
}

/// Whether a job id from Krea can name the job: present, at most 200 bytes, and not `.` or `..`
/// (which no percent-encoding keeps from meaning "this folder" or "the one above" in a URL).
fn usable_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && !matches!(id, "." | "..")
}

/// `["u", {"url": "u"}]` or a single `"u"` into a list of strings, each without a
/// `user:password@` (removed, with a warning: it must never be stored or logged).
fn collect_urls(value: &Value) -> Vec<String> {
    let one = |item: &Value| {
        let text = match item {
            Value::String(url) => Some(url.as_str()),
            Value::Object(object) => object.get("url").and_then(Value::as_str),
            _ => None,
        }?;
        let Ok(mut url) = Url::parse(text) else { return Some(text.to_owned()) };
        if !strip_userinfo(&mut url) {
            return Some(text.to_owned());
        }
        tracing::warn!(
            url = %url,
            "a result URL carried a user name or password; removed (it is never stored or logged)"
        );
        Some(url.to_string())
    };
    match value {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// An error found as a string, `{message}`, or `{code, message}`.
fn error_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Object(object) => {
            let message = object.get("message").and_then(Value::as_str);
            let code = object.get("code").and_then(Value::as_str);
            match (code, message) {
                (Some(code), Some(message)) => Some(format!("{code}: {message}")),
                (None, Some(text)) | (Some(text), None) => Some(text.to_owned()),
                (None, None) => None,
            }
        }
        _ => None,
    }
}

/// One page of `GET /jobs`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct JobPage {
    /// The jobs, newest first.
    pub items: Vec<RemoteJob>,
    /// Items that could not be read as jobs (skipped, not fatal: one bad item must not stop
    /// reconciliation).
    pub unreadable: Vec<UnreadableItem>,
    /// The cursor of the next page (`next_cursor`, or `nextCursor` as the docs page spells it).
    pub next_cursor: Option<String>,
}

/// An item of `GET /jobs` that is not a usable job (no id, an id over 200 characters, not an
/// object), with what could still be read of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnreadableItem {
    /// Its `created_at`, if that much could be read.
    pub created_at: Option<String>,
    /// Why it could not be read.
    pub reason: String,
}

/// What went wrong with a request, classified by what the runner must do about it.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// 400, 422 and other refusals of this request: retrying the same request cannot help.
    #[error("Krea refused the request ({status}): {message}")]
    Rejected {
        /// The status code.
        status: u16,
        /// Krea's message.
        message: String,
    },
    /// 401 or 403: the key is wrong or not allowed. Nothing else can succeed.
    #[error("Krea refused the API key ({status}): {message}")]
    Auth {
        /// The status code.
        status: u16,
        /// Krea's message.
        message: String,
    },
    /// 402: the prepaid balance is exhausted (or Krea's message says neither balance nor plan:
    /// see [`PaymentKind::of_message`]).
    #[error("the Krea API balance is exhausted (402): {message}")]
    PaymentRequired {
        /// Krea's message.
        message: String,
    },
    /// 402 whose message says the model needs a higher plan: that model cannot run on this
    /// account, whatever the balance; its jobs fail for good, like a 410's.
    #[error("the model needs a higher Krea plan (402): {message}")]
    PlanRequired {
        /// Krea's message.
        message: String,
    },
    /// 404: the job (or model) does not exist for this key.
    #[error("not found at Krea (404): {message}")]
    NotFound {
        /// Krea's message.
        message: String,
    },
    /// 410: the model was retired.
    #[error("{}", gone_message(.message, .replacement.as_deref(), .sunset_date.as_deref()))]
    ModelGone {
        /// Krea's message.
        message: String,
        /// The model to use instead, if Krea named one.
        replacement: Option<String>,
        /// When it was retired.
        sunset_date: Option<String>,
    },
    /// 429: too many jobs or requests. Wait and retry.
    #[error("Krea is rate limiting (429): {message}")]
    RateLimited {
        /// `Retry-After`, if the answer had one.
        retry_after: Option<Duration>,
        /// Krea's message.
        message: String,
    },
    /// 5xx, or a 3xx where none belongs.
    #[error("Krea answered {status}: {message}")]
    Server {
        /// The status code.
        status: u16,
        /// The message, if any.
        message: String,
    },
    /// The request could not be sent at all (connection refused, DNS, TLS): nothing happened at
    /// Krea, so even a POST may be sent again.
    #[error("could not reach Krea: {0}")]
    NotSent(String),
    /// The request went out but no complete answer came back (timeout, reset).
    #[error("no answer from Krea: {0}")]
    NoAnswer(String),
    /// An answer came that cannot be read (not JSON, too large, missing the job id).
    #[error("unreadable answer from Krea: {0}")]
    Malformed(String),
}

/// What a 402 is about. Krea answers 402 both when the prepaid balance is exhausted and when a
/// model needs a higher plan; only its message tells them apart (as Krea's own helper script
/// does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PaymentKind {
    /// The balance is exhausted: submitting stops (or pauses) until a top-up.
    Balance,
    /// The model needs a higher plan: its jobs fail, the others go on.
    Plan,
}

impl PaymentKind {
    /// Reads a 402's message: words of a balance ("insufficient", "balance") win, then words of
    /// a plan ("plan", "requires", "upgrade"); a message that says neither counts as a balance,
    /// since pausing is the cautious answer (a top-up and a resume retry, nothing is lost), while
    /// failing jobs for good is not.
    #[must_use]
    pub(crate) fn of_message(message: &str) -> Self {
        let words: Vec<String> = message
            .split(|c: char| !c.is_alphanumeric())
            .filter(|word| !word.is_empty())
            .map(str::to_lowercase)
            .collect();
        let says =
            |vocabulary: &[&str]| words.iter().any(|word| vocabulary.contains(&word.as_str()));
        if says(&["insufficient", "balance"]) {
            Self::Balance
        } else if says(&["plan", "plans", "requires", "require", "upgrade"]) {
            Self::Plan
        } else {
            Self::Balance
        }
    }
}

fn gone_message(message: &str, replacement: Option<&str>, sunset: Option<&str>) -> String {
    let mut text = format!("the model is no longer available (410): {message}");
    if let Some(date) = sunset {
        let _ = write!(text, " (retired {date})");
    }
    match replacement {
        Some(model) => {
            let _ = write!(text, "; use {model} instead");
        }
        None => text.push_str("; Krea named no replacement"),
    }
    text
}

impl ApiError {
    /// An answer that is not a job. `Malformed` holds text because the client redacts the key
    /// from it ([`KreaClient`]'s `redact`); a [`JobShapeError`] has no source to lose.
    fn malformed(shape: JobShapeError) -> Self {
        Self::Malformed(shape.to_string())
    }

    /// For a POST: true when Krea may have created the job although no usable answer came back.
    /// Such a POST is never repeated blindly; the job is reconciled first.
    #[must_use]
    pub(crate) fn may_have_created_job(&self) -> bool {
        matches!(self, Self::Server { .. } | Self::NoAnswer(_) | Self::Malformed(_))
    }

    /// For a GET: worth retrying after a pause.
    #[must_use]
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Server { .. }
                | Self::NoAnswer(_)
                | Self::NotSent(_)
                | Self::Malformed(_)
                | Self::RateLimited { .. }
        )
    }
}

/// Settings of the HTTP clients.
#[derive(Clone, Debug)]
pub(crate) struct ClientSettings {
    /// The API origin (and path prefix, for proxies).
    pub base_url: Url,
    /// The longest wait for a connection.
    pub connect_timeout: Duration,
    /// The longest an API request may take in all, and the longest pause within a download.
    pub request_timeout: Duration,
}

/// The client of Krea's API. One per process; cheap to share behind an `Arc`.
pub(crate) struct KreaClient {
    http: reqwest::Client,
    base: Url,
    auth: HeaderValue,
    key: ApiKey,
    request_timeout: Duration,
    /// Models whose `Deprecation`/`Sunset` headers were already logged: one warning each.
    deprecation_warned: Mutex<HashSet<String>>,
}

impl fmt::Debug for KreaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KreaClient").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

/// Why the API client cannot be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The base URL may not be contacted.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The key holds a byte an HTTP header cannot carry.
    #[error("the API key cannot be sent in an HTTP header")]
    KeyNotAHeader,
    /// The HTTP client could not be set up (TLS, the resolver).
    #[error("cannot set up the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

impl KreaClient {
    /// Builds the client. It follows no redirects: the API has none to give, and a redirect
    /// would be the one way a header could travel to a host that is not the API's.
    pub(crate) fn new(settings: &ClientSettings, key: ApiKey) -> Result<Self, ClientError> {
        check_url(&settings.base_url)?;
        // The header error is not kept: it could quote the key.
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| ClientError::KeyNotAHeader)?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base: settings.base_url.clone(),
            auth,
            key,
            request_timeout: settings.request_timeout,
            deprecation_warned: Mutex::new(HashSet::new()),
        })
    }

    fn endpoint(&self, path: &str) -> Result<Url, ApiError> {
        let joined = format!("{}/{}", self.base.as_str().trim_end_matches('/'), path);
        Url::parse(&joined)
            .map_err(|err| ApiError::Rejected { status: 0, message: err.to_string() })
    }

    /// `POST /generate/<model>` with `body`: creates a job.
    pub(crate) async fn create_job(&self, model: &str, body: &str) -> Result<RemoteJob, ApiError> {
        let url = self.endpoint(&format!("generate/{model}"))?;
        let json = self.call(Method::POST, url, Some(body), Some(model)).await?;
        RemoteJob::from_json(&json).map_err(ApiError::malformed)
    }

    /// `<base>/jobs/<id>`, the id percent-encoded as one path segment (ids come from the
    /// network): distinct ids give distinct URLs, and none can leave `/jobs/`.
    fn job_url(&self, job_id: &str) -> Result<Url, ApiError> {
        if !usable_job_id(job_id) {
            return Err(ApiError::Malformed(format!(
                "the job id {:?} cannot be used in a URL",
                printable(job_id, 60)
            )));
        }
        let mut url = self.endpoint("jobs")?;
        url.path_segments_mut()
            .map_err(|()| ApiError::Rejected {
                status: 0,
                message: format!("the API base URL {} cannot take a path", self.base),
            })?
            .push(job_id);
        Ok(url)
    }

    /// `GET /jobs/{id}`.
    pub(crate) async fn get_job(&self, job_id: &str) -> Result<RemoteJob, ApiError> {
        let url = self.job_url(job_id)?;
        let json = self.call(Method::GET, url, None, None).await?;
        RemoteJob::from_json(&json).map_err(ApiError::malformed)
    }

    /// `DELETE /jobs/{id}`: cancels a job that is still queued or processing.
    pub(crate) async fn cancel_job(&self, job_id: &str) -> Result<(), ApiError> {
        let url = self.job_url(job_id)?;
        self.call(Method::DELETE, url, None, None).await.map(drop)
    }

    /// `GET /jobs?limit=…&cursor=…`: this key's jobs created before `cursor`, newest first.
    pub(crate) async fn list_jobs(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<JobPage, ApiError> {
        let mut url = self.endpoint("jobs")?;
        url.query_pairs_mut().append_pair("limit", &limit.clamp(1, 1000).to_string());
        if let Some(cursor) = cursor {
            url.query_pairs_mut().append_pair("cursor", cursor);
        }
        let json = self.call(Method::GET, url, None, None).await?;
        let listed = json
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::Malformed("the job list has no items".into()))?;
        let mut items = Vec::with_capacity(listed.len());
        let mut unreadable = Vec::new();
        for item in listed {
            match RemoteJob::from_json(item) {
                Ok(job) => items.push(job),
                Err(reason) => unreadable.push(UnreadableItem {
                    created_at: item
                        .get("created_at")
                        .and_then(Value::as_str)
                        .map(|text| printable(text, 64)),
                    reason: printable(&format!("{reason}: {item}"), 200),
                }),
            }
        }
        let next_cursor = ["next_cursor", "nextCursor"]
            .iter()
            .find_map(|field| json.get(*field).and_then(Value::as_str))
            .map(str::to_owned);
        Ok(JobPage { items, unreadable, next_cursor })
    }

    /// `POST /assets`: uploads a file as multipart/form-data. The request may take longer than
    /// `request_timeout`, by a second per 256 KiB of file (a 75 MB file: about 5 more minutes).
    /// An error that [`ApiError::may_have_created_job`] calls ambiguous may have created the
    /// asset: look for it with [`KreaClient::list_assets`] before uploading again.
    pub(crate) async fn upload_asset(&self, upload: &AssetUpload<'_>) -> Result<Asset, ApiError> {
        let url = self.endpoint("assets")?;
        let boundary = format!("krea-batch-{:032x}", fastrand::u128(..));
        let (content_type, body) = crate::asset::form(upload, &boundary);
        let allowance = Duration::from_secs(upload.bytes.len() as u64 / (256 * 1024));
        let request = self
            .http
            .post(url)
            .header(AUTHORIZATION, self.auth.clone())
            .header("content-type", content_type)
            .timeout(self.request_timeout + allowance)
            .body(body);
        let json = self.answer(request, None).await?;
        Asset::from_json(&json)
            .ok_or_else(|| ApiError::Malformed("the upload's answer has no id or image_url".into()))
    }

    /// `GET /assets?limit=…&cursor=…`: this key's assets uploaded before `cursor`, newest first.
    pub(crate) async fn list_assets(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<AssetPage, ApiError> {
        let mut url = self.endpoint("assets")?;
        url.query_pairs_mut().append_pair("limit", &limit.clamp(1, 1000).to_string());
        if let Some(cursor) = cursor {
            url.query_pairs_mut().append_pair("cursor", cursor);
        }
        let json = self.call(Method::GET, url, None, None).await?;
        AssetPage::from_json(&json)
            .ok_or_else(|| ApiError::Malformed("the asset list has no items".into()))
    }

    /// Sends one request and reads its JSON answer (up to [`MAX_JSON_BYTES`]).
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<&str>,
        model: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut request = self
            .http
            .request(method, url)
            .header(AUTHORIZATION, self.auth.clone())
            .timeout(self.request_timeout);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_owned());
        }
        self.answer(request, model).await
    }

    /// Sends a built request and reads its JSON answer (up to [`MAX_JSON_BYTES`]): the one
    /// place where server text enters, redacted here.
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
        model: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut response = request.send().await.map_err(|err| self.transport_error(&err))?;
        let status = response.status();
        if let Some(model) = model {
            self.warn_if_deprecated(model, response.headers());
        }
        let retry_after = retry_after(response.headers());
        let bytes = read_capped(&mut response, MAX_JSON_BYTES)
            .await
            .map_err(|err| self.redact_error(err))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            let mut json: Value = serde_json::from_slice(&bytes)
                .map_err(|err| ApiError::Malformed(format!("{err} in an answer of {status}")))?;
            // Every string of the answer, before anything reads it: nothing downstream (job
            // errors, statuses, times, result URLs) can then carry the key.
            self.key.redact_json(&mut json);
            return Ok(json);
        }
        let bytes = self.redact_body(&bytes);
        // Redacted before it is cut short: a cut could leave half a key behind.
        let message = printable(&self.redact(&error_message(&bytes, status)), 1000);
        Err(self.classify(status, message, &bytes, retry_after))
    }

    fn classify(
        &self,
        status: StatusCode,
        message: String,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> ApiError {
        let code = status.as_u16();
        match code {
            401 | 403 => ApiError::Auth { status: code, message },
            402 => match PaymentKind::of_message(&message) {
                PaymentKind::Balance => ApiError::PaymentRequired { message },
                PaymentKind::Plan => ApiError::PlanRequired { message },
            },
            404 => ApiError::NotFound { message },
            410 => {
                let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let field = |name: &str| {
                    json.get(name).and_then(Value::as_str).map(|text| self.redact(text))
                };
                ApiError::ModelGone {
                    message,
                    replacement: field("replacement"),
                    sunset_date: field("sunset_date"),
                }
            }
            429 => ApiError::RateLimited { retry_after, message },
            400..=499 => ApiError::Rejected { status: code, message },
            _ => ApiError::Server { status: code, message },
        }
    }

    fn transport_error(&self, err: &reqwest::Error) -> ApiError {
        let text = self.redact(&error_chain(err));
        if err.is_connect() { ApiError::NotSent(text) } else { ApiError::NoAnswer(text) }
    }

    fn redact_error(&self, err: ApiError) -> ApiError {
        match err {
            ApiError::NoAnswer(text) => ApiError::NoAnswer(self.redact(&text)),
            ApiError::Malformed(text) => ApiError::Malformed(self.redact(&text)),
            other => other,
        }
    }

    /// An error body with the key removed, before anything reads it: a JSON body string by
    /// string (its escapes decoded first), any other body as text.
    fn redact_body(&self, bytes: &[u8]) -> Vec<u8> {
        if let Ok(mut json) = serde_json::from_slice::<Value>(bytes) {
            self.key.redact_json(&mut json);
            return serde_json::to_vec(&json).unwrap_or_default();
        }
        self.redact(&String::from_utf8_lossy(bytes)).into_bytes()
    }

    /// Removes the key from text that came from the network: a hostile or buggy server could
    /// echo the `Authorization` header back in an error message.
    fn redact(&self, text: &str) -> String {
        self.key.redact(text).into_owned()
    }

    fn warn_if_deprecated(&self, model: &str, headers: &HeaderMap) {
        if !(headers.contains_key("deprecation") || headers.contains_key("sunset")) {
            return;
        }
        let first_time =
            self.deprecation_warned.lock().is_ok_and(|mut warned| warned.insert(model.to_owned()));
        if first_time {
            // Header values are server text too: redacted and kept printable and short.
            let header = |name: &str| {
                let value = headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-");
                printable(&self.redact(value), 300)
            };
            tracing::warn!(
                model,
                deprecation = %header("deprecation"),
                sunset = %header("sunset"),
                link = %header("link"),
                "Krea says this model is deprecated and will be retired; plan a replacement"
            );
        }
    }
}

/// `reqwest::Error` and its sources in one line ("error sending request: connection reset").
#[must_use]
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads a body up to `cap` bytes; more is an error and the rest is not read.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Result<Vec<u8>, ApiError> {
    if response.content_length().is_some_and(|len| len > cap as u64) {
        return Err(ApiError::Malformed(format!("the answer is larger than {cap} bytes")));
    }
    let mut bytes = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > cap {
                    return Err(ApiError::Malformed(format!(
                        "the answer is larger than {cap} bytes"
                    )));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(bytes),
            Err(err) => return Err(ApiError::NoAnswer(error_chain(&err))),
        }
    }
}

/// Krea's error message from a body: `{error}`, `{message}`, `{error: {message}}`, or the text,
/// followed by its `details` (each with its path) when it has any; control characters
/// replaced, not yet redacted nor shortened.
fn error_message(body: &[u8], status: StatusCode) -> String {
    let from_json = serde_json::from_slice::<Value>(body).ok().and_then(|json| {
        let error = json.get("error").and_then(error_text);
        let message = json.get("message").and_then(Value::as_str).map(str::to_owned);
        let text = match (error, message) {
            // 410 puts a code in `error` and the sentence in `message`.
            (Some(code), Some(message)) if code != message => Some(format!("{message} ({code})")),
            (Some(text), _) | (None, Some(text)) => Some(text),
            (None, None) => None,
        };
        match (text, details_text(&json)) {
            (Some(text), Some(details)) => Some(format!("{text}: {details}")),
            (text, details) => text.or(details),
        }
    });
    let text = from_json.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            status.canonical_reason().unwrap_or("no message").to_owned()
        } else {
            text.to_owned()
        }
    });
    printable(&text, usize::MAX)
}

/// The `details` of an error answer, each with its path: `prompt: too long; width: above 2368`.
/// Read leniently, as Krea documents no shape: a list of `{path|field|loc|param, message|msg}`
/// objects or of strings, an object of field → message, under `details`, `errors` or
/// `error.details`; a path may be a list of segments (`["styles", 0, "strength"]`).
fn details_text(json: &Value) -> Option<String> {
    let details = json
        .get("details")
        .or_else(|| json.get("errors"))
        .or_else(|| json.get("error").and_then(|error| error.get("details")))?;
    let one = |item: &Value| -> Option<String> {
        match item {
            Value::String(text) => Some(text.clone()),
            Value::Object(object) => {
                let path = ["path", "field", "loc", "param", "name"]
                    .iter()
                    .find_map(|key| object.get(*key))
                    .map(path_text);
                let message = ["message", "msg", "detail", "error", "reason"]
                    .iter()
                    .find_map(|key| object.get(*key).and_then(Value::as_str));
                match (path, message) {
                    (Some(path), Some(message)) => Some(format!("{path}: {message}")),
                    (None, Some(message)) => Some(message.to_owned()),
                    (Some(path), None) => Some(path),
                    (None, None) => None,
                }
            }
            _ => None,
        }
    };
    let parts: Vec<String> = match details {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        Value::Object(fields) => fields
            .iter()
            .filter_map(|(path, value)| one(value).map(|message| format!("{path}: {message}")))
            .collect(),
        other => one(other).into_iter().collect(),
    };
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// A detail's path as text: `styles[0].strength` from a list of segments, or the string itself.
fn path_text(path: &Value) -> String {
    match path {
        Value::String(text) => text.clone(),
        Value::Array(segments) => {
            let mut text = String::new();
            for segment in segments {
                match segment {
                    Value::Number(index) => {
                        let _ = write!(text, "[{index}]");
                    }
                    Value::String(name) if text.is_empty() => text.push_str(name),
                    Value::String(name) => {
                        let _ = write!(text, ".{name}");
                    }
                    other => {
                        let _ = write!(text, ".{other}");
                    }
                }
            }
            text
        }
        other => other.to_string(),
    }
}

/// At most `limit` characters, control characters replaced: server text goes into log lines.
#[must_use]
pub(crate) fn printable(text: &str, limit: usize) -> String {
    let mut out: String =
        text.chars().take(limit).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().count() > limit {
        out.push('…');
    }
    out
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds.min(3600)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    let wait = when.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    Some(wait.min(Duration::from_hours(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_https_or_loopback_http() {
        for ok in [
            "https://api.krea.ai",
            "http://127.0.0.1:9/x",
            "http://localhost:80",
            "http://[::1]:8/",
        ] {
            assert!(check_url(&Url::parse(ok).expect("url")).is_ok(), "{ok}");
        }
        for bad in
            ["http://api.krea.ai", "http://10.0.0.1/", "ftp://127.0.0.1/", "file:///etc/passwd"]
        {
            assert!(check_url(&Url::parse(bad).expect("url")).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_parse_and_unknown_ones_are_pending() {
        for name in
            ["backlogged", "queued", "scheduled", "processing", "sampling", "intermediate-complete"]
        {
            let status = RemoteStatus::parse(name);
            assert!(!status.is_terminal());
            assert_eq!(status.as_str(), name);
            assert!(!matches!(status, RemoteStatus::Other(_)), "{name} is documented");
        }
        for name in ["completed", "failed", "cancelled"] {
            assert!(RemoteStatus::parse(name).is_terminal());
        }
        let odd = RemoteStatus::parse("warming-up");
        assert_eq!(odd, RemoteStatus::Other("warming-up".into()));
        assert!(!odd.is_terminal());
    }

    #[test]
    fn jobs_parse_leniently() {
        let job = RemoteJob::from_json(&json!({
            "job_id": "j1", "status": "completed", "created_at": "2026-01-01T00:00:00.000Z",
            "result": {"urls": ["https://gen.krea.ai/a.png", {"url": "https://gen.krea.ai/b.png"}]},
            "surprise": {"unknown": true}
        }))
        .expect("parses");
        assert_eq!(job.result_urls().expect("completed").len(), 2);

        let created = RemoteJob::from_json(&json!([{"id": "j2", "result": null}])).expect("array");
        assert_eq!(created.job_id, "j2");
        assert_eq!(created.status, None);

        let preview = RemoteJob::from_json(&json!({
            "job_id": "j3", "status": "intermediate-complete", "result": {"urls": ["p.png"]}
        }))
        .expect("parses");
        assert_eq!(preview.result_urls(), None, "previews are not results");

        let failed = RemoteJob::from_json(&json!({
            "job_id": "j4", "status": "failed", "error": {"code": "nsfw", "message": "blocked"}
        }))
        .expect("parses");
        assert_eq!(failed.error.as_deref(), Some("nsfw: blocked"));
        let failed = RemoteJob::from_json(&json!({
            "job_id": "j5", "status": "failed", "result": {"error": "provider down"}
        }))
        .expect("parses");
        assert_eq!(failed.error.as_deref(), Some("provider down"));

        assert!(RemoteJob::from_json(&json!({"status": "queued"})).is_err());
        assert!(RemoteJob::from_json(&json!("text")).is_err());
    }

    #[test]
    fn error_messages_from_any_shape() {
        let ok = StatusCode::BAD_REQUEST;
        assert_eq!(error_message(br#"{"error": "bad width"}"#, ok), "bad width");
        assert_eq!(error_message(br#"{"message": "top up"}"#, ok), "top up");
        assert_eq!(
            error_message(br#"{"error": "model_unavailable", "message": "retired"}"#, ok),
            "retired (model_unavailable)"
        );
        assert_eq!(error_message(b"", StatusCode::BAD_GATEWAY), "Bad Gateway");
        assert_eq!(
            error_message(
                br#"{"error": "Invalid body", "details": [{"path": "prompt", "message": "too long"},
                    {"path": ["styles", 0, "strength"], "message": "above 2"}]}"#,
                ok
            ),
            "Invalid body: prompt: too long; styles[0].strength: above 2"
        );
        assert_eq!(
            error_message(br#"{"errors": [{"loc": ["width"], "msg": "too big"}, "and more"]}"#, ok),
            "width: too big; and more"
        );
        assert_eq!(
            error_message(
                br#"{"error": {"message": "bad", "details": {"steps": "at most 100"}}}"#,
                ok
            ),
            "bad: steps: at most 100"
        );
        assert_eq!(
            error_message(br#"{"error": "bad", "details": 7}"#, ok),
            "bad",
            "a shape not understood leaves the message alone"
        );
        assert_eq!(error_message(b"<html>\n</html>", ok), "<html> </html>");
    }

    #[test]
    fn a_402_is_a_plan_or_a_balance_by_its_message() {
        use PaymentKind::{Balance, Plan};
        for (message, kind) in [
            // Krea's documented balance message.
            (
                "Your API balance is separate from your workspace compute balance. Please top up \
                 your API balance to continue using the API.",
                Balance,
            ),
            ("Insufficient credits", Balance),
            ("This model requires a Pro plan", Plan),
            ("Upgrade to access video/kling/kling-2.5", Plan),
            ("Not available on your PLAN.", Plan),
            // Balance words win: a plan message that also speaks of the balance still pauses.
            ("Insufficient balance on your plan", Balance),
            // Neither: the cautious reading.
            ("Payment Required", Balance),
            ("", Balance),
            // Words, not fragments: "explanation" holds "plan", "unbalanced" holds "balance".
            ("see the explanation", Balance),
        ] {
            assert_eq!(PaymentKind::of_message(message), kind, "{message:?}");
        }
    }

    #[test]
    fn post_ambiguity_is_classified() {
        assert!(ApiError::NoAnswer("reset".into()).may_have_created_job());
        assert!(ApiError::Server { status: 502, message: String::new() }.may_have_created_job());
        assert!(ApiError::Malformed("x".into()).may_have_created_job());
        assert!(!ApiError::NotSent("refused".into()).may_have_created_job());
        assert!(!ApiError::PaymentRequired { message: String::new() }.may_have_created_job());
        assert!(
            !ApiError::RateLimited { retry_after: None, message: String::new() }
                .may_have_created_job()
        );
    }

    #[test]
    fn gone_names_the_replacement() {
        let err = ApiError::ModelGone {
            message: "retired".into(),
            replacement: Some("image/bfl/flux-2".into()),
            sunset_date: Some("2026-06-01".into()),
        };
        let text = err.to_string();
        assert!(
            text.contains("use image/bfl/flux-2 instead") && text.contains("2026-06-01"),
            "{text}"
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert("retry-after", HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn messages_from_the_network_never_carry_the_key() {
        let settings = ClientSettings {
            base_url: Url::parse("https://api.krea.ai").expect("url"),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let key = ApiKey::new("sk-echoed-back").expect("key");
        let client = KreaClient::new(&settings, key).expect("client");
        assert_eq!(
            client.redact("invalid token Bearer sk-echoed-back"),
            "invalid token Bearer [redacted]"
        );
        assert!(!format!("{client:?}").contains("sk-echoed-back"));
    }

    fn client_for(base: &str) -> KreaClient {
        let settings = ClientSettings {
            base_url: Url::parse(base).expect("url"),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        KreaClient::new(&settings, ApiKey::new("sk-test").expect("key")).expect("client")
    }

    #[test]
    fn job_ids_are_percent_encoded_not_sanitised() {
        let client = client_for("https://api.krea.ai");
        let url = |id: &str| client.job_url(id).expect("url").to_string();
        let urls: HashSet<String> = ["a/b", "a.b", "a_b"].iter().map(|id| url(id)).collect();
        assert_eq!(urls.len(), 3, "three ids, three URLs: {urls:?}");
        assert_eq!(url("a/b"), "https://api.krea.ai/jobs/a%2Fb");
        assert_eq!(url("a.b"), "https://api.krea.ai/jobs/a.b");
        assert!(client.job_url("..").is_err() && client.job_url(".").is_err());
        assert!(RemoteJob::from_json(&serde_json::json!({"job_id": ".."})).is_err());
        for hostile in ["../../admin?x=1", "x#y", "%2e%2e", "a/../b"] {
            let parsed = client.job_url(hostile).expect("url");
            let segments: Vec<&str> = parsed.path_segments().expect("segments").collect();
            assert_eq!(segments.len(), 2, "{hostile} stays one segment: {parsed}");
            assert_eq!(segments[0], "jobs", "{hostile}: {parsed}");
            assert!(!matches!(segments[1], "." | ".."), "{hostile}: {parsed}");
            assert!(parsed.query().is_none() && parsed.fragment().is_none(), "{parsed}");
        }
        // A proxy's path prefix is kept.
        let proxied = client_for("https://proxy.example/krea/");
        assert_eq!(
            proxied.job_url("j1").expect("url").as_str(),
            "https://proxy.example/krea/jobs/j1"
        );
    }

    #[test]
    fn a_url_error_keeps_the_parse_error_beneath_it() {
        use std::error::Error as _;
        let err = parse_base_url("not a url").expect_err("not a URL");
        assert!(matches!(err, UrlError::NotAUrl { .. }), "{err}");
        let source = err.source().expect("the parse error is kept");
        assert!(err.to_string().contains(&source.to_string()), "{err}");
    }

    #[test]
    fn user_and_password_in_urls_are_never_kept() {
        let base = parse_base_url("https://me:hunter2@api.krea.ai").expect("accepted");
        assert_eq!(base.as_str(), "https://api.krea.ai/");
        let err = parse_base_url("http://me:hunter2@10.0.0.1").expect_err("plain http").to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_base_url("htp:/me:hunter2@[bad").expect_err("not a URL").to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let job = RemoteJob::from_json(&json!({
            "job_id": "j", "status": "completed",
            "result": {"urls": ["https://u:hunter2@gen.krea.ai/a.png", {"url": "https://gen.krea.ai/b.png"}]}
        }))
        .expect("parses");
        assert_eq!(job.urls, ["https://gen.krea.ai/a.png", "https://gen.krea.ai/b.png"]);
        let url = Url::parse("https://u:hunter2@h.example/x").expect("url");
        assert_eq!(display_url(&url), "https://h.example/x");
    }
}
