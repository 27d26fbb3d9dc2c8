//! What the scenarios share: the simulated Krea API as a child process, job files, running
//! `krea-batch` under GNU time, reading the simulation's stats over plain HTTP, and child
//! processes that are killed when the scenario ends, however it ends.

use anyhow::{Context as _, bail};
use krea_batch::sim::{SimConfig, SimStats};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: the release build `cargo bench` made.
pub(crate) const KREA_BATCH: &str = env!("CARGO_BIN_EXE_krea-batch");

/// The API key the simulation accepts and krea-batch sends.
pub(crate) const KEY: &str = "bench-key";

/// GNU time, for CPU time and peak RSS.
const GNU_TIME: &str = "/usr/bin/time";

/// Refuses to start without GNU time or curl, naming the Debian package to install.
pub(crate) fn check_tools() -> Result<(), String> {
    if !Path::new(GNU_TIME).exists() {
        return Err(format!(
            "{GNU_TIME} (GNU time) is missing: install the Debian package `time` \
             (sudo apt-get install time)"
        ));
    }
    let curl = Command::new("curl").arg("--version").stdout(Stdio::null()).status();
    if !curl.is_ok_and(|status| status.success()) {
        return Err(
            "curl is missing: install the Debian package `curl` (sudo apt-get install curl)"
                .to_owned(),
        );
    }
    Ok(())
}

/// Cargo's target folder (the parent of the one it gives benchmarks for temporary files).
pub(crate) fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map_or_else(|| PathBuf::from("target"), Path::to_owned)
}

/// A child process that is killed and reaped when dropped, so that a scenario that fails (or
/// panics) leaves nothing running.
#[derive(Debug)]
pub(crate) struct ChildGuard(Child);

impl ChildGuard {
    pub(crate) fn new(child: Child) -> Self {
        Self(child)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process is still running.
    pub(crate) fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The simulation settings every scenario starts from: the benchmark's key, a balance that
/// never runs out, and a request log long enough to keep every request.
pub(crate) fn sim_config() -> SimConfig {
    SimConfig {
        api_key: KEY.to_owned(),
        balance_usd: 1_000_000.0,
        request_log_limit: 1_000_000,
        ..SimConfig::default()
    }
}

/// `krea-batch simulate-api` running as its own process.
#[derive(Debug)]
pub(crate) struct Sim {
    url: String,
    stderr: PathBuf,
    /// Kept open: the simulation may still write to it.
    _stdout: BufReader<ChildStdout>,
    child: ChildGuard,
}

impl Sim {
    /// Writes `config` to `dir/sim.yaml`, starts the simulation on a free port and reads its
    /// URL from the first line it prints.
    pub(crate) fn start(dir: &Path, config: &SimConfig) -> anyhow::Result<Self> {
        let config_path = dir.join("sim.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(config)?)?;
        let stderr = dir.join("sim.stderr");
        let child = Command::new(KREA_BATCH)
            .args(["-q", "simulate-api", "--port", "0", "--key", KEY, "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("cannot start krea-batch simulate-api")?;
        let mut child = ChildGuard::new(child);
        let stdout = child.0.stdout.take().context("the simulation's stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some((_, url)) = line.trim().split_once("listening on ") else {
            bail!(
                "the simulation did not print its URL (it printed {line:?}); its stderr:\n{}",
                tail(&std::fs::read_to_string(&stderr).unwrap_or_default())
            );
        };
        // The line goes on after the URL ("… (result files on http://…)").
        let url = url.split_whitespace().next().unwrap_or(url);
        Ok(Self { url: url.to_owned(), stderr, _stdout: stdout, child })
    }

    /// The API origin, `http://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// `GET /_sim/stats`.
    pub(crate) fn stats(&mut self) -> anyhow::Result<SimStats> {
        let body = http_get(&self.url, "/_sim/stats", KEY).with_context(|| {
            let running = if self.child.running() { "running" } else { "exited" };
            let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            format!(
                "the simulation's stats (the simulation has {running}); its stderr:\n{}",
                tail(&stderr)
            )
        })?;
        serde_json::from_slice(&body).context("the simulation's stats are not SimStats JSON")
    }
}

/// A blocking HTTP/1.0 GET on loopback with a bearer key; the body of a 200.
fn http_get(origin: &str, path: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    let host = origin.strip_prefix("http://").context("a plain http:// origin")?;
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_mins(1)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").context("no HTTP header end")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path} answered {status:?}");
    }
    Ok(response[split + 4..].to_vec())
}

/// A job file's `limits:`, as (key, value) pairs written as they would be in YAML.
pub(crate) type Limits = Vec<(&'static str, String)>;

/// `key value, key value…`, for the notes.
pub(crate) fn describe(limits: &Limits) -> String {
    let pairs: Vec<String> = limits.iter().map(|(key, value)| format!("{key} {value}")).collect();
    pairs.join(", ")
}

/// Writes `dir/jobs.yaml`: the flux model, results in `./out`, `limits` (if any), and `count` jobs with
/// the distinct prompts `"<stem> <i>"`.
pub(crate) fn write_job_file(
    dir: &Path,
    limits: &Limits,
    stem: &str,
    count: usize,
) -> anyhow::Result<PathBuf> {
    let mut text = String::from("model: image/bfl/flux-1-dev\noutput: ./out\n");
    if !limits.is_empty() {
        text.push_str("limits:\n");
    }
    for (key, value) in limits {
        let _ = writeln!(text, "  {key}: {value}");
    }
    text.push_str("jobs:\n");
    for i in 0..count {
        let _ = writeln!(text, "  - prompt: \"{stem} {i}\"");
    }
    let path = dir.join("jobs.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `krea-batch -q ARGS` in `dir`, with a clean environment pointing at `sim` (when given).
pub(crate) fn krea_batch(dir: &Path, sim: Option<&Sim>, args: &[&str]) -> Command {
    let mut command = Command::new(KREA_BATCH);
    prepare(&mut command, dir, sim);
    command.arg("-q").args(args);
    command
}

fn prepare(command: &mut Command, dir: &Path, sim: Option<&Sim>) {
    command.current_dir(dir).stdin(Stdio::null());
    for var in
        ["KREA_API_KEY", "KREA_API_BASE", "CREDENTIALS_DIRECTORY", "RUST_LOG", "JOURNAL_STREAM"]
    {
        command.env_remove(var);
    }
    if let Some(sim) = sim {
        command.env("KREA_API_BASE", sim.url()).env("KREA_API_KEY", KEY);
    }
}

/// A finished `krea-batch` process and what it cost.
#[derive(Debug)]
pub(crate) struct Timed {
    /// Wall time in seconds (measured here, to the microsecond).
    pub(crate) wall: f64,
    /// User and system CPU seconds (GNU time, to the centisecond).
    pub(crate) cpu: f64,
    /// Peak resident set size in KiB (GNU time).
    pub(crate) max_rss_kib: u64,
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Timed {
    /// Peak RSS in MiB.
    pub(crate) fn rss_mib(&self) -> f64 {
        self.max_rss_kib as f64 / 1024.0
    }

    /// Fails, with the end of its stderr, unless the process exited with `code`.
    pub(crate) fn expect_code(&self, code: i32, what: &str) -> anyhow::Result<&Self> {
        if self.code != Some(code) {
            bail!(
                "{what} exited with {:?}, expected {code}; its stderr ends:\n{}",
                self.code,
                tail(&self.stderr)
            );
        }
        Ok(self)
    }

    /// Stdout as JSON (`--json`).
    pub(crate) fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).context("krea-batch --json printed no JSON")
    }
}

/// Runs `krea-batch -q ARGS` in `dir` under GNU time and waits for it.
pub(crate) fn run_timed(dir: &Path, sim: Option<&Sim>, args: &[&str]) -> anyhow::Result<Timed> {
    let time_file = dir.join("gnu-time.txt");
    let mut command = Command::new(GNU_TIME);
    prepare(&mut command, dir, sim);
    command.args(["-f", "%e %U %S %M", "-o"]).arg(&time_file).arg(KREA_BATCH).arg("-q").args(args);
    let started = Instant::now();
    let output = command.output().context("cannot run krea-batch under /usr/bin/time")?;
    let wall = started.elapsed().as_secs_f64();
    // With -o, GNU time writes "Command exited with non-zero status N" before the format line.
    let text = std::fs::read_to_string(&time_file)?;
    let fields: Vec<f64> = text
        .lines()
        .rfind(|line| !line.trim().is_empty())
        .unwrap_or_default()
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected GNU time output {text:?}"))?;
    let &[_, user, sys, max_rss_kib] = fields.as_slice() else {
        bail!("unexpected GNU time output {text:?}");
    };
    Ok(Timed {
        wall,
        cpu: user + sys,
        max_rss_kib: max_rss_kib as u64,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// CPU seconds (user + system) a running process has used so far, from `/proc/<pid>/stat`
/// (fields 14 and 15, in clock ticks of 1/100 s).
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        Ok(fields.get(n - 3).context("short /proc/PID/stat")?.parse()?)
    };
    Ok((field(14)? + field(15)?) as f64 / 100.0)
}

/// The last lines of a process's output, for error messages.
pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A fresh folder for one scenario, under `KREA_BATCH_BENCH_DIR` if set (to compare file
/// systems, e.g. `/dev/shm`), else under the system's temporary folder.
pub(crate) fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    match std::env::var_os("KREA_BATCH_BENCH_DIR") {
        Some(root) => tempfile::Builder::new().prefix("krea-batch-bench-").tempdir_in(root),
        None => tempfile::Builder::new().prefix("krea-batch-bench-").tempdir(),
    }
}
