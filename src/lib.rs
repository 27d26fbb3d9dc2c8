//! krea-batch: a batch job-runner for the Krea AI generation API.
//!
//! Hand it a YAML file of prompts; it submits them to Krea under a rate limiter and a cap on jobs
//! in flight, polls each job to its end, downloads every result whole, and keeps a durable record
//! so that nothing paid for is lost and nothing is paid twice. The binary (`main.rs`) is a thin
//! shell around this library. The integration tests drive the binary against the simulation;
//! the engine's own tests drive it in-process, through its seam (`seam.rs`), on paused
//! tokio time.
//!
//! # Layout
//!
//! | file | job |
//! |---|---|
//! | `job.rs` | a job's identity (key), name rules and local lifecycle; no I/O |
//! | `jobfile/` | the YAML job file as users write it (sweeps included), and Krea's JSON pipeline files translated into one (`jobfile/pipeline.rs`), validated into jobs with precise errors; the one reader of YAML (`jobfile/yaml.rs` reads the daemon's and the simulation's configuration) |
//! | `key.rs` | where the API key comes from; the type that keeps it out of logs |
//! | `chain.rs` | chains of stages (`then:`): each stage job's name, key and request body, made from its parent's result; no I/O but reading a result's pixel size |
//! | `beside.rs` | opening a file named relative to a folder without leaving it (no `..`, no links) |
//! | `inbox.rs` | the daemon's inbox: noticing complete job files, moving them to accepted/ or rejected/ |
//! | `metrics.rs` | the optional Prometheus /metrics endpoint of the daemon (loopback only) |
//! | `pricing.rs` | the price table: what a generation costs, for estimates |
//! | `costs.rs` | a job file's estimated cost per model, and whether a budget can count it |
//! | `api.rs` | the Krea HTTP client: wire types, lenient parsing, status-code classification |
//! | `asset.rs` | Krea's assets on the wire: the upload form, the asset and its list |
//! | `pace.rs` | the submission pacer (governor, its pace set by the controller), the pause while Krea cannot be reached, and the poll schedule |
//! | `retry.rs` | the retry policy (backoff crate): what is transient, how long to wait |
//! | `store/` | the SQLite state file: jobs, attempts, files; schema versions; one writer thread |
//! | `error.rs` | [`InputError`]: bad input or usage (exit 2), raised at any layer |
//! | `files.rs` | general file helpers: atomic writes, real folders (no links), temporary files of a killed run |
//! | `download.rs` | streaming result files to disk atomically, with sidecars, deadlines and a rate floor |
//! | `address.rs` | which addresses result URLs may reach: the SSRF guard and its DNS resolver |
//! | `output.rs` | the output folder as krea-batch's own: its marker (which state owns it), its lock, results the state does not know |
//! | `runner/` | the engine: ties jobs, pacer, API, store and downloads together; its job table (`runner/table.rs`: each job's phase, with its data, `runner/phase.rs`, and its queue, changed together and checked in one place); its vocabulary (`StopReason`, `Pause`, `Counts`, `EngineStatus`) in `runner/status.rs`, which imports only `job` and `store`; how hard to push an account of unknown limits in `runner/controller.rs` (pure: no I/O, no clock of its own); cancels at Krea, refused ones retried and reported, in `runner/cancel.rs`; a chain's next stage jobs inserted once their input is downloaded in `runner/stages.rs`; results no job can be named for (several POSTs lost together) downloaded apart in `runner/unattributed.rs` |
//! | `seam.rs` | what the engine needs from the world (Krea, result hosts, the clock), as interfaces with the real and the refusing implementations; below the engine, so `reconcile` uses it without importing the engine |
//! | `openapi.rs` | Krea's OpenAPI document: fetched, cached, each model's request schema; a job file checked against it |
//! | `schema.rs` | checking a request body against its model's JSON Schema (a subset) |
//! | `recover.rs` | `krea-batch recover`: a lost state file rebuilt from the output folder and Krea's records (command) |
//! | `dimensions.rs` | an image's pixel size from its header (PNG, JPEG, WebP), for inputs that need it |
//! | `uploads.rs` | local input files uploaded once per content (recorded before each POST, a lost answer found again with `GET /assets`), their URLs put into the bodies the engine sends |
//! | `reconcile.rs` | finding at Krea the jobs whose submission got no answer, never paying twice |
//! | `reuse.rs` | results the state already paid for, linked into a new output folder instead of paid again |
//! | `report.rs` | progress display, the run summary, the manifest |
//! | `gallery.rs` | `index.html`: the batch as a static page of results |
//! | `setup.rs` | setting a run up and down: places, the store opened and guarded (locks, API base, output folder claim), clients, writer, engine, requests forwarded |
//! | `run.rs` | `krea-batch run` and `download`: a job file end to end (command) |
//! | `check.rs` | `krea-batch check`: the plan, nothing sent (command) |
//! | `status.rs` | `krea-batch status`: a state file read, with the service's pause and counts per job file (command) |
//! | `models.rs` | `krea-batch models`: the models of Krea's OpenAPI document, or one model's fields (command) |
//! | `daemon/` | `krea-batch daemon`: the service around the engine (inbox, systemd, signals) (command) |
//! | `cli.rs` | the command line (clap types): a module of the binary (`main.rs` declares it), not of this library |
//! | `testlog.rs` | tests only: a run's log captured as text |
//! | `journal.rs` | `<N>` priority prefixes on log lines under journald, so `journalctl -p` filters them |
//! | `control.rs` | `cancel` and `resume`: acting on a state file, with or without a running process (command) |
//! | `selection.rs` | which jobs of a state a command names: a job file's, all or by name (for `cancel` and `retry`) |
//! | `rerun.rs` | `krea-batch retry`: failed jobs put back to pending on purpose, their failures kept, then run as `run` does (command) |
//! | `sim/` | the simulated Krea API used by tests, the benchmark and `--simulate`; the one public module |
//!
//! # Dependency direction
//!
//! `job` and `pricing` do no I/O; `jobfile` reads only the job file and the data and input
//! files beside it. `api` knows HTTP but not job states. `store` knows jobs but not HTTP. `runner` is the one
//! module that ties them together. `setup` builds on `runner`, `store`, `output` and the clients;
//! `uploads` builds on `seam`, `store` and `jobfile` (the engine never sees a local file);
//! the commands (`run`, `check`, `status`, `control`, `rerun`, `recover`, `models`, `daemon`) build on `setup`, and no
//! module imports a command; `main` sits on top. The simulation depends on nothing else in
//! the crate: it models Krea, not krea-batch.
//!
//! # Public surface
//!
//! The library has one user that matters, the `krea-batch` binary, and three that check it:
//! the integration tests (`tests/`), the fuzz targets (`fuzz/`) and the benchmark (`benches/`).
//! Every module is private; this file re-exports what those users call, and nothing else:
//!
//! - the commands, one function each, with their options and results: [`run`] (`run` and
//!   `download`), [`plan`] (`check`), [`status`], [`recover`], [`cancel`], [`resume`],
//!   [`models()`], [`retry_plan`] and [`retry_jobs`] (`retry`) and [`run_daemon`];
//! - what the commands take: a job file ([`load_job_file`], [`output_dir_of`]), a key
//!   ([`load_key`]), a job file's places and API ([`places`], [`base_url`], [`STATE_FILE`]), the
//!   schema check ([`schema_report`]), and the other YAML files ([`parse_yaml_document`]);
//! - how a run is steered and watched ([`Controls`], [`EngineStatus`], [`show_progress`]) and
//!   how it ends: [`Summary`], [`Counts`], [`StopReason`], and the errors the binary sorts
//!   into exit codes ([`InputError`], [`JobFileError`], [`KeyError`]), printed with
//!   [`error_chain`];
//! - limits the tests check against ([`MAX_JOBS`], [`MAX_UNANSWERED_POSTS`]) and what the fuzz
//!   targets call ([`parse_job_file`], [`check_job_name`], and the hidden `flow_depth`);
//! - [`sim`], the simulated Krea API (below).
//!
//! Why so narrow: the engine, the store, the client and the seam change as the engine does;
//! private, they can change without a semver promise, and rustc reports what nobody uses
//! (`dead_code`), where `pub` says more than is true (`unreachable_pub`) and what the surface
//! leaves undocumented (`missing_docs`). The engine's own tests live inside the crate
//! (`runner/tests.rs`, with `runner/doubles.rs`), so they need no public engine. The
//! command-line types belong to the binary, which declares `cli.rs` itself.
//!
//! # The simulation
//!
//! [`sim`] is the one public module. It is a model of Krea, not a part of krea-batch: its files
//! are private and `sim/mod.rs` re-exports its own surface, as a crate's root would, for the
//! tests, the benchmark and `--simulate`. It imports nothing from the rest of the crate, and
//! `tests/it/layers.rs` checks that. It could be a crate of its own in a workspace (issue 11
//! allows it); it stays a module because that boundary would be the same one, enforced by the
//! compiler instead of by a test, at the price of a second manifest whose dependencies must be
//! kept in step with this one and a `cargo test` that has to name both packages for the
//! simulation's unit tests to run.

mod address;
mod api;
mod asset;
mod beside;
mod chain;
mod check;
mod control;
mod costs;
mod daemon;
mod dimensions;
mod download;
mod error;
mod files;
mod gallery;
mod inbox;
mod job;
mod jobfile;
mod journal;
mod key;
mod metrics;
mod models;
mod openapi;
mod output;
mod pace;
mod pricing;
mod reconcile;
mod recover;
mod report;
mod rerun;
mod retry;
mod reuse;
mod run;
mod runner;
mod schema;
mod seam;
mod selection;
mod setup;
pub mod sim;
mod status;
mod store;
#[cfg(test)]
mod testlog;
mod uploads;

// The commands.

/// The answer of [`plan`], printed or as JSON.
pub use check::Plan;
/// `krea-batch check`: what a job file would do and cost, nothing sent.
pub use check::plan;
/// `krea-batch cancel`: through the running process when there is one, else at Krea.
pub use control::cancel;
/// `krea-batch resume`: the running process probes whether it may submit again.
pub use control::resume;
/// The service's configuration file, also read to find its state file.
pub use daemon::DaemonConfig;
/// What the binary's signal handlers tell [`run_daemon`]: drain and stop, or reload.
pub use daemon::DaemonSignals;
/// `krea-batch daemon`: the service, until [`DaemonSignals::shutdown`].
pub use daemon::run as run_daemon;
/// One field of a model's request body, in [`ModelDetail`].
pub use models::FieldInfo;
/// `krea-batch models PATH`: one model's fields.
pub use models::ModelDetail;
/// `krea-batch models`: every model of the document.
pub use models::ModelList;
/// One model of [`ModelList`].
pub use models::ModelSummary;
/// The answer of [`models()`], printed or as JSON.
pub use models::Models;
/// `krea-batch models [PATH]`: the models of Krea's OpenAPI document, or one model's fields.
pub use models::models;
/// What [`recover`] needs besides the job file.
pub use recover::RecoverOptions;
/// What [`recover`] found and recorded.
pub use recover::RecoverReport;
/// `krea-batch recover`: a lost state file rebuilt from the output folder and Krea's records.
pub use recover::recover;
/// One failed job in a [`RetryPlan`].
pub use rerun::RetryJob;
/// What `krea-batch retry` would run again, and its estimated cost.
pub use rerun::RetryPlan;
/// `krea-batch retry`: puts the jobs of a [`RetryPlan`] back to pending, their failures kept.
pub use rerun::retry_jobs;
/// `krea-batch retry`: which failed jobs would run again, and their cost; reads only.
pub use rerun::retry_plan;
/// Whether [`run`] runs everything or only fetches missing result files.
pub use run::Mode;
/// What [`run`] needs besides the job file: the key, the API, the places, the stop controls.
pub use run::RunOptions;
/// What [`run`] ended with.
pub use run::RunResult;
/// `krea-batch run` and `krea-batch download` ([`Mode`]): a job file run end to end, from
/// the state file it resumes to the summary it ends with.
pub use run::run;
/// Which jobs [`cancel`] cancels and [`retry_plan`] runs again.
pub use selection::Selection;
/// The answer of [`status`], printed or as JSON.
pub use status::Status;
/// `krea-batch status`: a state file read, also while a run writes it.
pub use status::status;

// What the commands take.

/// A folder of images a job file takes jobs from (`from: photos/`), as `check` reports it.
pub use jobfile::FolderUse;
/// A validated job file: its settings and one job per generation.
pub use jobfile::JobFile;
/// Why a job file was refused: the file, the place, the key and what to do (exit code 2).
pub use jobfile::JobFileError;
/// The most jobs one job file may expand to.
pub use jobfile::MAX_JOBS;
/// What a folder of images held that gave no job (hidden files, subfolders, other types).
pub use jobfile::Skipped;
/// Reads and validates a job file; every refusal names the file, line, column and key.
pub use jobfile::load as load_job_file;
/// The output folder a job file names, read without validating the rest (for `status`).
pub use jobfile::output_dir_of;
/// Parses job-file text, as [`load_job_file`] does after reading the file; for the fuzz target.
pub use jobfile::parse as parse_job_file;
/// A YAML file that is not the settings it should be, with its file, line and column.
pub use jobfile::yaml::YamlError;
/// Reads one YAML document into a settings type (the simulation's configuration); the one way
/// in to the YAML crate outside the job file.
pub use jobfile::yaml::parse_document as parse_yaml_document;
/// The API key, which no log line, error or file shows.
pub use key::ApiKey;
/// Why no usable key was found (exit code 2).
pub use key::KeyError;
/// The key [`load_key`] found, where it found it, and a warning about its file's permissions.
pub use key::LoadedKey;
/// Finds the API key: `--api-key-file`, then `KREA_API_KEY`, then the systemd credential.
pub use key::load as load_key;
/// Which OpenAPI document the schema check uses, and whether a failed check stops a run.
pub use openapi::SchemaChoice;
/// A job file's request bodies checked against Krea's OpenAPI document, for [`plan`].
pub use openapi::schema_report;
/// What [`places`] answers.
pub use setup::Places;
/// The state file's name inside the output folder.
pub use setup::STATE_FILE;
/// The API base URL a command line names, else Krea's (for commands without a job file).
pub use setup::api_base_url;
/// The API base URL of a job file, unless the command line overrides it.
pub use setup::base_url;
/// Refuses, as a usage error, a command that reads a state file that is not there.
pub use setup::existing_state;
/// The output folder and state file of a job file, as `--state` and `--simulate` change them.
pub use setup::places;
/// [`places`] for a job file on disk, reading no more of it than its `output:` line.
pub use setup::places_of;

// How a run is steered and watched, and how it ends.

/// An error and its causes in one line, each cause said once: how the binary prints errors.
pub use api::error_chain;
/// Bad input or usage, from any layer: the binary's exit code 2.
pub use error::InputError;
/// Whether a job name is safe as a file name in the output folder; for the fuzz target.
pub use job::check_name as check_job_name;
#[doc(hidden)]
pub use jobfile::flow_depth;
/// Log writers whose lines carry their journald priority (`<4>` for a warning).
pub use journal::{PrefixedLines, Prioritised};
/// The end of a run: counts, files, spend, why it stopped; printed or as JSON.
pub use report::Summary;
/// The progress bar's look (one line at 80 columns; no time left claimed before a job ends).
pub use report::progress_style;
/// Shows a run's live counts on a progress bar or as log lines.
pub use report::show_progress;
/// Stop switches handed to a run: stop submitting (first Ctrl-C), drain, abort (second Ctrl-C).
pub use runner::Controls;
/// Jobs by where they stand: in [`EngineStatus`], [`Summary`] and [`Status`], and what the
/// binary's exit code is decided from.
pub use runner::Counts;
/// The live counts a run publishes, for [`show_progress`].
pub use runner::EngineStatus;
/// Attempts of one job that may go unanswered before the job fails.
pub use runner::MAX_UNANSWERED_POSTS;
/// Why the service's submitting is paused, since and until when, in [`Status`].
pub use runner::Pause;
/// A job that was to be cancelled and that Krea ran and billed all the same, in [`Summary`].
pub use runner::RefusedCancel;
/// Why a run stopped submitting early; the binary turns it into an exit code.
pub use runner::StopReason;
