//! Nothing paid twice, nothing lost: reconciliation of unanswered submissions, one writer per
//! state file, downloads that fail on a full disk, and a job file edited between runs.

use crate::support::{
    Run, Sim, ViaShell, Workspace, files_under, krea_batch, numbered_jobs, wait_until,
};
use krea_batch::sim::Faults;
use std::time::Duration;

/// Limits for reconciliation tests: quick timeouts and settling.
const RECONCILE_LIMITS: &str = "
limits:
  submissions_per_minute: 6000
  burst: 20
  max_in_flight: 8
  poll_interval: 50ms
  poll_interval_max: 200ms
  retry_backoff: 20ms
  request_timeout: 1s
  reconcile_after: 50ms
";

fn reconcile_workspace(jobs: &str) -> Workspace {
    Workspace::with_file(&format!("model: image/bfl/flux-1-dev\n{RECONCILE_LIMITS}jobs:\n{jobs}"))
}

#[test]
fn a_job_created_by_a_dropped_answer_is_adopted_not_paid_twice() {
    let sim = Sim::start(|config| {
        config.faults = Faults { post_drop_rate: 0.5, ..Faults::default() };
    });
    let work = reconcile_workspace(&numbered_jobs("a dropped answer", 8));
    let run = work.run(&sim, &[]);
    run.expect_code(0);
    let stats = sim.stats();
    assert!(stats.dropped_connections > 0, "the scenario dropped answers");
    assert!(run.stderr.contains("adopted"), "{}", run.stderr);
    assert_eq!(stats.jobs_created, 8);
    assert!(
        stats.creations_by_prompt.values().all(|count| *count == 1),
        "{:?}",
        stats.creations_by_prompt
    );
    assert_eq!(work.manifest().iter().filter(|line| line["status"] == "completed").count(), 8);
}

#[test]
fn a_submission_that_created_nothing_is_sent_again_after_reconciliation() {
    // 5xx before the request is handled: nothing is created, but the client cannot know. The
    // first two POSTs always meet one; the rest of the requests at random.
    let sim = Sim::start(|config| {
        config.faults =
            Faults { server_error_rate: 0.3, server_error_first_posts: 2, ..Faults::default() };
    });
    let work = reconcile_workspace(&numbered_jobs("a lost request", 8));
    let run = work.run(&sim, &[]);
    run.expect_code(0);
    assert!(run.stderr.contains("not found at Krea"), "{}", run.stderr);
    let stats = sim.stats();
    assert!(stats.responses_5xx > 0);
    assert_eq!(stats.jobs_created, 8);
    assert!(stats.creations_by_prompt.values().all(|count| *count == 1));
}

#[test]
fn a_second_run_on_the_same_state_file_stops_at_once() {
    let sim = Sim::start(|config| config.job_time = Duration::from_secs(2));
    let work = Workspace::with_jobs(&numbered_jobs("a busy state file", 4));
    let first = work.spawn_run(&sim);
    wait_until(Duration::from_secs(20), "the first run submits", || sim.stats().jobs_created > 0);

    // Refused rather than made to wait: waiting for the lock, it would have run once the first
    // run ended, and exited 0. (The lock is only ever tried: `store::tests`.)
    let second = work.run(&sim, &[]);
    second.expect_code(2);
    assert!(second.stderr.contains("already using the state file"), "{}", second.stderr);

    // status reads the state file while the run writes it.
    let status = work.command(&sim, "unused", &["status"], &["--json"]);
    status.expect_code(0);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("JSON status");
    assert_eq!(status["counts"]["total"], 4);

    let first = first.finish(Duration::from_secs(30));
    first.expect_code(0);
    assert_eq!(sim.stats().jobs_created, 4, "the second run sent nothing");
    assert_eq!(work.manifest().iter().filter(|line| line["status"] == "completed").count(), 4);
}

/// `krea-batch run <extra> jobs.yaml` as on a disk with `blocks` of 512 bytes free: a file-size
/// limit stands in for a full disk, as writes past it fail (EFBIG), and ignoring SIGXFSZ, which
/// exec keeps, turns the signal into that error.
fn run_on_a_full_disk(sim: &Sim, work: &Workspace, blocks: u32, extra: &[&str]) -> Run {
    let script = format!("trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" run \"$@\"");
    let job_file = work.job_file().to_string_lossy().into_owned();
    let args: Vec<&str> = extra.iter().copied().chain([job_file.as_str()]).collect();
    Run::of(
        &krea_batch()
            .env("KREA_API_BASE", sim.url())
            .env("KREA_API_KEY", sim.key())
            .output_via_shell(&script, &args),
    )
}

#[test]
fn a_download_that_hits_a_write_error_is_left_pending_and_fetched_later() {
    // Results of 3 MiB; the first run may write no file past 1 MiB (as on a full disk).
    let sim = Sim::start(|config| config.result_bytes = 3 << 20);
    let work = Workspace::with_jobs(&numbered_jobs("a large result", 2));
    let run = run_on_a_full_disk(&sim, &work, 2048, &[]);
    run.expect_code(1);
    let manifest = work.manifest();
    assert!(manifest.iter().all(|line| line["status"] == "download_pending"), "{manifest:?}");
    let leftovers: Vec<_> = files_under(&work.out())
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "png"))
        .collect();
    assert!(leftovers.is_empty(), "no partial result left in place: {leftovers:?}");

    // `download` fetches from the stored URLs: no key, no API request, nothing generated.
    let api_requests = |stats: &krea_batch::sim::SimStats| {
        stats.requests.iter().filter(|r| r.listener == krea_batch::sim::Listener::Api).count()
    };
    let before = api_requests(&sim.stats());
    let fetched = crate::support::Run::of(
        &krea_batch().arg("download").arg(work.job_file()).output().expect("download runs"),
    );
    fetched.expect_code(0);
    let stats = sim.stats();
    assert_eq!(api_requests(&stats), before, "download talks only to the file host");
    assert_eq!(stats.jobs_created, 2, "a failed download never generates again");
    for line in work.manifest() {
        assert_eq!(line["status"], "completed");
        let file = work.out().join(line["files"][0].as_str().expect("file"));
        assert_eq!(std::fs::metadata(&file).expect("result").len(), 3 << 20);
    }
}

#[test]
fn editing_the_job_file_adds_only_new_jobs_and_leaves_removed_ones_alone() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(
        "  - {name: fox, prompt: a fox, count: 2}\n  - {name: owl, prompt: an owl}\n",
    );
    work.run(&sim, &[]).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 3);

    // Renamed, count raised by one, the owl removed, a cat added.
    std::fs::write(
        work.job_file(),
        format!(
            "model: image/bfl/flux-1-dev\n{}\njobs:\n  - {{name: renard, prompt: a fox, count: 3}}\n  \
             - {{name: cat, prompt: a cat}}\n",
            crate::support::FAST_LIMITS
        ),
    )
    .expect("job file edited");
    let run = work.run(&sim, &[]);
    run.expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 5, "one more fox and the cat: {:?}", stats.creations_by_prompt);
    assert_eq!(stats.creations_by_prompt["a fox"], 3);
    assert_eq!(stats.creations_by_prompt["an owl"], 1, "the removed owl was not touched");
    assert!(run.stderr.contains("no longer in the job file"), "{}", run.stderr);
}

/// A failure that stops the run (here the state file cannot be written: a file-size limit
/// stands in for a full disk) still answers `--json` with a JSON object naming the error and the
/// exit code, so a script reading stdout is never left with nothing.
#[test]
fn a_run_stopped_by_a_write_error_still_prints_its_json_answer() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a full disk", 2));
    let run = run_on_a_full_disk(&sim, &work, 16, &["--json"]);
    run.expect_code(1);
    let answer: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|err| {
        panic!("--json printed no JSON ({err}): {}\n{}", run.stdout, run.stderr)
    });
    assert_eq!(answer["exit_code"], 1, "{answer}");
    assert_eq!(answer["stopped"], "error", "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains(".krea-batch.sqlite"), "the error names the state file: {answer}");
    assert!(run.stderr.contains(error), "the same error on stderr: {}", run.stderr);
    assert_eq!(sim.stats().jobs_created, 0, "nothing was sent without a state to record it");
}
