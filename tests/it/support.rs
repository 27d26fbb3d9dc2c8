//! Shared fixtures: a simulated Krea API on loopback, job files in a temporary folder, and the
//! real `krea-batch` binary run as a child process against them.

use krea_batch::sim::{SimConfig, SimServer, SimStats};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A simulation running on its own runtime, so tests can run the binary synchronously.
pub(crate) struct Sim {
    runtime: tokio::runtime::Runtime,
    server: Option<SimServer>,
}

impl Sim {
    /// Starts a simulation with quick jobs, then applies `adjust`.
    pub(crate) fn start(adjust: impl FnOnce(&mut SimConfig)) -> Self {
        let mut config = SimConfig {
            job_time: Duration::from_millis(200),
            video_job_time: Duration::from_millis(400),
            concurrency: 8,
            backlog: 32,
            ..SimConfig::default()
        };
        adjust(&mut config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        let server = runtime.block_on(SimServer::start(config)).expect("simulation starts");
        Self { runtime, server: Some(server) }
    }

    pub(crate) fn server(&self) -> &SimServer {
        self.server.as_ref().expect("running")
    }

    pub(crate) fn stats(&self) -> SimStats {
        self.server().stats()
    }

    pub(crate) fn url(&self) -> String {
        self.server().base_url()
    }

    pub(crate) fn key(&self) -> String {
        self.server().api_key().to_owned()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

/// Limits that keep tests quick: fast polling and back-off, generous pacing.
pub(crate) const FAST_LIMITS: &str = "
limits:
  submissions_per_minute: 6000
  burst: 20
  max_in_flight: 8
  poll_interval: 50ms
  video_poll_interval: 50ms
  poll_interval_max: 200ms
  retry_backoff: 50ms
  request_timeout: 5s
";

/// A folder holding one job file.
pub(crate) struct Workspace {
    pub(crate) dir: tempfile::TempDir,
}

impl Workspace {
    /// A job file `jobs.yaml` with `FAST_LIMITS`, the flux model, and `jobs` (YAML list items).
    pub(crate) fn with_jobs(jobs: &str) -> Self {
        Self::with_file(&format!("model: image/bfl/flux-1-dev\n{FAST_LIMITS}\njobs:\n{jobs}"))
    }

    /// Rewrites `jobs.yaml` as [`Workspace::with_jobs`] writes it, with other `jobs`.
    pub(crate) fn set_jobs(&self, jobs: &str) {
        let text = format!("model: image/bfl/flux-1-dev\n{FAST_LIMITS}\njobs:\n{jobs}");
        std::fs::write(self.job_file(), text).expect("job file rewritten");
    }

    /// A job file `jobs.yaml` with exactly `text`.
    pub(crate) fn with_file(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("jobs.yaml"), text).expect("job file written");
        Self { dir }
    }

    pub(crate) fn job_file(&self) -> PathBuf {
        self.dir.path().join("jobs.yaml")
    }

    pub(crate) fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// The manifest's lines, parsed.
    pub(crate) fn manifest(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.out().join("manifest.jsonl")).expect("manifest");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("manifest line is JSON"))
            .collect()
    }

    /// `krea-batch run jobs.yaml` against `sim`, with its key.
    pub(crate) fn run(&self, sim: &Sim, extra: &[&str]) -> Run {
        self.command(sim, &sim.key(), &["run"], extra)
    }

    /// `krea-batch run jobs.yaml` against `sim` as a live process, for signals and kills.
    pub(crate) fn spawn_run(&self, sim: &Sim) -> LiveChild {
        let mut command = krea_batch();
        command
            .arg("run")
            .arg(self.job_file())
            .env("KREA_API_BASE", sim.url())
            .env("KREA_API_KEY", sim.key())
            .env("XDG_CACHE_HOME", self.cache_home());
        LiveChild::spawn(command)
    }

    /// `krea-batch <subcommand> jobs.yaml <extra>` with the given key.
    pub(crate) fn command(&self, sim: &Sim, key: &str, subcommand: &[&str], extra: &[&str]) -> Run {
        let mut command = krea_batch();
        command.args(subcommand).arg(self.job_file()).args(extra);
        command.env("KREA_API_BASE", sim.url()).env("KREA_API_KEY", key);
        command.env("XDG_CACHE_HOME", self.cache_home());
        Run::of(&command.output().expect("krea-batch runs"))
    }

    /// The user cache folder (`XDG_CACHE_HOME`) this workspace's commands share, as the
    /// commands of one user would.
    pub(crate) fn cache_home(&self) -> PathBuf {
        self.dir.path().join("xdg-cache")
    }
}

/// Running a command through `sh -c SCRIPT BINARY ARGS…`, for limits set with `ulimit`.
pub(crate) trait ViaShell {
    /// Runs `script` in `sh` with `$0` the binary and `$1…` the `args`; the environment set on
    /// the command is kept.
    fn output_via_shell(&mut self, script: &str, args: &[&str]) -> Output {
        self.via_shell(script, args).output().expect("sh runs")
    }

    /// The command that [`ViaShell::output_via_shell`] runs, to spawn it instead.
    fn via_shell(&self, script: &str, args: &[&str]) -> Command;
}

impl ViaShell for Command {
    fn via_shell(&self, script: &str, args: &[&str]) -> Command {
        let mut shell = Command::new("sh");
        shell.arg("-c").arg(script).arg(self.get_program()).args(args);
        for (name, value) in self.get_envs() {
            match value {
                Some(value) => shell.env(name, value),
                None => shell.env_remove(name),
            };
        }
        shell
    }
}

/// The binary under test, with a clean environment and a user cache folder of its own (so no
/// test reads another's cached OpenAPI document, and none writes to the real `~/.cache`).
pub(crate) fn krea_batch() -> Command {
    static COMMANDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut command = Command::new(env!("CARGO_BIN_EXE_krea-batch"));
    for var in
        ["KREA_API_KEY", "KREA_API_BASE", "CREDENTIALS_DIRECTORY", "RUST_LOG", "JOURNAL_STREAM"]
    {
        command.env_remove(var);
    }
    let n = COMMANDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("xdg-cache-{}-{n}", std::process::id()));
    command.env("XDG_CACHE_HOME", cache);
    command
}

/// A finished child process.
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    pub(crate) fn of(output: &Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Asserts the exit code, showing the output when it differs.
    pub(crate) fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// `n` job entries with distinct prompts `"<stem> <i>"`.
pub(crate) fn numbered_jobs(stem: &str, n: usize) -> String {
    use std::fmt::Write as _;
    (0..n).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "  - prompt: \"{stem} {i}\"");
        text
    })
}

/// SHA-256 of a file, lowercase hex.
pub(crate) fn sha256_of(path: &Path) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).expect("file readable")))
}

/// Every regular file under `dir`, recursively.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Waits, up to `limit`, until `condition` holds; panics with `what` otherwise.
pub(crate) fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running child whose stderr is collected as it comes, so a test can wait for a log line.
pub(crate) struct LiveChild {
    child: std::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl LiveChild {
    /// Spawns `command` with piped output.
    pub(crate) fn spawn(mut command: Command) -> Self {
        use std::io::BufRead as _;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the process starts");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        let sink = std::sync::Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut text = sink.lock().expect("stderr buffer");
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self { child, stderr, reader: Some(reader) }
    }

    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has ended.
    pub(crate) fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// Waits until stderr contains `needle`.
    pub(crate) fn wait_for_log(&self, needle: &str, limit: Duration) {
        wait_until(limit, &format!("the log says {needle:?}"), || {
            self.stderr.lock().expect("stderr buffer").contains(needle)
        });
    }

    /// Waits until a log line contains `message`; returns that line's field `name` (the text
    /// log format writes fields as `name=value` after the message).
    pub(crate) fn log_field(&self, message: &str, name: &str, limit: Duration) -> String {
        self.wait_for_log(message, limit);
        let text = self.stderr.lock().expect("stderr buffer");
        let line = text.lines().find(|line| line.contains(message)).expect("the line waited for");
        let prefix = format!("{name}=");
        let value = line.split_whitespace().find_map(|word| word.strip_prefix(prefix.as_str()));
        value.unwrap_or_else(|| panic!("no {name}= in the log line {line:?}")).to_owned()
    }

    /// Sends a signal ("INT", "TERM", "HUP", "KILL").
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `limit` for the exit; past it, kills the process and fails the test, saying
    /// `what` with the stderr collected. A deadline on a wait, not a measure of speed: `limit`
    /// is set far above what the process needs.
    pub(crate) fn finish_within(mut self, limit: Duration, what: &str) -> Run {
        let deadline = std::time::Instant::now() + limit;
        while !self.has_exited() {
            if std::time::Instant::now() >= deadline {
                self.signal("KILL");
                let run = self.finish(Duration::from_secs(10));
                panic!("{what}: killed after {limit:?}\n{}", run.stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.finish(Duration::from_secs(10))
    }

    /// Waits up to `limit` for the exit; returns code, stdout and the collected stderr.
    pub(crate) fn finish(mut self, limit: Duration) -> Run {
        let mut exited = false;
        wait_until(limit, "the process exits", || {
            exited = self.child.try_wait().expect("try_wait").is_some();
            exited
        });
        let output = self.child.wait_with_output().expect("output");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("stderr reader");
        }
        let stderr = self.stderr.lock().expect("stderr buffer").clone();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr,
        }
    }
}

/// A plain HTTP/1.0 GET on loopback, returning the body (tests need no async client for it).
pub(crate) fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response read");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// With several POSTs on the wire: every result filed under a job was created by that job's
/// prompt (its sidecar's `job_id` is a job the simulation created for that prompt), and every
/// job the simulation created reached the user, under its job or in `unattributed/` with its
/// prompt among the candidates that file's sidecar names. Returns (attributed, unattributed)
/// result files.
pub(crate) fn assert_each_result_where_it_belongs(
    what: &str,
    work: &Workspace,
    stats: &SimStats,
) -> (usize, usize) {
    use std::collections::{HashMap, HashSet};
    let prompt_of_job: HashMap<&str, &str> =
        stats.jobs.iter().map(|job| (job.id.as_str(), job.prompt.as_str())).collect();
    let read = |path: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(path).expect("a sidecar")).expect("sidecar JSON")
    };
    let mut reached: HashSet<String> = HashSet::new();
    let mut attributed = 0;
    for line in work.manifest().iter().filter(|line| line["status"] == "completed") {
        for file in line["files"].as_array().into_iter().flatten() {
            let file = file.as_str().expect("a file");
            let sidecar = read(&work.out().join(format!("{file}.json")));
            let job_id = sidecar["job_id"].as_str().expect("a job id");
            let prompt = sidecar["prompt"].as_str().expect("a prompt");
            assert_eq!(prompt_of_job.get(job_id), Some(&prompt), "{what}: {file} holds {job_id}");
            reached.insert(job_id.to_owned());
            attributed += 1;
        }
    }
    let folder = work.out().join("unattributed");
    let parked = if folder.is_dir() { files_under(&folder) } else { Vec::new() };
    let mut unattributed = 0;
    for path in parked.iter().filter(|path| path.extension().is_some_and(|ext| ext == "json")) {
        let sidecar = read(path);
        let job_id = sidecar["krea_job_id"].as_str().expect("a Krea job id");
        let made_by = prompt_of_job.get(job_id).expect("a job the simulation created");
        let candidates: Vec<&str> = sidecar["candidates"]
            .as_array()
            .expect("candidates")
            .iter()
            .filter_map(|candidate| candidate["prompt"].as_str())
            .collect();
        assert!(
            candidates.len() >= 2,
            "{what}: {} names its candidates: {candidates:?}",
            path.display()
        );
        assert!(
            candidates.contains(made_by),
            "{what}: {}: {made_by} not a candidate",
            path.display()
        );
        assert!(reached.insert(job_id.to_owned()), "{what}: {job_id} attributed and unattributed");
        unattributed += 1;
    }
    for job in stats.jobs.iter().filter(|job| job.status == "completed") {
        assert!(reached.contains(&job.id), "{what}: {} ({}) reached the user", job.id, job.prompt);
    }
    (attributed, unattributed)
}
