//! `krea-batch retry`: a job that failed in the simulation is run again on purpose, once, after
//! its estimated cost is shown; without `--yes` and without a terminal it is refused (exit 2);
//! a job that did not fail is not retried.

use crate::support::{FAST_LIMITS, Run, Workspace, krea_batch};
use serde_json::Value;
use std::path::Path;

/// `krea-batch ARGS` in the workspace folder, with no terminal on stdin.
fn in_folder(work: &Workspace, args: &[&str]) -> Run {
    let mut command = krea_batch();
    command.current_dir(work.dir.path()).args(args).stdin(std::process::Stdio::null());
    Run::of(&command.output().expect("krea-batch runs"))
}

/// The simulation's settings in `name` beside the job file.
fn sim_config(work: &Workspace, name: &str, yaml: &str) -> String {
    std::fs::write(work.dir.path().join(name), yaml).expect("sim config");
    name.to_owned()
}

fn status(work: &Workspace) -> Value {
    let status = in_folder(work, &["status", "--simulate", "--json", "jobs.yaml"]);
    status.expect_code(0);
    serde_json::from_str(&status.stdout).expect("JSON status")
}

/// How many jobs the simulated account created for each prompt.
fn created_per_prompt(work: &Workspace) -> Value {
    let world = work.dir.path().join("out-simulated/.krea-batch-sim.json");
    let world: Value =
        serde_json::from_str(&std::fs::read_to_string(world).expect("kept world")).expect("JSON");
    world["account"]["creations_by_prompt"].clone()
}

#[test]
fn a_failed_job_is_retried_once_after_its_cost_is_shown_and_never_without_consent() {
    let work = Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\n{FAST_LIMITS}\njobs:\n  - {{name: cat, prompt: a cat FLAGGED}}\n  \
         - {{name: dog, prompt: a dog}}\n"
    ));
    let failing = sim_config(&work, "failing.yaml", "job_time: 50ms\nmoderation_marker: FLAGGED\n");
    let passing = sim_config(&work, "passing.yaml", "job_time: 50ms\nmoderation_marker: NEVER\n");
    let first =
        in_folder(&work, &["run", "--simulate", "--simulate-config", &failing, "jobs.yaml"]);
    first.expect_code(1);
    assert_eq!(status(&work)["counts"]["failed"], 1);

    // No terminal, no --yes: refused, with the cost shown and what to do.
    let asked = in_folder(&work, &["retry", "--simulate", "jobs.yaml", "--failed"]);
    asked.expect_code(2);
    assert!(asked.stderr.contains("cat (image/bfl/flux-1-dev, $0.007)"), "{}", asked.stderr);
    assert!(asked.stderr.contains("estimated cost: $0.0070"), "{}", asked.stderr);
    assert!(asked.stderr.contains("pass --yes"), "{}", asked.stderr);
    assert_eq!(status(&work)["counts"]["failed"], 1, "still failed");

    // A job that did not fail is not retried.
    let done = in_folder(&work, &["retry", "--simulate", "--yes", "jobs.yaml", "dog"]);
    done.expect_code(2);
    assert!(done.stderr.contains("job dog is done, not failed"), "{}", done.stderr);

    // A misspelt name gets the closest one.
    let typo = in_folder(&work, &["retry", "--simulate", "--yes", "jobs.yaml", "catt"]);
    typo.expect_code(2);
    assert!(typo.stderr.contains("no job named catt of jobs.yaml"), "{}", typo.stderr);
    assert!(typo.stderr.contains("did you mean cat?"), "{}", typo.stderr);

    // A job gone from the job file is not run again (the run would not send it).
    let full = std::fs::read_to_string(work.job_file()).expect("job file");
    let kept: Vec<&str> = full.lines().filter(|line| !line.contains("cat")).collect();
    let without_cat = kept.join("\n") + "\n";
    std::fs::write(work.job_file(), without_cat).expect("cat removed");
    let gone = in_folder(&work, &["retry", "--simulate", "--yes", "jobs.yaml", "cat"]);
    gone.expect_code(2);
    assert!(gone.stderr.contains("job cat is no longer in"), "{}", gone.stderr);
    std::fs::write(work.job_file(), full).expect("cat back");

    let retried = in_folder(
        &work,
        &["retry", "--simulate", "--simulate-config", &passing, "--yes", "jobs.yaml", "cat"],
    );
    retried.expect_code(0);
    assert!(retried.stderr.contains("1 failed job to run again"), "{}", retried.stderr);
    let counts = &status(&work)["counts"];
    assert_eq!((counts["failed"].as_u64(), counts["completed"].as_u64()), (Some(0), Some(2)));
    assert!(work.dir.path().join("out-simulated/cat.png").exists(), "its result is on disk");
    let created = created_per_prompt(&work);
    assert_eq!(created["a cat FLAGGED"], 2, "the failure, then exactly one new job: {created}");
    assert_eq!(created["a dog"], 1, "the completed job is not sent again: {created}");

    // The state keeps the failure the retry replaced.
    let state = rusqlite::Connection::open(Path::new(
        &work.dir.path().join("out-simulated/.krea-batch.sqlite"),
    ))
    .expect("state");
    let kept: String = state
        .query_row("SELECT error FROM retries", [], |row| row.get(0))
        .expect("one retry recorded");
    assert!(kept.contains("moderation"), "{kept}");

    // Nothing failed is left: nothing to do.
    let nothing = in_folder(&work, &["retry", "--simulate", "jobs.yaml", "--failed"]);
    nothing.expect_code(0);
    assert!(nothing.stderr.contains("nothing to retry"), "{}", nothing.stderr);
}
