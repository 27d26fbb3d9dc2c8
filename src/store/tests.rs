//! Tests of the state file: versions and migration, the one-writer lock, privacy, recovery.

use super::*;
use crate::pricing::PriceTable;

/// A copy of the first-version state file kept in `tests/data/`.
fn fixture_copy(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/state-v1.sqlite");
    let copy = dir.join("state.sqlite");
    std::fs::copy(source, &copy).expect("fixture copied");
    copy
}

#[test]
fn the_first_schema_version_is_read_and_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixture_copy(dir.path());
    let store = Store::open_writer(&path).expect("opens and migrates");
    assert_eq!(store.version().expect("version"), SCHEMA_VERSION);
    let jobs = store.jobs(None).expect("jobs");
    let state_of = |name: &str| jobs.iter().find(|job| job.name == name).map(|job| job.state);
    assert_eq!(state_of("lighthouse"), Some(JobState::Downloaded));
    assert_eq!(state_of("blocked"), Some(JobState::Failed));
    assert_eq!(state_of("harbour"), Some(JobState::Pending));
    assert_eq!(state_of("waiting"), Some(JobState::Pending));
    let lighthouse = jobs.iter().find(|job| job.name == "lighthouse").expect("listed");
    assert_eq!(lighthouse.files.len(), 1);
    assert_eq!(lighthouse.files[0].path, "lighthouse.png");
    assert!(lighthouse.remote_id.is_some());
}

#[test]
fn a_batch_from_before_folder_markers_is_found_for_its_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixture_copy(dir.path());
    let store = Store::open_writer(&path).expect("opens and migrates");
    let elsewhere = Path::new("/elsewhere/out");
    // By its job file's path, by its output folder, or as the one batch of a state file kept
    // in the folder itself; never for a folder the state file is not in.
    let by_source = store.legacy_batch("/tmp/fixture/jobs.yaml", elsewhere, false);
    assert_eq!(by_source.expect("read").as_deref(), Some("/tmp/fixture/jobs.yaml"));
    let by_folder = store.legacy_batch("/moved/jobs.yaml", Path::new("out"), false);
    assert_eq!(by_folder.expect("read").as_deref(), Some("/tmp/fixture/jobs.yaml"));
    let in_folder = store.legacy_batch("/moved/jobs.yaml", elsewhere, true);
    assert_eq!(in_folder.expect("read").as_deref(), Some("/tmp/fixture/jobs.yaml"));
    assert_eq!(store.legacy_batch("/moved/jobs.yaml", elsewhere, false).expect("read"), None);
}

#[test]
fn a_newer_schema_is_refused_not_misread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixture_copy(dir.path());
    Connection::open(&path).expect("open").pragma_update(None, "user_version", 99).expect("set");
    let message = Store::open_reader(&path).expect_err("refused").to_string();
    assert!(message.contains("newer"), "{message}");
    assert!(matches!(Store::open_writer(&path), Err(StoreError::TooNew { found: 99, .. })));
}

#[test]
fn a_second_writer_is_refused_while_readers_are_welcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.sqlite");
    let first = Store::open_writer(&path).expect("first writer");
    assert!(matches!(Store::open_writer(&path), Err(StoreError::Locked { .. })));
    Store::open_reader(&path).expect("a reader is fine");
    drop(first);
    Store::open_writer(&path).expect("free again");
}

#[test]
fn the_state_file_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.sqlite");
    drop(Store::open_writer(&path).expect("created"));
    let mode = std::fs::metadata(&path).expect("exists").permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");
}

#[test]
fn an_interrupted_submission_becomes_unknown_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixture_copy(dir.path());
    {
        let store = Store::open_writer(&path).expect("open");
        store
            .conn
            .execute("UPDATE jobs SET state = 'submitting' WHERE name = 'harbour'", [])
            .expect("set");
    }
    let store = Store::open_writer(&path).expect("reopen");
    let harbour =
        store.jobs(None).expect("jobs").into_iter().find(|job| job.name == "harbour").expect("job");
    assert_eq!(harbour.state, JobState::Unknown);
}

/// An upload's record moves attempting → unknown → uploaded, per content and API, and an
/// older state file gains the table on migration.
#[test]
fn uploads_are_recorded_per_content_and_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixture_copy(dir.path());
    let mut store = Store::open_writer(&path).expect("opens and migrates");
    let (sha, api) = ("ab".repeat(32), "https://api.krea.ai");
    assert_eq!(store.upload(&sha, api).expect("read"), None);
    store.begin_upload(&sha, api, "cat.png").expect("recorded");
    let record = store.upload(&sha, api).expect("read").expect("recorded");
    assert_eq!((record.state, record.path.as_str()), (UploadState::Attempting, "cat.png"));
    assert!(record.attempt_at.is_some());
    store.upload_unknown(&sha, api).expect("recorded");
    assert_eq!(store.upload(&sha, api).expect("read").map(|r| r.state), Some(UploadState::Unknown));
    store.upload_done(&sha, api, "https://x/a.png").expect("recorded");
    let uploaded = UploadState::Uploaded { url: "https://x/a.png".into() };
    assert_eq!(store.upload(&sha, api).expect("read").map(|r| r.state), Some(uploaded));
    assert_eq!(store.upload(&sha, "http://127.0.0.1:9").expect("read"), None, "per API");
    drop(store);
    let mut store = Store::open_writer(&path).expect("reopens");
    assert!(store.upload(&sha, api).expect("read").is_some(), "durable");
    store.forget_upload(&sha, api).expect("forgotten");
    assert_eq!(store.upload(&sha, api).expect("read"), None);
}

#[test]
fn stage_jobs_are_inserted_once_and_stay_in_the_file_with_their_parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open_writer(&dir.path().join("state.sqlite")).expect("opens");
    let chained = "model: image/bfl/flux-1-dev\njobs:\n  - {name: castle, prompt: a castle, \
                   then: [{model: enhance/topaz/standard-enhance}]}\n";
    let file = crate::jobfile::parse(chained.as_bytes(), Path::new("jobs.yaml")).expect("valid");
    let prices =
        PriceTable::with_overrides([("enhance/topaz/standard-enhance".into(), 0.1)].into());
    let out = Path::new("out");
    let batch =
        store.import("jobs.yaml", out, &file.jobs, &prices, false).expect("import").batch_id;
    let parent = store.jobs(None).expect("jobs").remove(0);
    let chain =
        crate::chain::Chain::parse(parent.chain.as_deref().expect("a chain")).expect("read");
    assert_eq!(chain.stages[0].price_usd, Some(0.1), "priced at import");
    let outcome = crate::chain::ParentOutcome {
        key: &parent.key,
        name: &parent.name,
        state: JobState::Downloaded,
        error: None,
        results: vec![("https://results/1.png", Some((32, 32)))],
    };
    let next = crate::chain::next_jobs(&chain, &outcome);
    let first = store.insert_stage_jobs(batch, parent.id, &next).expect("inserted");
    let again = store.insert_stage_jobs(batch, parent.id, &next).expect("inserted again");
    assert_eq!(first, again, "a second insert finds the same row");
    assert_eq!(store.jobs(None).expect("jobs").len(), 2);
    assert_eq!((first[0].parent_id, first[0].price_usd), (Some(parent.id), Some(0.1)));
    assert_eq!(first[0].name, "castle/1-standard-enhance");

    // The stage job leaves the file with its parent, and comes back with it.
    let other = crate::jobfile::parse(
        b"model: image/bfl/flux-1-dev\njobs: [{prompt: x}]\n",
        Path::new("jobs.yaml"),
    )
    .expect("valid");
    store.import("jobs.yaml", out, &other.jobs, &prices, false).expect("import");
    assert!(store.jobs(None).expect("jobs").iter().all(|job| job.name == "001-x" || !job.in_file));
    store.import("jobs.yaml", out, &file.jobs, &prices, false).expect("import");
    let jobs = store.jobs(None).expect("jobs");
    assert!(jobs.iter().filter(|job| job.name.starts_with("castle/")).all(|job| job.in_file));
}

/// `krea-batch retry`'s one transition: a failed job back to pending, its failure kept, its
/// failed attempt's Krea id still claimed; a job not failed is left alone.
#[test]
fn a_retried_job_goes_back_to_pending_and_its_failure_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixture_copy(dir.path());
    let mut store = Store::open_writer(&path).expect("opens and migrates");
    let jobs = store.jobs(None).expect("jobs");
    let job = |name: &str| jobs.iter().find(|job| job.name == name).expect("listed").clone();
    let (blocked, lighthouse) = (job("blocked"), job("lighthouse"));
    store
        .conn
        .execute("UPDATE jobs SET remote_id = 'old-id' WHERE id = ?1", [blocked.id])
        .expect("id");

    let moved = store.retry_failed(&[blocked.id, lighthouse.id]).expect("retried");
    assert_eq!(moved, 1, "only the failed one");
    let again = store.job(blocked.id).expect("read").expect("there");
    assert_eq!(again.state, JobState::Pending);
    assert_eq!((again.error.as_deref(), again.remote_id.as_deref()), (None, None));
    assert_eq!(again.attempts, blocked.attempts, "the next POST counts one more");
    let kept = store.retried_failures(blocked.id).expect("history");
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].error, blocked.error);
    assert_eq!(kept[0].remote_id.as_deref(), Some("old-id"));
    assert!(store.remote_ids().expect("ids").contains("old-id"), "never adopted again");
    assert_eq!(store.job(lighthouse.id).expect("read").expect("there").state, JobState::Downloaded);
    assert_eq!(store.retry_failed(&[blocked.id]).expect("no-op"), 0, "pending is not failed");
}

/// Jobs read back name their local inputs by the path their upload was recorded with, for the
/// manifest and the gallery; a content never uploaded has no name yet.
#[test]
fn jobs_name_their_inputs_by_the_recorded_uploads() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cat.png"), b"\x89PNG\r\n\x1a\na cat").expect("image");
    std::fs::write(dir.path().join("dog.png"), b"\x89PNG\r\n\x1a\na dog").expect("image");
    let text = "model: bfl/flux-1-dev\njobs:\n  - prompt: a\n    params: {image_url: cat.png}\n  \
                - prompt: b\n    params: {image_url: dog.png}\n";
    let file = crate::jobfile::parse(text.as_bytes(), &dir.path().join("jobs.yaml")).expect("file");
    let mut store = Store::open_writer(&dir.path().join("state.db")).expect("state");
    let prices = crate::pricing::PriceTable::with_overrides([].into());
    store.import("jobs.yaml", &dir.path().join("out"), &file.jobs, &prices, false).expect("import");
    let cat = file.local_files.iter().find(|f| f.path == Path::new("cat.png")).expect("cat");
    store.begin_upload(&cat.sha256, "https://api.krea.ai", "cat.png").expect("recorded");
    let jobs = store.jobs(None).expect("jobs");
    let named: Vec<Vec<&str>> =
        jobs.iter().map(|job| job.inputs.iter().map(|i| i.path.as_str()).collect()).collect();
    assert_eq!(named, [vec!["cat.png"], vec![]]);
    assert_eq!(jobs[0].inputs[0].sha256, cat.sha256);
}

#[test]
fn retrying_a_failed_job_forgets_the_later_stages_its_failure_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open_writer(&dir.path().join("state.sqlite")).expect("opens");
    let chained = "model: image/bfl/flux-1-dev\njobs:\n  - {name: castle, prompt: a castle, \
                   then: [{model: enhance/topaz/standard-enhance}, {model: video/kling/kling-2.5}]}\n";
    let file = crate::jobfile::parse(chained.as_bytes(), Path::new("jobs.yaml")).expect("valid");
    let prices = PriceTable::with_overrides(std::collections::BTreeMap::new());
    let out = Path::new("out");
    let batch =
        store.import("jobs.yaml", out, &file.jobs, &prices, false).expect("import").batch_id;
    let parent = store.jobs(None).expect("jobs").remove(0);
    store.conn.execute("UPDATE jobs SET state = 'failed', error = 'moderated'", []).expect("fail");
    // The engine records the failed chain: stage 1, then stage 2 from it.
    let mut job = store.job(parent.id).expect("read").expect("there");
    for _ in 0..2 {
        let chain = crate::chain::Chain::parse(job.chain.as_deref().expect("chain")).expect("read");
        let outcome = crate::chain::ParentOutcome {
            key: &job.key,
            name: &job.name,
            state: job.state,
            error: job.error.as_deref(),
            results: Vec::new(),
        };
        let next = crate::chain::next_jobs(&chain, &outcome);
        job = store.insert_stage_jobs(batch, job.id, &next).expect("inserted").remove(0);
        assert_eq!(job.state, JobState::Failed);
    }
    assert_eq!(store.jobs(None).expect("jobs").len(), 3);
    let ids: Vec<i64> = store.jobs(None).expect("jobs").iter().map(|job| job.id).collect();
    assert_eq!(store.retry_failed(&ids).expect("retried"), 1, "only the job that was sent");
    let left = store.jobs(None).expect("jobs");
    assert_eq!(left.len(), 1, "the stages it stopped are made again once it is downloaded");
    assert_eq!(left[0].state, JobState::Pending);
}
