//! The engine's seam: the three things it needs from the world, as small object-safe traits.
//!
//! - [`KreaApi`]: create, get, cancel and list jobs at Krea, upload and list assets;
//!   implemented by [`KreaClient`], and by [`RefusingApi`] where no API call may happen
//!   (`krea-batch download`, which carries no key).
//! - [`ResultFetcher`]: the download of one result file, with retries; implemented by
//!   [`Downloader`].
//! - [`Clock`]: the wall clock in milliseconds since the epoch, as recorded in the state file;
//!   implemented by [`SystemClock`].
//!
//! [`EngineIo`] bundles them with the state file's writer. Production builds it from the real
//! clients; the engine's in-process tests (`runner/tests.rs`) build it from in-memory doubles
//! and a clock that follows paused tokio time, so a whole run takes milliseconds.
//!
//! The futures are boxed so that the traits stay object-safe (`Arc<dyn KreaApi>`): one
//! allocation per request is nothing beside a network round trip.

use crate::api::{ApiError, JobPage, KreaClient, RemoteJob};
use crate::asset::{Asset, AssetPage, AssetUpload};
use crate::download::{DownloadError, Downloader, Fetched};
use crate::retry::RetryPolicy;
use crate::store::StoreWriter;
use std::collections::HashSet;
use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future answering one API request.
pub(crate) type ApiFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// A boxed future downloading one result.
pub(crate) type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Fetched, DownloadError>> + Send + 'a>>;

/// What the engine asks of Krea. Errors are classified as [`KreaClient`] classifies them; the
/// engine's decisions (pay never twice) rest on that classification.
pub(crate) trait KreaApi: Send + Sync + Debug {
    /// `POST /generate/<model>` with `body`: creates a job.
    fn create_job<'a>(&'a self, model: &'a str, body: &'a str) -> ApiFuture<'a, RemoteJob>;
    /// `GET /jobs/{id}`.
    fn get_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, RemoteJob>;
    /// `DELETE /jobs/{id}`.
    fn cancel_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, ()>;
    /// `GET /jobs`: one page of this key's jobs created before `cursor`, newest first.
    fn list_jobs<'a>(&'a self, cursor: Option<&'a str>, limit: u32) -> ApiFuture<'a, JobPage>;
    /// `GET /jobs` for a sweep (`runner/sweep.rs`): the newest `limit` jobs, to read the state
    /// of those in flight. The same request as a listing's first page; a method of its own so
    /// the engine's tests can tell a sweep from a reconciliation's listing.
    fn sweep_jobs(&self, limit: u32) -> ApiFuture<'_, JobPage> {
        self.list_jobs(None, limit)
    }
    /// `POST /assets`: uploads a local file (see `uploads.rs` for when).
    fn upload_asset<'a>(&'a self, upload: AssetUpload<'a>) -> ApiFuture<'a, Asset>;
    /// `GET /assets`: one page of this key's assets uploaded before `cursor`, newest first.
    fn list_assets<'a>(&'a self, cursor: Option<&'a str>, limit: u32) -> ApiFuture<'a, AssetPage>;
}

impl KreaApi for KreaClient {
    fn create_job<'a>(&'a self, model: &'a str, body: &'a str) -> ApiFuture<'a, RemoteJob> {
        Box::pin(KreaClient::create_job(self, model, body))
    }

    fn get_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, RemoteJob> {
        Box::pin(KreaClient::get_job(self, job_id))
    }

    fn cancel_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, ()> {
        Box::pin(KreaClient::cancel_job(self, job_id))
    }

    fn list_jobs<'a>(&'a self, cursor: Option<&'a str>, limit: u32) -> ApiFuture<'a, JobPage> {
        Box::pin(KreaClient::list_jobs(self, cursor, limit))
    }

    fn upload_asset<'a>(&'a self, upload: AssetUpload<'a>) -> ApiFuture<'a, Asset> {
        Box::pin(async move { KreaClient::upload_asset(self, &upload).await })
    }

    fn list_assets<'a>(&'a self, cursor: Option<&'a str>, limit: u32) -> ApiFuture<'a, AssetPage> {
        Box::pin(KreaClient::list_assets(self, cursor, limit))
    }
}

/// The API of a mode that must never call Krea (`krea-batch download`): every call is refused
/// without touching the network, as a request that could not be sent ([`ApiError::NotSent`]),
/// so nothing is believed to have happened at Krea. No key is needed to build it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RefusingApi;

impl RefusingApi {
    fn refuse<'a, T: Send + 'a>(what: &str) -> ApiFuture<'a, T> {
        let message = format!("{what} is not allowed here: this mode only downloads results");
        Box::pin(std::future::ready(Err(ApiError::NotSent(message))))
    }
}

impl KreaApi for RefusingApi {
    fn create_job<'a>(&'a self, _model: &'a str, _body: &'a str) -> ApiFuture<'a, RemoteJob> {
        Self::refuse("submitting a job")
    }

    fn get_job<'a>(&'a self, _job_id: &'a str) -> ApiFuture<'a, RemoteJob> {
        Self::refuse("polling a job")
    }

    fn cancel_job<'a>(&'a self, _job_id: &'a str) -> ApiFuture<'a, ()> {
        Self::refuse("cancelling a job")
    }

    fn list_jobs<'a>(&'a self, _cursor: Option<&'a str>, _limit: u32) -> ApiFuture<'a, JobPage> {
        Self::refuse("listing jobs")
    }

    fn upload_asset<'a>(&'a self, _upload: AssetUpload<'a>) -> ApiFuture<'a, Asset> {
        Self::refuse("uploading a file")
    }

    fn list_assets<'a>(
        &'a self,
        _cursor: Option<&'a str>,
        _limit: u32,
    ) -> ApiFuture<'a, AssetPage> {
        Self::refuse("listing assets")
    }
}

/// How the engine downloads one result: `url` to `<dir>/<stem>.<ext>` for the Krea job
/// `owner`, retrying transient failures by `policy`.
pub(crate) trait ResultFetcher: Send + Sync + Debug {
    /// Downloads one result (see [`Downloader::fetch_with_retries`]).
    fn fetch<'a>(
        &'a self,
        url: &'a str,
        dir: &'a Path,
        stem: &'a str,
        owner: Option<&'a str>,
        policy: &'a RetryPolicy,
    ) -> FetchFuture<'a>;
}

impl ResultFetcher for Downloader {
    fn fetch<'a>(
        &'a self,
        url: &'a str,
        dir: &'a Path,
        stem: &'a str,
        owner: Option<&'a str>,
        policy: &'a RetryPolicy,
    ) -> FetchFuture<'a> {
        Box::pin(self.fetch_with_retries(url, dir, stem, owner, policy))
    }
}

/// The wall clock as the state file records it: milliseconds since the Unix epoch. Deadlines
/// and waits inside the engine use tokio's clock; this is for times that are stored or compared
/// with Krea's.
pub(crate) trait Clock: Send + Sync + Debug {
    /// Milliseconds since the Unix epoch, now.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::store::now_ms()
    }
}

/// The engine's connections to the world: the API, the result hosts, the clock, the state file.
#[derive(Debug)]
pub(crate) struct EngineIo {
    /// Krea.
    pub api: Arc<dyn KreaApi>,
    /// The result hosts.
    pub fetcher: Arc<dyn ResultFetcher>,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// The state file's writer.
    pub writer: StoreWriter,
    /// Krea job ids held by other batches of the same state file: never adopted.
    pub claimed_elsewhere: HashSet<String>,
}

impl EngineIo {
    /// The production connections: `api`, `downloader` and the system clock.
    #[must_use]
    pub(crate) fn new(
        api: Arc<dyn KreaApi>,
        downloader: Downloader,
        writer: StoreWriter,
        claimed_elsewhere: HashSet<String>,
    ) -> Self {
        Self {
            api,
            fetcher: Arc::new(downloader),
            clock: Arc::new(SystemClock),
            writer,
            claimed_elsewhere,
        }
    }
}
