//! Bad input is refused before anything is sent, with its place named; `check` and `status`.

use crate::support::{Sim, Workspace, krea_batch, numbered_jobs};

#[test]
fn malformed_yaml_is_refused_with_line_and_column_and_nothing_is_sent() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_file(
        "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a fox\n  - prompt: [unclosed\n",
    );
    let run = work.run(&sim, &[]);
    run.expect_code(2);
    assert!(run.stderr.contains("jobs.yaml:"), "{}", run.stderr);
    let located = run.stderr.lines().any(|line| {
        let mut parts = line.split(':').skip_while(|part| !part.ends_with("jobs.yaml"));
        parts.next();
        let line_no = parts.next().and_then(|p| p.trim().parse::<u32>().ok());
        let column = parts.next().and_then(|p| p.trim().parse::<u32>().ok());
        line_no.is_some() && column.is_some()
    });
    assert!(located, "file:line:column in {}", run.stderr);
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

#[test]
fn semantic_errors_name_the_key() {
    let sim = Sim::start(|_| {});
    let cases = [
        ("jobs:\n  - prompt: ''\n", "jobs[0].prompt", 3),
        ("jobs:\n  - prompt: a\n    nmae: b\n", "jobs[0]", 4),
        ("jobs:\n  - {prompt: a, name: x}\n  - {prompt: b, name: x}\n", "jobs[1].name", 4),
        ("jobs:\n  - {prompt: a, count: 0}\n", "count", 3),
        ("limits:\n  poll_interval: soon\njobs:\n  - prompt: a\n", "limits.poll_interval", 3),
    ];
    for (body, key, line) in cases {
        let work = Workspace::with_file(&format!("model: image/bfl/flux-1-dev\n{body}"));
        let run = work.run(&sim, &[]);
        run.expect_code(2);
        assert!(run.stderr.contains(key), "{key} in {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("jobs.yaml:{line}:")),
            "line {line} in {}",
            run.stderr
        );
    }
    assert_eq!(sim.stats().requests_total, 0);
}

/// Names of krea-batch's own files in the output folder are refused when the job file is read
/// (a job named `manifest.jsonl` was paid for and could never be downloaded), as a name: key
/// and as a name a sweep makes; nothing is sent.
#[test]
fn job_names_of_krea_batchs_own_files_are_refused() {
    let sim = Sim::start(|_| {});
    let cases = [
        ("jobs:\n  - {prompt: a, name: manifest.jsonl}\n", "jobs[0].name", 3, "manifest.jsonl"),
        (
            "jobs:\n  - prompt: a\n  - prompt: b\n    name: Index.html\n",
            "jobs[1].name",
            5,
            "Index.html",
        ),
        (
            "jobs:\n  - prompt: \"a {n}\"\n    name: \"index-{n}.html\"\n    matrix: {n: [2]}\n",
            "jobs[0]",
            3,
            "index-2.html",
        ),
    ];
    for (body, key, line, name) in cases {
        let work = Workspace::with_file(&format!("model: image/bfl/flux-1-dev\n{body}"));
        let run = work.run(&sim, &[]);
        run.expect_code(2);
        let message = run.stderr.trim();
        assert!(message.contains(&format!("jobs.yaml:{line}:")), "line {line}: {message}");
        assert!(message.contains(key) && message.contains(name), "{key}, {name}: {message}");
        assert!(message.contains("output folder"), "{message}");
        assert!(!work.out().join("manifest.jsonl").exists());
    }
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

/// The OpenAPI document is cached once per user and API base, not beside each state file:
/// `check --offline` on a job file in another folder (so another state) finds it.
#[test]
fn the_openapi_cache_is_per_user_and_found_from_another_folder() {
    let sim = Sim::start(|_| {});
    let first = Workspace::with_jobs(&numbered_jobs("a fox", 1));
    first.command(&sim, "unused", &["check"], &["--json"]).expect_code(0);
    let cached = crate::support::files_under(&first.cache_home().join("krea-batch"));
    assert_eq!(cached.len(), 1, "one document cached for the API base: {cached:?}");
    assert!(
        crate::support::files_under(first.dir.path())
            .iter()
            .all(|file| { !file.ends_with(".krea-batch.openapi.json") }),
        "nothing cached beside the state"
    );

    let other = Workspace::with_jobs(&numbered_jobs("an owl", 1));
    let output = krea_batch()
        .args(["check", "--json", "--offline"])
        .arg(other.job_file())
        .env("KREA_API_BASE", sim.url())
        .env("XDG_CACHE_HOME", first.cache_home())
        .output()
        .expect("check runs");
    let offline = crate::support::Run::of(&output);
    offline.expect_code(0);
    let plan: serde_json::Value = serde_json::from_str(&offline.stdout).expect("JSON plan");
    let origin = plan["schema"]["origin"].as_str().unwrap_or_default();
    assert!(
        origin.contains(&cached[0].display().to_string()) && origin.contains("(cached)"),
        "{plan}"
    );
    let fetched = sim.stats().requests.iter().filter(|r| r.path == "/openapi.json").count();
    assert_eq!(fetched, 1, "fetched once, then read from the cache");

    // Offline, a body the cached document refuses is refused, from any folder.
    let bad = Workspace::with_jobs("  - {prompt: a fox, params: {steps: 500}}\n");
    let output = krea_batch()
        .args(["check", "--offline"])
        .arg(bad.job_file())
        .env("KREA_API_BASE", sim.url())
        .env("XDG_CACHE_HOME", first.cache_home())
        .output()
        .expect("check runs");
    let refused = crate::support::Run::of(&output);
    refused.expect_code(2);
    assert!(refused.stdout.contains("steps: 500 is above the maximum 100"), "{}", refused.stdout);
    let fetched = sim.stats().requests.iter().filter(|r| r.path == "/openapi.json").count();
    assert_eq!(fetched, 1, "nothing fetched offline");
}

#[test]
fn a_missing_key_names_all_three_sources() {
    let work = Workspace::with_jobs(&numbered_jobs("x", 1));
    let output = krea_batch().arg("run").arg(work.job_file()).output().expect("runs");
    let run = crate::support::Run::of(&output);
    run.expect_code(2);
    let message = run.stderr.trim();
    assert_eq!(message.lines().count(), 1, "{message}");
    for source in ["KREA_API_KEY", "--api-key-file", "CREDENTIALS_DIRECTORY"] {
        assert!(message.contains(source), "{message}");
    }
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let work = Workspace::with_jobs(&numbered_jobs("x", 1));
    let output = krea_batch()
        .arg("run")
        .arg(work.job_file())
        .env("KREA_API_KEY", "k")
        .env("KREA_API_BASE", "http://api.krea.ai")
        .output()
        .expect("runs");
    let run = crate::support::Run::of(&output);
    run.expect_code(2);
    assert!(run.stderr.contains("only https"), "{}", run.stderr);
}

#[test]
fn check_prints_the_plan_and_sends_nothing() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(
        "  - {prompt: a fox, count: 3}\n  - {prompt: a cat, model: image/krea/krea-2/medium}\n",
    );
    let run = work.command(&sim, "unused", &["check"], &["--json"]);
    run.expect_code(0);
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON plan");
    assert_eq!(plan["jobs"], 4);
    let estimated = plan["estimated_usd"].as_f64().expect("estimate");
    assert!((estimated - (3.0 * 0.007 + 0.03)).abs() < 1e-9, "{estimated}");
    assert!(
        plan["schema"]["origin"].as_str().is_some_and(|o| o.ends_with("/openapi.json")),
        "{plan}"
    );
    assert_eq!(plan["schema"]["problems"].as_array().map(Vec::len), Some(0));
    let stats = sim.stats();
    assert!(
        stats.requests.iter().all(|r| r.path == "/openapi.json"),
        "only the schemas were fetched"
    );
    assert_eq!(stats.jobs_created, 0);
}

#[test]
fn check_names_schema_problems_with_their_line_and_exits_2() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(
        "  - {prompt: a fox, params: {steps: 500}}\n  - {prompt: a cat, model: image/krea/krea-2/medium, params: {creativity: wild}}\n",
    );
    let run = work.command(&sim, "unused", &["check"], &[]);
    run.expect_code(2);
    assert!(
        run.stdout.contains("jobs.yaml:")
            && run.stdout.contains("steps: 500 is above the maximum 100"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("creativity: \"wild\" is not one of"), "{}", run.stdout);
    assert_eq!(sim.stats().jobs_created, 0);

    // A model the document does not know is a warning, and an unreachable document too.
    let unknown = Workspace::with_jobs("  - {prompt: a fox, model: image/new/model}\n");
    let run = unknown.command(&sim, "unused", &["check"], &[]);
    run.expect_code(0);
    assert!(run.stdout.contains("does not describe image/new/model"), "{}", run.stdout);
    let offline = unknown.command(&sim, "unused", &["check"], &["--openapi", "/nonexistent.json"]);
    offline.expect_code(0);
    assert!(offline.stdout.contains("were not checked"), "{}", offline.stdout);
}

#[test]
fn status_reads_the_state_file() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a pier", 3));
    work.run(&sim, &[]).expect_code(0);
    let run = work.command(&sim, "unused", &["status"], &["--json"]);
    run.expect_code(0);
    let status: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON status");
    assert_eq!(status["counts"]["completed"], 3);
    // Money as it means: three prices of $0.007 summed, without binary noise.
    assert_eq!(status["spent_usd"].to_string(), "0.021", "{status}");
}

/// An error keeps the error beneath it as its source, and the message printed says each cause
/// once: an output folder that is a file is refused (exit 2) with its reason, not repeated.
#[test]
fn a_refusal_says_its_cause_once() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs("  - prompt: a fox\n");
    std::fs::write(work.out(), b"not a folder").expect("a file where the folder goes");
    let run = work.run(&sim, &[]);
    run.expect_code(2);
    let said = run.stderr.matches("it is a file, not a folder").count();
    assert_eq!(said, 1, "the cause once in {}", run.stderr);
    assert!(run.stderr.contains("output directory"), "{}", run.stderr);
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

/// `duration: 5` fits a schema whose allowed values are written `5.0` and `10.0` (numbers
/// compare by value), and a value that fits none is told every allowed one.
#[test]
fn check_compares_numbers_by_value_and_lists_every_allowed_one() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_file(
        "model: video/kling/kling-2.5\njobs:\n  - {prompt: waves, params: {duration: 5}}\n  \
         - {prompt: dunes, params: {duration: 10}}\n",
    );
    let fits = work.command(&sim, "unused", &["check"], &[]);
    fits.expect_code(0);
    assert!(fits.stdout.contains("request bodies fit"), "{}", fits.stdout);

    work_with_duration(&work, "7");
    let refused = work.command(&sim, "unused", &["check"], &[]);
    refused.expect_code(2);
    assert!(refused.stdout.contains("duration: 7 is not one of 5.0, 10.0"), "{}", refused.stdout);
}

fn work_with_duration(work: &Workspace, duration: &str) {
    std::fs::write(
        work.job_file(),
        format!("model: video/kling/kling-2.5\njobs:\n  - {{prompt: waves, params: {{duration: {duration}}}}}\n"),
    )
    .expect("job file rewritten");
}

/// `check` says "valid" only when nothing it lists says otherwise; a mistake in the top-level
/// `params:` is reported once, at its own line; a model path close to one Krea lists is a typo.
#[test]
fn check_reports_defaults_at_their_line_and_model_typos_with_did_you_mean() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_file(
        "model: image/bfl/flux-1-dev\nparams:\n  width: 1024\n  steps: 500\njobs:\n  - prompt: a\n  \
         - prompt: b\n  - prompt: c\n    params: {steps: 20, width: 9000}\n",
    );
    let run = work.command(&sim, "unused", &["check"], &[]);
    run.expect_code(2);
    let first = run.stdout.lines().next().unwrap_or_default();
    assert!(first.ends_with("3 jobs, NOT valid: 2 problems, listed below"), "{}", run.stdout);
    assert!(!run.stdout.contains(", valid"), "{}", run.stdout);
    let steps: Vec<&str> = run.stdout.lines().filter(|line| line.contains("steps:")).collect();
    assert_eq!(steps.len(), 1, "the default's mistake once: {}", run.stdout);
    assert!(
        steps[0].trim().ends_with(
            "jobs.yaml:4: params (image/bfl/flux-1-dev): steps: 500 is above the maximum 100"
        ),
        "{}",
        run.stdout
    );
    // A job's own value is the job's mistake, at its line.
    let width = run.stdout.lines().find(|line| line.contains("width:")).unwrap_or_default();
    assert!(width.contains("jobs.yaml:8: job "), "{}", run.stdout);

    let typo =
        Workspace::with_file("model: image/bfl/flux-dev\njobs:\n  - prompt: a\n  - prompt: b\n");
    let run = typo.command(&sim, "unused", &["check"], &[]);
    run.expect_code(2);
    let said: Vec<&str> = run.stdout.lines().filter(|line| line.contains("flux-dev:")).collect();
    assert_eq!(said.len(), 1, "once per model: {}", run.stdout);
    assert!(said[0].contains("did you mean image/bfl/flux-1-dev?"), "{}", run.stdout);
    assert!(!run.stdout.contains("does not describe"), "{}", run.stdout);
}
