//! The `krea-batch` binary: parses the command line, sets up logging and signals, calls the
//! library, and turns the outcome into an exit code. Everything else lives in the library.
//!
//! Exit codes: 0 every job completed; 1 some failed (or were cancelled, lost, left unknown or
//! with downloads pending); 2 bad input or usage; 3 stopped by 402 (balance exhausted);
//! 4 the API key was refused; 5 stopped by the budget; 130 interrupted.

mod cli;

use clap::Parser as _;
use cli::{
    CancelArgs, CheckArgs, Cli, ColorChoice, Command, DaemonArgs, DownloadArgs, LogFormat, ManArgs,
    ModelsArgs, RecoverArgs, ResumeArgs, RetryArgs, RunArgs, SchemaArgs, SimulateArgs, StateChoice,
    StatusArgs,
};
use krea_batch::sim::{self, FileTopUp, SimConfig, SimError, SimServer, WorldFileError};
use krea_batch::{
    Controls, DaemonConfig, DaemonSignals, EngineStatus, InputError, JobFileError, KeyError, Mode,
    RunOptions, SchemaChoice, Selection, StopReason, Summary,
};
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

/// `print!` to stdout through [`print_out`]: a reader that stops early is no error.
macro_rules! out {
    ($($arg:tt)*) => { print_out(&format!($($arg)*))? };
}

/// `println!` to stdout through [`print_out`].
macro_rules! outln {
    ($($arg:tt)*) => { print_out(&format!("{}\n", format_args!($($arg)*)))? };
}

/// Every job completed.
const EXIT_OK: u8 = 0;
/// Some jobs did not complete.
const EXIT_SOME_FAILED: u8 = 1;
/// Bad input or usage.
const EXIT_BAD_INPUT: u8 = 2;
/// Stopped by 402.
const EXIT_PAYMENT_REQUIRED: u8 = 3;
/// The key was refused.
const EXIT_AUTH: u8 = 4;
/// Stopped because the next job would exceed the budget.
const EXIT_BUDGET: u8 = 5;
/// Interrupted.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A retry that asks first shows no bar: it would draw over the question.
    let run_args = match &cli.command {
        Command::Run(args) => Some(args),
        Command::Retry(retry) if retry.yes => Some(&retry.run),
        _ => None,
    };
    let progress_bar = run_args
        .filter(|args| !args.no_progress && !cli.quiet && std::io::stderr().is_terminal())
        .map(|_| new_progress_bar());
    init_logging(&cli, progress_bar.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("krea-batch: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(dispatch(cli, progress_bar));
    ExitCode::from(code)
}

async fn dispatch(cli: Cli, progress_bar: Option<indicatif::ProgressBar>) -> u8 {
    let result = match cli.command {
        Command::Run(args) => run_reporting_failure(args, progress_bar).await,
        Command::Download(args) => download(args).await,
        Command::Check(args) => check(args).await,
        Command::Recover(args) => recover(args).await,
        Command::Status(args) => status(&args),
        Command::Daemon(args) => run_daemon(args).await,
        Command::Cancel(args) => cancel(args).await,
        Command::Resume(args) => resume(args).await,
        Command::SimulateApi(args) => simulate_api(args).await,
        Command::Models(args) => models(args).await,
        Command::Retry(args) => retry(args, progress_bar).await,
        Command::Completions(args) => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut command, "krea-batch", &mut script);
            print_out(&String::from_utf8_lossy(&script)).map(|()| EXIT_OK).map_err(Into::into)
        }
        Command::Man(args) => man(&args),
    };
    result.unwrap_or_else(|err| {
        let code = if is_input_error(&err) { EXIT_BAD_INPUT } else { EXIT_SOME_FAILED };
        eprintln!("krea-batch: {}", describe(&err));
        code
    })
}

/// `err` and its causes in one line, each cause said once: most errors quote their source in
/// their own message and also keep it as their source.
fn describe(err: &anyhow::Error) -> String {
    krea_batch::error_chain(err.as_ref())
}

/// Errors that mean "fix the input and try again": exit code 2.
fn is_input_error(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<InputError>() || cause.is::<JobFileError>() || cause.is::<KeyError>()
    })
}

/// `run`, and with `--json` a JSON answer on stdout even when the run stops on an error (a full
/// disk, a read-only state file, a bad job file): `{error, exit_code, counts, …}`, the counts
/// read from the state file when it can be read, so a script always has something to parse.
async fn run_reporting_failure(
    args: RunArgs,
    progress_bar: Option<indicatif::ProgressBar>,
) -> anyhow::Result<u8> {
    let json = args.json;
    let mut state = None;
    let result = run(args, progress_bar, &mut state).await;
    if let (Err(err), true) = (&result, json) {
        outln!("{}", failure_json(err, state.as_deref()));
    }
    result
}

/// The `--json` answer of a run that stopped on `err`; `state` is the state file, once known.
fn failure_json(err: &anyhow::Error, state: Option<&std::path::Path>) -> String {
    let code = if is_input_error(err) { EXIT_BAD_INPUT } else { EXIT_SOME_FAILED };
    let status = state.and_then(|path| krea_batch::status(path).ok());
    let value = serde_json::json!({
        "error": describe(err),
        "exit_code": code,
        "stopped": "error",
        "state_file": state.map(|path| path.display().to_string()),
        "counts": status.as_ref().map(|status| &status.counts),
        "spend_usd": status.as_ref().map(|status| status.spent_usd),
        "unknown": status.as_ref().map(|status| &status.unknown),
        "download_pending": status.as_ref().map(|status| &status.download_pending),
    });
    serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
}

async fn run(
    args: RunArgs,
    progress_bar: Option<indicatif::ProgressBar>,
    state: &mut Option<std::path::PathBuf>,
) -> anyhow::Result<u8> {
    let file = krea_batch::load_job_file(&args.job_file)?;
    let places = krea_batch::places(&file, args.state.as_deref(), args.simulate);
    *state = Some(places.state.clone());
    let mut api_base = args.api.api_base.clone();
    let mut simulation = None;
    let mut world = None;
    let key = if args.simulate {
        let config = match &args.simulate_config {
            Some(path) => load_sim_config(path)?,
            None => SimConfig::default(),
        };
        // The simulated account lives beside the simulated results, so a rerun finds its jobs,
        // ids and balance as a rerun against Krea would.
        let path = places.output_dir.join(sim::WORLD_FILE);
        let server = SimServer::start_with_world(config, &path).await.map_err(sim_error)?;
        tracing::info!(api = %server.base_url(), "running against the simulated Krea API: nothing is spent");
        api_base = Some(server.base_url());
        let key = krea_batch::ApiKey::new(server.api_key())?;
        world = Some((path, server.world_id().map(str::to_owned)));
        simulation = Some(server);
        key
    } else {
        api_key(args.api.api_key_file.as_deref())?
    };

    let controls = Controls::default();
    tokio::spawn(watch_signals(controls.clone()));
    let (status_tx, status_rx) = tokio::sync::watch::channel(EngineStatus::default());
    let progress =
        tokio::spawn(krea_batch::show_progress(status_rx, progress_bar, Duration::from_secs(10)));
    let options = RunOptions {
        mode: Mode::Run,
        schema: schema_choice(&args.schema, args.no_validate),
        state: args.state.clone(),
        api_base,
        key: Some(key),
        simulated: args.simulate,
        simulation: world.as_ref().and_then(|(_, id)| id.clone()),
        force: args.force,
        fresh: args.fresh,
        controls,
        status: status_tx,
    };
    let result = krea_batch::run(file, options).await;
    let _ = progress.await;
    if let Some(server) = simulation {
        server.shutdown().await;
    }
    let summary = result?.summary;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    }
    eprint!("{summary}");
    if let (Some((path, _)), Some(StopReason::PaymentRequired)) = (&world, summary.stopped) {
        eprintln!(
            "The simulated balance is spent. Top it up, then run the same command again:\n  \
             krea-batch simulate-api --top-up 5 --world {}",
            shell_word(&path.to_string_lossy())
        );
    }
    Ok(exit_code(&summary))
}

/// A simulation that cannot start: a world file in use or unreadable is the user's to sort
/// out (exit 2).
fn sim_error(err: SimError) -> anyhow::Error {
    match err {
        SimError::World(
            err @ (WorldFileError::InUse { .. } | WorldFileError::Unreadable { .. }),
        ) => InputError::new(err).into(),
        err => err.into(),
    }
}

/// `text` as one word a POSIX shell reads back as it is: bare when it is plain, else quoted.
fn shell_word(text: &str) -> String {
    let plain = !text.is_empty()
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain { text.to_owned() } else { format!("'{}'", text.replace('\'', r"'\''")) }
}

async fn download(args: DownloadArgs) -> anyhow::Result<u8> {
    let file = krea_batch::load_job_file(&args.job_file)?;
    let places = krea_batch::places(&file, args.state.as_deref(), args.simulate);
    krea_batch::existing_state(&places.state)?;
    // Simulated results are fetched from the simulated account's file host, served again.
    let simulation = if args.simulate { serve_kept_world(&places.output_dir).await? } else { None };
    let controls = Controls::default();
    tokio::spawn(watch_signals(controls.clone()));
    let (status, _) = tokio::sync::watch::channel(EngineStatus::default());
    let options = RunOptions {
        mode: Mode::DownloadOnly,
        schema: SchemaChoice::default(),
        state: args.state,
        api_base: None,
        key: None,
        simulated: args.simulate,
        simulation: None,
        force: false,
        fresh: false,
        controls,
        status,
    };
    let result = krea_batch::run(file, options).await;
    if let Some(server) = simulation {
        server.shutdown().await;
    }
    let summary = result?.summary;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    }
    eprint!("{summary}");
    Ok(if summary.counts.download_pending == 0 { EXIT_OK } else { EXIT_SOME_FAILED })
}

async fn recover(args: RecoverArgs) -> anyhow::Result<u8> {
    let file = krea_batch::load_job_file(&args.job_file)?;
    let mut simulation = None;
    let options = if args.simulate {
        // Krea's records are the simulated account's, kept beside the simulated results.
        let dir = krea_batch::places(&file, args.state.as_deref(), true).output_dir;
        let Some(server) = serve_kept_world(&dir).await? else {
            return Err(InputError::msg(format!(
                "there is no simulated account to ask in {} (its {} is missing, or a run is \
                 using it now): recover --simulate rebuilds the state of a `run --simulate` from \
                 the account it kept",
                dir.display(),
                sim::WORLD_FILE
            ))
            .into());
        };
        let options = krea_batch::RecoverOptions {
            state: args.state,
            api_base: Some(server.base_url()),
            key: krea_batch::ApiKey::new(server.api_key())?,
            simulated: true,
            simulation: server.world_id().map(str::to_owned),
        };
        simulation = Some(server);
        options
    } else {
        krea_batch::RecoverOptions {
            state: args.state,
            api_base: args.api.api_base,
            key: api_key(args.api.api_key_file.as_deref())?,
            simulated: false,
            simulation: None,
        }
    };
    let result = krea_batch::recover(file, options).await;
    if let Some(server) = simulation {
        server.shutdown().await;
    }
    let report = result?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    }
    eprint!("{report}");
    Ok(EXIT_OK)
}

/// The API key from `--api-key-file`, `KREA_API_KEY` or the systemd credential, with a
/// warning when its file is readable by others: one loader for every command that needs it.
fn api_key(file: Option<&std::path::Path>) -> Result<krea_batch::ApiKey, KeyError> {
    let loaded = krea_batch::load_key(file, |name| std::env::var(name).ok())?;
    if let Some(warning) = &loaded.permission_warning {
        tracing::warn!("{warning}");
    }
    tracing::debug!(source = %loaded.source, "API key found");
    Ok(loaded.key)
}

async fn run_daemon(args: DaemonArgs) -> anyhow::Result<u8> {
    let key = api_key(args.api_key_file.as_deref())?;
    let signals = DaemonSignals::default();
    tokio::spawn(watch_daemon_signals(signals.clone()));
    krea_batch::run_daemon(&args.config, key, signals).await?;
    Ok(EXIT_OK)
}

/// The state file a command names: `--state`, the daemon's `--config`, or a job file's default
/// (with `--simulate`, that of its simulated run). It must exist: a command that reads a state
/// never creates one.
fn state_path(choice: &StateChoice, job_file: Option<&str>) -> anyhow::Result<std::path::PathBuf> {
    let path = if let Some(state) = &choice.state {
        state.clone()
    } else if let Some(config) = &choice.config {
        DaemonConfig::load(config).map_err(InputError::new)?.state
    } else if let Some(file) = job_file {
        krea_batch::places_of(std::path::Path::new(file), None, choice.simulate)?.state
    } else {
        return Err(InputError::msg(
            "name where the jobs are: --file JOBS.yaml (the job file that was run), --state \
             FILE or --config DAEMON.yaml",
        )
        .into());
    };
    krea_batch::existing_state(&path)?;
    Ok(path)
}

/// The simulated account kept in `dir` by `run --simulate`, served again so that a command
/// reading its results reaches it; `None` when there is none, or while a run serves it.
async fn serve_kept_world(dir: &std::path::Path) -> anyhow::Result<Option<SimServer>> {
    let path = dir.join(sim::WORLD_FILE);
    if !path.exists() {
        return Ok(None);
    }
    match SimServer::start_with_world(SimConfig::default(), &path).await {
        Ok(server) => Ok(Some(server)),
        Err(SimError::World(WorldFileError::InUse { .. })) => Ok(None),
        Err(err) => Err(sim_error(err)),
    }
}

async fn cancel(args: CancelArgs) -> anyhow::Result<u8> {
    let state = state_path(&args.target, args.file.as_deref())?;
    let simulated = args.target.simulate;
    // `--all` and no names are the same: every job, of the job file when one is named.
    let selection = Selection { file: args.file, names: args.names, simulated };
    // Simulated jobs in flight are cancelled at the simulated account, served again unless a
    // run serves it (that run then takes the request).
    let dir = state.parent().unwrap_or(std::path::Path::new("."));
    let simulation = if simulated { serve_kept_world(dir).await? } else { None };
    // The key is needed only to cancel at Krea when no krea-batch is running; without one,
    // that case says so.
    let (key, api_base) = if let Some(server) = &simulation {
        (Some(krea_batch::ApiKey::new(server.api_key())?), Some(server.base_url()))
    } else {
        (api_key(args.api_key_file.as_deref()).ok(), None)
    };
    let result = krea_batch::cancel(&state, &selection, key, api_base.as_deref()).await;
    if let Some(server) = simulation {
        server.shutdown().await;
    }
    outln!("{}", result?);
    Ok(EXIT_OK)
}

async fn resume(args: ResumeArgs) -> anyhow::Result<u8> {
    let state = state_path(&args.target, args.job_file.as_deref())?;
    outln!("{}", krea_batch::resume(&state).await?);
    Ok(EXIT_OK)
}

/// SIGTERM or SIGINT: drain and stop. SIGHUP: reload.
async fn watch_daemon_signals(signals: DaemonSignals) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => signals.shutdown.cancel(),
            _ = interrupt.recv() => signals.shutdown.cancel(),
            _ = hangup.recv() => signals.reload.notify_one(),
        }
    }
}

fn exit_code(summary: &Summary) -> u8 {
    match summary.stopped {
        Some(StopReason::AuthRefused) => EXIT_AUTH,
        Some(StopReason::PaymentRequired) => EXIT_PAYMENT_REQUIRED,
        Some(StopReason::BudgetReached | StopReason::DailyBudgetReached) => EXIT_BUDGET,
        Some(StopReason::Interrupted) => EXIT_INTERRUPTED,
        None => {
            let c = &summary.counts;
            let all_done = c.completed == c.total;
            if all_done { EXIT_OK } else { EXIT_SOME_FAILED }
        }
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<u8> {
    let file = krea_batch::load_job_file(&args.job_file)?;
    // The simulation's own schemas, as `run --simulate` checks against them; nothing is kept.
    let simulation =
        if args.simulate { Some(SimServer::start(SimConfig::default()).await?) } else { None };
    let api_base = simulation.as_ref().map(SimServer::base_url).or(args.api_base);
    let base = krea_batch::base_url(&file, api_base.as_deref())?;
    let state = krea_batch::places(&file, None, args.simulate).state;
    let report =
        krea_batch::schema_report(&file, &base, &state, &schema_choice(&args.schema, false)).await;
    if let Some(server) = simulation {
        server.shutdown().await;
    }
    let fits = report.problems.is_empty();
    let mut plan = krea_batch::plan(&file, &base, report, args.simulate)?;
    if args.simulate {
        // The simulation served its schemas and is gone: name it, not its passing address.
        "the built-in simulation (--simulate)".clone_into(&mut plan.api_base);
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        out!("{plan}");
    }
    // Bodies Krea would refuse are bad input, like any other mistake in the file, and so are
    // jobs that a budget cannot count; an estimate above the budget is the budget's own code.
    Ok(match &plan.budget {
        _ if !fits => EXIT_BAD_INPUT,
        Some(budget) if budget.unpriced.is_some() => EXIT_BAD_INPUT,
        Some(budget) if !budget.fits => EXIT_BUDGET,
        _ => EXIT_OK,
    })
}

/// `krea-batch retry`: shows the failed jobs it would run again with their estimated cost,
/// asks (unless `--yes`), puts them back to pending, then runs the job file as `run` does.
async fn retry(
    args: RetryArgs,
    progress_bar: Option<indicatif::ProgressBar>,
) -> anyhow::Result<u8> {
    let RetryArgs { run: run_args, names, failed: _, yes } = args;
    let file = krea_batch::load_job_file(&run_args.job_file)?;
    let places = krea_batch::places(&file, run_args.state.as_deref(), run_args.simulate);
    krea_batch::existing_state(&places.state)?;
    let selection = Selection {
        file: Some(run_args.job_file.to_string_lossy().into_owned()),
        names,
        simulated: run_args.simulate,
    };
    let plan = krea_batch::retry_plan(&places.state, &selection, &file)?;
    if plan.jobs.is_empty() {
        eprintln!("nothing to retry: no job of {} has failed", run_args.job_file.display());
        return Ok(EXIT_OK);
    }
    eprint!("{plan}");
    if !yes && !confirmed(plan.jobs.len())? {
        let which = if plan.jobs.len() == 1 { "the job stays" } else { "the jobs stay" };
        eprintln!("nothing retried: {which} failed");
        return Ok(EXIT_SOME_FAILED);
    }
    krea_batch::retry_jobs(&plan)?;
    run_reporting_failure(run_args, progress_bar).await
}

/// Asks on the terminal whether to run `jobs` failed jobs again; without a terminal to ask
/// on, refuses (exit 2) and says to pass `--yes`.
fn confirmed(jobs: usize) -> anyhow::Result<bool> {
    use std::io::Write as _;
    if !std::io::stdin().is_terminal() {
        return Err(InputError::msg(
            "not retried: there is no terminal to confirm on; pass --yes to run them again \
             without asking",
        )
        .into());
    }
    let noun = if jobs == 1 { "this job" } else { "these jobs" };
    eprint!("Run {noun} again? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

/// `krea-batch man`: the man page, in roff, on stdout; with `--dir`, one page per command
/// written into that folder (the main page's SUBCOMMANDS name them).
fn man(args: &ManArgs) -> anyhow::Result<u8> {
    let command = <Cli as clap::CommandFactory>::command();
    if let Some(dir) = &args.dir {
        let written =
            std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir));
        written.map_err(|err| {
            InputError::because(
                format!("cannot write the man pages into {}: {err}", dir.display()),
                err,
            )
        })?;
        eprintln!("man pages written into {}", dir.display());
        return Ok(EXIT_OK);
    }
    let page = clap_mangen::Man::new(command);
    let mut roff = Vec::new();
    page.render(&mut roff)?;
    print_out(&String::from_utf8_lossy(&roff))?;
    Ok(EXIT_OK)
}

/// Writes a command's answer to stdout. A reader that stops early (`| head`) is no error: what
/// it did not read was not wanted.
fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result,
    }
}

async fn models(args: ModelsArgs) -> anyhow::Result<u8> {
    // The simulation's own document, as `check --simulate` reads it; nothing is kept.
    let simulation =
        if args.simulate { Some(SimServer::start(SimConfig::default()).await?) } else { None };
    let base = simulation.as_ref().map(SimServer::base_url).or(args.api_base);
    let base = krea_batch::api_base_url(base.as_deref())?;
    // The simulation serves its document and is gone: name it, not its passing address.
    let label = args.simulate.then_some("the built-in simulation (--simulate)");
    let choice = schema_choice(&args.schema, false);
    let result = krea_batch::models(args.path.as_deref(), &base, &choice, label).await;
    if let Some(server) = simulation {
        server.shutdown().await;
    }
    let models = result?;
    if args.json {
        print_out(&format!("{}\n", serde_json::to_string_pretty(&models)?))?;
    } else {
        print_out(&models.to_string())?;
    }
    Ok(EXIT_OK)
}

fn schema_choice(args: &SchemaArgs, skip: bool) -> SchemaChoice {
    SchemaChoice { openapi: args.openapi.clone(), offline: args.offline, skip }
}

fn status(args: &StatusArgs) -> anyhow::Result<u8> {
    let state_path = state_path(&args.target, args.job_file.as_deref())?;
    let json = args.json;
    let status = krea_batch::status(&state_path)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        out!("{status}");
    }
    Ok(EXIT_OK)
}

fn load_sim_config(path: &std::path::Path) -> anyhow::Result<SimConfig> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        InputError::because(format!("cannot read {}: {err}", path.display()), err)
    })?;
    // The file, line and column, and for a misspelled key the job file's did-you-mean.
    krea_batch::parse_yaml_document(&text, path).map_err(|err| InputError::new(err).into())
}

async fn simulate_api(args: SimulateArgs) -> anyhow::Result<u8> {
    if args.print_config {
        out!("{}", sim::DEFAULT_CONFIG_YAML);
        return Ok(EXIT_OK);
    }
    let mut config = match &args.config {
        Some(path) => load_sim_config(path)?,
        None => SimConfig::default(),
    };
    if let Some(key) = args.key {
        config.api_key = key;
    }
    if let Some(usd) = args.top_up {
        return top_up(usd, args.port, args.world.as_deref(), &config.api_key).await;
    }
    config.api_port = args.port;
    config.files_port = args.files_port;
    if let Some(balance) = args.balance {
        config.balance_usd = balance;
    }
    let server = match &args.world {
        Some(path) => SimServer::start_with_world(config, path).await.map_err(sim_error)?,
        None => SimServer::start(config).await?,
    };
    let base = server.base_url();
    let port = base.rsplit(':').next().unwrap_or_default().to_owned();
    let key = server.api_key();
    let key_arg = if key == SimConfig::default().api_key {
        String::new()
    } else {
        format!(" --key {}", shell_word(key))
    };
    outln!("Krea API simulation listening on {base} (result files on {})", server.files_base_url());
    match &args.world {
        Some(path) => outln!(
            "balance ${:.2}; the account is kept in {}",
            server.stats().balance_usd,
            path.display()
        ),
        None => outln!("balance ${:.2}", server.stats().balance_usd),
    }
    outln!("To point krea-batch at it, paste:");
    outln!("export KREA_API_BASE={base} KREA_API_KEY={}", shell_word(key));
    outln!("To top up its balance by $5, paste:");
    outln!("krea-batch simulate-api --top-up 5 --port {port}{key_arg}");
    outln!("Ctrl-C stops it.");
    let controls = Controls::default();
    tokio::spawn(watch_signals(controls.clone()));
    controls.stop_submitting.cancelled().await;
    server.shutdown().await;
    Ok(EXIT_OK)
}

/// `simulate-api --top-up USD`: of the world file `world` (or the simulation serving it), else
/// of the simulation listening on `port`.
async fn top_up(
    usd: f64,
    port: u16,
    world: Option<&std::path::Path>,
    key: &str,
) -> anyhow::Result<u8> {
    if !usd.is_finite() || usd <= 0.0 {
        return Err(
            InputError::msg(format!("--top-up {usd}: give a positive amount in USD")).into()
        );
    }
    let port = match world {
        Some(path) => match sim::top_up_file(path, usd).map_err(InputError::new)? {
            FileTopUp::Saved { before_usd, balance_usd } => {
                outln!(
                    "simulated balance ${balance_usd:.2} (was ${before_usd:.2}) in {}",
                    path.display()
                );
                return Ok(EXIT_OK);
            }
            FileTopUp::Served { api_port } => api_port,
        },
        None if port == 0 => {
            return Err(InputError::msg(
                "--top-up needs the simulation: --port PORT (a running simulate-api) or --world \
                 FILE (a kept world, such as <output>-simulated/.krea-batch-sim.json)",
            )
            .into());
        }
        None => port,
    };
    let balance = top_up_at(port, key, usd).await?;
    outln!("simulated balance ${balance:.2} (the simulation on 127.0.0.1:{port})");
    Ok(EXIT_OK)
}

/// Sends a top-up to the simulation listening on `port` (`POST /_sim/top-up`).
async fn top_up_at(port: u16, key: &str, usd: f64) -> anyhow::Result<f64> {
    let url = format!("http://127.0.0.1:{port}/_sim/top-up");
    let answer = reqwest::Client::new()
        .post(&url)
        .bearer_auth(key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::json!({ "usd": usd }).to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|err| {
            InputError::msg(format!(
                "no simulation answers on 127.0.0.1:{port} ({err}); is `krea-batch simulate-api \
                 --port {port}` running?"
            ))
        })?;
    let status = answer.status();
    let body = answer.bytes().await.unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match body["balance_usd"].as_f64() {
        Some(balance) if status.is_success() => Ok(balance),
        _ if status == reqwest::StatusCode::UNAUTHORIZED => Err(InputError::msg(format!(
            "the simulation on 127.0.0.1:{port} refused the key: pass its key with --key"
        ))
        .into()),
        _ => Err(InputError::msg(format!(
            "127.0.0.1:{port} did not take the top-up ({status}): is it a krea-batch simulation?"
        ))
        .into()),
    }
}

/// First Ctrl-C or SIGTERM: stop submitting, finish what is in flight. Second: stop now.
async fn watch_signals(controls: Controls) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else { return };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        seen += 1;
        if seen == 1 {
            controls.stop_submitting.cancel();
        } else {
            tracing::warn!("stopping now; the state is saved and a rerun resumes");
            controls.abort.cancel();
            return;
        }
    }
}

fn new_progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(krea_batch::progress_style());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Logs go to stderr. Under journald (`JOURNAL_STREAM` set) lines carry no timestamps (the
/// journal adds its own) and each starts with its `<N>` priority ([`krea_batch::Prioritised`]). Colours as [`colours`] decides. With a progress bar, lines are printed
/// above it.
fn init_logging(cli: &Cli, bar: Option<indicatif::ProgressBar>) {
    use tracing_subscriber::EnvFilter;
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "krea_batch=info,warn",
        (false, 1) => "krea_batch=debug,info",
        (false, _) => "krea_batch=trace,debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = colours(
        cli.color,
        !journald && std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let writer = LogWriter { bar };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let prioritised = krea_batch::Prioritised::new(writer.clone());
    match (cli.log_format, journald) {
        (LogFormat::Json, true) => builder.with_writer(prioritised).json().init(),
        (LogFormat::Json, false) => builder.with_writer(writer).json().init(),
        (LogFormat::Text, true) => {
            builder.with_writer(prioritised).with_ansi(ansi).without_time().init();
        }
        (LogFormat::Text, false) => builder.with_writer(writer).with_ansi(ansi).init(),
    }
}

/// Whether log lines carry colours: `--color always|never` decides; `auto` colours a
/// terminal (`terminal`, false under journald) unless `NO_COLOR` is set and not empty
/// (<https://no-color.org>).
fn colours(choice: ColorChoice, terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => terminal && no_color.is_none_or(std::ffi::OsStr::is_empty),
    }
}

/// Writes log lines to stderr, above the progress bar when there is one.
#[derive(Clone)]
struct LogWriter {
    bar: Option<indicatif::ProgressBar>,
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    /// Every command's `--help` ends with examples, and lists the options all commands take
    /// under their own heading, apart from the command's.
    #[test]
    fn every_help_ends_with_examples_and_sets_the_global_options_apart() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        cli.build();
        for command in cli.get_subcommands_mut().filter(|command| command.get_name() != "help") {
            let name = command.get_name().to_owned();
            let help = command.render_long_help().to_string();
            let examples = help.rfind("Examples:\n").unwrap_or_else(|| panic!("{name}: {help}"));
            let globals = help.find("Global options:").unwrap_or_else(|| panic!("{name}: {help}"));
            assert!(globals < examples, "{name}: the examples come last");
            let own = help.find("\nOptions:").unwrap_or(0);
            assert!(own < globals, "{name}: its own options first: {help}");
            let listed: Vec<&str> = help[examples..].trim_end().lines().skip(1).collect();
            assert!((1..=2).contains(&listed.len()), "{name}: one or two examples: {listed:?}");
            for example in listed {
                assert!(example.starts_with(&format!("  krea-batch {name}")), "{name}: {example}");
            }
        }
    }

    /// `NO_COLOR` (not empty) turns colours off on a terminal; `--color` overrides both ways.
    #[test]
    fn no_color_is_honoured_on_a_terminal_and_the_flag_overrides_it() {
        let set = Some(OsStr::new("1"));
        assert!(colours(ColorChoice::Auto, true, None));
        assert!(!colours(ColorChoice::Auto, true, set));
        assert!(colours(ColorChoice::Auto, true, Some(OsStr::new(""))), "empty means unset");
        assert!(!colours(ColorChoice::Auto, false, None), "no colours into a file or pipe");
        assert!(colours(ColorChoice::Always, false, set));
        assert!(!colours(ColorChoice::Never, true, None));
    }
}
