//! The job table on its own: which moves it allows, and that a job's queue follows its phase.
//! Paused tokio time, since the poll timers and back-offs are tokio timers.

use super::super::doubles::job_record as record;
use super::super::phase::SUBMITTED_WITHOUT_ID;
use super::*;
use crate::store::FileRecord;

const NOW: i64 = 1_767_225_600_000;

fn remote(id: &str) -> RemoteJob {
    RemoteJob {
        job_id: id.to_owned(),
        status: None,
        created_at: Some("2026-01-01T00:00:01Z".into()),
        completed_at: None,
        urls: Vec::new(),
        error: None,
    }
}

/// A table holding one job per state in `states` (row ids 1, 2, …), slots in the same order.
fn table_of(states: &[JobState]) -> JobTable {
    let mut table = JobTable::new(HashSet::new());
    for (id, state) in (1..).zip(states) {
        table.add(record(id, *state), Arc::default(), NOW).expect("a new job is taken");
    }
    table
}

/// The states of the jobs whose writes are queued, in order; empties the queue.
fn written(table: &mut JobTable) -> Vec<(String, JobState)> {
    let (changes, _) = table.take_changes();
    changes
        .into_iter()
        .filter_map(|change| match change {
            Change::Job(job) => Some((job.name, job.state)),
            _ => None,
        })
        .collect()
}

/// Panics if the table's invariants do not hold (`JobTable::broken`).
#[track_caller]
fn sound(table: &JobTable) {
    assert_eq!(table.broken(), None);
}

/// Whether the job waits in no queue at all.
fn in_no_queue(table: &JobTable, slot: usize) -> bool {
    table.slots[slot].queue == Queue::None
        && !table.submit.contains(&slot)
        && !table.backing_off.iter().any(|(_, waiting)| *waiting == slot)
        && !table.reconcile.contains(&slot)
        && !table.downloads.contains(&slot)
}

#[tokio::test(start_paused = true)]
async fn rows_join_the_queue_their_state_calls_for() {
    let mut table = table_of(&[
        JobState::Pending,
        JobState::Unknown,
        JobState::Submitted,
        JobState::Completed,
        JobState::Downloaded,
        JobState::Failed,
    ]);
    assert_eq!(table.next_to_submit(), Some(0));
    assert_eq!(table.awaiting_reconciliation().collect::<Vec<_>>(), [1]);
    assert!(table.has_polls());
    assert_eq!(table.next_download(), Some(3));
    assert!(in_no_queue(&table, 4) && in_no_queue(&table, 5));
    // A submitted job found again is polled at once: it may have ended meanwhile.
    assert_eq!(table.next_poll().await, Some(2));
    assert_eq!(table.claim_owner("krea-3").as_deref(), Some("job job-3"));
    let counts = table.counts();
    assert_eq!((counts.total, counts.pending, counts.in_flight, counts.unknown), (6, 1, 1, 1));
    assert!(written(&mut table).is_empty(), "consistent rows are not written back");
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn a_job_known_or_dropped_from_its_file_is_not_taken() {
    let mut table = table_of(&[JobState::Pending]);
    assert_eq!(table.add(record(1, JobState::Pending), Arc::default(), NOW), None);
    let mut dropped = record(2, JobState::Pending);
    dropped.in_file = false;
    assert_eq!(table.add(dropped, Arc::default(), NOW), None);
    // A job dropped from the file but already sent is still carried to its end.
    let mut sent = record(3, JobState::Submitted);
    sent.in_file = false;
    assert_eq!(table.add(sent, Arc::default(), NOW), Some(1));
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn a_submitted_row_without_a_krea_id_is_reconciled_not_polled() {
    let mut row = record(1, JobState::Submitted);
    row.remote_id = None;
    row.submitted_at = Some(NOW - 5000);
    let mut table = JobTable::new(HashSet::new());
    let slot = table.add(row, Arc::default(), NOW).expect("taken");
    assert_eq!(table.phase(slot), &Phase::Unknown);
    assert!(!table.has_polls());
    assert_eq!(table.waiting_to_reconcile(), 1);
    assert_eq!(table.counts().unknown, 1);
    let job = table.job(slot);
    assert_eq!(job.attempt_at, Some(NOW - 5000), "its window starts at its submission");
    assert_eq!(job.error.as_deref(), Some(SUBMITTED_WITHOUT_ID));
    assert_eq!(written(&mut table), [("job-1".to_owned(), JobState::Unknown)], "repaired row");
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn an_accepted_job_leaves_pending_carries_its_id_and_is_polled_when_scheduled() {
    let mut table = table_of(&[JobState::Pending, JobState::Pending]);
    table.submitting(0, NOW).expect("pending -> submitting");
    assert_eq!(table.next_to_submit(), Some(1), "the job left the submission queue");
    assert_eq!((table.job(0).attempts, table.job(0).attempt_at), (1, Some(NOW)));
    assert_eq!(table.counts().in_flight, 1);

    table.accepted(0, &remote("k-9"), NOW + 700).expect("submitting -> submitted");
    let Phase::Submitted(at) = table.phase(0) else { panic!("{:?}", table.phase(0)) };
    assert_eq!(at.remote_id(), "k-9");
    let job = table.job(0);
    assert_eq!((job.state, job.remote_id.as_deref()), (JobState::Submitted, Some("k-9")));
    assert_eq!(job.submitted_at, Some(NOW + 700));
    assert_eq!(table.claim_owner("k-9").as_deref(), Some("job job-1"));
    assert!(table.claimed().contains("k-9"));

    assert!(!table.has_polls(), "polled only once the engine knows when");
    table
        .schedule_poll(0, |last| {
            assert_eq!(last, None, "no poll yet");
            Duration::from_secs(3)
        })
        .expect("a submitted job is polled");
    assert!(table.has_polls());
    let due = tokio::time::timeout(Duration::from_secs(4), table.next_poll()).await;
    assert_eq!(due, Ok(Some(0)));
    assert!(!table.has_polls(), "taken out of the timers while it is polled");
    table.schedule_poll(0, |last| last.expect("the last delay") * 2).expect("polled again");
    let Phase::Submitted(at) = table.phase(0) else { unreachable!() };
    assert_eq!(at.poll_delay, Some(Duration::from_secs(6)));
    assert_eq!(
        written(&mut table),
        [("job-1".to_owned(), JobState::Submitting), ("job-1".to_owned(), JobState::Submitted)]
    );
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn a_failed_job_leaves_every_queue() {
    let mut table = table_of(&[
        JobState::Pending,   // in the submission queue
        JobState::Pending,   // backing off
        JobState::Unknown,   // awaiting reconciliation
        JobState::Submitted, // in the poll timers
    ]);
    table.back_to_pending_after(1, Instant::now() + Duration::from_mins(1), NOW).expect("stay");
    assert!(!in_no_queue(&table, 1));
    for slot in 0..4 {
        table.failed(slot, format!("reason {slot}"), NOW).expect("any unfinished job may fail");
        assert!(in_no_queue(&table, slot), "slot {slot}");
        assert_eq!(table.phase(slot), &Phase::Failed { reason: format!("reason {slot}") });
        assert_eq!(table.job(slot).error, Some(format!("reason {slot}")));
        assert_eq!(table.job(slot).finished_at, Some(NOW));
    }
    assert!(!table.has_pending() && !table.has_polls());
    assert_eq!(table.waiting_to_reconcile(), 0);
    assert_eq!(table.counts().failed, 4);
    let (_, ended) = table.take_changes();
    assert_eq!(ended, [0, 1, 2, 3], "each ended job is listed once, for the manifest");
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn illegal_transitions_are_refused_and_change_nothing() {
    let mut table = table_of(&[JobState::Submitted, JobState::Downloaded, JobState::Pending]);
    let _ = written(&mut table);
    let before = table.counts();
    // A job Krea has is never sent again.
    let err = table.requeue(0, NOW).expect_err("submitted -> pending");
    assert_eq!((err.from, err.to), (JobState::Submitted, JobState::Pending));
    assert!(err.to_string().contains("job-1"), "{err}");
    assert!(table.submitting(0, NOW).is_err(), "submitted -> submitting");
    assert!(table.submitting(1, NOW).is_err(), "downloaded -> submitting");
    assert!(table.failed(1, "late".into(), NOW).is_err(), "an end is final");
    assert!(table.completed(2, vec!["https://x/1.png".into()], NOW).is_err(), "never sent");
    assert!(table.downloaded(2, NOW).is_err(), "pending -> downloaded");
    // A completed job is billed: it is downloaded, never failed.
    let mut billed = table_of(&[JobState::Completed]);
    assert!(billed.failed(0, "late".into(), NOW).is_err(), "completed -> failed");
    assert!(billed.has_downloads(), "still waiting for its download");

    assert!(matches!(table.phase(0), Phase::Submitted(_)));
    assert_eq!(table.phase(1), &Phase::Downloaded);
    assert_eq!(table.phase(2), &Phase::Pending);
    assert_eq!(table.job(1).error, None);
    assert_eq!(table.next_to_submit(), Some(2), "the pending job keeps its place");
    assert!(table.has_polls(), "the submitted job keeps its poll");
    assert_eq!(table.counts(), before);
    assert!(written(&mut table).is_empty(), "a refused move writes nothing");
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn the_table_allows_exactly_what_the_lifecycle_allows() {
    let now_plus = Instant::now() + Duration::from_secs(1);
    for from in JobState::ALL {
        for to in JobState::ALL {
            // A table with one job in `from`; `submitting` only exists after an attempt.
            let mut table = if from == JobState::Submitting {
                let mut table = table_of(&[JobState::Pending]);
                table.submitting(0, NOW).expect("pending -> submitting");
                table
            } else {
                table_of(&[from])
            };
            assert_eq!(table.state(0), from);
            let moved = match to {
                JobState::Pending => table.requeue(0, NOW),
                JobState::Submitting => table.submitting(0, NOW),
                JobState::Unknown => table.unanswered(0, NOW, "no answer".into(), true),
                JobState::Submitted => table.accepted(0, &remote("k-1"), NOW),
                JobState::Completed => table.completed(0, vec!["https://x/1".into()], NOW),
                JobState::Downloaded => table.downloaded(0, NOW),
                JobState::Failed => table.failed(0, "why".into(), NOW),
                JobState::Cancelled => table.cancelled(0, None, NOW),
            };
            assert_eq!(moved.is_ok(), from.may_become(to), "{from} -> {to}: {moved:?}");
            let now = if moved.is_ok() { to } else { from };
            assert_eq!(table.state(0), now);
            assert_eq!(table.job(0).state, now, "the record follows the phase");
            sound(&table);
            assert!(
                table.slots[0].queue.fits(table.phase(0)),
                "{from} -> {to}: {:?} in {:?}",
                table.phase(0),
                table.slots[0].queue
            );
        }
    }
    // Backing off is a way of being pending.
    let mut table = table_of(&[JobState::Completed]);
    assert!(table.back_to_pending_after(0, now_plus, NOW).is_err());
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_job_holds_submissions_then_backs_off_and_rejoins_the_head() {
    let mut table = table_of(&[JobState::Pending, JobState::Pending, JobState::Pending]);
    table.submitting(0, NOW).expect("pending -> submitting");
    table.unanswered(0, NOW + 30_000, "no answer".into(), true).expect("-> unknown");
    assert_eq!(table.awaiting_reconciliation().collect::<Vec<_>>(), [0]);
    assert_eq!(table.job(0).attempt_ended, Some(NOW + 30_000));
    assert_eq!(table.job(0).error.as_deref(), Some("no answer"));

    let due = Instant::now() + Duration::from_secs(10);
    table.back_to_pending_after(0, due, NOW).expect("unknown -> pending");
    assert_eq!(table.waiting_to_reconcile(), 0);
    assert_eq!(table.backoff_wake(), Some(due));
    assert_eq!(table.next_to_submit(), Some(1), "the others go first meanwhile");
    table.release_backed_off(due - Duration::from_millis(1));
    assert_eq!(table.next_to_submit(), Some(1));
    table.release_backed_off(due);
    assert_eq!(table.next_to_submit(), Some(0), "back at the head once due");
    assert_eq!(table.backoff_wake(), None);
    assert!(table.slots[0].queue == Queue::Submit);

    // Left to the next run: still unknown, in no queue, holding nothing back.
    table.submitting(0, NOW).expect("pending -> submitting");
    table.unanswered(0, NOW, "no answer".into(), false).expect("-> unknown");
    assert_eq!(table.waiting_to_reconcile(), 0);
    assert!(in_no_queue(&table, 0));
    table.submitting(1, NOW).expect("pending -> submitting");
    table.unanswered(1, NOW, "no answer".into(), true).expect("-> unknown");
    assert_eq!(table.leave_unknown_to_next_run(), ["job-2"]);
    assert_eq!(table.waiting_to_reconcile(), 0);
    assert_eq!(table.state(1), JobState::Unknown);
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_job_is_set_aside_unknown_and_only_an_unknown_one() {
    let mut table = table_of(&[JobState::Unknown, JobState::Submitted]);
    table.set_aside(0, "two candidates".into()).expect("an unknown job may be set aside");
    assert_eq!(table.state(0), JobState::Unknown);
    assert!(in_no_queue(&table, 0));
    assert_eq!(table.job(0).error.as_deref(), Some("two candidates"));
    let err = table.set_aside(1, "no".into()).expect_err("only unknown jobs are set aside");
    assert_eq!((err.from, err.to), (JobState::Submitted, JobState::Unknown));
    assert!(table.schedule_poll(0, |_| Duration::ZERO).is_err(), "only submitted jobs are polled");
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_pending_job_takes_it_out_of_the_middle_of_the_queue() {
    let mut table = table_of(&[JobState::Pending, JobState::Pending, JobState::Pending]);
    table.cancelled(1, Some("cancelled by the user".into()), NOW).expect("pending -> cancelled");
    assert_eq!(table.submit, [0, 2]);
    assert_eq!(table.job(1).error.as_deref(), Some("cancelled by the user"));
    assert_eq!(table.counts().cancelled, 1);
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn a_refused_model_fails_its_waiting_jobs_and_no_others() {
    let mut table =
        table_of(&[JobState::Pending, JobState::Pending, JobState::Pending, JobState::Pending]);
    table.slots[2].record.model = "image/other".into();
    table.submitting(3, NOW).expect("pending -> submitting");
    table.unanswered(3, NOW, "500".into(), true).expect("-> unknown");
    table.back_to_pending_after(3, Instant::now() + Duration::from_secs(5), NOW).expect("back");
    let _ = written(&mut table);
    table.fail_pending_of_model("image/bfl/flux-1-dev", "model gone", NOW).expect("fails");
    assert_eq!(
        written(&mut table),
        [
            ("job-1".to_owned(), JobState::Failed),
            ("job-2".to_owned(), JobState::Failed),
            ("job-4".to_owned(), JobState::Failed),
        ],
        "the queue in its order, then those backing off"
    );
    assert_eq!(table.next_to_submit(), Some(2));
    assert_eq!(table.backoff_wake(), None);
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn a_completed_job_is_downloaded_once_its_files_are_on_disk() {
    let mut table = table_of(&[JobState::Submitted]);
    let _ = table.next_poll().await;
    table.remote_update(0, "completed", &remote("krea-1"));
    let urls = vec!["https://x/1.png".to_owned(), "https://x/2.png".to_owned()];
    table.completed(0, urls.clone(), NOW).expect("submitted -> completed");
    assert_eq!(table.phase(0), &Phase::Completed { urls: urls.clone() });
    assert_eq!(table.job(0).urls, urls);
    assert_eq!(table.job(0).finished_at, Some(NOW), "billed: dated for the daily budget");
    assert_eq!(table.next_download(), Some(0));
    assert!(!table.has_downloads(), "out of the queue while it downloads");

    table.download_pending(0, "timed out");
    assert_eq!(table.state(0), JobState::Completed, "a failed download is never a new job");
    assert_eq!(table.job(0).error.as_deref(), Some("download pending: timed out"));
    let file = FileRecord {
        index: 0,
        url: urls[0].clone(),
        path: "job-1/1.png".into(),
        bytes: 3,
        sha256: "abc".into(),
        content_type: "image/png".into(),
    };
    table.file_written(0, file.clone());
    table.file_written(0, file);
    assert_eq!(table.job(0).files.len(), 1, "a file written again replaces itself");
    table.downloaded(0, NOW + 1).expect("completed -> downloaded");
    assert_eq!(table.job(0).error, None, "the pending download's error is cleared");
    assert_eq!(table.job(0).finished_at, Some(NOW), "the end is when Krea finished");
    assert_eq!(table.counts().completed, 1);
    sound(&table);
}

#[tokio::test(start_paused = true)]
async fn the_invariant_check_finds_a_job_out_of_step_with_its_queue() {
    let mut table = table_of(&[JobState::Pending, JobState::Submitted]);
    sound(&table);
    table.submit.push_back(0);
    assert!(table.broken().is_some_and(|why| why.contains("job-1")), "twice in the queue");
    table.submit.pop_back();
    table.slots[1].record.state = JobState::Pending;
    assert!(table.broken().is_some_and(|why| why.contains("job-2")), "columns out of step");
    table.slots[1].record.state = JobState::Submitted;
    table.counts.pending += 1;
    assert!(table.broken().is_some_and(|why| why.contains("counts")), "counts out of step");
}
