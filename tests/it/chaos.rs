//! The chaos matrix: every fault the simulation can inject, alone and then all together, with
//! the real binary against it. A run (and, where a fault leaves work for later, a bounded
//! number of reruns) must bring every job to the right end state, and after every run:
//!
//! - no job was created twice at the simulated Krea (`creations_by_prompt` is 1 everywhere), and
//!   no POST followed a 402;
//! - every `completed` manifest line has its files, byte for byte what the file host sent, and
//!   no temporary download is left;
//! - the `--json` summary tells the truth: its counts are the manifest's, its files and bytes
//!   those on disk, it names the jobs that failed or are not done, and the exit code agrees;
//! - no `Authorization` header reached any host but the API (`auth_header_on_file_host`);
//! - nothing panicked, and no run hung (each is killed after `RUN_LIMIT` and reported).
//!
//! Client limits are the quick ones of the reconciliation tests (1 s read timeout, 50 ms
//! settling, 20 ms back-off) and simulated jobs take 200 ms, so the matrix takes seconds. Fault
//! draws come from the simulation's seed; `KREA_BATCH_CHAOS_SEED=N` explores other sequences.

use crate::support::{
    LiveChild, Run, Sim, Workspace, assert_each_result_where_it_belongs, files_under, krea_batch,
    numbered_jobs, wait_until,
};
use krea_batch::sim::{Faults, JobRecord, Listener, Quirks, SimStats, Storm};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

/// Quick client limits: a 1 s read timeout, quick reconciliation and back-off.
const LIMITS: &str = "limits:
  submissions_per_minute: 6000
  burst: 20
  max_in_flight: 8
  poll_interval: 50ms
  video_poll_interval: 50ms
  poll_interval_max: 200ms
  retry_backoff: 20ms
  request_timeout: 1s
  reconcile_after: 50ms
";

/// The limit that keeps every lost answer attributable.
const ONE_AT_A_TIME: &str = "  submission_concurrency: 1\n";

/// The longest one run may take before it counts as a hang.
const RUN_LIMIT: Duration = Duration::from_mins(1);

/// The most runs a fault may need to bring every job to its end.
const MAX_RUNS: usize = 5;

/// A job file with the quick limits, `extra_limits` (indented `key: value` lines) and `jobs`.
/// One POST at a time unless `extra_limits` says otherwise: each fault here must end every job
/// under its own name, which several POSTs on the wire cannot promise when their answers are
/// lost together (those go to `unattributed/`; `lost_answers_with_four_posts_on_the_wire` checks
/// that case).
fn workspace(jobs: &str, extra_limits: &str) -> Workspace {
    let one_at_a_time =
        if extra_limits.contains("submission_concurrency") { "" } else { ONE_AT_A_TIME };
    Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\n{LIMITS}{one_at_a_time}{extra_limits}jobs:\n{jobs}"
    ))
}

/// `krea-batch run --json jobs.yaml` against `sim`.
fn run_command(work: &Workspace, sim: &Sim) -> Command {
    verbose_run_command(work, sim, &[])
}

/// `krea-batch <global> run --json jobs.yaml` against `sim`; `global` is, say, `["-v"]`, to
/// see in the log the retries a fault caused.
fn verbose_run_command(work: &Workspace, sim: &Sim, global: &[&str]) -> Command {
    let mut command = krea_batch();
    command
        .args(global)
        .args(["run", "--json"])
        .arg(work.job_file())
        .env("KREA_API_BASE", sim.url())
        .env("KREA_API_KEY", sim.key());
    command
}

/// `command` run under GNU time, which adds its peak RSS to stderr (see [`peak_rss_kib`]).
fn under_time(time: &std::path::Path, command: &Command) -> Command {
    let mut timed = Command::new(time);
    timed.args(["-f", "chaos-peak-rss-kib=%M"]).arg(command.get_program());
    timed.args(command.get_args());
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => timed.env(name, value),
            None => timed.env_remove(name),
        };
    }
    timed
}

/// The peak RSS that [`under_time`] reported, in KiB.
fn peak_rss_kib(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix("chaos-peak-rss-kib="))
        .and_then(|kib| kib.trim().parse().ok())
}

/// Runs `command` to its end, killing it (and failing the test) if it outlives `RUN_LIMIT`.
fn run_bounded(fault: &str, command: Command) -> Run {
    LiveChild::spawn(command).finish_within(RUN_LIMIT, &format!("{fault}: the run hung"))
}

/// One run of `krea-batch run`, checked.
fn run_once(fault: &str, work: &Workspace, sim: &Sim, jobs: usize) -> Checked {
    check(fault, work, sim, run_bounded(fault, run_command(work, sim)), jobs)
}

/// `krea-batch run` until it ends: the last run, checked.
fn run_to_end(fault: &str, work: &Workspace, sim: &Sim, jobs: usize) -> Checked {
    runs_to_end(fault, work, sim, jobs, || run_command(work, sim)).pop().expect("one run")
}

/// Runs `command` until no job is left with work a rerun could do (downloads pending,
/// unknown, in flight), at most `MAX_RUNS` times. Every run is checked; all are returned.
fn runs_to_end(
    fault: &str,
    work: &Workspace,
    sim: &Sim,
    jobs: usize,
    command: impl Fn() -> Command,
) -> Vec<Checked> {
    let mut runs: Vec<Checked> = Vec::new();
    loop {
        let checked = check(fault, work, sim, run_bounded(fault, command()), jobs);
        let resumable = ["download_pending", "unknown", "in_flight"]
            .iter()
            .any(|status| checked.count(status) > 0);
        let again = checked.run.code == 1 && resumable && runs.len() + 1 < MAX_RUNS;
        if again {
            eprintln!("{fault}: run {} left {:?}; running again", runs.len() + 1, checked.statuses);
        }
        runs.push(checked);
        if !again {
            return runs;
        }
    }
}

/// A run and what it left, after the invariants were checked.
struct Checked {
    run: Run,
    summary: Value,
    manifest: Vec<Value>,
    statuses: BTreeMap<String, usize>,
    stats: SimStats,
}

impl Checked {
    fn count(&self, status: &str) -> usize {
        self.statuses.get(status).copied().unwrap_or(0)
    }

    fn line(&self, name: &str) -> &Value {
        self.manifest.iter().find(|line| line["name"] == name).expect("the job is listed")
    }

    /// Asserts that every job completed and the run exited 0.
    fn all_completed(&self, fault: &str, jobs: usize) -> &Self {
        assert_eq!(
            (self.run.code, self.count("completed")),
            (0, jobs),
            "{fault}: every job completes ({:?})\n{}",
            self.statuses,
            self.run.stderr
        );
        self
    }
}

/// The summary's count that a manifest status is reported under.
fn summary_key(status: &str) -> &str {
    match status {
        "not_submitted" => "pending",
        other => other,
    }
}

/// The last lines of a log, for assertion messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The invariants every run must keep, whatever the fault. `jobs` is the job file's size.
fn check(fault: &str, work: &Workspace, sim: &Sim, run: Run, jobs: usize) -> Checked {
    let stats = sim.stats();
    let log = tail(&run.stderr);
    assert!(!run.stderr.contains("panicked"), "{fault}: krea-batch panicked\n{}", run.stderr);
    assert!(matches!(run.code, 0 | 1 | 3), "{fault}: exit {} is no batch outcome\n{log}", run.code);

    // Nothing paid twice, no POST after a 402, no key sent to another host.
    let twice: Vec<_> = stats.creations_by_prompt.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "{fault}: jobs created more than once: {twice:?}\n{log}");
    assert_eq!(stats.posts_after_402, 0, "{fault}: POSTs after a 402\n{log}");
    assert_eq!(stats.auth_header_on_file_host, 0, "{fault}: the key reached a file host");

    // Every job listed once.
    let manifest = work.manifest();
    let names: BTreeSet<&str> = manifest.iter().filter_map(|line| line["name"].as_str()).collect();
    assert_eq!((manifest.len(), names.len()), (jobs, jobs), "{fault}: every job listed once");
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for line in &manifest {
        *statuses.entry(line["status"].as_str().expect("a status").to_owned()).or_insert(0) += 1;
    }

    let on_disk = check_files(fault, work, &manifest, &stats);
    let summary: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|err| {
        panic!("{fault}: --json printed no summary ({err})\n{}\n{log}", run.stdout)
    });
    check_summary(fault, &summary, &manifest, &statuses, on_disk);

    // The exit code agrees with the manifest and the summary.
    let all_completed = statuses.get("completed") == Some(&jobs);
    let stopped_by_402 = summary["stopped"] == "payment_required";
    let expected = if all_completed {
        0
    } else if stopped_by_402 {
        3
    } else {
        1
    };
    assert_eq!(
        run.code, expected,
        "{fault}: exit code vs manifest {statuses:?} and summary {summary}\n{log}"
    );
    if stopped_by_402 {
        assert!(stats.responses_402 > 0, "{fault}: the summary claims a 402 that never came");
    } else {
        assert!(summary["stopped"].is_null(), "{fault}: stopped for nothing: {summary}");
    }
    Checked { run, summary, manifest, statuses, stats }
}

/// Completed jobs have their files, each byte for byte what the file host served; every file
/// the manifest lists exists; no temporary file is left. Returns the listed files and bytes.
fn check_files(fault: &str, work: &Workspace, manifest: &[Value], stats: &SimStats) -> (u64, u64) {
    let (mut listed_files, mut listed_bytes) = (0, 0);
    for line in manifest {
        let completed = line["status"] == "completed";
        let files = line["files"].as_array().expect("files");
        assert!(!completed || !files.is_empty(), "{fault}: a completed job without files: {line}");
        for file in files {
            let file = file.as_str().expect("a file name");
            let path = work.out().join(file);
            let bytes = std::fs::metadata(&path)
                .unwrap_or_else(|err| {
                    panic!("{fault}: {file} is listed but missing ({err}): {line}")
                })
                .len();
            listed_files += 1;
            listed_bytes += bytes;
            let sidecar: Value = serde_json::from_slice(
                &std::fs::read(work.out().join(format!("{file}.json"))).expect("sidecar exists"),
            )
            .expect("sidecar is JSON");
            let url = sidecar["source_url"].as_str().expect("source_url");
            let served = stats.served_files.get(url).unwrap_or_else(|| {
                panic!("{fault}: {url} was never served whole, yet {file} exists")
            });
            assert_eq!(
                (crate::support::sha256_of(&path), bytes),
                (served.sha256.clone(), served.len),
                "{fault}: {file} is not what the file host sent"
            );
        }
    }
    let partials: Vec<_> = files_under(&work.out())
        .into_iter()
        .filter(|path| {
            path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(".krea-part-"))
        })
        .collect();
    assert!(partials.is_empty(), "{fault}: temporary files left: {partials:?}");
    (listed_files, listed_bytes)
}

/// The summary tells the truth: its counts are the manifest's, its files and bytes those on
/// disk, and it names every job that failed or is not done (when it has room for them all).
fn check_summary(
    fault: &str,
    summary: &Value,
    manifest: &[Value],
    statuses: &BTreeMap<String, usize>,
    (files, bytes): (u64, u64),
) {
    let counts = &summary["counts"];
    assert_eq!(counts["total"], manifest.len(), "{fault}: summary total\n{summary}");
    for key in
        ["pending", "in_flight", "unknown", "download_pending", "completed", "failed", "cancelled"]
    {
        let listed =
            statuses.iter().filter(|(s, _)| summary_key(s) == key).map(|(_, n)| n).sum::<usize>();
        assert_eq!(
            counts[key], listed,
            "{fault}: the summary counts {key} unlike the manifest ({statuses:?})\n{summary}"
        );
    }
    assert_eq!(
        (&summary["files"], &summary["bytes"]),
        (&Value::from(files), &Value::from(bytes)),
        "{fault}: the summary's files and bytes are those on disk"
    );
    let troubled: BTreeSet<&str> = manifest
        .iter()
        .filter(|line| {
            ["failed", "download_pending", "unknown"].iter().any(|s| line["status"] == *s)
        })
        .filter_map(|line| line["name"].as_str())
        .collect();
    if troubled.len() <= 10 {
        let in_summary: BTreeSet<&str> = summary["failures"]
            .as_array()
            .expect("failures")
            .iter()
            .filter_map(|failure| failure[0].as_str())
            .collect();
        assert_eq!(
            in_summary, troubled,
            "{fault}: the summary names every job that failed or is not done\n{summary}"
        );
    }
}

/// The simulation's seed: `KREA_BATCH_CHAOS_SEED` to explore other fault sequences, else the
/// default config's, so a failure replays.
fn seed() -> u64 {
    std::env::var("KREA_BATCH_CHAOS_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| krea_batch::sim::SimConfig::default().seed)
}

/// A simulation with the chaos seed, adjusted by `adjust`.
fn chaos_sim(adjust: impl FnOnce(&mut krea_batch::sim::SimConfig)) -> Sim {
    Sim::start(|config| {
        config.seed = seed();
        adjust(config);
    })
}

fn sim_with(faults: Faults) -> Sim {
    chaos_sim(|config| config.faults = faults)
}

fn requests_on(stats: &SimStats, listener: Listener, path: &str) -> usize {
    stats.requests.iter().filter(|r| r.listener == listener && r.path.starts_with(path)).count()
}

/// A prompt whose POST Krea answers 500 every time, creating nothing: after each 500 the job is
/// reconciled (nothing was created), backs off while the other jobs are submitted, and fails
/// after `MAX_UNANSWERED_POSTS` attempts saying so. The others complete, each created once.
#[test]
fn a_job_whose_post_always_gets_a_500_fails_alone_after_its_attempts() {
    let fault = "one prompt always answered 500";
    let attempts = krea_batch::MAX_UNANSWERED_POSTS;
    let sim =
        sim_with(Faults { server_error_marker: Some("[chokes]".into()), ..Faults::default() });
    let jobs = format!(
        "  - {{name: choking, prompt: \"a fox [chokes]\"}}\n{}",
        numbered_jobs("an owl", 6)
    );
    let work = workspace(&jobs, "");
    let checked = run_once(fault, &work, &sim, 7);
    assert_eq!(
        (checked.run.code, checked.count("completed")),
        (1, 6),
        "{}",
        tail(&checked.run.stderr)
    );
    let line = checked.line("choking");
    assert_eq!(line["status"], "failed", "{line}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("Krea answered 500 to {attempts} attempts")), "{error}");

    let posts: Vec<u16> = checked
        .stats
        .requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/generate/"))
        .map(|r| r.status)
        .collect();
    assert_eq!(posts.iter().filter(|s| **s == 500).count(), attempts, "{posts:?}");
    assert_eq!(posts.len(), attempts + 6, "each other job sent once: {posts:?}");
    // The failing job is first in the file; once its first attempt is shown to have created
    // nothing, it waits its back-off and the next POST is another job's.
    assert_eq!(&posts[..2], [500, 200], "{posts:?}");
    assert!(!checked.stats.creations_by_prompt.contains_key("a fox [chokes]"));
}

/// An item of `GET /jobs` that cannot be read (an id of 300 characters) is skipped with one
/// warning; the jobs whose answers were lost are still found at Krea and adopted.
#[test]
fn an_unreadable_item_in_the_job_list_does_not_stop_reconciliation() {
    let fault = "an unreadable item in the job list";
    let sim =
        sim_with(Faults { post_drop_rate: 1.0, unreadable_list_item: true, ..Faults::default() });
    let work = workspace(&numbered_jobs("a lost answer", 3), "");
    let checked = run_once(fault, &work, &sim, 3);
    checked.all_completed(fault, 3);
    assert_eq!(checked.stats.jobs_created, 3);
    let warnings = checked.run.stderr.matches("holds items that cannot be read").count();
    assert_eq!(warnings, 1, "one warning per run, not one per listing\n{}", checked.run.stderr);
}

/// 500/502/503 on a fifth of API requests: POSTs that met one are reconciled (nothing was
/// created) and sent again, polls are retried; every job completes, each created once.
#[test]
fn server_errors_at_20_percent() {
    let fault = "5xx at 20%";
    let sim = sim_with(Faults { server_error_rate: 0.2, ..Faults::default() });
    let work = workspace(&numbered_jobs("a server error", 10), "");
    let end = run_to_end(fault, &work, &sim, 10);
    end.all_completed(fault, 10);
    assert!(end.stats.responses_5xx > 0, "{fault}: the scenario answered 5xx");
    assert_eq!(end.stats.jobs_created, 10, "{fault}");
}

/// A fifth of API connections closed unanswered, before the request is handled.
#[test]
fn connection_resets() {
    let fault = "connection resets at 20%";
    let sim = sim_with(Faults { reset_rate: 0.2, ..Faults::default() });
    let work = workspace(&numbered_jobs("a reset", 10), "");
    let end = run_to_end(fault, &work, &sim, 10);
    end.all_completed(fault, 10);
    assert!(end.stats.dropped_connections > 0, "{fault}: the scenario reset connections");
    assert_eq!(end.stats.jobs_created, 10, "{fault}");
}

/// POSTs that create the job and lose the answer: found by reconciliation and adopted.
#[test]
fn posts_that_create_the_job_and_drop_the_answer() {
    let fault = "dropped POST answers at 40%";
    let sim = sim_with(Faults { post_drop_rate: 0.4, ..Faults::default() });
    let work = workspace(&numbered_jobs("a dropped answer", 12), "");
    let end = run_to_end(fault, &work, &sim, 12);
    end.all_completed(fault, 12);
    assert!(end.stats.dropped_connections > 0, "{fault}: the scenario dropped answers");
    assert!(end.run.stderr.contains("adopted"), "{fault}: jobs were adopted\n{}", end.run.stderr);
    assert_eq!(end.stats.jobs_created, 12, "{fault}");
}

/// Answers that come after the client's 1 s read timeout (a slow POST has created its job).
#[test]
fn answers_slower_than_the_read_timeout() {
    let fault = "answers 3 s late (read timeout 1 s) at 15%";
    let sim = sim_with(Faults {
        slow_rate: 0.15,
        slow_delay: Duration::from_secs(3),
        ..Faults::default()
    });
    let work = workspace(&numbered_jobs("a slow answer", 10), "");
    let end = runs_to_end(fault, &work, &sim, 10, || verbose_run_command(&work, &sim, &["-v"]));
    let end = end.last().expect("one run");
    end.all_completed(fault, 10);
    assert!(
        end.run.stderr.contains("timed out"),
        "{fault}: requests timed out\n{}",
        end.run.stderr
    );
    assert_eq!(end.stats.jobs_created, 10, "{fault}");
}

/// 429 storms on top of Krea's own concurrency limit, with and without `Retry-After`.
fn storm_case(fault: &str, retry_after: Option<u64>) {
    let sim = chaos_sim(|config| {
        config.concurrency = 2;
        config.backlog = 1;
        config.retry_after_secs = retry_after;
    });
    sim.server().set_faults(Faults {
        storm: Some(Storm {
            rate: 0.5,
            duration: Duration::from_millis(1500),
            retry_after_secs: retry_after,
        }),
        ..Faults::default()
    });
    let work = workspace(&numbered_jobs("a storm", 10), "");
    let end = run_to_end(fault, &work, &sim, 10);
    end.all_completed(fault, 10);
    assert!(end.stats.responses_429 > 0, "{fault}: the scenario answered 429");
    assert_eq!(end.stats.jobs_created, 10, "{fault}");
}

/// Half of all API requests answered 429 for 1.5 s, no `Retry-After`, over Krea's own limit of
/// two running and one waiting.
#[test]
fn a_429_storm_without_retry_after_over_a_small_concurrency() {
    storm_case("429 storm without Retry-After, concurrency 2, backlog 1", None);
}

/// The same with `Retry-After: 1` on every 429, the storm's and the concurrency limit's.
#[test]
fn a_429_storm_with_retry_after_over_a_small_concurrency() {
    storm_case("429 storm with Retry-After: 1, concurrency 2, backlog 1", Some(1));
}

/// The balance runs out after five jobs: exit 3, no POST after the 402, the jobs in flight
/// finished and downloaded; after a top-up the rerun completes the rest (exit 0).
#[test]
fn payment_required_in_the_middle_then_a_top_up() {
    let fault = "402 after five jobs";
    // Five flux jobs' worth ($0.007 each, reserved while in flight).
    let sim = chaos_sim(|config| config.balance_usd = 0.035);
    let work = workspace(&numbered_jobs("a thin wallet", 12), "");
    let first = run_once(fault, &work, &sim, 12);
    assert_eq!(first.run.code, 3, "{fault}: stopped by the 402\n{}", first.run.stderr);
    assert_eq!(first.summary["stopped"], "payment_required", "{fault}");
    assert_eq!(first.stats.posts_after_402, 0, "{fault}: no POST after the 402");
    assert_eq!(
        (first.count("completed"), first.count("not_submitted")),
        (5, 7),
        "{fault}: in-flight jobs finished, the rest waits"
    );

    sim.server().set_balance(10.0);
    let second = run_to_end(fault, &work, &sim, 12);
    second.all_completed(fault, 12);
    assert_eq!(second.stats.posts_after_402, 0, "{fault}");
    assert_eq!(second.stats.jobs_created, 12, "{fault}");
}

/// Downloads cut short of their `Content-Length`: never written in place; left pending at
/// 100 %, fetched by reruns at 30 %, and never generated again.
#[test]
fn downloads_cut_short_of_their_content_length() {
    // Every download cut short: every job is left with its download pending.
    let fault = "downloads truncated at 100%";
    let sim = sim_with(Faults { download_truncate_rate: 1.0, ..Faults::default() });
    let work = workspace(&numbered_jobs("a short download", 10), "");
    let first = run_once(fault, &work, &sim, 10);
    assert_eq!(first.count("download_pending"), 10, "{fault}: {:?}", first.statuses);
    assert_eq!(first.stats.downloads_completed, 0, "{fault}");
    let results: Vec<_> = files_under(&work.out())
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "png"))
        .collect();
    assert!(results.is_empty(), "{fault}: no cut result is left in place: {results:?}");

    // Then at 30%: reruns fetch them, and generate nothing again.
    let fault = "downloads truncated at 30%, after a run at 100%";
    sim.server().set_faults(Faults { download_truncate_rate: 0.3, ..Faults::default() });
    let end = run_to_end(fault, &work, &sim, 10);
    end.all_completed(fault, 10);
    assert_eq!(end.stats.jobs_created, 10, "{fault}: a failed download never generates again");
}

/// GETs answered 200 with half a JSON document or an HTML error page.
#[test]
fn malformed_and_truncated_json() {
    let fault = "malformed or truncated JSON on 20% of GETs";
    let sim = sim_with(Faults { malformed_json_rate: 0.2, ..Faults::default() });
    let work = workspace(&numbered_jobs("a garbled answer", 10), "");
    let end = runs_to_end(fault, &work, &sim, 10, || verbose_run_command(&work, &sim, &["-v"]));
    let end = end.last().expect("one run");
    end.all_completed(fault, 10);
    assert!(
        end.run.stderr.contains("unreadable answer"),
        "{fault}: garbled answers were met\n{}",
        end.run.stderr
    );
    assert_eq!(end.stats.jobs_created, 10, "{fault}");
}

/// Every documented variant of Krea's answers at once, with dropped answers (so the job list is
/// read) and a 402 spelled `{"error": ...}`, then a top-up.
#[test]
fn missing_fields_other_shapes_and_unknown_states() {
    let fault = "every quirk: no status on create, an undocumented state, URLs as objects, \
                 failures in result, nextCursor, 402 as {error}";
    let sim = chaos_sim(|config| {
        config.quirks = Quirks {
            next_cursor_camel_case: true,
            result_urls_as_objects: true,
            omit_status_on_create: true,
            failure_in_result: true,
            payment_error_key: true,
            undocumented_state: Some("warming-up".to_owned()),
            validation_details: true,
        };
        // Dropped answers make the client read the job list (and its cursor).
        config.faults = Faults { post_drop_rate: 0.2, ..Faults::default() };
        // Eight flux jobs' worth: the ninth POST meets the 402.
        config.balance_usd = 0.056;
    });
    let jobs = format!(
        "{}  - {{name: refused, prompt: \"[nsfw] a quirky refusal\"}}\n",
        numbered_jobs("a quirky answer", 11)
    );
    let work = workspace(&jobs, "");
    let first = run_once(fault, &work, &sim, 12);
    assert_eq!(first.run.code, 3, "{fault}: the 402 was understood\n{}", first.run.stderr);
    assert_eq!(first.stats.posts_after_402, 0, "{fault}: no POST after the 402");

    sim.server().set_balance(10.0);
    let end = run_to_end(fault, &work, &sim, 12);
    assert_eq!(end.run.code, 1, "{fault}: one job failed\n{}", end.run.stderr);
    assert_eq!((end.count("completed"), end.count("failed")), (11, 1), "{fault}");
    let refused = end.line("refused");
    assert_eq!(refused["status"], "failed", "{fault}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("moderation"), "{fault}: Krea's reason, from result.error: {refused}");
    assert_eq!(end.stats.preview_downloads, 0, "{fault}: previews are not results");
}

/// A job that never leaves `processing`: given up after `job_timeout`, cancelled with DELETE
/// (not billed), reported failed with the reason; the other jobs complete; exit 1.
#[test]
fn a_job_stuck_in_processing_is_cancelled_after_its_deadline() {
    let fault = "a job stuck in processing, job_timeout 2s";
    let sim = chaos_sim(|_| {});
    let jobs = format!(
        "{}  - {{name: stuck, prompt: \"[stuck] forever\"}}\n",
        numbered_jobs("a quick one", 4)
    );
    let work = workspace(&jobs, "  job_timeout: 2s\n");
    let end = run_once(fault, &work, &sim, 5);
    assert_eq!(end.run.code, 1, "{fault}\n{}", end.run.stderr);
    assert_eq!((end.count("completed"), end.count("failed")), (4, 1), "{fault}");
    let stuck = end.line("stuck");
    assert_eq!(stuck["status"], "failed", "{fault}");
    let error = stuck["error"].as_str().unwrap_or_default();
    assert!(error.contains("timeout"), "{fault}: the error names the timeout: {stuck}");
    let at_krea: Vec<&JobRecord> =
        end.stats.jobs.iter().filter(|job| job.prompt.contains("[stuck]")).collect();
    assert_eq!(at_krea.len(), 1, "{fault}");
    assert_eq!(at_krea[0].status, "cancelled", "{fault}: cancelled at Krea");
    assert!(!at_krea[0].charged, "{fault}: a cancelled job is not billed");
    assert!(
        end.stats.requests.iter().any(|r| r.method == "DELETE" && r.path.contains(&at_krea[0].id)),
        "{fault}: cancelled with DELETE"
    );
}

/// As above, but the answer to some DELETEs is lost (the cancel took effect at Krea): the job
/// must still be reported failed because of its timeout, not `cancelled` without a reason.
#[test]
fn a_stuck_job_whose_cancel_answer_is_lost_is_still_reported_failed() {
    // Half the API answers come 1.5 s late (read timeout 1 s), from the moment all six stuck
    // jobs exist: some DELETEs cancel the job at Krea and their answer is lost.
    let fault = "six jobs stuck in processing, job_timeout 2s, then answers 1.5 s late at 50%";
    let sim = chaos_sim(|_| {});
    let jobs = (0..6).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "  - {{name: stuck-{i}, prompt: \"[stuck] forever {i}\"}}");
        text
    });
    let work = workspace(&jobs, "  job_timeout: 2s\n");
    let child = LiveChild::spawn(run_command(&work, &sim));
    wait_until(Duration::from_secs(20), "the six jobs exist at Krea", || {
        sim.stats().jobs_created == 6
    });
    sim.server().set_faults(Faults {
        slow_rate: 0.5,
        slow_delay: Duration::from_millis(1500),
        ..Faults::default()
    });
    let end = check(fault, &work, &sim, child.finish(RUN_LIMIT), 6);
    for job in &end.stats.jobs {
        assert_eq!((job.status.as_str(), job.charged), ("cancelled", false), "{fault}: {job:?}");
    }
    for line in &end.manifest {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(
            line["status"] == "failed" && error.contains("timeout"),
            "{fault}: a job given up on after its timeout is reported failed, with why: {line}\n{}",
            end.summary
        );
    }
}

/// Every download redirected to `listener`'s origin: followed, without the key.
fn followed_redirect_case(fault: &str, faults: Faults, listener: Listener) {
    let sim = sim_with(faults);
    let work = workspace(&numbered_jobs("a redirected download", 6), "");
    let end = run_to_end(fault, &work, &sim, 6);
    end.all_completed(fault, 6);
    assert!(
        requests_on(&end.stats, listener, "/results/") >= 6,
        "{fault}: the downloads were redirected there"
    );
    let keyed: Vec<_> = end
        .stats
        .requests
        .iter()
        .filter(|r| r.path.starts_with("/results/") && r.authorization)
        .collect();
    assert!(keyed.is_empty(), "{fault}: downloads carried the key: {keyed:?}");
}

/// Result URLs that redirect to a third origin: followed, without the key.
#[test]
fn a_redirect_to_another_host_gets_no_key() {
    followed_redirect_case(
        "downloads redirected to a third origin (100%)",
        Faults { redirect_other_origin_rate: 1.0, ..Faults::default() },
        Listener::Redirect,
    );
}

/// Result URLs that redirect to the API's own origin: followed, and still without the key.
#[test]
fn a_redirect_to_the_api_origin_gets_no_key() {
    followed_redirect_case(
        "downloads redirected to the API origin (100%)",
        Faults { redirect_api_origin_rate: 1.0, ..Faults::default() },
        Listener::Api,
    );
}

/// Redirects the client must refuse: every download meets one, so every job is left
/// `download_pending` with the reason, and a rerun generates nothing again.
fn refused_redirect_case(fault: &str, faults: Faults, reason: &str) {
    let sim = sim_with(faults);
    let work = workspace(&numbered_jobs("a refused redirect", 4), "");
    for run in 1..=2 {
        let end = run_once(fault, &work, &sim, 4);
        assert_eq!(end.run.code, 1, "{fault}: run {run}\n{}", end.run.stderr);
        assert_eq!(end.count("download_pending"), 4, "{fault}: run {run}: {:?}", end.statuses);
        for line in &end.manifest {
            let error = line["error"].as_str().unwrap_or_default();
            assert!(error.contains(reason), "{fault}: run {run}: the error says why: {line}");
        }
        assert_eq!(end.stats.jobs_created, 4, "{fault}: run {run}: never generated again");
        assert_eq!(end.stats.downloads_completed, 0, "{fault}: run {run}");
    }
}

/// Result URLs that redirect to `http://` off loopback: refused, left pending, not regenerated.
#[test]
fn a_redirect_to_plain_http_is_refused() {
    refused_redirect_case(
        "downloads redirected to http:// (100%)",
        Faults { redirect_insecure_rate: 1.0, ..Faults::default() },
        "plain http",
    );
}

/// Result URLs that redirect endlessly: refused after a few hops, left pending.
#[test]
fn a_redirect_loop_is_refused() {
    refused_redirect_case(
        "downloads redirected in a loop (100%)",
        Faults { redirect_loop_rate: 1.0, ..Faults::default() },
        "redirect",
    );
}

/// 100 MB JSON answers: read up to the client's cap and refused, not buffered; the run
/// completes and (measured with GNU time, when installed) stays far below 100 MB of RSS.
#[test]
fn a_100_mb_json_body_is_capped_not_buffered() {
    let fault = "100 MB JSON bodies on 20% of GETs";
    let sim =
        sim_with(Faults { huge_body_rate: 0.2, huge_body_bytes: 100_000_000, ..Faults::default() });
    let work = workspace(&numbered_jobs("a huge answer", 8), "");
    // The client's peak RSS, if GNU time is there to measure it.
    let time = std::path::Path::new("/usr/bin/time");
    let time = time.is_file().then_some(time);
    let runs = runs_to_end(fault, &work, &sim, 8, || {
        let command = verbose_run_command(&work, &sim, &["-v"]);
        time.map_or(command, |time| under_time(time, &verbose_run_command(&work, &sim, &["-v"])))
    });
    let end = runs.last().expect("one run");
    end.all_completed(fault, 8);
    assert!(
        runs.iter().any(|run| run.run.stderr.contains("larger than")),
        "{fault}: huge answers were met and refused\n{}",
        end.run.stderr
    );
    if time.is_some() {
        let peaks: Vec<Option<u64>> =
            runs.iter().map(|run| peak_rss_kib(&run.run.stderr)).collect();
        eprintln!("{fault}: the client's peak RSS per run, KiB: {peaks:?}");
        assert!(
            peaks.iter().all(|peak| peak.is_some_and(|kib| kib < 80 * 1024)),
            "{fault}: the client's peak RSS stays far below 100 MB: {peaks:?} KiB"
        );
    }
}

/// Results larger than `limits.max_result_size`: refused, left pending with the setting named,
/// never generated again.
#[test]
fn a_result_larger_than_max_result_size_is_refused() {
    let fault = "results of 300 kB, max_result_size 100 kB";
    let sim = chaos_sim(|config| config.result_bytes = 300_000);
    let work = workspace(&numbered_jobs("an oversized result", 3), "  max_result_size: 100000\n");
    for run in 1..=2 {
        let end = run_once(fault, &work, &sim, 3);
        assert_eq!(end.run.code, 1, "{fault}: run {run}\n{}", end.run.stderr);
        assert_eq!(end.count("download_pending"), 3, "{fault}: run {run}: {:?}", end.statuses);
        for line in &end.manifest {
            let error = line["error"].as_str().unwrap_or_default();
            assert!(error.contains("max_result_size"), "{fault}: run {run}: {line}");
        }
        assert_eq!(end.stats.jobs_created, 3, "{fault}: run {run}: never generated again");
    }
}

/// Everything at once, at moderate rates, on jobs with two results each.
#[test]
fn every_fault_at_once_at_moderate_rates() {
    let fault = "5xx 5%, resets 3%, dropped POSTs 5%, slow 2%, malformed JSON 3%, a 429 storm \
                 (30% for 2 s), truncated downloads 10%, failed downloads 3%, redirects to a \
                 third origin 10% and to the API origin 5%; two results per job";
    let sim = chaos_sim(|config| {
        config.outputs_per_job = 2;
        config.concurrency = 6;
        config.backlog = 4;
    });
    sim.server().set_faults(Faults {
        server_error_rate: 0.05,
        reset_rate: 0.03,
        post_drop_rate: 0.05,
        slow_rate: 0.02,
        slow_delay: Duration::from_secs(3),
        malformed_json_rate: 0.03,
        storm: Some(Storm { rate: 0.3, duration: Duration::from_secs(2), retry_after_secs: None }),
        download_truncate_rate: 0.1,
        download_error_rate: 0.03,
        redirect_other_origin_rate: 0.1,
        redirect_api_origin_rate: 0.05,
        ..Faults::default()
    });
    let work = workspace(&numbered_jobs("everything at once", 30), "");
    let end = run_to_end(fault, &work, &sim, 30);
    end.all_completed(fault, 30);
    assert_eq!(end.stats.jobs_created, 30, "{fault}");
    assert!(
        end.manifest.iter().all(|line| line["files"].as_array().map(Vec::len) == Some(2)),
        "{fault}: both results of every job"
    );
    let stats = &end.stats;
    let injected = (stats.responses_5xx, stats.dropped_connections, stats.responses_429);
    assert!(
        injected.0 + injected.1 > 0,
        "{fault}: the scenario injected API faults (5xx, dropped, 429): {injected:?}"
    );
}

/// Four POSTs on the wire (`limits.submission_concurrency: 4`) with answers lost often: nothing
/// created twice (checked after every run), no result under a job whose prompt did not create
/// it, and every job the simulation created reaches the user, under its job or in
/// `unattributed/` naming it among the candidates.
#[test]
fn lost_answers_with_four_posts_on_the_wire() {
    let fault = "dropped POST answers 20%, 5xx 5%, resets 5%, four POSTs on the wire";
    let sim = sim_with(Faults {
        post_drop_rate: 0.2,
        server_error_rate: 0.05,
        reset_rate: 0.05,
        ..Faults::default()
    });
    let work = workspace(&numbered_jobs("four on the wire", 40), "  submission_concurrency: 4\n");
    let runs = runs_to_end(fault, &work, &sim, 40, || run_command(&work, &sim));
    let end = runs.last().expect("one run");
    assert!(end.stats.dropped_connections > 0, "{fault}: the scenario dropped answers");
    let (attributed, parked) = assert_each_result_where_it_belongs(fault, &work, &end.stats);
    assert_eq!(
        end.count("completed") + end.count("unknown"),
        40,
        "{fault}: every job completed or set aside, nothing else: {:?}",
        end.statuses
    );
    eprintln!("{fault}: {attributed} results attributed, {parked} unattributed");
}
