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
//! | `jobfile/` | the YAML job file as users write it (sweeps included), validated into jobs with precise errors |
//! | `key.rs` | where the API key comes from; the type that keeps it out of logs |
//! | `beside.rs` | opening a file named relative to a folder without leaving it (no `..`, no links) |
//! | `inbox.rs` | the daemon's inbox: noticing complete job files, moving them to accepted/ or rejected/ |
//! | `metrics.rs` | the optional Prometheus /metrics endpoint of the daemon (loopback only) |
//! | `pricing.rs` | the price table: what a generation costs, for estimates |
//! | `costs.rs` | a job file's estimated cost per model, and whether a budget can count it |
//! | `api.rs` | the Krea HTTP client: wire types, lenient parsing, status-code classification |
//! | `asset.rs` | Krea's assets on the wire: the upload form, the asset and its list |
//! | `pace.rs` | the submission pacer (governor) and the shared back-off after 429s |
//! | `retry.rs` | the retry policy (backoff crate): what is transient, how long to wait |
//! | `store/` | the SQLite state file: jobs, attempts, files; schema versions; one writer thread |
//! | `error.rs` | [`error::InputError`]: bad input or usage (exit 2), raised at any layer |
//! | `files.rs` | general file helpers: atomic writes, real folders (no links), temporary files of a killed run |
//! | `download.rs` | streaming result files to disk atomically, with sidecars, deadlines and a rate floor |
//! | `address.rs` | which addresses result URLs may reach: the SSRF guard and its DNS resolver |
//! | `output.rs` | the output folder as krea-batch's own: its marker (which state owns it), its lock, results the state does not know |
//! | `runner/` | the engine: ties jobs, pacer, API, store and downloads together; its vocabulary (`StopReason`, `Counts`, `EngineStatus`) in `runner/status.rs`, which imports only `job` and `store` |
//! | `seam.rs` | what the engine needs from the world (Krea, result hosts, the clock), as interfaces with the real and the refusing implementations; below the engine, so `reconcile` uses it without importing the engine |
//! | `openapi.rs` | Krea's OpenAPI document: fetched, cached, each model's request schema; a job file checked against it |
//! | `schema.rs` | checking a request body against its model's JSON Schema (a subset) |
//! | `recover.rs` | `krea-batch recover`: a lost state file rebuilt from the output folder and Krea's records (command) |
//! | `uploads.rs` | local input files uploaded once per content (recorded before each POST, a lost answer found again with `GET /assets`), their URLs put into the bodies the engine sends |
//! | `reconcile.rs` | finding at Krea the jobs whose submission got no answer, never paying twice |
//! | `reuse.rs` | results the state already paid for, linked into a new output folder instead of paid again |
//! | `report.rs` | progress display, the run summary, the manifest |
//! | `gallery.rs` | `index.html`: the batch as a static page of results |
//! | `setup.rs` | setting a run up and down: places, the store opened and guarded (locks, API base, output folder claim), clients, writer, engine, requests forwarded |
//! | `run.rs` | `krea-batch run` and `download`: a job file end to end (command) |
//! | `check.rs` | `krea-batch check`: the plan, nothing sent (command) |
//! | `status.rs` | `krea-batch status`: a state file read (command) |
//! | `daemon/` | `krea-batch daemon`: the service around the engine (inbox, systemd, signals) (command) |
//! | `cli.rs` | the command line (clap types) |
//! | `control.rs` | `cancel` and `resume`: acting on a state file, with or without a running process (command) |
//! | `sim/` | the simulated Krea API used by tests, the benchmark and `--simulate` |
//!
//! # Dependency direction
//!
//! `job` and `pricing` do no I/O; `jobfile` reads only the job file and the data and input
//! files beside it. `api` knows HTTP but not job states. `store` knows jobs but not HTTP. `runner` is the one
//! module that ties them together. `setup` builds on `runner`, `store`, `output` and the clients;
//! `uploads` builds on `seam`, `store` and `jobfile` (the engine never sees a local file);
//! the commands (`run`, `check`, `status`, `control`, `recover`, `daemon`) build on `setup`, and no
//! module imports a command; `main` sits on top. The simulation depends on nothing else in
//! the crate: it models Krea, not krea-batch.

pub mod address;
pub mod api;
pub mod asset;
pub mod beside;
pub mod check;
pub mod cli;
pub mod control;
pub mod costs;
pub mod daemon;
pub mod download;
pub mod error;
pub mod files;
pub mod gallery;
pub mod inbox;
pub mod job;
pub mod jobfile;
pub mod key;
pub mod metrics;
pub mod openapi;
pub mod output;
pub mod pace;
pub mod pricing;
pub mod reconcile;
pub mod recover;
pub mod report;
pub mod retry;
pub mod reuse;
pub mod run;
pub mod runner;
pub mod schema;
pub mod seam;
pub mod setup;
pub mod sim;
pub mod status;
pub mod store;
pub mod uploads;
