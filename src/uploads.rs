//! Local input files uploaded to Krea (`POST /assets`) once per content, exactly once, and
//! their URLs put into the bodies the engine sends.
//!
//! Where it runs: before the jobs that need a file reach the engine. `run` calls [`prepare`]
//! between the import of the job file and the start of the engine, with the state file still in
//! its hands ([`Records::Direct`]); the daemon calls [`upload_files`] for each inbox file before
//! importing it, recording through the engine's writer ([`Records::Writer`]), and adds the URLs
//! to the [`UrlBook`] its engine sends with. The engine is left as it is: what it gets is the API
//! wrapped in [`WithUploads`], which replaces each file's
//! placeholder (`jobfile`'s `krea-batch-file:sha256:<hex>`, the content's hash, which is what
//! the job's key was made from) by the recorded URL in the body of each `POST /generate`. The
//! body in the state file keeps the placeholder, so the job's identity never depends on a URL.
//!
//! Exactly once, as for jobs: the upload is recorded (`attempting`) in the state file before
//! its POST, and its URL as soon as it comes. An upload whose answer is lost (timeout, reset,
//! 5xx) may have created the asset: it is marked `unknown` and looked for with `GET /assets`,
//! by the description every upload carries (`krea-batch sha256:<hex>`), before anything is
//! sent again; one found is adopted, one shown absent is uploaded again (Krea answers an
//! upload only once the asset exists, so an upload that is not listed was not made). A record
//! left `attempting` by a killed run is reconciled the same way. Uploads are recorded per API
//! base: an asset of one API (or simulation) is never sent to another.
//!
//! What it leaves to others: which files a job file names and whether they may be used
//! (`jobfile`), the wire format (`asset.rs`, `api.rs`), the records (`store`).

use crate::api::{ApiError, JobPage, RemoteJob};
use crate::asset::{Asset, AssetPage, AssetUpload};
use crate::beside::open_beside;
use crate::error::InputError;
use crate::jobfile::{LocalFile, PLACEHOLDER_PREFIX, placeholder, placeholders};
use crate::seam::{ApiFuture, KreaApi};
use crate::store::{
    InputName, JobRecord, Store, StoreError, StoreWriter, UploadRecord, UploadState,
};
use anyhow::Context as _;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::io::Read as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How many times one file is sent in one run before the run gives up (a rerun goes on).
const MAX_ATTEMPTS: u32 = 4;

/// The most pages of `GET /assets` read to find a lost upload.
const MAX_LIST_PAGES: usize = 50;

/// The description every upload carries: how a lost upload is found again.
#[must_use]
pub(crate) fn description(sha256: &str) -> String {
    format!("krea-batch sha256:{sha256}")
}

/// The URLs of uploaded contents (SHA-256 → URL) that [`WithUploads`] puts into bodies; shared
/// so that the daemon can add those of a new inbox file while the engine runs.
pub(crate) type UrlBook = Arc<RwLock<HashMap<String, String>>>;

/// Names each job's local inputs as `files` (the job file's, as read now) names them, for the
/// manifest and the gallery; a content the file no longer names keeps the name its upload was
/// recorded with (`Store::jobs`). Before a first upload, only the job file knows the names.
pub(crate) fn name_inputs(jobs: &mut [JobRecord], files: &[LocalFile]) {
    if files.is_empty() {
        return;
    }
    let by_content: HashMap<&str, &LocalFile> =
        files.iter().map(|file| (file.sha256.as_str(), file)).collect();
    for job in jobs.iter_mut().filter(|job| job.body.contains(PLACEHOLDER_PREFIX)) {
        let named = placeholders(&job.body)
            .filter_map(|sha| match by_content.get(sha) {
                Some(file) => Some(InputName {
                    sha256: sha.to_owned(),
                    path: file.path.display().to_string(),
                }),
                None => job.inputs.iter().find(|known| known.sha256 == sha).cloned(),
            })
            .collect();
        job.inputs = named;
    }
}

/// The contents (SHA-256) that the jobs not yet sent use.
fn needed(jobs: &[JobRecord]) -> BTreeSet<&str> {
    jobs.iter()
        .filter(|job| job.remote_id.is_none() && !job.state.is_final())
        .flat_map(|job| placeholders(&job.body))
        .collect()
}

/// When uploading stops early: a first Ctrl-C (`stop`) sends no further file and lets the one
/// on the wire finish; a second (`abort`) leaves it at once. Either way the state stays whole:
/// an upload is recorded (`attempting`) before its POST, and the next run looks for it with
/// `GET /assets` before sending anything again. The engine, started after, sees the same
/// tokens and submits nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stops {
    /// No further file is sent once cancelled.
    pub(crate) stop: CancellationToken,
    /// The upload on the wire is left once cancelled.
    pub(crate) abort: CancellationToken,
}

/// Uploads (or finds recorded, or finds at Krea) every local file that `jobs` not yet sent
/// use, and returns `api` wrapped so that their bodies carry the URLs. `api_base` names the API
/// the records belong to. Waits `backoff` (doubling) between attempts a 429 or an unreachable
/// API interrupted.
pub(crate) async fn prepare(
    store: &mut Store,
    api: Arc<dyn KreaApi>,
    api_base: &str,
    files: &[LocalFile],
    jobs: &[JobRecord],
    backoff: Duration,
    stops: &Stops,
) -> anyhow::Result<Arc<dyn KreaApi>> {
    let needed = needed(jobs);
    if needed.is_empty() {
        return Ok(api);
    }
    let book = UrlBook::default();
    let used: Vec<LocalFile> =
        files.iter().filter(|file| needed.contains(file.sha256.as_str())).cloned().collect();
    let mut records = Records::Direct(store);
    upload_files(&mut records, api.as_ref(), api_base, &used, backoff, &book, stops).await?;
    // Contents used by jobs of the state whose file this job file no longer names: their URL
    // if one is recorded (else those jobs fail with a message, see `WithUploads`).
    recorded(store, api_base, jobs, &book)?;
    Ok(Arc::new(WithUploads::new(api, book)))
}

/// Uploads each of `files` (or finds it recorded, or at Krea) and adds its URL to `book`.
pub(crate) async fn upload_files(
    records: &mut Records<'_>,
    api: &dyn KreaApi,
    api_base: &str,
    files: &[LocalFile],
    backoff: Duration,
    book: &UrlBook,
    stops: &Stops,
) -> anyhow::Result<()> {
    for (done, file) in files.iter().enumerate() {
        if stops.stop.is_cancelled() || stops.abort.is_cancelled() {
            let left = files.len() - done;
            tracing::warn!(left, "interrupted: input files left to upload; a rerun goes on");
            return Ok(());
        }
        let url = tokio::select! {
            biased;
            () = stops.abort.cancelled() => {
                tracing::warn!(file = %file.path.display(), "upload left unfinished; the next run looks for it at Krea before sending it again");
                return Ok(());
            }
            url = ensure(records, api, api_base, file, backoff) => url
                .with_context(|| format!("while uploading the input file {}", file.path.display()))?,
        };
        book.write().unwrap_or_else(PoisonError::into_inner).insert(file.sha256.clone(), url);
    }
    Ok(())
}

/// Adds to `book` the recorded URLs of the contents `jobs` not yet sent use and `book` lacks.
pub(crate) fn recorded(
    store: &Store,
    api_base: &str,
    jobs: &[JobRecord],
    book: &UrlBook,
) -> Result<(), StoreError> {
    let mut urls = book.write().unwrap_or_else(PoisonError::into_inner);
    for sha in needed(jobs) {
        if urls.contains_key(sha) {
            continue;
        }
        if let Some(record) = store.upload(sha, api_base)?
            && let UploadState::Uploaded { url } = record.state
        {
            urls.insert(sha.to_owned(), url);
        }
    }
    Ok(())
}

/// The URL of `file` at Krea: recorded, found after a lost answer, or uploaded now.
async fn ensure(
    records: &mut Records<'_>,
    api: &dyn KreaApi,
    api_base: &str,
    file: &LocalFile,
    backoff: Duration,
) -> anyhow::Result<String> {
    let sha = file.sha256.as_str();
    let written = file.path.display().to_string();
    let mut wait = backoff;
    for attempt in 1..=MAX_ATTEMPTS {
        match records.upload(sha, api_base).await?.map(|record| record.state) {
            Some(UploadState::Uploaded { url }) => return Ok(url),
            Some(UploadState::Attempting | UploadState::Unknown) => {
                if let Some(url) = find(api, sha).await? {
                    tracing::info!(file = %written, "a lost upload was found at Krea; not sent again");
                    records.upload_done(sha, api_base, &url).await?;
                    return Ok(url);
                }
                tracing::info!(file = %written, "a lost upload is not at Krea; sending it again");
                records.forget_upload(sha, api_base).await?;
            }
            None => {}
        }
        let bytes = read(file)?;
        records.begin_upload(sha, api_base, &written).await?;
        let upload = AssetUpload {
            file_name: file.path.file_name().and_then(|n| n.to_str()).unwrap_or("input"),
            content_type: file.mime_type,
            bytes: &bytes,
            description: &description(sha),
        };
        match api.upload_asset(upload).await {
            Ok(asset) => {
                records.upload_done(sha, api_base, &asset.url).await?;
                tracing::info!(file = %written, "uploaded");
                return Ok(asset.url);
            }
            Err(err) if err.may_have_created_job() => {
                tracing::warn!(file = %written, %err, "the upload got no usable answer; looking for it at Krea before anything is sent again");
                records.upload_unknown(sha, api_base).await?;
            }
            Err(err @ (ApiError::NotSent(_) | ApiError::RateLimited { .. })) => {
                records.forget_upload(sha, api_base).await?;
                let pause = match &err {
                    ApiError::RateLimited { retry_after: Some(after), .. } => *after,
                    _ => wait,
                };
                tracing::warn!(file = %written, %err, attempt, "upload not made; trying again");
                tokio::time::sleep(pause).await;
                wait = wait.saturating_mul(2);
            }
            Err(err @ ApiError::Rejected { .. }) => {
                records.forget_upload(sha, api_base).await?;
                return Err(InputError::because(
                    format!("Krea refused the file {written}: {err}; fix or replace it"),
                    err,
                )
                .into());
            }
            Err(err) => {
                records.forget_upload(sha, api_base).await?;
                return Err(err.into());
            }
        }
    }
    // Settle a last lost answer before giving up, so the rerun starts from what Krea holds.
    if let Some(record) = records.upload(sha, api_base).await?
        && record.state == UploadState::Unknown
        && let Some(url) = find(api, sha).await?
    {
        records.upload_done(sha, api_base, &url).await?;
        return Ok(url);
    }
    anyhow::bail!(
        "{written} could not be uploaded after {MAX_ATTEMPTS} attempts; run again later (what \
         reached Krea is looked for first, never sent twice)"
    )
}

/// Where uploads are recorded: the state file in this process's hands (`run`, before the
/// engine), or through the engine's writer (the daemon, while the engine runs).
pub(crate) enum Records<'a> {
    /// The state file itself.
    Direct(&'a mut Store),
    /// The state's writer thread.
    Writer(&'a StoreWriter),
}

impl Records<'_> {
    async fn call<T: Send + 'static>(
        &mut self,
        call: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self {
            Self::Direct(store) => call(store),
            Self::Writer(writer) => writer.with_store(call).await?,
        }
    }

    async fn upload(&mut self, sha: &str, api: &str) -> Result<Option<UploadRecord>, StoreError> {
        let (sha, api) = (sha.to_owned(), api.to_owned());
        self.call(move |store| store.upload(&sha, &api)).await
    }

    async fn begin_upload(&mut self, sha: &str, api: &str, path: &str) -> Result<(), StoreError> {
        let (sha, api, path) = (sha.to_owned(), api.to_owned(), path.to_owned());
        self.call(move |store| store.begin_upload(&sha, &api, &path)).await
    }

    async fn upload_unknown(&mut self, sha: &str, api: &str) -> Result<(), StoreError> {
        let (sha, api) = (sha.to_owned(), api.to_owned());
        self.call(move |store| store.upload_unknown(&sha, &api)).await
    }

    async fn upload_done(&mut self, sha: &str, api: &str, url: &str) -> Result<(), StoreError> {
        let (sha, api, url) = (sha.to_owned(), api.to_owned(), url.to_owned());
        self.call(move |store| store.upload_done(&sha, &api, &url)).await
    }

    async fn forget_upload(&mut self, sha: &str, api: &str) -> Result<(), StoreError> {
        let (sha, api) = (sha.to_owned(), api.to_owned());
        self.call(move |store| store.forget_upload(&sha, &api)).await
    }
}

/// The file's bytes, checked to be the content the job file was read with.
fn read(file: &LocalFile) -> anyhow::Result<Vec<u8>> {
    let (opened, _) = open_beside(&file.base, &file.path).map_err(InputError::new)?;
    let mut bytes = Vec::new();
    opened
        .take(crate::jobfile::MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", file.path.display()))?;
    if format!("{:x}", Sha256::digest(&bytes)) != file.sha256 {
        return Err(InputError::msg(format!(
            "{} changed since the job file was read; run again to use what it holds now",
            file.path.display()
        ))
        .into());
    }
    Ok(bytes)
}

/// The URL of the asset whose description names `sha`, if Krea lists one.
async fn find(api: &dyn KreaApi, sha: &str) -> anyhow::Result<Option<String>> {
    let wanted = description(sha);
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_LIST_PAGES {
        let page: AssetPage = api
            .list_assets(cursor.as_deref(), 1000)
            .await
            .context("while looking for a lost upload at Krea (GET /assets)")?;
        if let Some(asset) = page.items.iter().find(|asset| asset.description == wanted) {
            return Ok(Some(asset.url.clone()));
        }
        match page.next_cursor {
            Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
            _ => return Ok(None),
        }
    }
    anyhow::bail!(
        "a lost upload could not be looked for: Krea lists more than {MAX_LIST_PAGES} pages of \
         assets; delete old ones or run again"
    )
}

/// The API the engine sends through: each file's placeholder in a job's body replaced by its
/// upload's URL; everything else passed on as is.
#[derive(Debug)]
pub(crate) struct WithUploads {
    inner: Arc<dyn KreaApi>,
    /// URLs by content (SHA-256).
    urls: UrlBook,
}

impl WithUploads {
    /// `inner`, sending bodies with the URLs of `urls`.
    #[must_use]
    pub(crate) fn new(inner: Arc<dyn KreaApi>, urls: UrlBook) -> Self {
        Self { inner, urls }
    }

    /// `body` with every placeholder replaced by its URL; the error names a content without one.
    fn substitute(&self, body: &str) -> Result<String, String> {
        let mut out = body.to_owned();
        for sha in placeholders(body) {
            let urls = self.urls.read().unwrap_or_else(PoisonError::into_inner);
            let url = urls.get(sha).ok_or_else(|| {
                format!(
                    "the local input file with SHA-256 {sha} has no upload: the job file no \
                     longer names it; put the file back in the job file and run again"
                )
            })?;
            let quoted = serde_json::to_string(url).unwrap_or_default();
            out = out.replace(&format!("\"{}\"", placeholder(sha)), &quoted);
        }
        Ok(out)
    }
}

impl KreaApi for WithUploads {
    fn create_job<'a>(&'a self, model: &'a str, body: &'a str) -> ApiFuture<'a, RemoteJob> {
        match self.substitute(body) {
            Ok(body) => Box::pin(async move { self.inner.create_job(model, &body).await }),
            // Refused before it is sent: nothing reached Krea, and the job cannot be sent.
            Err(message) => {
                Box::pin(std::future::ready(Err(ApiError::Rejected { status: 0, message })))
            }
        }
    }

    fn get_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, RemoteJob> {
        self.inner.get_job(job_id)
    }

    fn cancel_job<'a>(&'a self, job_id: &'a str) -> ApiFuture<'a, ()> {
        self.inner.cancel_job(job_id)
    }

    fn list_jobs<'a>(&'a self, cursor: Option<&'a str>, limit: u32) -> ApiFuture<'a, JobPage> {
        self.inner.list_jobs(cursor, limit)
    }

    fn upload_asset<'a>(&'a self, upload: AssetUpload<'a>) -> ApiFuture<'a, Asset> {
        self.inner.upload_asset(upload)
    }

    fn list_assets<'a>(&'a self, cursor: Option<&'a str>, limit: u32) -> ApiFuture<'a, AssetPage> {
        self.inner.list_assets(cursor, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Krea's assets in memory: counts uploads, and can lose the answer of the next ones (the
    /// asset is made, the answer never comes) or refuse to be reached.
    #[derive(Debug, Default)]
    struct Remote {
        assets: Mutex<Vec<Asset>>,
        uploads: Mutex<u32>,
        lose_answers: Mutex<u32>,
        unreachable: Mutex<u32>,
        /// Uploads get no answer at all (they wait forever), and cancel this token once sent:
        /// a Ctrl-C that comes while one is on the wire.
        hang: Option<CancellationToken>,
    }

    impl Remote {
        fn uploads(&self) -> u32 {
            *self.uploads.lock().expect("lock")
        }
    }

    fn unused<'a, T: Send + 'a>() -> ApiFuture<'a, T> {
        Box::pin(std::future::ready(Err(ApiError::NotSent("not in this test".into()))))
    }

    impl KreaApi for Remote {
        fn create_job<'a>(&'a self, _: &'a str, _: &'a str) -> ApiFuture<'a, RemoteJob> {
            unused()
        }
        fn get_job<'a>(&'a self, _: &'a str) -> ApiFuture<'a, RemoteJob> {
            unused()
        }
        fn cancel_job<'a>(&'a self, _: &'a str) -> ApiFuture<'a, ()> {
            unused()
        }
        fn list_jobs<'a>(&'a self, _: Option<&'a str>, _: u32) -> ApiFuture<'a, JobPage> {
            unused()
        }
        fn upload_asset<'a>(&'a self, upload: AssetUpload<'a>) -> ApiFuture<'a, Asset> {
            let mut unreachable = self.unreachable.lock().expect("lock");
            if *unreachable > 0 {
                *unreachable -= 1;
                return Box::pin(std::future::ready(Err(ApiError::NotSent("refused".into()))));
            }
            *self.uploads.lock().expect("lock") += 1;
            if let Some(sent) = &self.hang {
                sent.cancel();
                return Box::pin(std::future::pending());
            }
            let mut assets = self.assets.lock().expect("lock");
            let asset = Asset {
                id: format!("a{}", assets.len()),
                url: format!("https://assets.example/a{}.png", assets.len()),
                description: upload.description.to_owned(),
            };
            assets.push(asset.clone());
            let mut lose = self.lose_answers.lock().expect("lock");
            let answer = if *lose > 0 {
                *lose -= 1;
                Err(ApiError::NoAnswer("connection reset".into()))
            } else {
                Ok(asset)
            };
            Box::pin(std::future::ready(answer))
        }
        fn list_assets<'a>(&'a self, _: Option<&'a str>, _: u32) -> ApiFuture<'a, AssetPage> {
            let mut items = self.assets.lock().expect("lock").clone();
            items.reverse();
            Box::pin(std::future::ready(Ok(AssetPage { items, next_cursor: None })))
        }
    }

    const API: &str = "https://api.example";

    fn setup() -> (tempfile::TempDir, Store, LocalFile) {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = b"\x89PNG\r\n\x1a\na cat";
        std::fs::write(dir.path().join("cat.png"), bytes).expect("file");
        let store = Store::open_writer(&dir.path().join("state.sqlite")).expect("state");
        let file = LocalFile {
            path: "cat.png".into(),
            base: dir.path().to_owned(),
            sha256: format!("{:x}", Sha256::digest(bytes)),
            bytes: bytes.len() as u64,
            mime_type: "image/png",
            size: None,
        };
        (dir, store, file)
    }

    #[tokio::test]
    async fn a_lost_answer_is_found_at_krea_and_never_sent_again() {
        let (_dir, mut store, file) = setup();
        let remote = Remote { lose_answers: Mutex::new(1), ..Remote::default() };
        let url = ensure(&mut Records::Direct(&mut store), &remote, API, &file, Duration::ZERO)
            .await
            .expect("found");
        assert_eq!(url, "https://assets.example/a0.png");
        assert_eq!(remote.uploads(), 1, "found by its description, not sent twice");
        let recorded = store.upload(&file.sha256, API).expect("read").map(|r| r.state);
        assert_eq!(recorded, Some(UploadState::Uploaded { url: url.clone() }));
        let again = ensure(&mut Records::Direct(&mut store), &remote, API, &file, Duration::ZERO)
            .await
            .expect("known");
        assert_eq!((again, remote.uploads()), (url, 1), "the recorded URL is reused");
    }

    #[tokio::test]
    async fn an_attempt_left_by_a_kill_is_looked_for_first() {
        let (_dir, mut store, file) = setup();
        // Killed after the asset was made: adopted.
        let remote = Remote::default();
        store.begin_upload(&file.sha256, API, "cat.png").expect("recorded");
        remote.assets.lock().expect("lock").push(Asset {
            id: "made".into(),
            url: "https://assets.example/made.png".into(),
            description: description(&file.sha256),
        });
        let url = ensure(&mut Records::Direct(&mut store), &remote, API, &file, Duration::ZERO)
            .await
            .expect("found");
        assert_eq!((url.as_str(), remote.uploads()), ("https://assets.example/made.png", 0));
        // Killed before it reached Krea: shown absent, sent once.
        let (_dir, mut store, file) = setup();
        let remote = Remote::default();
        store.begin_upload(&file.sha256, API, "cat.png").expect("recorded");
        ensure(&mut Records::Direct(&mut store), &remote, API, &file, Duration::ZERO)
            .await
            .expect("uploaded");
        assert_eq!(remote.uploads(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_api_is_tried_again_and_a_changed_file_refused() {
        let (dir, mut store, file) = setup();
        let remote = Remote { unreachable: Mutex::new(2), ..Remote::default() };
        ensure(&mut Records::Direct(&mut store), &remote, API, &file, Duration::from_secs(1))
            .await
            .expect("uploaded");
        assert_eq!(remote.uploads(), 1);
        let (_other, mut fresh, _) = setup();
        std::fs::write(dir.path().join("cat.png"), b"\x89PNG\r\n\x1a\nanother cat").expect("edit");
        let err = ensure(&mut Records::Direct(&mut fresh), &remote, API, &file, Duration::ZERO)
            .await
            .expect_err("changed");
        assert!(format!("{err:#}").contains("changed since"), "{err:#}");
    }

    /// A first Ctrl-C sends no further file; a second leaves the upload on the wire, recorded
    /// as attempting, so the next run looks for it at Krea before sending it again.
    #[tokio::test]
    async fn ctrl_c_stops_the_uploads_and_leaves_the_state_for_the_next_run() {
        let (_dir, mut store, file) = setup();
        let stops = Stops::default();
        let remote = Remote { hang: Some(stops.abort.clone()), ..Remote::default() };
        let book = UrlBook::default();
        stops.stop.cancel();
        let files = [file.clone()];
        let mut records = Records::Direct(&mut store);
        upload_files(&mut records, &remote, API, &files, Duration::ZERO, &book, &stops)
            .await
            .expect("stopped, not failed");
        assert_eq!(remote.uploads(), 0, "nothing sent after the first Ctrl-C");

        let stops = Stops { abort: stops.abort, ..Stops::default() };
        upload_files(&mut records, &remote, API, &files, Duration::ZERO, &book, &stops)
            .await
            .expect("left, not failed");
        assert_eq!(remote.uploads(), 1, "the upload was on the wire");
        assert!(book.read().expect("lock").is_empty(), "no URL without an answer");
        let recorded = store.upload(&file.sha256, API).expect("read").map(|r| r.state);
        assert_eq!(recorded, Some(UploadState::Attempting), "looked for by the next run");
    }

    #[test]
    fn placeholders_are_replaced_by_their_urls() {
        let sha = "ab".repeat(32);
        let body = format!(r#"{{"image_url":"{}","prompt":"a cat"}}"#, placeholder(&sha));
        let book = UrlBook::default();
        book.write().expect("lock").insert(sha.clone(), "https://x/a\"b.png".to_owned());
        let api = WithUploads::new(Arc::new(Remote::default()), book);
        let sent = api.substitute(&body).expect("known");
        let sent: serde_json::Value = serde_json::from_str(&sent).expect("still JSON");
        assert_eq!(sent["image_url"], "https://x/a\"b.png");
        let unknown = format!(r#"{{"image_url":"{}"}}"#, placeholder(&"cd".repeat(32)));
        assert!(api.substitute(&unknown).expect_err("no upload").contains("no upload"));
        assert_eq!(placeholders(&body).collect::<Vec<_>>(), [sha.as_str()]);
    }
}
