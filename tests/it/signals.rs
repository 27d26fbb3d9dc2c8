//! Ctrl-C during a run: once stops submitting and finishes what is in flight (a download under
//! way gets `download_grace`); twice stops at once. Either way the rerun resumes without
//! submitting anything twice. A result that never finishes arriving ends at its deadline.

use crate::support::{Sim, Workspace, numbered_jobs, wait_until};
use krea_batch::sim::{Faults, Listener};
use std::time::Duration;

fn two_at_a_time(jobs: usize) -> Workspace {
    Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\nlimits:\n  max_in_flight: 2\n  submissions_per_minute: 6000\n  \
         poll_interval: 50ms\n  poll_interval_max: 100ms\n  retry_backoff: 50ms\njobs:\n{}",
        numbered_jobs("a slow dawn", jobs)
    ))
}

#[test]
fn one_interrupt_finishes_in_flight_jobs_and_the_rerun_does_the_rest() {
    let sim = Sim::start(|config| config.job_time = Duration::from_millis(1500));
    let work = two_at_a_time(6);
    let child = work.spawn_run(&sim);
    wait_until(Duration::from_secs(20), "two jobs are submitted", || sim.stats().jobs_created == 2);
    child.signal("INT");
    let run = child.finish(Duration::from_secs(30));
    run.expect_code(130);
    assert_eq!(sim.stats().jobs_created, 2, "nothing submitted after the interrupt");
    let manifest = work.manifest();
    let count = |status: &str| manifest.iter().filter(|line| line["status"] == status).count();
    assert_eq!((count("completed"), count("not_submitted")), (2, 4), "{manifest:?}");

    work.run(&sim, &[]).expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 6);
    assert!(stats.creations_by_prompt.values().all(|count| *count == 1));
}

#[test]
fn a_second_interrupt_stops_at_once_and_the_rerun_polls_instead_of_resubmitting() {
    let sim = Sim::start(|config| config.job_time = Duration::from_secs(4));
    let work = two_at_a_time(4);
    let child = work.spawn_run(&sim);
    wait_until(Duration::from_secs(20), "two jobs are submitted", || sim.stats().jobs_created == 2);
    child.signal("INT");
    child.wait_for_log("no more submissions", Duration::from_secs(5));
    child.signal("INT");
    let run = child.finish(Duration::from_secs(3));
    run.expect_code(130);
    let manifest = work.manifest();
    let in_flight = manifest.iter().filter(|line| line["status"] == "in_flight").count();
    assert_eq!(in_flight, 2, "{manifest:?}");

    work.run(&sim, &[]).expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 4);
    assert!(
        stats.creations_by_prompt.values().all(|count| *count == 1),
        "in-flight jobs were polled, not resubmitted"
    );
}

/// The first Ctrl-C ends the wait for reconciliation at once: the job whose POST lost its
/// answer stays `unknown` in the state (never sent again blindly), and the rerun finds it at
/// Krea and adopts it.
#[test]
fn one_interrupt_during_reconciliation_exits_and_the_rerun_reconciles() {
    // Every POST creates its job and loses the answer; reconciliation would wait an hour.
    let sim = Sim::start(|config| {
        config.faults = krea_batch::sim::Faults { post_drop_rate: 1.0, ..Default::default() };
    });
    let file = |reconcile_after: &str| {
        format!(
            "model: image/bfl/flux-1-dev\n{}  reconcile_after: {reconcile_after}\njobs:\n{}",
            crate::support::FAST_LIMITS,
            numbered_jobs("a lost answer", 2)
        )
    };
    let work = Workspace::with_file(&file("1h"));
    let child = work.spawn_run(&sim);
    child.wait_for_log("the submission got no usable answer", Duration::from_secs(20));
    child.signal("INT");
    // Without the fix the run waits out `reconcile_after` (an hour).
    let run = child.finish(Duration::from_secs(30));
    run.expect_code(130);
    assert!(run.stderr.contains("stay unknown"), "{}", run.stderr);
    assert_eq!(sim.stats().jobs_created, 1, "nothing was sent after the unanswered POST");
    let manifest = work.manifest();
    let count = |status: &str| manifest.iter().filter(|line| line["status"] == status).count();
    assert_eq!((count("unknown"), count("not_submitted")), (1, 1), "{manifest:?}");

    sim.server().set_faults(krea_batch::sim::Faults::default());
    std::fs::write(work.job_file(), file("50ms")).expect("job file rewritten");
    work.run(&sim, &[]).expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 2);
    assert!(stats.creations_by_prompt.values().all(|count| *count == 1), "adopted, not resent");
}

/// One job whose result the sim serves at one byte per second, with `limits` added.
fn dripping(limits: &str) -> (Sim, Workspace) {
    let sim = Sim::start(|config| {
        config.faults = Faults { download_drip_rate: 1.0, ..Faults::default() };
    });
    let work = Workspace::with_file(&format!(
        "model: image/bfl/flux-1-dev\nlimits:\n  poll_interval: 50ms\n  poll_interval_max: 100ms\n  \
         retry_backoff: 50ms\n{limits}jobs:\n  - {{name: drip, prompt: a slow river}}\n"
    ));
    (sim, work)
}

/// The job ends download pending with `reason` in its error, then a rerun against a healthy
/// result host downloads it without submitting anything again.
fn pending_then_fetched_by_the_rerun(sim: &Sim, work: &Workspace, reason: &str) {
    let line = &work.manifest()[0];
    assert_eq!(line["status"], "download_pending", "{line}");
    assert!(line["error"].as_str().is_some_and(|e| e.contains(reason)), "{line}");
    sim.server().set_faults(Faults::default());
    work.run(sim, &[]).expect_code(0);
    assert_eq!(work.manifest()[0]["status"], "completed");
    assert_eq!(sim.stats().jobs_created, 1, "never a reason to generate again");
}

#[test]
fn a_result_served_at_one_byte_per_second_ends_at_its_deadline() {
    let (sim, work) = dripping("  download_timeout: 1s\n");
    let run = work.spawn_run(&sim).finish(Duration::from_secs(30));
    run.expect_code(1);
    pending_then_fetched_by_the_rerun(&sim, &work, "download_timeout");
}

#[test]
fn one_sigterm_stops_a_dripping_download_within_the_grace_time() {
    let (sim, work) = dripping("  download_grace: 1s\n");
    let child = work.spawn_run(&sim);
    wait_until(Duration::from_secs(20), "the download has started", || {
        sim.stats().requests.iter().any(|request| request.listener == Listener::Files)
    });
    child.signal("TERM");
    let run = child.finish(Duration::from_secs(15));
    run.expect_code(130);
    pending_then_fetched_by_the_rerun(&sim, &work, "download_grace");
}
