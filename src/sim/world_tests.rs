//! Unit tests of the world model, driven with explicit instants.

use super::*;

const T0: Millis = 1_780_000_000_000;

fn config(concurrency: usize, backlog: usize, job_ms: u64) -> SimConfig {
    SimConfig {
        concurrency,
        backlog,
        job_time: Duration::from_millis(job_ms),
        balance_usd: 100.0,
        ..SimConfig::default()
    }
}

fn job(prompt: &str) -> NewJob {
    NewJob {
        model: "image/bfl/flux-1-dev".to_owned(),
        prompt: prompt.to_owned(),
        kind: Kind::Image,
        job_type: "flux",
        price_micros: 7_000,
        input: None,
        picture: Picture::default(),
    }
}

fn create(world: &mut World, now: Millis, prompt: &str) -> JobView {
    world.create(now, job(prompt)).expect("job accepted")
}

fn status(world: &mut World, now: Millis, id: &str) -> Status {
    world.get(now, id).expect("job exists").status
}

#[test]
fn jobs_wait_in_the_backlog_and_start_in_submission_order() {
    let mut world = World::new(&config(2, 3, 1_000));
    let a = create(&mut world, T0, "a");
    let b = create(&mut world, T0 + 100, "b");
    let c = create(&mut world, T0 + 200, "c");
    let d = create(&mut world, T0 + 300, "d");
    assert_eq!((a.status, b.status), (Status::Queued, Status::Queued));
    assert_eq!((c.status, d.status), (Status::Backlogged, Status::Backlogged));
    assert_eq!(status(&mut world, T0 + 999, &a.id), Status::IntermediateComplete);
    assert_eq!(status(&mut world, T0 + 999, &c.id), Status::Backlogged);
    // a ends at +1000 and frees a slot for c (not d); b ends at +1100 and frees one for d.
    assert_eq!(status(&mut world, T0 + 1_050, &a.id), Status::Completed);
    assert_eq!(status(&mut world, T0 + 1_050, &c.id), Status::Queued);
    assert_eq!(status(&mut world, T0 + 1_050, &d.id), Status::Backlogged);
    assert_eq!(status(&mut world, T0 + 1_100, &d.id), Status::Queued);
    // c started at +1000 (when the slot freed), not when it was next looked at.
    assert_eq!(status(&mut world, T0 + 2_000, &c.id), Status::Completed);
    assert_eq!(status(&mut world, T0 + 2_099, &d.id), Status::IntermediateComplete);
    assert_eq!(status(&mut world, T0 + 2_100, &d.id), Status::Completed);
}

#[test]
fn a_post_beyond_concurrency_and_backlog_is_refused() {
    let mut world = World::new(&config(1, 1, 1_000));
    create(&mut world, T0, "a");
    create(&mut world, T0, "b");
    assert_eq!(world.create(T0, job("c")), Err(Refusal::AtCapacity));
    assert_eq!(world.creations_by_prompt().get("c"), None);
    // Once the first finishes, there is room again.
    assert!(world.create(T0 + 1_000, job("c")).is_ok());
}

#[test]
fn the_lifecycle_passes_through_every_state() {
    let mut cfg = config(1, 0, 1_000);
    cfg.quirks.undocumented_state = Some("warming".to_owned());
    let mut world = World::new(&cfg);
    let id = create(&mut world, T0, "a").id;
    let seen: Vec<Status> = [0, 100, 200, 300, 500, 800, 1_000]
        .iter()
        .map(|dt| status(&mut world, T0 + dt, &id))
        .collect();
    assert_eq!(
        seen,
        [
            Status::Queued,
            Status::Scheduled,
            Status::Undocumented,
            Status::Processing,
            Status::Sampling,
            Status::IntermediateComplete,
            Status::Completed
        ]
    );
    let view = world.get(T0 + 5_000, &id).expect("exists");
    assert_eq!(view.ended_ms, Some(T0 + 1_000));
    assert_eq!(status_name(Status::Undocumented, "warming"), "warming");
}

#[test]
fn zero_job_time_completes_at_once() {
    let mut world = World::new(&config(1, 0, 0));
    let first = create(&mut world, T0, "a");
    assert_eq!(first.status, Status::Queued, "the create response shows the job pending");
    assert_eq!(status(&mut world, T0, &first.id), Status::Completed);
    // The slot is free again at the same instant.
    assert!(world.create(T0, job("b")).is_ok());
}

#[test]
fn the_price_is_reserved_at_creation_and_charged_on_completion() {
    let mut cfg = config(4, 4, 1_000);
    cfg.balance_usd = 0.02;
    let mut world = World::new(&cfg);
    create(&mut world, T0, "a");
    create(&mut world, T0, "b");
    assert_eq!((world.reserved(), world.spent(), world.balance()), (14_000, 0, 20_000));
    // 7_000 does not fit in 20_000 - 14_000.
    assert_eq!(world.create(T0, job("c")), Err(Refusal::InsufficientBalance));
    world.advance(T0 + 1_000);
    assert_eq!((world.reserved(), world.spent(), world.balance()), (0, 14_000, 6_000));
    assert_eq!(world.create(T0 + 1_000, job("c")), Err(Refusal::InsufficientBalance));
    world.set_balance(usd_to_micros(1.0));
    assert!(world.create(T0 + 1_000, job("c")).is_ok());
}

#[test]
fn in_flight_jobs_finish_even_after_the_balance_is_cut() {
    let mut world = World::new(&config(1, 1, 1_000));
    let a = create(&mut world, T0, "a");
    let b = create(&mut world, T0, "b");
    world.set_balance(0);
    assert_eq!(world.create(T0, job("c")), Err(Refusal::InsufficientBalance));
    assert_eq!(status(&mut world, T0 + 2_000, &a.id), Status::Completed);
    assert_eq!(status(&mut world, T0 + 2_000, &b.id), Status::Completed);
    assert_eq!((world.balance(), world.spent()), (-14_000, 14_000));
}

#[test]
fn failed_and_cancelled_jobs_are_not_billed() {
    let mut world = World::new(&config(2, 0, 1_000));
    let doomed = create(&mut world, T0, "a cat [nsfw]");
    let cancelled = create(&mut world, T0, "a dog");
    assert_eq!(world.cancel(T0 + 10, &cancelled.id), Ok(()));
    let failed = world.get(T0 + 500, &doomed.id).expect("exists");
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.failure.map(|f| f.code), Some("content_moderation"));
    assert_eq!((world.reserved(), world.spent(), world.balance()), (0, 0, 100_000_000));
    let records = world.job_records(T0 + 500, "");
    assert!(records.iter().all(|record| !record.charged));
}

#[test]
fn cancel_is_allowed_only_while_queued_or_processing() {
    let mut world = World::new(&config(1, 2, 1_000));
    let running = create(&mut world, T0, "a");
    let waiting = create(&mut world, T0, "b");
    assert_eq!(world.cancel(T0, "no-such-job"), Err(CancelError::NotFound));
    assert_eq!(world.cancel(T0, &waiting.id), Err(CancelError::NotCancellable(Status::Backlogged)));
    assert_eq!(
        world.cancel(T0 + 150, &running.id),
        Err(CancelError::NotCancellable(Status::Scheduled))
    );
    assert_eq!(world.cancel(T0 + 300, &running.id), Ok(()));
    assert_eq!(status(&mut world, T0 + 300, &running.id), Status::Cancelled);
    // The freed slot goes to the backlogged job at the moment of the cancel.
    assert_eq!(status(&mut world, T0 + 300, &waiting.id), Status::Queued);
    assert_eq!(status(&mut world, T0 + 1_300, &waiting.id), Status::Completed);
    assert_eq!(
        world.cancel(T0 + 1_300, &waiting.id),
        Err(CancelError::NotCancellable(Status::Completed))
    );
}

#[test]
fn cancel_any_pending_reaches_backlogged_jobs() {
    let mut cfg = config(1, 2, 1_000);
    cfg.cancel_any_pending = true;
    let mut world = World::new(&cfg);
    let running = create(&mut world, T0, "a");
    let skipped = create(&mut world, T0, "b");
    let next = create(&mut world, T0, "c");
    assert_eq!(world.cancel(T0, &skipped.id), Ok(()));
    assert_eq!(world.reserved(), 14_000);
    assert_eq!(status(&mut world, T0 + 1_000, &running.id), Status::Completed);
    assert_eq!(status(&mut world, T0 + 1_000, &next.id), Status::Queued);
    assert_eq!(status(&mut world, T0 + 1_000, &skipped.id), Status::Cancelled);
}

#[test]
fn stuck_jobs_stay_processing_until_cancelled_or_timed_out() {
    let mut world = World::new(&config(1, 1, 1_000));
    let stuck = create(&mut world, T0, "[stuck] forever");
    let behind = create(&mut world, T0, "behind");
    assert_eq!(status(&mut world, T0 + 1_000_000, &stuck.id), Status::Processing);
    assert_eq!(status(&mut world, T0 + 1_000_000, &behind.id), Status::Backlogged);
    assert_eq!(world.cancel(T0 + 1_000_000, &stuck.id), Ok(()));
    assert_eq!(status(&mut world, T0 + 1_001_000, &behind.id), Status::Completed);

    let mut cfg = config(1, 0, 1_000);
    cfg.auto_timeout = Some(Duration::from_mins(3));
    let mut world = World::new(&cfg);
    let stuck = create(&mut world, T0, "[stuck]");
    assert_eq!(status(&mut world, T0 + 179_999, &stuck.id), Status::Processing);
    let view = world.get(T0 + 180_000, &stuck.id).expect("exists");
    assert_eq!(view.status, Status::Failed);
    assert_eq!(view.failure.map(|failure| failure.code), Some("timeout"));
    assert_eq!(world.reserved(), 0);
}

#[test]
fn fail_rate_fails_jobs_halfway() {
    let mut cfg = config(1, 0, 1_000);
    cfg.fail_rate = 1.0;
    let mut world = World::new(&cfg);
    let id = create(&mut world, T0, "a").id;
    assert_eq!(status(&mut world, T0 + 499, &id), Status::Processing);
    let view = world.get(T0 + 500, &id).expect("exists");
    assert_eq!(view.failure.map(|failure| failure.code), Some("provider_error"));
}

#[test]
fn listing_pages_newest_first_with_a_strict_cursor() {
    let mut world = World::new(&config(10, 0, 1_000));
    // Five jobs in the same millisecond still get distinct timestamps.
    let ids: Vec<String> = (0..5).map(|i| create(&mut world, T0, &format!("p{i}")).id).collect();
    let page = |world: &mut World, before| {
        let query = ListQuery { limit: 2, before_ms: before, ..ListQuery::default() };
        let (items, next) = world.list(T0, &query);
        (items.into_iter().map(|item| item.id).collect::<Vec<_>>(), next)
    };
    let (first, next) = page(&mut world, None);
    assert_eq!(first, [ids[4].clone(), ids[3].clone()]);
    let (second, next) = page(&mut world, next);
    assert_eq!(second, [ids[2].clone(), ids[1].clone()]);
    let (third, next) = page(&mut world, next);
    assert_eq!((third, next), (vec![ids[0].clone()], None));

    world.cancel(T0 + 1, &ids[2]).expect("queued job cancels");
    let query = ListQuery { limit: 10, status: Some(Status::Cancelled), ..ListQuery::default() };
    let (cancelled, _) = world.list(T0 + 1, &query);
    assert_eq!(cancelled.len(), 1);
    let query =
        ListQuery { limit: 10, types: Some(vec!["krea-2".to_owned()]), ..ListQuery::default() };
    assert!(world.list(T0 + 1, &query).0.is_empty());
}

#[test]
fn ids_are_uuids_and_timestamps_rfc3339_millis() {
    let mut world = World::new(&config(1, 0, 1_000));
    let view = create(&mut world, T0, "a");
    let parts: Vec<usize> = view.id.split('-').map(str::len).collect();
    assert_eq!(parts, [8, 4, 4, 4, 12]);
    assert_eq!(view.id.as_bytes()[14], b'4');
    assert_eq!(rfc3339(1_780_000_000_123), "2026-05-28T20:26:40.123Z");
    assert_eq!(parse_status("intermediate-complete"), Some(Status::IntermediateComplete));
    assert_eq!(parse_status("warming"), None);
}
