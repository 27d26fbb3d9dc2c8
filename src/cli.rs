//! The command line: clap types only. `main.rs` turns them into calls into the library.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// The heading under which every command's `--help` lists the options all commands take, apart
/// from the command's own.
const GLOBAL: &str = "Global options";

/// Runs batches of Krea AI generations from a YAML file: paced, resumable, never paying twice.
#[derive(Debug, Parser)]
#[command(name = "krea-batch", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// More detail in the log (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    pub verbose: u8,
    /// Only warnings and errors in the log.
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = GLOBAL)]
    pub quiet: bool,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, help_heading = GLOBAL)]
    pub log_format: LogFormat,
    /// Colours in the log: `auto` colours on a terminal unless `NO_COLOR` is set (and not under
    /// journald); `always` and `never` decide regardless.
    #[arg(
        long,
        value_enum,
        value_name = "WHEN",
        default_value_t = ColorChoice::Auto,
        global = true,
        help_heading = GLOBAL
    )]
    pub color: ColorChoice,
}

/// When the log is coloured (`--color`), as in ripgrep and cargo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorChoice {
    /// On a terminal, unless `NO_COLOR` is set to anything but the empty string.
    Auto,
    /// Always, even into a file or a pipe.
    Always,
    /// Never.
    Never,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines (no timestamps under journald; colours as `--color` says).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Generate every job of a job file, resuming where an earlier run stopped.
    #[command(
        after_help = "Examples:\n  krea-batch run jobs.yaml\n  krea-batch run jobs.yaml --simulate"
    )]
    Run(RunArgs),
    /// Fetch the missing files of completed jobs from their stored URLs; submits nothing and
    /// needs no key.
    #[command(
        after_help = "Examples:\n  krea-batch download jobs.yaml\n  krea-batch download jobs.yaml --simulate"
    )]
    Download(DownloadArgs),
    /// Validate a job file and print the plan (jobs, models, estimated cost); sends nothing.
    #[command(
        after_help = "Examples:\n  krea-batch check jobs.yaml\n  krea-batch check jobs.yaml --simulate --json"
    )]
    Check(CheckArgs),
    /// Rebuild a lost, emptied or rolled-back state file from the output folder (manifest,
    /// sidecars) and Krea's records; submits nothing.
    #[command(
        after_help = "Examples:\n  krea-batch recover jobs.yaml\n  krea-batch recover jobs.yaml --simulate"
    )]
    Recover(RecoverArgs),
    /// Show the jobs of a state file by state (also while a run is going).
    #[command(
        after_help = "Examples:\n  krea-batch status jobs.yaml\n  krea-batch status --config /etc/krea-batch/daemon.yaml --json"
    )]
    Status(StatusArgs),
    /// Run as a service: take job files from an inbox, for as long as it runs (systemd).
    #[command(after_help = "Examples:\n  krea-batch daemon --config /etc/krea-batch/daemon.yaml")]
    Daemon(DaemonArgs),
    /// Cancel jobs: pending ones are never sent, jobs in flight are cancelled at Krea.
    #[command(
        after_help = "Examples:\n  krea-batch cancel --file jobs.yaml --all\n  krea-batch cancel --file jobs.yaml fox-1"
    )]
    Cancel(CancelArgs),
    /// Ask a running daemon (or run) to probe now whether submitting may resume, after a top-up.
    #[command(
        after_help = "Examples:\n  krea-batch resume jobs.yaml\n  krea-batch resume --config /etc/krea-batch/daemon.yaml"
    )]
    Resume(ResumeArgs),
    /// Run the simulated Krea API as a server, for trying job files and for tests; or top up a
    /// simulation's balance (--top-up).
    #[command(after_help = SIMULATE_EXAMPLES, after_long_help = simulate_long_help())]
    SimulateApi(SimulateArgs),
    /// List the models of Krea's OpenAPI document (kind, required fields, time, price), or
    /// one model's fields with their types, ranges and defaults.
    #[command(
        after_help = "Examples:\n  krea-batch models\n  krea-batch models image/bfl/flux-1-dev --json"
    )]
    Models(ModelsArgs),
    /// Run failed jobs of a job file again, on purpose: shows their estimated cost and asks
    /// first (--yes: without asking).
    #[command(
        after_help = "Examples:\n  krea-batch retry jobs.yaml --failed\n  krea-batch retry jobs.yaml fox-1 fox-2 --yes"
    )]
    Retry(RetryArgs),
    /// Print a shell completion script on stdout.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Print the man page (roff) on stdout, or write one page per command into a folder.
    #[command(
        after_help = "Examples:\n  krea-batch man | man -l -\n  krea-batch man --dir ~/.local/share/man/man1"
    )]
    Man(ManArgs),
}

/// `simulate-api --help`'s examples.
const SIMULATE_EXAMPLES: &str = "Examples:\n  krea-batch simulate-api --port 8080\n  \
                                 krea-batch simulate-api --top-up 5 --port 8080";

/// `simulate-api --help`: the simulation's settings, then the examples, last as everywhere.
fn simulate_long_help() -> String {
    format!("{}\n\n{SIMULATE_EXAMPLES}", krea_batch::sim::config_keys_help().trim_end())
}

/// `completions --help`'s examples: where bash, zsh and fish look for them.
const COMPLETIONS_EXAMPLES: &str = "Examples:\n  \
    krea-batch completions bash > ~/.local/share/bash-completion/completions/krea-batch\n  \
    krea-batch completions zsh > ~/.zfunc/_krea-batch";

/// `krea-batch completions`.
#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `krea-batch man`.
#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Write `krea-batch.1` and a `krea-batch-COMMAND.1` for every command into DIR (made if
    /// needed) instead of printing the one page.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `krea-batch models`.
#[derive(Debug, Args)]
pub(crate) struct ModelsArgs {
    /// One model (`image/bfl/flux-1-dev`): its fields, with types, ranges and defaults.
    pub path: Option<String>,
    /// Print as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The API base URL whose document to read (default: Krea's).
    #[arg(long, env = "KREA_API_BASE", value_name = "URL")]
    pub api_base: Option<String>,
    /// The models of the built-in simulation (what `run --simulate` accepts).
    #[arg(long, conflicts_with_all = ["api_base", "offline", "openapi"])]
    pub simulate: bool,
    /// Where the document comes from.
    #[command(flatten)]
    pub schema: SchemaArgs,
}

/// `krea-batch retry`: the options of `run`, and which failed jobs to run again.
#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    /// What `run` takes: the job file first, and the same options.
    #[command(flatten)]
    pub run: RunArgs,
    /// Names of the failed jobs to run again.
    #[arg(required_unless_present = "failed", conflicts_with = "failed")]
    pub names: Vec<String>,
    /// Run every failed job of the job file again.
    #[arg(long)]
    pub failed: bool,
    /// Do not ask: go ahead after showing the estimated cost (needed without a terminal).
    #[arg(short, long)]
    pub yes: bool,
}

/// `krea-batch daemon`.
#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE", default_value = "/etc/krea-batch/daemon.yaml")]
    pub config: PathBuf,
    /// Read the API key from this file (instead of `KREA_API_KEY` or the systemd credential).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
}

/// Which state file a command acts on.
#[derive(Debug, Args)]
pub(crate) struct StateChoice {
    /// The state file.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub state: Option<PathBuf>,
    /// The daemon's configuration file (its state file).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The state of a `run --simulate`: the one in the job file's `<output>-simulated` folder.
    #[arg(long, conflicts_with = "config")]
    pub simulate: bool,
}

/// `krea-batch cancel`.
#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    /// Names of the jobs to cancel (among --file's jobs when it is given).
    #[arg(required_unless_present_any = ["file", "all"])]
    pub names: Vec<String>,
    /// The job file whose jobs to cancel (a path, or its name in the daemon's inbox): all of
    /// them, or the NAMES given. With neither --state nor --config, its state file is found
    /// from it, as `status` finds it.
    #[arg(long, value_name = "FILE")]
    pub file: Option<String>,
    /// Cancel every job not yet finished (of --file, when it is given).
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
    /// Which state file.
    #[command(flatten)]
    pub target: StateChoice,
    /// Read the API key from this file (needed only when no krea-batch is running and jobs are
    /// in flight).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
}

/// `krea-batch resume`.
#[derive(Debug, Args)]
pub(crate) struct ResumeArgs {
    /// The job file whose run to ask (its default state file), unless --state or --config is
    /// given.
    #[arg(required_unless_present_any = ["state", "config"])]
    pub job_file: Option<String>,
    /// Which state file.
    #[command(flatten)]
    pub target: StateChoice,
}

/// Where the API is and how to authenticate.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// The API base URL, instead of the job file's `api.base_url` (https, or http on loopback).
    #[arg(long, env = "KREA_API_BASE", value_name = "URL")]
    pub api_base: Option<String>,
    /// Read the API key from this file (instead of `KREA_API_KEY` or the systemd credential).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
}

/// `krea-batch run`.
#[derive(Debug, Args)]
#[allow(clippy::struct_excessive_bools, reason = "command-line switches are booleans")]
pub(crate) struct RunArgs {
    /// The job file (YAML).
    pub job_file: PathBuf,
    /// The state file (default: `.krea-batch.sqlite` in the output directory).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Run against the built-in simulation of the Krea API instead of Krea: nothing is spent.
    /// Results go to the output directory with `-simulated` appended.
    #[arg(long)]
    pub simulate: bool,
    /// The simulation's settings (YAML), with --simulate.
    #[arg(long, value_name = "FILE", requires = "simulate")]
    pub simulate_config: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// API settings.
    #[command(flatten)]
    pub api: ApiArgs,
    /// Schema checking.
    #[command(flatten)]
    pub schema: SchemaArgs,
    /// Run even if the job file does not fit Krea's request schemas.
    #[arg(long)]
    pub no_validate: bool,
    /// Write into an output folder that holds files krea-batch did not write (it still never
    /// replaces them).
    #[arg(long)]
    pub force: bool,
    /// Generate again even the jobs this state already completed for another job file (by
    /// default their results are reused, not paid again).
    #[arg(long)]
    pub fresh: bool,
}

/// Where Krea's OpenAPI document (the request schemas) comes from.
#[derive(Debug, Args)]
pub(crate) struct SchemaArgs {
    /// Use only the cached OpenAPI document, whatever its age; fetch nothing.
    #[arg(long)]
    pub offline: bool,
    /// Check against this OpenAPI document instead of `<api>/openapi.json`.
    #[arg(long, value_name = "FILE")]
    pub openapi: Option<PathBuf>,
}

/// `krea-batch download`.
#[derive(Debug, Args)]
pub(crate) struct DownloadArgs {
    /// The job file (YAML) whose results to fetch.
    pub job_file: PathBuf,
    /// The state file (default: `.krea-batch.sqlite` in the output directory).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// The results of a `run --simulate` (in `<output>-simulated`), from the simulated account
    /// kept beside them.
    #[arg(long)]
    pub simulate: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `krea-batch recover`.
#[derive(Debug, Args)]
pub(crate) struct RecoverArgs {
    /// The job file (YAML) whose output folder to recover.
    pub job_file: PathBuf,
    /// The state file to rebuild (default: `.krea-batch.sqlite` in the output directory).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// The results of a `run --simulate` (in `<output>-simulated`), asking the simulated
    /// account kept beside them instead of Krea.
    #[arg(long)]
    pub simulate: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// API settings.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `krea-batch check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The job file (YAML).
    pub job_file: PathBuf,
    /// Print the plan as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The API base URL, instead of the job file's `api.base_url` (where the schemas come from).
    #[arg(long, env = "KREA_API_BASE", value_name = "URL")]
    pub api_base: Option<String>,
    /// The plan of `run --simulate`: checked against the simulation's schemas, and resumed from
    /// the state in `<output>-simulated`.
    #[arg(long, conflicts_with = "api_base")]
    pub simulate: bool,
    /// Schema checking.
    #[command(flatten)]
    pub schema: SchemaArgs,
}

/// `krea-batch status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The job file whose state to show (its default state file), unless --state or --config
    /// is given.
    #[arg(required_unless_present_any = ["state", "config"])]
    pub job_file: Option<String>,
    /// Which state file.
    #[command(flatten)]
    pub target: StateChoice,
    /// Print as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `krea-batch simulate-api`.
#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// Port of the API (0: any free port; the address is printed). With --top-up: the port of
    /// the running simulation to top up.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Port of the result-file host (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub files_port: u16,
    /// The simulation's settings (YAML; the keys are listed below under --help, and
    /// --print-config prints them with their defaults).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The API key the simulation accepts (default: its config's, `sim-key`).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// The prepaid balance in USD (of a new world: a kept world keeps its own).
    #[arg(long, value_name = "USD")]
    pub balance: Option<f64>,
    /// Keep the simulated account (its jobs, ids and balance) in FILE, and take it up again on
    /// the next start, as `run --simulate` does in `<output>-simulated/.krea-batch-sim.json`.
    #[arg(long, value_name = "FILE")]
    pub world: Option<PathBuf>,
    /// Add USD to a simulation's balance and exit: of the one running on --port, or of the
    /// world in --world (topped up in the file, or through the simulation serving it).
    #[arg(long, value_name = "USD", conflicts_with_all = ["files_port", "balance", "print_config"])]
    pub top_up: Option<f64>,
    /// Print every setting with its default and what it does (a valid --config file), and exit.
    #[arg(long)]
    pub print_config: bool,
}
