//! `krea-batch daemon`: the same engine as a service that never ends. Operators drop job files
//! into an inbox; results appear in a folder per job file under the output root, for weeks, with
//! a prepaid balance that runs out and is topped up.
//!
//! This module wires the pieces: the config (`config.rs`), the inbox (`inbox.rs`), the engine in
//! service mode (`runner/`), systemd notifications (`notify.rs`), the metrics endpoint
//! (`metrics.rs`), and requests left in the state file by `krea-batch cancel` and
//! `krea-batch resume`. Signals arrive through [`DaemonSignals`]; `main.rs` installs the handlers.
//!
//! - A job file in the inbox is moved to `inbox/processing/`, validated, imported into the
//!   state in one transaction, and moved to `inbox/accepted/`; an invalid one goes to
//!   `inbox/rejected/` with a `<name>.error.txt` naming the line and column. A file whose
//!   content was imported before adds nothing. A file left in `processing/` by a service that
//!   stopped (killed for its memory, say) is not read again at the next start: it goes to
//!   `rejected/` (or `accepted/` if its import had committed), so one file cannot make the
//!   service crash in a loop.
//! - A 402 (or a refused key) pauses submitting; jobs in flight go on to their end; one
//!   submission probes every `probe_interval`, or at once on SIGHUP or `krea-batch resume`.
//! - SIGTERM: nothing new starts, the requests under way finish and are recorded, and the daemon
//!   exits within `drain_time`; jobs still running at Krea are polled by the next start.

pub(crate) mod config;
mod notify;

use crate::api;
use crate::error::InputError;
use crate::files::{ensure_real_dir, remove_partials};
use crate::inbox::{Inbox, PROCESSING, ReadyFile};
use crate::jobfile::{self, JobFile};
use crate::key::ApiKey;
use crate::metrics::MetricsSnapshot;
use crate::pricing::PriceTable;
use crate::report::rewrite_manifest;
use crate::reuse::ReuseError;
use crate::runner::{
    Controls, EngineCommand, EngineSettings, EngineStatus, KreaApi, RunKind,
    sleep_until_or_forever, tick_or_forever,
};
use crate::setup::{self, Started};
use crate::store::{Store, StoreError, StoreWriter};
use crate::uploads::{self, Records, UrlBook, WithUploads, upload_files};
use anyhow::Context as _;
pub use config::DaemonConfig;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Signals from the outside: `shutdown` (SIGTERM, SIGINT) and `reload` (SIGHUP).
#[derive(Clone, Debug, Default)]
pub struct DaemonSignals {
    /// Drain and exit.
    pub shutdown: CancellationToken,
    /// Reload the config, rescan the inbox, probe a pause.
    pub reload: Arc<tokio::sync::Notify>,
}

/// STATUS= is sent at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Runs the service until `signals.shutdown`.
pub async fn run(config_path: &Path, key: ApiKey, signals: DaemonSignals) -> anyhow::Result<()> {
    let config = DaemonConfig::load(config_path).map_err(InputError::new)?;
    let base_text = config.api.base_url.as_deref().unwrap_or(api::DEFAULT_BASE_URL);
    let base = api::parse_base_url(base_text)
        .map_err(|err| InputError::because(format!("api.base_url: {err}"), err))?;
    ensure_real_dir(&config.output)
        .map_err(|err| InputError::because(format!("output: {err}"), err))?;
    let mut inbox = Inbox::open(&config.inbox, config.inbox_scan_interval).map_err(|err| {
        InputError::because(format!("inbox {}: {err}", config.inbox.display()), err)
    })?;
    let mut store = setup::open_store(&config.state)?;
    setup::guard_api_base(&mut store, &base)?;
    file_away_interrupted(&mut inbox, &store)?;
    let jobs = store.jobs(None)?;
    for dir in store.output_dirs()?.values() {
        let _ = remove_partials(dir);
    }

    let api_base = base.as_str().trim_end_matches('/').to_owned();
    let (client, downloader) = setup::clients(base, &config.limits, key)?;
    // Local input files: the engine sends through an API that puts their URLs into bodies;
    // those of earlier inbox files come from the state, new ones are added as files arrive.
    let book = UrlBook::default();
    uploads::recorded(&store, &api_base, &jobs, &book)?;
    let api: Arc<dyn KreaApi> = Arc::new(client);
    let sending: Arc<dyn KreaApi> = Arc::new(WithUploads::new(Arc::clone(&api), book.clone()));
    let watchdog = sd_notify::watchdog_enabled();
    let controls = Controls::default();
    let (status_tx, status_rx) = tokio::sync::watch::channel(EngineStatus::default());
    let Started { engine, writer, commands } = setup::start_engine(
        store,
        (sending, downloader),
        jobs,
        service_settings(&config, watchdog),
        controls.clone(),
        status_tx,
    )?;
    let engine_task = tokio::spawn(engine.run());

    let metrics = start_metrics(&config, &signals).await?;
    let uploads = Uploading { api, api_base, book };
    let mut daemon = Daemon {
        config,
        config_path: config_path.to_owned(),
        inbox,
        writer,
        commands,
        metrics,
        uploads,
    };
    notify::ready(&notify::status_line(&status_rx.borrow()));
    tracing::info!(
        inbox = %daemon.config.inbox.display(),
        output = %daemon.config.output.display(),
        "krea-batch daemon ready"
    );
    let result = daemon.serve(engine_task, &controls, status_rx, &signals, watchdog).await;
    if let Some(metrics) = daemon.metrics.take() {
        metrics.shutdown.cancel();
    }
    daemon.writer.close().await;
    result
}

/// Files away what a stopped service left in `inbox/processing/`: to `accepted/` if its content
/// was imported (the service stopped between the import and the move), else to `rejected/`
/// with [`crate::inbox::INTERRUPTED`]; never read again, so that a file that exhausts the
/// service's memory cannot make it crash at every start.
fn file_away_interrupted(inbox: &mut Inbox, store: &Store) -> anyhow::Result<()> {
    let left = inbox.interrupted().map_err(|err| {
        let message = format!("inbox {}: {err}", inbox.dir().join(PROCESSING).display());
        InputError::because(message, err)
    })?;
    for (path, name) in left {
        let imported = match inbox.sha256_of(&path) {
            Ok(sha) => store.content_imported(&sha)?,
            Err(_) => false,
        };
        let moved = if imported {
            tracing::info!(file = %name, "a job file the service was taking when it stopped had been imported; accepted");
            inbox.accept_path(&path, &name)
        } else {
            tracing::warn!(file = %name, "the service stopped while reading this job file; rejected, not read again");
            inbox.reject_path(&path, &name, crate::inbox::INTERRUPTED)
        };
        if let Err(err) = moved {
            tracing::error!(file = %name, %err, "cannot move a job file out of inbox/processing/");
        }
    }
    Ok(())
}

type EngineTask = tokio::task::JoinHandle<Result<crate::runner::EngineOutcome, StoreError>>;

impl Daemon {
    /// The service loop: inbox scans, requests, STATUS=, the watchdog, reload and shutdown,
    /// until the engine returns.
    async fn serve(
        &mut self,
        mut engine_task: EngineTask,
        controls: &Controls,
        mut status_rx: tokio::sync::watch::Receiver<EngineStatus>,
        signals: &DaemonSignals,
        watchdog: Option<Duration>,
    ) -> anyhow::Result<()> {
        let mut scan = tokio::time::interval(self.config.inbox_scan_interval);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog_tick = watchdog.map(|every| tokio::time::interval(every / 2));
        let mut status_due: Option<Instant> = None;
        let mut status_sent = Instant::now();
        let mut stopping = false;
        let mut drain_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = scan.tick(), if !stopping => {
                    self.scan_inbox().await;
                    self.forward_requests().await;
                }
                changed = status_rx.changed() => {
                    if changed.is_ok() {
                        self.publish_metrics(&status_rx.borrow_and_update());
                        status_due.get_or_insert(status_sent + STATUS_EVERY);
                    }
                }
                () = sleep_until_or_forever(status_due) => {
                    status_due = None;
                    status_sent = Instant::now();
                    notify::status(&notify::status_line(&status_rx.borrow()));
                }
                () = tick_or_forever(&mut watchdog_tick) => {
                    // WATCHDOG=1 only while the engine loop turns: a hung engine is restarted.
                    let every = watchdog.unwrap_or_default();
                    let beat = controls.heartbeat.load(Ordering::Relaxed);
                    let age = crate::store::now_ms().saturating_sub(beat);
                    if u128::try_from(age).unwrap_or(u128::MAX) < every.as_millis() / 2 {
                        notify::watchdog();
                    }
                }
                () = signals.reload.notified(), if !stopping => {
                    notify::reloading();
                    self.reload().await;
                    notify::ready(&notify::status_line(&status_rx.borrow()));
                }
                () = signals.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    notify::stopping();
                    tracing::info!(drain_time = ?self.config.drain_time, "stopping: finishing the requests under way");
                    controls.drain.cancel();
                    drain_deadline = Some(Instant::now() + self.config.drain_time);
                }
                () = sleep_until_or_forever(drain_deadline) => {
                    tracing::warn!("the drain time is over; stopping now (the state is saved)");
                    controls.abort.cancel();
                    drain_deadline = None;
                }
                joined = &mut engine_task => {
                    let outcome = joined.context("the engine failed")??;
                    crate::setup::keep_cancels(&self.writer, &outcome.cancels_left).await;
                    // The jobs left running at Krea, not all the jobs the state holds.
                    let counts = crate::runner::Counts::of(&outcome.jobs);
                    tracing::info!(
                        in_flight = counts.in_flight + counts.unknown,
                        "stopped; jobs in flight are resumed by the next start"
                    );
                    return Ok(());
                }
            }
        }
    }
}

/// The engine settings of the service: the limits, plus pausing instead of stopping on a 402,
/// and a heartbeat often enough for the watchdog.
fn service_settings(config: &DaemonConfig, watchdog: Option<Duration>) -> EngineSettings {
    let mut settings = setup::engine_settings(&config.limits);
    settings.kind = RunKind::Service { probe_every: config.probe_interval };
    settings.heartbeat = watchdog.map(|every| every / 4);
    settings.budget = config.budget;
    // Downloads under way stop (download pending) before the drain time runs out, so they are
    // recorded as stopped rather than cut off by the exit.
    settings.download_grace = settings.download_grace.min(config.drain_time * 4 / 5);
    settings
}

/// Why the service refuses a job file from its inbox.
#[derive(Debug, thiserror::Error)]
enum Unfit {
    /// Not a valid job file.
    #[error(transparent)]
    JobFile(#[from] jobfile::JobFileError),
    /// The file sets its own budget; the service's is in its configuration.
    #[error(
        "{}: budget: the service's budget is set in its configuration file (`budget:` there), \
         not per job file; remove `budget:` from the job file",
        .0.display()
    )]
    OwnBudget(std::path::PathBuf),
    /// Under the service's budget, every job needs a price.
    #[error(transparent)]
    Unpriced(crate::costs::Unpriced),
}

/// A job file's `output:`, `api:` and `limits:` are a run's; the service has its own, so it
/// ignores them, and says so rather than leave the operator wondering where results went.
fn warn_of_run_settings(file_name: &str, written: &[&str]) {
    if written.is_empty() {
        return;
    }
    let ignored: Vec<String> = written.iter().map(|key| format!("`{key}:`")).collect();
    tracing::warn!(
        file = %file_name,
        "the job file's {} {} ignored: the service's configuration governs (results go to its \
         output folder, under the file's name); remove {} from the file to silence this",
        ignored.join(", "),
        if ignored.len() == 1 { "is" } else { "are" },
        if ignored.len() == 1 { "it" } else { "them" },
    );
}

/// The running service's parts besides the engine.
struct Daemon {
    config: DaemonConfig,
    config_path: std::path::PathBuf,
    inbox: Inbox,
    writer: StoreWriter,
    commands: UnboundedSender<EngineCommand>,
    metrics: Option<Metrics>,
    uploads: Uploading,
}

/// What the service needs to upload the local input files of inbox files (`uploads.rs`).
struct Uploading {
    api: Arc<dyn KreaApi>,
    /// The API the uploads are recorded for.
    api_base: String,
    /// The URLs the engine's API puts into bodies.
    book: UrlBook,
}

/// The metrics endpoint's feed and stop switch.
struct Metrics {
    snapshot: tokio::sync::watch::Sender<MetricsSnapshot>,
    shutdown: CancellationToken,
}

async fn start_metrics(
    config: &DaemonConfig,
    signals: &DaemonSignals,
) -> anyhow::Result<Option<Metrics>> {
    let Some(metrics) = &config.metrics else { return Ok(None) };
    let listener = crate::metrics::bind(metrics.listen).await.map_err(|err| {
        InputError::because(format!("metrics.listen {}: {err}", metrics.listen), err)
    })?;
    // The address bound, not the one configured: with port 0 the system picks the port, and
    // this line is how the operator (or a test) learns it.
    let bound = listener.local_addr().unwrap_or(metrics.listen);
    let (snapshot, snapshot_rx) = tokio::sync::watch::channel(MetricsSnapshot::default());
    let shutdown = signals.shutdown.child_token();
    tokio::spawn(crate::metrics::serve(listener, snapshot_rx, shutdown.clone()));
    tracing::info!(listen = %bound, "metrics at /metrics");
    Ok(Some(Metrics { snapshot, shutdown }))
}

impl Daemon {
    /// Validates, imports and files away every complete job file in the inbox.
    async fn scan_inbox(&mut self) {
        let ready = match self.inbox.scan() {
            Ok(ready) => ready,
            Err(err) => {
                tracing::warn!(%err, inbox = %self.inbox.dir().display(), "cannot scan the inbox");
                return;
            }
        };
        for file in ready {
            self.take_file(file).await;
        }
    }

    /// The service's own rules for an inbox file, beyond the job-file format: the budget is
    /// the service's (one cap over all files, in its configuration), so a file's `budget:`
    /// would be ignored and is refused instead; under that budget every job needs a price.
    fn fits_the_service(&self, job_file: JobFile) -> Result<JobFile, Unfit> {
        if job_file.budget.is_some() {
            return Err(Unfit::OwnBudget(job_file.source));
        }
        if self.config.budget.is_some()
            && let Some(refusal) = crate::costs::unpriced_under_budget(&job_file)
        {
            return Err(Unfit::Unpriced(refusal));
        }
        Ok(job_file)
    }

    async fn take_file(&mut self, mut file: ReadyFile) {
        // Messages and `from:` paths are as the file was dropped, beside its data files.
        let dropped_at = file.path.clone();
        if let Err(err) = self.inbox.quarantine(&mut file) {
            tracing::error!(file = %file.file_name, %err, "cannot move the job file to inbox/processing/; it stays in the inbox (touch it to retry)");
            return;
        }
        let job_file = match jobfile::parse(&file.bytes, &dropped_at)
            .map_err(Unfit::from)
            .and_then(|job_file| self.fits_the_service(job_file))
        {
            Ok(job_file) => job_file,
            Err(err) => {
                tracing::warn!(file = %file.file_name, error = %err, "job file rejected");
                if let Err(io) = self.inbox.reject(&file, &err.to_string()) {
                    tracing::error!(file = %file.file_name, %io, "cannot move the rejected file");
                }
                return;
            }
        };
        file.bytes = Vec::new(); // parsed: up to 32 MiB less to hold during the import
        warn_of_run_settings(&file.file_name, &job_file.run_settings);
        if !self.upload_inputs(&mut file, &dropped_at, &job_file).await {
            return;
        }
        let output_dir = self.config.output.join(&file.batch_name);
        if let Err(err) = ensure_real_dir(&output_dir) {
            tracing::error!(file = %file.file_name, %err, "cannot make the output folder; the file stays in the inbox (touch it to retry)");
            self.put_back(&mut file, &dropped_at);
            return;
        }
        let source = format!("inbox:{}", file.batch_name);
        let sha = file.sha256.clone();
        let dir = output_dir.clone();
        let imported = self
            .writer
            .with_store(move |store| -> Result<Option<_>, ReuseError> {
                if store.content_imported(&sha)? {
                    return Ok(None);
                }
                let prices = PriceTable::with_overrides(job_file.prices.clone());
                let report =
                    store.import(&source, &dir, &job_file.jobs, &prices, job_file.reuse)?;
                store.set_content_hash(report.batch_id, &sha)?;
                if !report.reusable.is_empty() {
                    let dirs = store.output_dirs()?;
                    let taken = crate::reuse::take_results(store, &report.reusable, &dirs)?;
                    tracing::info!(
                        taken,
                        "jobs took results this state already paid for: not paid again"
                    );
                }
                let jobs = store.jobs(Some(report.batch_id))?;
                Ok(Some((report, jobs, store.output_dirs()?)))
            })
            .await;
        match imported {
            Ok(Ok(Some((report, jobs, output_dirs)))) => {
                if let Err(err) = rewrite_manifest(&output_dir, &jobs, true) {
                    tracing::warn!(%err, "cannot write the manifest");
                }
                tracing::info!(file = %file.file_name, added = report.added, known = report.known, output = %output_dir.display(), "job file accepted");
                let _ = self.commands.send(EngineCommand::AddJobs { jobs, output_dirs });
            }
            Ok(Ok(None)) => {
                tracing::info!(file = %file.file_name, "job file accepted; its content was imported before, nothing added");
            }
            Ok(Err(err)) => {
                tracing::error!(file = %file.file_name, %err, "cannot import the job file; it stays in the inbox (touch it to retry)");
                self.put_back(&mut file, &dropped_at);
                return;
            }
            Err(err) => {
                tracing::error!(file = %file.file_name, %err, "the state writer is gone");
                self.put_back(&mut file, &dropped_at);
                return;
            }
        }
        if let Err(err) = self.inbox.accept(&file) {
            tracing::error!(file = %file.file_name, %err, "cannot move the accepted file");
        }
    }

    /// Moves a file that could not be taken for now from `processing/` back to where it was
    /// dropped, where it waits until it changes (as before it was quarantined).
    /// Uploads (or finds recorded) the local input files of an inbox file before its jobs are
    /// imported, so that no job the engine gets lacks its URL; false when the file cannot go
    /// on: Krea refusing a file (or a file changed) rejects it, a failure that a later try may
    /// not meet leaves it in the inbox.
    async fn upload_inputs(
        &mut self,
        file: &mut ReadyFile,
        dropped_at: &Path,
        job_file: &JobFile,
    ) -> bool {
        if job_file.local_files.is_empty() {
            return true;
        }
        let mut records = Records::Writer(&self.writer);
        let uploaded = upload_files(
            &mut records,
            self.uploads.api.as_ref(),
            &self.uploads.api_base,
            &job_file.local_files,
            self.config.limits.retry_backoff,
            &self.uploads.book,
            // Not interrupted: the service's shutdown waits for an inbox file's uploads, as before.
            &uploads::Stops::default(),
        )
        .await;
        let Err(err) = uploaded else { return true };
        let error = format!("{err:#}");
        if err.chain().any(<dyn std::error::Error>::is::<InputError>) {
            tracing::warn!(file = %file.file_name, %error, "job file rejected");
            if let Err(io) = self.inbox.reject(file, &error) {
                tracing::error!(file = %file.file_name, %io, "cannot move the rejected file");
            }
        } else {
            tracing::error!(file = %file.file_name, %error, "cannot upload the job file's local inputs; it stays in the inbox (touch it to retry)");
            self.put_back(file, dropped_at);
        }
        false
    }

    fn put_back(&mut self, file: &mut ReadyFile, dropped_at: &Path) {
        if let Err(err) = self.inbox.put_back(file, dropped_at) {
            tracing::error!(file = %file.file_name, %err, "cannot move the job file back from inbox/processing/; the next start rejects it");
        }
    }

    /// Hands requests left by `krea-batch cancel` and `krea-batch resume` to the engine.
    async fn forward_requests(&self) {
        setup::forward_requests(&self.writer, &self.commands).await;
    }

    /// SIGHUP: reads the config again (limits and the probe interval apply at once; paths and
    /// the API address need a restart), rescans the inbox, and probes a pause.
    async fn reload(&mut self) {
        match DaemonConfig::load(&self.config_path) {
            Ok(config) => {
                if (&config.inbox, &config.output, &config.state, &config.api, &config.metrics)
                    != (
                        &self.config.inbox,
                        &self.config.output,
                        &self.config.state,
                        &self.config.api,
                        &self.config.metrics,
                    )
                {
                    tracing::warn!(
                        "inbox, output, state, api and metrics changes take effect at the next start"
                    );
                }
                let watchdog = sd_notify::watchdog_enabled();
                let _ = self.commands.send(EngineCommand::Reconfigure(Box::new(service_settings(
                    &config, watchdog,
                ))));
                self.config.limits = config.limits;
                self.config.probe_interval = config.probe_interval;
                self.config.drain_time = config.drain_time;
                tracing::info!(config = %self.config_path.display(), "configuration reloaded");
            }
            Err(err) => {
                tracing::error!(%err, "the configuration is invalid; keeping the current one");
            }
        }
        let _ = self.commands.send(EngineCommand::Probe);
        self.scan_inbox().await;
        self.forward_requests().await;
    }

    fn publish_metrics(&self, status: &EngineStatus) {
        let Some(metrics) = &self.metrics else { return };
        metrics.snapshot.send_replace(MetricsSnapshot {
            counts: status.counts,
            submissions_total: status.submissions_total,
            rate_limited_total: status.rate_limited_total,
            payment_required_total: status.payment_required_total,
            paused: status.paused.map(|reason| reason.code().to_owned()),
            downloads_total: status.downloads_total,
            download_bytes_total: status.download_bytes_total,
            spend_usd_estimate: status.spend_usd,
            account_capacity: status.capacity,
            allowed_in_flight: status.allowed_in_flight,
            posts_allowed: status.posts_allowed,
            backlogged: status.backlogged,
            pace_per_second: status.pace_per_second,
        });
    }
}
