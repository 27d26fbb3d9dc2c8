//! The budget of a one-shot run (`budget:` in the job file): `check` says whether the estimate
//! fits, a run stops submitting before the cap would be exceeded (exit 5) while jobs in flight
//! finish, a rerun with a higher cap sends the rest, and jobs of unknown price are refused
//! before anything is sent. The service's budget is tested in `daemon.rs`.

use crate::support::{FAST_LIMITS, Sim, Workspace, numbered_jobs};

/// A job file of `jobs` flux jobs ($0.007 each) under `budget`.
fn budgeted(budget: &str, jobs: usize) -> Workspace {
    Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\nbudget: {budget}\n{FAST_LIMITS}\njobs:\n{}",
        numbered_jobs("a budgeted lighthouse", jobs)
    ))
}

#[test]
fn check_says_whether_the_estimate_fits_the_budget() {
    let sim = Sim::start(|_| {});
    let fits = budgeted("{max_usd: 0.035}", 5);
    let run = fits.command(&sim, "unused", &["check"], &["--json"]);
    run.expect_code(0);
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON plan");
    assert_eq!(plan["budget"]["fits"], true, "{plan}");
    assert_eq!(plan["budget"]["max_usd"], 0.035, "{plan}");

    let over = budgeted("{max_usd: 0.03, per_day_usd: 0.01}", 5);
    let run = over.command(&sim, "unused", &["check"], &[]);
    run.expect_code(5);
    assert!(run.stdout.contains("estimated cost: $0.0350"), "{}", run.stdout);
    assert!(run.stdout.contains("budget: $0.03: the estimate does NOT fit"), "{}", run.stdout);
    assert!(
        run.stdout.contains("daily budget: $0.01: the estimate takes at least 4 day(s)"),
        "{}",
        run.stdout
    );
    assert_eq!(sim.stats().jobs_created, 0);
}

#[test]
fn a_run_stops_at_the_budget_with_exit_5_and_a_higher_cap_sends_the_rest() {
    let sim = Sim::start(|_| {});
    // Three jobs fit in $0.021; the fourth would exceed it.
    let work = budgeted("{max_usd: 0.021}", 5);
    let run = work.run(&sim, &[]);
    run.expect_code(5);
    assert!(run.stderr.contains("the budget of $0.021 would be exceeded"), "{}", run.stderr);
    assert!(run.stderr.contains("Stopped submitting: the next job would exceed"), "{}", run.stderr);
    assert_eq!(sim.stats().jobs_created, 3, "nothing sent past the budget");
    let manifest = work.manifest();
    let completed = manifest.iter().filter(|line| line["status"] == "completed").count();
    assert_eq!(completed, 3, "the jobs in flight finished: {manifest:?}");

    let text = std::fs::read_to_string(work.job_file()).expect("job file");
    std::fs::write(work.job_file(), text.replace("max_usd: 0.021", "max_usd: 0.05"))
        .expect("budget raised");
    work.run(&sim, &[]).expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 5);
    assert!(stats.creations_by_prompt.values().all(|count| *count == 1), "none paid twice");
}

#[test]
fn jobs_of_unknown_price_are_refused_under_a_budget_until_priced() {
    let sim = Sim::start(|_| {});
    let text = format!(
        "model: image/unknown/model\nbudget: {{max_usd: 1}}\n{FAST_LIMITS}\njobs:\n{}",
        numbered_jobs("an unpriced harbour", 2)
    );
    let work = Workspace::with_file(&text);
    let check = work.command(&sim, "unused", &["check"], &[]);
    check.expect_code(2);
    assert!(check.stdout.contains("knows no price for image/unknown/model (2 jobs)"));
    let run = work.run(&sim, &["--no-validate"]);
    run.expect_code(2);
    assert!(run.stderr.contains("add each under `prices:`"), "{}", run.stderr);
    let stats = sim.stats();
    assert!(stats.requests.iter().all(|r| r.path == "/openapi.json"), "only the schemas read");
    assert_eq!(stats.jobs_created, 0);

    // A price in the file makes them countable.
    std::fs::write(work.job_file(), format!("prices: {{image/unknown/model: 0.5}}\n{text}"))
        .expect("priced");
    let check = work.command(&sim, "unused", &["check"], &["--json"]);
    let plan: serde_json::Value = serde_json::from_str(&check.stdout).expect("JSON plan");
    assert_eq!(plan["budget"]["fits"], true, "{plan}");
}
