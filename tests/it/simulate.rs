//! The simulation as users meet it: `run --simulate` run again in the same folder (after it
//! finished, after a 402 and a top-up, after Ctrl-C) resumes like a run against Krea, with the
//! simulated account kept beside the results; job ids never repeat across simulations; an id
//! handed out twice is reported and never a reason to submit again; and `simulate-api` explains
//! its settings and prints lines that work when pasted.

use crate::support::{
    FAST_LIMITS, LiveChild, Run, Sim, ViaShell, Workspace, krea_batch, numbered_jobs, wait_until,
};
use serde_json::Value;
use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A job file whose jobs are submitted one at a time, so a 402 meets no POST on the wire.
fn one_at_a_time(jobs: &str) -> Workspace {
    Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\nlimits:\n  submissions_per_minute: 1200\n  burst: 1\n  \
         max_in_flight: 4\n  poll_interval: 50ms\n  poll_interval_max: 200ms\n  \
         retry_backoff: 50ms\njobs:\n{jobs}"
    ))
}

/// The simulation's settings in `sim.yaml` beside the job file.
fn sim_config(work: &Workspace, yaml: &str) -> PathBuf {
    let path = work.dir.path().join("sim.yaml");
    std::fs::write(&path, yaml).expect("sim config");
    path
}

/// `krea-batch run --simulate --simulate-config CONFIG jobs.yaml`, in the workspace folder.
fn run_simulated(work: &Workspace, config: &Path) -> Run {
    Run::of(
        &krea_batch()
            .current_dir(work.dir.path())
            .args(["run", "--simulate", "--simulate-config"])
            .arg(config)
            .arg(work.job_file())
            .output()
            .expect("runs"),
    )
}

fn simulated_out(work: &Workspace) -> PathBuf {
    work.dir.path().join("out-simulated")
}

/// The simulated world that `run --simulate` keeps beside its results.
fn world(work: &Workspace) -> Value {
    let text = std::fs::read_to_string(simulated_out(work).join(".krea-batch-sim.json"))
        .expect("the simulated world is kept beside the results");
    serde_json::from_str(&text).expect("JSON")
}

/// Jobs the simulated world holds, and how many were created per prompt.
fn created(work: &Workspace) -> (usize, Vec<u64>) {
    let world = world(work);
    let jobs = world["account"]["jobs"].as_array().expect("jobs").len();
    let per_prompt = world["account"]["creations_by_prompt"].as_object().expect("counts");
    (jobs, per_prompt.values().map(|count| count.as_u64().expect("a count")).collect())
}

fn manifest_of(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("manifest.jsonl")).expect("manifest");
    text.lines().map(|line| serde_json::from_str(line).expect("JSON line")).collect()
}

#[test]
fn the_same_simulate_command_twice_exits_0_and_the_second_creates_no_job() {
    let work = Workspace::with_file(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/jobs.example.yaml"))
            .expect("example"),
    );
    let config = sim_config(&work, "job_time: 100ms\nvideo_job_time: 200ms\n");
    run_simulated(&work, &config).expect_code(0);
    let (jobs, _) = created(&work);
    let world_id = world(&work)["world_id"].clone();
    assert_eq!(jobs, 9, "the example's nine jobs");

    let again = run_simulated(&work, &config);
    again.expect_code(0);
    assert_eq!(created(&work).0, jobs, "the second run created no job");
    assert_eq!(world(&work)["world_id"], world_id, "the same simulated world");
    assert!(!again.stderr.contains("submitted job="), "nothing sent again: {}", again.stderr);
    assert!(again.stderr.contains("9 jobs: 9 done"), "{}", again.stderr);
}

#[test]
fn a_simulated_run_stopped_by_402_is_resumed_after_a_top_up_and_pays_nothing_twice() {
    // Three flux jobs ($0.007 each) fit in the simulated balance; five are asked for.
    let work = one_at_a_time(&numbered_jobs("a simulated harbour", 5));
    let config = sim_config(&work, "job_time: 100ms\nbalance_usd: 0.021\n");
    let stopped = run_simulated(&work, &config);
    stopped.expect_code(3);
    assert_eq!(created(&work).0, 3);
    // The run says how to top the simulation up; the line works as printed.
    let command = stopped
        .stderr
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("krea-batch simulate-api --top-up"))
        .unwrap_or_else(|| panic!("no top-up command in\n{}", stopped.stderr));
    let top_up = pasted(command, work.dir.path());
    top_up.expect_code(0);
    assert!(top_up.stdout.contains("simulated balance $5.00"), "{}", top_up.stdout);

    run_simulated(&work, &config).expect_code(0);
    let (jobs, per_prompt) = created(&work);
    assert_eq!(jobs, 5);
    assert!(per_prompt.iter().all(|count| *count == 1), "nothing paid twice: {per_prompt:?}");
    let spent = world(&work)["account"]["spent_micros"].as_i64().expect("spent");
    assert_eq!(spent, 5 * 7_000, "each job charged once");
    let manifest = manifest_of(&simulated_out(&work));
    assert!(manifest.iter().all(|line| line["status"] == "completed"), "{manifest:?}");
}

#[test]
fn a_simulated_run_stopped_at_once_is_finished_by_a_rerun_from_the_kept_world() {
    // Jobs of 3 s: a double Ctrl-C leaves them in flight, and they run on meanwhile.
    let work = Workspace::with_jobs(&numbered_jobs("an interrupted lake", 3));
    let config = sim_config(&work, "job_time: 3s\n");
    let mut command = krea_batch();
    command
        .current_dir(work.dir.path())
        .args(["run", "--simulate", "--simulate-config"])
        .arg(&config)
        .arg(work.job_file());
    let child = LiveChild::spawn(command);
    child.wait_for_log("submitted", Duration::from_mins(1));
    child.signal("INT");
    child.wait_for_log("no more submissions", Duration::from_secs(30));
    child.signal("INT");
    child.finish(Duration::from_secs(30)).expect_code(130);
    let (before, _) = created(&work);
    assert!(before >= 1, "a job was in flight");

    run_simulated(&work, &config).expect_code(0);
    let (jobs, per_prompt) = created(&work);
    assert_eq!(jobs, 3);
    assert!(per_prompt.iter().all(|count| *count == 1), "in-flight jobs were polled, not resent");
    let manifest = manifest_of(&simulated_out(&work));
    assert!(manifest.iter().all(|line| line["status"] == "completed"), "{manifest:?}");
}

#[test]
fn a_rerun_is_accepted_when_the_simulations_port_was_taken_meanwhile() {
    let work = Workspace::with_jobs(&numbered_jobs("a moved pier", 1));
    let config = sim_config(&work, "job_time: 50ms\n");
    run_simulated(&work, &config).expect_code(0);
    let before = world(&work);
    let port = u16::try_from(before["ports"]["api"].as_u64().expect("a port")).expect("a port");
    // Another program takes the port (SO_REUSEADDR, as the simulation binds, so the connections
    // the last run left in TIME_WAIT do not stand in the way).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let _taken = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(([127, 0, 0, 1], port).into()).expect("the old port is free to take");
        socket.listen(1).expect("listening")
    });
    work.set_jobs(&numbered_jobs("a moved pier", 2));
    let rerun = run_simulated(&work, &config);
    rerun.expect_code(0);
    let after = world(&work);
    assert_ne!(after["ports"]["api"], before["ports"]["api"], "another port");
    assert_eq!(after["world_id"], before["world_id"]);
    assert_eq!(created(&work), (2, vec![1, 1]), "only the new job was sent");
}

#[test]
fn job_ids_are_unique_across_two_simulation_processes() {
    // The same seed in both: ids must still differ.
    let ids = |stem: &str| -> HashSet<String> {
        let work = Workspace::with_jobs(&numbered_jobs(stem, 3));
        let config = sim_config(&work, "job_time: 50ms\nseed: 7\n");
        run_simulated(&work, &config).expect_code(0);
        manifest_of(&simulated_out(&work))
            .iter()
            .map(|line| line["job_id"].as_str().expect("a job id").to_owned())
            .collect()
    };
    let (first, second) = (ids("a first sky"), ids("a second sky"));
    assert_eq!((first.len(), second.len()), (3, 3));
    assert!(first.is_disjoint(&second), "{first:?} and {second:?} share ids");
}

#[test]
fn a_post_answered_with_an_id_already_claimed_is_reported_and_never_sent_again() {
    // Hostile: the simulation answers the second job with the first job's id.
    let sim = Sim::start(|config| config.reuse_job_ids = true);
    let work = Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\n{}\njobs:\n  - {{name: fox-1, prompt: a fox}}\n  \
         - {{name: fox-2, prompt: another fox}}\n",
        FAST_LIMITS.replace("burst: 20", "burst: 1")
    ));
    let mut command = krea_batch();
    command
        .arg("run")
        .arg(work.job_file())
        .env("KREA_API_BASE", sim.url())
        .env("KREA_API_KEY", sim.key());
    // Bounded: without the fix the engine submitted the job again and again.
    let run = LiveChild::spawn(command).finish(Duration::from_mins(1));
    run.expect_code(1);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 2, "the second job was not sent again");
    let manifest = work.manifest();
    let failed: Vec<&Value> = manifest.iter().filter(|line| line["status"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{manifest:?}");
    let (loser, error) = (&failed[0]["name"], failed[0]["error"].as_str().expect("why"));
    let winner = if loser == "fox-1" { "fox-2" } else { "fox-1" };
    let id = stats.jobs[0].id.as_str();
    assert!(error.contains(id) && error.contains(&format!("job {winner}")), "{error}");
    assert!(error.contains("not submitted again"), "{error}");
    assert!(run.stderr.contains(&format!("already belongs to job {winner}")), "{}", run.stderr);

    // A rerun does not send it either.
    work.run(&sim, &[]).expect_code(1);
    assert_eq!(sim.stats().jobs_created, 2);
}

#[test]
fn simulate_api_help_lists_its_settings_and_print_config_is_a_valid_config() {
    let help = Run::of(&krea_batch().args(["simulate-api", "--help"]).output().expect("runs"));
    help.expect_code(0);
    assert!(!help.stdout.contains("SimConfig"), "{}", help.stdout);
    for key in [
        "balance_usd",
        "job_time",
        "concurrency",
        "faults.post_drop_rate",
        "reuse_job_ids",
        "plan_required_models",
    ] {
        let line = help.stdout.lines().find(|line| line.trim_start().starts_with(key));
        let line = line.unwrap_or_else(|| panic!("{key} not listed:\n{}", help.stdout));
        assert!(line.split_whitespace().count() > 3, "{key} is explained: {line}");
    }
    assert!(help.stdout.contains("--top-up"), "{}", help.stdout);

    let printed =
        Run::of(&krea_batch().args(["simulate-api", "--print-config"]).output().expect("runs"));
    printed.expect_code(0);
    // Read as `--simulate-config` and `simulate-api --config` read a file.
    let config: krea_batch::sim::SimConfig =
        krea_batch::parse_yaml_document(&printed.stdout, std::path::Path::new("printed.yaml"))
            .expect("a valid configuration");
    assert_eq!(config.api_key, "sim-key");
}

#[test]
fn a_misspelled_simulation_setting_gets_the_job_files_did_you_mean() {
    let work = Workspace::with_jobs(&numbered_jobs("a typo", 1));
    let config = sim_config(&work, "job_time: 1s\nconcurency: 3\n");
    let run = run_simulated(&work, &config);
    run.expect_code(2);
    let expected = format!(
        "{}:2:1: unknown key \"concurency\"; did you mean `concurrency`?",
        config.display()
    );
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
    assert_eq!(run.stderr.matches("concurency").count(), 1, "said once: {}", run.stderr);
}

#[test]
fn the_banner_lines_work_when_pasted() {
    // Room for one flux job: the second meets a 402 until the pasted top-up.
    let mut server = krea_batch()
        .args(["simulate-api", "--balance", "0.007"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("simulate-api starts");
    let banner = read_banner(server.stdout.take().expect("piped stdout"));
    let line = |start: &str| -> String {
        banner
            .iter()
            .find(|line| line.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in {banner:?}"))
            .clone()
    };
    let (export, top_up) =
        (line("export KREA_API_BASE="), line("krea-batch simulate-api --top-up"));

    let work = one_at_a_time(&numbered_jobs("a pasted harbour", 2));
    let run_pasted = || {
        let script = format!("{export}\nexec \"$0\" run \"$1\"");
        let path = work.job_file();
        Run::of(&krea_batch().output_via_shell(&script, &[path.to_str().expect("UTF-8 path")]))
    };
    run_pasted().expect_code(3);
    let topped = pasted(&top_up, work.dir.path());
    topped.expect_code(0);
    assert!(topped.stdout.contains("simulated balance $5.00"), "{}", topped.stdout);
    run_pasted().expect_code(0);
    assert!(work.manifest().iter().all(|line| line["status"] == "completed"));

    let stop = std::process::Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stop.success());
    let mut ended = false;
    wait_until(Duration::from_secs(30), "simulate-api ends on Ctrl-C", || {
        ended = server.try_wait().expect("try_wait").is_some();
        ended
    });
}

/// `line`, a `krea-batch …` command as printed, run in a shell in `dir` with the binary under
/// test first on `PATH` as `krea-batch`.
fn pasted(line: &str, dir: &Path) -> Run {
    let bin = dir.join("bin");
    if !bin.join("krea-batch").exists() {
        std::fs::create_dir_all(&bin).expect("bin folder");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_krea-batch"), bin.join("krea-batch"))
            .expect("krea-batch on PATH");
    }
    let path = std::env::join_paths(
        std::iter::once(bin)
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH");
    let mut command = krea_batch();
    command.current_dir(dir).env("PATH", path);
    Run::of(&command.output_via_shell(line, &[]))
}

/// The banner's lines, up to "Ctrl-C stops it.", read within a deadline.
fn read_banner(stdout: std::process::ChildStdout) -> Vec<String> {
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut banner = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines.recv_timeout(left).expect("the banner is printed");
        let last = line.starts_with("Ctrl-C");
        banner.push(line);
        if last {
            return banner;
        }
    }
}
