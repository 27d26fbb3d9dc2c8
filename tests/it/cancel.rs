//! Cancels Krea refuses (the job is `backlogged`). `krea-batch cancel` when no krea-batch holds
//! the state reports one as a refusal with Krea's reason and a non-zero exit, never as "not
//! found", and with no internal state name; a running `run` logs it with Krea's reason; either
//! way the cancel is kept, and the next run cancels the job once Krea allows.

use crate::support::{LiveChild, Run, Sim, Workspace, krea_batch};
use std::time::Duration;

/// One job at a time: `second` waits `backlogged` behind `first`, which never ends.
fn one_at_a_time() -> (Sim, Workspace) {
    let sim = Sim::start(|config| {
        config.concurrency = 1;
        config.job_time = Duration::from_mins(1);
    });
    let work = Workspace::with_jobs(
        "  - name: first\n    prompt: \"[stuck] a lighthouse\"\n  - name: second\n    prompt: \"a harbour\"\n",
    );
    (sim, work)
}

/// `krea-batch cancel --state <work's state> NAME` with `sim`'s key.
fn cancel(sim: &Sim, work: &Workspace, name: &str) -> Run {
    Run::of(
        &krea_batch()
            .args(["cancel", "--state"])
            .arg(work.out().join(".krea-batch.sqlite"))
            .arg(name)
            .env("KREA_API_KEY", sim.key())
            .output()
            .expect("cancel runs"),
    )
}

/// Stops a run with two Ctrl-C (the second stops at once); returns its output.
fn interrupt(child: LiveChild) -> Run {
    child.signal("INT");
    child.wait_for_log("no more submissions", Duration::from_secs(5));
    child.signal("INT");
    let run = child.finish(Duration::from_secs(10));
    run.expect_code(130);
    run
}

#[test]
fn a_cancel_krea_refuses_is_reported_as_a_refusal_and_the_next_run_carries_it_out() {
    let (sim, work) = one_at_a_time();
    let child = work.spawn_run(&sim);
    child.wait_for_log("job=second", Duration::from_secs(20));
    interrupt(child);
    let in_flight = work.manifest().iter().filter(|line| line["status"] == "in_flight").count();
    assert_eq!(in_flight, 2, "both are at Krea: {:?}", work.manifest());
    let cancel = |name: &str| cancel(&sim, &work, name);

    let refused = cancel("second");
    refused.expect_code(1);
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(said.contains("Krea refused to cancel 1 job"), "{said}");
    assert!(said.contains("Job cannot be cancelled in state backlogged"), "Krea's reason: {said}");
    assert!(said.contains("second: "), "names the job: {said}");
    assert!(!said.contains("404") && !said.contains("not found"), "{said}");
    assert!(!said.contains("submitting") && !said.contains("state="), "{said}");
    assert_eq!(sim.stats().jobs.iter().filter(|job| job.status == "cancelled").count(), 0);

    // Cancelling `first` lets `second` start, in a state Krea cancels.
    let done = cancel("first");
    done.expect_code(0);
    assert!(done.stdout.trim() == "cancelled 1 job", "{}", done.stdout);

    // The refused cancel was kept: the next run asks again, and Krea cancels `second`.
    let run = work.run(&sim, &[]);
    run.expect_code(1);
    assert!(!run.stderr.contains("submitting"), "{}", run.stderr);
    let at_krea = sim.stats();
    assert_eq!(at_krea.jobs_created, 2, "nothing sent again");
    assert!(
        at_krea.jobs.iter().all(|job| job.status == "cancelled" && !job.charged),
        "{at_krea:?}"
    );
}

#[test]
fn a_cancel_krea_refuses_during_a_run_is_logged_and_kept_for_the_next_run() {
    let (sim, work) = one_at_a_time();
    let child = work.spawn_run(&sim);
    child.wait_for_log("job=second", Duration::from_secs(20));
    // The running `run` takes the request and asks Krea, which refuses: `second` is backlogged.
    cancel(&sim, &work, "second").expect_code(0);
    child.wait_for_log("Krea refused to cancel the job now", Duration::from_secs(10));
    let run = interrupt(child);
    assert!(run.stderr.contains("Job cannot be cancelled in state backlogged"), "{}", run.stderr);
    assert!(run.stderr.contains("cancels Krea has not carried out yet are kept"), "{}", run.stderr);
    assert!(!run.stderr.contains("submitting"), "{}", run.stderr);

    // Once `first` is cancelled, `second` starts; the next run cancels it from the kept request.
    cancel(&sim, &work, "first").expect_code(0);
    work.run(&sim, &[]).expect_code(1);
    let at_krea = sim.stats();
    assert_eq!(at_krea.jobs_created, 2, "nothing sent again");
    assert!(
        at_krea.jobs.iter().all(|job| job.status == "cancelled" && !job.charged),
        "{at_krea:?}"
    );
}
