//! The README's commands, run as printed: every command of every ```` ```sh ```` block is either
//! run here or skipped with its reason, and a command that is neither fails the test, so a
//! command added to the README must be run here or explicitly left out.
//!
//! How a printed command is run:
//! - It goes to `sh -c` as printed (comments and all), in a fresh temporary folder holding a
//!   copy of `jobs.example.yaml`, and `jobs.yaml`, a copy of it too (the README's quick-start
//!   calls the user's own file `jobs.yaml`).
//! - `krea-batch` is the binary under test (`env!("CARGO_BIN_EXE_krea-batch")`): a folder with
//!   a link of that name to it comes first on `PATH`, standing for what `cargo install` puts in
//!   `~/.cargo/bin`.
//! - The one rewrite: a leading `cargo run --release --` becomes `krea-batch`. Cargo has built
//!   the binary already (the test binary is built with it); building a release build again
//!   would take minutes and test nothing more.
//! - Commands after `export KREA_API_KEY=…` need a key and Krea: they run against the simulated
//!   API instead, with `KREA_API_BASE` and `KREA_API_KEY` set as the README's "The simulated
//!   Krea API" section says to (`KREA_API_BASE` wins over the file's `api.base_url`).
//! - Where the README promises that running a command again works ("Run the same command
//!   again", "rerun the same command to resume"), it runs twice, and the second run must
//!   succeed and send nothing new.
//!
//! Every command run must exit 0: each is shown in the README as something that works.

use crate::support::{Sim, ViaShell as _, krea_batch};
use std::path::{Path, PathBuf};

/// What the test does with one command of the README.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// Run it once, as printed.
    Once,
    /// Run it, then again: the README promises a rerun works (and sends nothing new).
    Twice,
    /// Run it against the simulated API (it needs a key and Krea as printed).
    Simulated,
    /// Run it twice against the simulated API.
    SimulatedTwice,
    /// Not run, for this reason.
    Skip(&'static str),
}

const NEEDS_SYSTEMD: &str = "needs root, systemd and the installed service; the daemon tests \
                             (daemon.rs) run the same service in a temporary folder";
const NEEDS_FAILED_JOBS: &str = "needs jobs that failed (the example's all complete) and, without \
                                 `--yes`, a terminal to confirm on; retry.rs runs both ways \
                                 against a simulated failure";
const INSTALLS_IN_HOME: &str = "installs into the user's home; completions.rs runs \
                                `completions bash` and `man --dir` into a temporary folder";
const MEASUREMENT: &str = "a measurement of the README's own figures (minutes of work, \
                           timing-dependent), not a check; run by hand when the figure is renewed";

/// Every command of the README's `sh` blocks, as printed less its trailing comment, and what
/// the test does with it.
const COMMANDS: &[(&str, Way)] = &[
    // "Try it".
    ("cargo run --release -- run jobs.example.yaml --simulate", Way::Twice),
    ("cargo run --release -- status --simulate jobs.example.yaml", Way::Once),
    ("cargo test --locked", Way::Skip("the test suite this test is part of")),
    // The quick start, against the simulated API.
    (
        "cargo install --path .",
        Way::Skip(
            "builds a second release binary into ~/.cargo/bin (minutes, and outside the test's \
             folder); the binary under test stands for it on PATH",
        ),
    ),
    (
        "export KREA_API_KEY=…",
        Way::Skip("a real key; the commands after it run with the simulation's key and address"),
    ),
    ("krea-batch check jobs.yaml", Way::Simulated),
    ("krea-batch run jobs.yaml", Way::SimulatedTwice),
    ("krea-batch status jobs.yaml", Way::Simulated),
    ("krea-batch download jobs.yaml", Way::Simulated),
    ("krea-batch cancel --file jobs.yaml --all", Way::Simulated),
    ("krea-batch cancel --file jobs.yaml fox-1", Way::Simulated),
    ("krea-batch recover jobs.yaml", Way::Simulated),
    ("krea-batch retry jobs.yaml --failed", Way::Skip(NEEDS_FAILED_JOBS)),
    ("krea-batch models", Way::Simulated),
    ("krea-batch models image/bfl/flux-1-dev", Way::Simulated),
    // Completions and the man page.
    ("mkdir -p ~/.local/share/bash-completion/completions", Way::Skip(INSTALLS_IN_HOME)),
    (
        "krea-batch completions bash > ~/.local/share/bash-completion/completions/krea-batch",
        Way::Skip(INSTALLS_IN_HOME),
    ),
    ("krea-batch man --dir ~/.local/share/man/man1", Way::Skip(INSTALLS_IN_HOME)),
    // Failed jobs run again.
    ("krea-batch retry jobs.yaml fox-1 fox-2 --yes", Way::Skip(NEEDS_FAILED_JOBS)),
    // The gallery's screenshot.
    ("apt install chromium", Way::Skip("installs a system package as root")),
    (
        "cargo test --test it gallery -- --ignored --nocapture",
        Way::Skip("needs Chromium, which CI does not install; the gallery's other tests run"),
    ),
    // The kill test at full scale.
    (
        "KREA_BATCH_KILL_JOBS=1000 KREA_BATCH_KILLS=100 cargo test --release --test it kill -- --nocapture",
        Way::Skip("the kill test at full scale takes minutes; kill.rs runs it at CI's scale"),
    ),
    // Installing the service.
    (
        "cargo build --release --locked",
        Way::Skip("a release build: minutes; the test binary's build stands for it"),
    ),
    (
        "sudo install -m 0755 target/release/krea-batch /usr/local/bin/krea-batch",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    (
        "sudo install -m 0644 contrib/krea-batch.sysusers.conf /usr/lib/sysusers.d/krea-batch.conf",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    ("sudo systemd-sysusers", Way::Skip(NEEDS_SYSTEMD)),
    ("sudo install -d -m 0755 /etc/krea-batch", Way::Skip(NEEDS_SYSTEMD)),
    (
        "sudo install -m 0644 contrib/daemon.yaml /etc/krea-batch/daemon.yaml",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    ("sudo sh -c 'umask 077; cat > /etc/krea-batch/krea-api-key'", Way::Skip(NEEDS_SYSTEMD)),
    (
        "sudo install -m 0644 contrib/krea-batch.service /etc/systemd/system/krea-batch.service",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    (
        "sudo install -D -m 0644 README.md /usr/share/doc/krea-batch/README.md",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    ("sudo systemctl daemon-reload", Way::Skip(NEEDS_SYSTEMD)),
    ("sudo systemctl enable --now krea-batch", Way::Skip(NEEDS_SYSTEMD)),
    // Using the service.
    ("cp catalogue.yaml /var/lib/krea-batch/inbox/.catalogue.yaml.part", Way::Skip(NEEDS_SYSTEMD)),
    (
        "mv /var/lib/krea-batch/inbox/.catalogue.yaml.part /var/lib/krea-batch/inbox/catalogue.yaml",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    ("systemctl status krea-batch", Way::Skip(NEEDS_SYSTEMD)),
    ("journalctl -u krea-batch -f", Way::Skip(NEEDS_SYSTEMD)),
    ("ls /var/lib/krea-batch/results/catalogue/", Way::Skip(NEEDS_SYSTEMD)),
    (
        "sudo -u krea-batch krea-batch status --config /etc/krea-batch/daemon.yaml",
        Way::Skip(NEEDS_SYSTEMD),
    ),
    // The memory measurement ("Memory").
    ("dir=$(mktemp -d); cd $dir", Way::Skip(MEASUREMENT)),
    (
        "python3 -c \"print('prompt,seed'); [print(f'a red fox in snow number {i},{i}') for i in range(500000)]\" > rows.csv",
        Way::Skip(MEASUREMENT),
    ),
    (
        "printf 'model: image/bfl/flux-1-dev\\njobs:\\n  - from: rows.csv\\n' > jobs.yaml",
        Way::Skip(MEASUREMENT),
    ),
    (
        "/usr/bin/time -v krea-batch check jobs.yaml 2>&1 >/dev/null | grep 'Maximum resident'",
        Way::Skip(MEASUREMENT),
    ),
    ("mkdir -p svc/inbox; cp rows.csv svc/inbox/", Way::Skip(MEASUREMENT)),
    (
        "printf 'inbox: inbox\\noutput: out\\nstate: state.sqlite\\napi: {base_url: \"http://127.0.0.1:9\"}\\n' > svc/daemon.yaml",
        Way::Skip(MEASUREMENT),
    ),
    (
        "KREA_API_KEY=unused /usr/bin/time -v -o time.txt krea-batch daemon --config svc/daemon.yaml 2>log.txt & pid=$!",
        Way::Skip(MEASUREMENT),
    ),
    (
        "sleep 2; cp jobs.yaml svc/inbox/.jobs.part && mv svc/inbox/.jobs.part svc/inbox/jobs.yaml",
        Way::Skip(MEASUREMENT),
    ),
    (
        "sleep 60; kill -TERM $(pgrep -P $pid); wait $pid; grep 'Maximum resident' time.txt",
        Way::Skip(MEASUREMENT),
    ),
    // The idle CPU measurement.
    ("cargo build --release", Way::Skip(MEASUREMENT)),
    (
        "dir=$(mktemp -d); printf 'inbox: inbox\\noutput: out\\nstate: state.sqlite\\n' > $dir/daemon.yaml",
        Way::Skip(MEASUREMENT),
    ),
    (
        "KREA_API_KEY=unused target/release/krea-batch daemon --config $dir/daemon.yaml 2>/dev/null & pid=$!",
        Way::Skip(MEASUREMENT),
    ),
    (
        "sleep 5; a=$(awk '{print $14+$15}' /proc/$pid/stat); sleep 60; b=$(awk '{print $14+$15}' /proc/$pid/stat)",
        Way::Skip(MEASUREMENT),
    ),
    ("echo \"idle CPU over 60 s: $(( (b - a) * 10 )) ms\"; kill $pid", Way::Skip(MEASUREMENT)),
    // The benchmark.
    (
        "KREA_BATCH_BENCH_JOBS=200 KREA_BATCH_BENCH_CELLS=\"32/0/0 32/0/100 32/0/300 32/20/0 32/20/100 32/20/300 8/0/0 8/0/100 8/0/300 8/20/0 8/20/100 8/20/300 2/0/0 2/0/100 2/0/300 2/20/0 2/20/100 2/20/300\" cargo bench -- unknown_account",
        Way::Skip("the benchmark: minutes of simulated accounts; `cargo bench` is not a test"),
    ),
];

/// The commands of the README's ```` ```sh ```` blocks, in order: a line continued with a
/// trailing `\` joined to the next, comment lines left out, each as printed (`printed`) and
/// without its trailing comment (`key`).
fn sh_commands(readme: &str) -> Vec<(String, String)> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if !in_sh {
            in_sh = line.trim_end() == "```sh";
            continue;
        }
        if line.starts_with("```") {
            in_sh = false;
            continue;
        }
        let text = line.trim();
        if let Some(continued) = text.strip_suffix('\\') {
            pending.push_str(continued.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(text);
        let printed = std::mem::take(&mut pending);
        if printed.is_empty() || printed.starts_with('#') {
            continue;
        }
        let key = without_comment(&printed).to_owned();
        commands.push((printed, key));
    }
    commands
}

/// `command` without a trailing `# comment` (one after whitespace, outside quotes).
fn without_comment(command: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (at, c) in command.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => {
                return command[..at].trim_end();
            }
            _ => {}
        }
        previous = c;
    }
    command.trim_end()
}

fn way_of(key: &str) -> Option<Way> {
    COMMANDS.iter().find(|(listed, _)| *listed == key).map(|(_, way)| *way)
}

#[test]
fn every_readme_command_is_run_or_skipped_with_a_reason() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let commands = sh_commands(&readme);
    assert!(commands.len() > 10, "the README's sh blocks were found: {commands:?}");
    for (command, way) in COMMANDS {
        if let Way::Skip(reason) = way {
            assert!(reason.len() > 20, "`{command}` is skipped without a reason");
        }
    }
    let unlisted: Vec<&str> = commands
        .iter()
        .filter(|(_, key)| way_of(key).is_none())
        .map(|(_, key)| key.as_str())
        .collect();
    assert!(
        unlisted.is_empty(),
        "README commands neither run nor skipped by tests/it/readme.rs; add each to COMMANDS \
         (run it, or skip it with the reason): {unlisted:#?}"
    );
    let stale: Vec<&str> = COMMANDS
        .iter()
        .map(|(listed, _)| *listed)
        .filter(|listed| !commands.iter().any(|(_, key)| key == listed))
        .collect();
    assert!(stale.is_empty(), "COMMANDS lists commands the README no longer has: {stale:#?}");
}

#[test]
fn the_readme_commands_that_can_run_here_work_as_printed() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let folder = Folder::new();
    let sim = Sim::start(|_| {});
    let mut ran = 0;
    for (printed, key) in sh_commands(&readme) {
        let Some(way) = way_of(&key) else { continue }; // the other test names it
        let (simulated, times) = match way {
            Way::Skip(_) => continue,
            Way::Once => (None, 1),
            Way::Twice => (None, 2),
            Way::Simulated => (Some(&sim), 1),
            Way::SimulatedTwice => (Some(&sim), 2),
        };
        let created_before = sim.stats().jobs_created;
        for time in 1..=times {
            folder.run(&printed, simulated, time);
            ran += 1;
        }
        if times == 2 && simulated.is_none() {
            // The README: the simulated account is kept in this file, and the rerun "finds
            // every job done, sends nothing".
            let world = folder.path().join("out-simulated/.krea-batch-sim.json");
            let world: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&world).expect("the kept world"))
                    .expect("JSON");
            let jobs = world["account"]["jobs"].as_array().map(Vec::len);
            assert_eq!(jobs, Some(9), "`{printed}` twice: nine jobs in the simulated account");
        }
        if times == 2 && simulated.is_some() {
            let created = sim.stats().jobs_created;
            assert_eq!(
                created,
                created_before + 9,
                "`{printed}` twice: the nine jobs once each, nothing more on the rerun"
            );
        }
    }
    assert!(ran >= 10, "the runnable commands ran ({ran})");
    // What the quick start promises to leave: one PNG per job of the example, and a gallery.
    let pngs = |dir: &str| {
        std::fs::read_dir(folder.path().join(dir)).map_or(0, |entries| {
            entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "png")).count()
        })
    };
    assert_eq!(pngs("out-simulated"), 9, "`run jobs.example.yaml --simulate`'s results");
    assert!(folder.path().join("out-simulated/index.html").is_file());
    assert_eq!(pngs("out"), 9, "`run jobs.yaml`'s results");
}

/// The temporary folder the commands run in, and `krea-batch` on `PATH`.
struct Folder {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Folder {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs.example.yaml");
        for name in ["jobs.example.yaml", "jobs.yaml"] {
            std::fs::copy(&example, dir.path().join(name)).expect("the example copied");
        }
        let bin = dir.path().join(".bin");
        std::fs::create_dir(&bin).expect("a folder for PATH");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_krea-batch"), bin.join("krea-batch"))
            .expect("krea-batch on PATH");
        Self { dir, bin }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `printed` (with `cargo run --release --` as `krea-batch`) in `sh`; it must exit 0.
    fn run(&self, printed: &str, simulated: Option<&Sim>, time: u32) {
        let script = printed
            .strip_prefix("cargo run --release --")
            .map_or_else(|| printed.to_owned(), |rest| format!("krea-batch{rest}"));
        // The binary's clean environment (no key, no address, no credentials of the caller's),
        // and one user cache for all the commands, as one user's commands share theirs.
        let mut binary = krea_batch();
        binary.env("XDG_CACHE_HOME", self.path().join(".cache"));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin.clone()];
        paths.extend(std::env::split_paths(&path));
        binary.env("PATH", std::env::join_paths(paths).expect("a PATH"));
        if let Some(sim) = simulated {
            binary.env("KREA_API_BASE", sim.url()).env("KREA_API_KEY", sim.key());
        }
        let mut command = binary.via_shell(&script, &[]);
        command.current_dir(self.path());
        let output = command.output().expect("sh runs");
        assert!(
            output.status.success(),
            "`{printed}` (run {time}) exited {:?}\n--- stdout\n{}\n--- stderr\n{}",
            output.status.code(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
}
