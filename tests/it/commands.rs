//! The commands that act on a state after a run, as the README and their usage lines print
//! them: `cancel --file FILE --all`, `cancel --file FILE NAME`, and the exit codes and
//! messages when the state is not where a command looks; the global `--color` flag.

use crate::support::{Run, Sim, Workspace, krea_batch};

/// A run stopped by a 402 after two of six named jobs (`p0`…`p5`): four are left unsent.
fn four_left_unsent(sim: &Sim) -> Workspace {
    let work = Workspace::with_jobs(
        "  - {name: p0, prompt: a pier 0}\n  - {name: p1, prompt: a pier 1}\n  \
         - {name: p2, prompt: a pier 2}\n  - {name: p3, prompt: a pier 3}\n  \
         - {name: p4, prompt: a pier 4}\n  - {name: p5, prompt: a pier 5}\n",
    );
    work.run(sim, &[]).expect_code(3);
    work
}

/// `krea-batch cancel ARGS` with the simulation's key.
fn cancel(sim: &Sim, args: &[&str]) -> Run {
    Run::of(
        &krea_batch()
            .arg("cancel")
            .args(args)
            .env("KREA_API_KEY", sim.key())
            .env("KREA_API_BASE", sim.url())
            .output()
            .expect("cancel runs"),
    )
}

fn counts(work: &Workspace, sim: &Sim) -> serde_json::Value {
    let status = work.command(sim, "unused", &["status"], &["--json"]);
    status.expect_code(0);
    serde_json::from_str::<serde_json::Value>(&status.stdout).expect("JSON status")["counts"]
        .clone()
}

#[test]
fn cancel_takes_a_job_file_with_names_or_all_as_its_usage_says() {
    let sim = Sim::start(|config| config.balance_usd = 0.014);
    let work = four_left_unsent(&sim);
    let file = work.job_file();
    let file = file.to_str().expect("a UTF-8 path");
    assert_eq!(counts(&work, &sim)["pending"], 4);
    // The text names the state as the JSON does.
    let text = work.command(&sim, "unused", &["status"], &[]);
    let pending = text.stdout.lines().find(|line| line.contains("pending (not submitted)"));
    assert!(pending.is_some_and(|line| line.trim_end().ends_with(" 4")), "{}", text.stdout);

    // One job of the file by name: the state is found from the job file.
    let named = cancel(&sim, &["--file", file, "p5"]);
    named.expect_code(0);
    assert_eq!(named.stdout.trim(), "cancelled 1 job", "one job, said in the singular");
    assert_eq!(counts(&work, &sim)["cancelled"], 1);

    // A name the file does not have is refused with the place looked in.
    let unknown = cancel(&sim, &["--file", file, "nope"]);
    unknown.expect_code(2);
    assert!(unknown.stderr.contains("no job named nope"), "{}", unknown.stderr);

    // The README's line: everything of the file not yet finished.
    let all = cancel(&sim, &["--file", file, "--all"]);
    all.expect_code(0);
    assert!(all.stdout.contains("cancelled 3 jobs"), "{}", all.stdout);
    let counts = counts(&work, &sim);
    assert_eq!((counts["cancelled"].as_u64(), counts["pending"].as_u64()), (Some(4), Some(0)));
    assert_eq!(sim.stats().jobs_created, 2, "a cancel sends no job");

    // Names alone do not say which state: the message says how to name it.
    let nowhere = cancel(&sim, &["p0"]);
    nowhere.expect_code(2);
    assert!(nowhere.stderr.contains("--file JOBS.yaml"), "{}", nowhere.stderr);
}

/// `krea-batch ARGS` run in the workspace folder.
fn in_folder(work: &Workspace, args: &[&str]) -> Run {
    Run::of(&krea_batch().current_dir(work.dir.path()).args(args).output().expect("runs"))
}

/// After `run --simulate`, every command that reads a state takes `--simulate` and reads the
/// simulated folder's; without it, it says where the simulated results are (exit 2) and
/// creates nothing in `out/`.
#[test]
fn commands_that_read_a_state_take_simulate_and_never_create_one() {
    let work =
        Workspace::with_jobs("  - {name: fox, prompt: a fox}\n  - {name: owl, prompt: an owl}\n");
    std::fs::write(work.dir.path().join("sim.yaml"), "job_time: 100ms\n").expect("sim config");
    let run =
        in_folder(&work, &["run", "--simulate", "--simulate-config", "sim.yaml", "jobs.yaml"]);
    run.expect_code(0);
    assert!(
        run.stderr.lines().any(|line| {
            line.starts_with("gallery: ") && line.ends_with("out-simulated/index.html")
        }),
        "the summary names the page: {}",
        run.stderr
    );
    let simulated = work.dir.path().join("out-simulated");

    for command in
        [&["status", "jobs.yaml"][..], &["download", "jobs.yaml"], &["resume", "jobs.yaml"]]
    {
        let refused = in_folder(&work, command);
        refused.expect_code(2);
        assert!(refused.stderr.contains("there is no state file at"), "{}", refused.stderr);
        assert!(
            refused.stderr.contains("out-simulated") && refused.stderr.contains("add --simulate"),
            "{command:?}: {}",
            refused.stderr
        );
        assert!(!work.out().exists(), "{command:?} created {}", work.out().display());
    }
    let cancel = in_folder(&work, &["cancel", "--file", "jobs.yaml", "fox"]);
    cancel.expect_code(2);
    assert!(!work.out().exists(), "cancel created {}", work.out().display());

    let status = in_folder(&work, &["status", "--simulate", "jobs.yaml", "--json"]);
    status.expect_code(0);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(status["counts"]["completed"], 2, "{status}");
    let download = in_folder(&work, &["download", "--simulate", "jobs.yaml"]);
    download.expect_code(0);
    assert!(download.stderr.contains("2 jobs: 2 done"), "{}", download.stderr);
    let cancel = in_folder(&work, &["cancel", "--simulate", "--file", "jobs.yaml", "--all"]);
    cancel.expect_code(0);
    assert!(cancel.stdout.contains("have all ended"), "{}", cancel.stdout);
    let check = in_folder(&work, &["check", "--simulate", "jobs.yaml", "--json"]);
    check.expect_code(0);
    let plan: serde_json::Value = serde_json::from_str(&check.stdout).expect("JSON plan");
    assert_eq!(
        (plan["resume"]["done"].as_u64(), plan["resume"]["to_pay"].as_u64()),
        (Some(2), Some(0)),
        "{plan}"
    );
    assert!(plan["state"].as_str().is_some_and(|state| state.contains("out-simulated")), "{plan}");
    let resume = in_folder(&work, &["resume", "--simulate", "jobs.yaml"]);
    resume.expect_code(0);
    assert!(resume.stdout.contains("no krea-batch is running"), "{}", resume.stdout);

    // A lost simulated state is rebuilt from the simulated account kept beside the results.
    std::fs::remove_file(simulated.join(".krea-batch.sqlite")).expect("state removed");
    let recover = in_folder(&work, &["recover", "--simulate", "jobs.yaml"]);
    recover.expect_code(0);
    assert!(recover.stderr.contains("2 jobs recovered"), "{}", recover.stderr);
    let status = in_folder(&work, &["status", "--simulate", "jobs.yaml", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON");
    assert_eq!(status["counts"]["completed"], 2, "{status}");
    assert!(!work.out().exists(), "nothing was ever written to {}", work.out().display());
}

/// `status` of a job file never run is a usage error (exit 2, as README says), naming the
/// state file it looked for.
#[test]
fn status_of_a_job_file_never_run_exits_2() {
    let work = Workspace::with_jobs("  - {prompt: a fox}\n");
    let status = in_folder(&work, &["status", "jobs.yaml"]);
    status.expect_code(2);
    assert!(status.stderr.contains(".krea-batch.sqlite"), "{}", status.stderr);
    assert!(status.stderr.contains("krea-batch run"), "{}", status.stderr);
    assert!(!work.out().exists());
}

/// `--color always` colours the log even into a pipe, and wins over `NO_COLOR`; `--color never`
/// and the default (`auto`, not a terminal here) do not. The terminal case of `NO_COLOR` is the
/// binary's unit test `no_color_is_honoured_on_a_terminal_and_the_flag_overrides_it`.
#[test]
fn color_always_colours_the_log_and_never_does_not() {
    const ESC: &str = "\x1b[";
    let work = Workspace::with_jobs("  - {name: fox, prompt: a fox}\n");
    std::fs::write(work.dir.path().join("sim.yaml"), "job_time: 50ms\n").expect("sim config");
    let run = |color: &[&str], no_color: Option<&str>| {
        let mut command = krea_batch();
        command.current_dir(work.dir.path()).args(color);
        command.args(["run", "--simulate", "--simulate-config", "sim.yaml", "jobs.yaml"]);
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        } else {
            command.env_remove("NO_COLOR");
        }
        let run = Run::of(&command.output().expect("runs"));
        run.expect_code(0);
        assert!(run.stderr.contains("INFO"), "the run logs: {}", run.stderr);
        run.stderr
    };
    let always = run(&["--color", "always"], None);
    assert!(always.contains(ESC), "{always}");
    let overridden = run(&["--color=always"], Some("1"));
    assert!(overridden.contains(ESC), "--color always wins over NO_COLOR: {overridden}");
    let never = run(&["--color", "never"], None);
    assert!(!never.contains(ESC), "{never}");
    let no_color = run(&[], Some("1"));
    assert!(!no_color.contains(ESC), "{no_color}");
}
