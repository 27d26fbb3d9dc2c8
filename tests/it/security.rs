//! What must stay in stays in: the key in no output of any kind, at any log level, also from
//! the daemon; the key file's permissions; files only inside the output folder, never through a
//! planted symbolic link; private state.

use crate::support::{Run, Sim, Workspace, files_under, krea_batch, numbered_jobs, wait_until};
use krea_batch::sim::Faults;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "sk-test-NEVER-IN-ANY-OUTPUT-9173";

/// Asserts that no file under `dir` and neither output stream contains the key.
fn assert_nowhere(dir: &Path, run: &Run) {
    assert!(
        !run.stdout.contains(SECRET) && !run.stderr.contains(SECRET),
        "the key reached the terminal"
    );
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).expect("readable");
        let found = bytes.windows(SECRET.len()).any(|window| window == SECRET.as_bytes());
        assert!(!found, "the key is in {}", file.display());
    }
}

#[test]
fn the_daemon_keeps_the_key_out_of_logs_state_and_files_even_under_faults() {
    let sim = Sim::start(|config| {
        config.api_key = SECRET.into();
        config.faults = Faults {
            server_error_rate: 0.1,
            post_drop_rate: 0.1,
            redirect_api_origin_rate: 0.3,
            redirect_other_origin_rate: 0.3,
            ..Faults::default()
        };
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{SECRET}\n")).expect("key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(
        dir.path().join("daemon.yaml"),
        // One POST at a time: every result must land under its job for the count below;
        // lost answers of POSTs on the wire together would go to unattributed/.
        format!(
            "inbox: inbox\noutput: results\nstate: state.sqlite\napi:\n  base_url: {}\nlimits:\n  \
             request_timeout: 1s\n  reconcile_after: 50ms\n  retry_backoff: 20ms\n  poll_interval: 50ms\n  \
             poll_interval_max: 200ms\n  submission_concurrency: 1\ninbox_scan_interval: 100ms\n\
             drain_time: 2s\n",
            sim.url()
        ),
    )
    .expect("config");
    let mut command = krea_batch();
    command
        .args(["-vv", "--log-format", "json", "daemon", "--config"])
        .arg(dir.path().join("daemon.yaml"))
        .arg("--api-key-file")
        .arg(&key_file)
        .env("RUST_LOG", "trace");
    let daemon = crate::support::LiveChild::spawn(command);
    let inbox = dir.path().join("inbox");
    wait_until(Duration::from_secs(10), "the inbox exists", || inbox.is_dir());
    std::fs::write(
        dir.path().join("j.yaml"),
        format!("model: image/bfl/flux-1-dev\njobs:\n{}", numbered_jobs("a secret-free job", 6)),
    )
    .expect("job file");
    std::fs::rename(dir.path().join("j.yaml"), inbox.join("j.yaml")).expect("renamed in");
    std::fs::write(inbox.join("bad.yaml"), "jobs: [{prompt: ''}]\n").expect("bad file");
    wait_until(Duration::from_secs(30), "six results", || {
        std::fs::read_dir(dir.path().join("results/j")).map_or(0, |entries| {
            entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "png")).count()
        }) == 6
    });
    daemon.signal("TERM");
    let run = daemon.finish(Duration::from_secs(10));
    run.expect_code(0);
    assert!(run.stderr.lines().count() > 50, "trace logging was on");
    std::fs::remove_file(&key_file).expect("the key file itself is allowed to hold the key");
    assert_nowhere(dir.path(), &run);
    assert_eq!(sim.stats().auth_header_on_file_host, 0, "no key followed a redirect");
}

#[test]
fn a_key_file_readable_by_others_gets_a_warning() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a warned run", 1));
    let key_file = work.dir.path().join("key");
    std::fs::write(&key_file, sim.key()).expect("key file");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let run = Run::of(
        &krea_batch()
            .arg("run")
            .arg(work.job_file())
            .arg("--api-key-file")
            .arg(&key_file)
            .env("KREA_API_BASE", sim.url())
            .output()
            .expect("runs"),
    );
    run.expect_code(0);
    assert!(run.stderr.contains("chmod 600"), "{}", run.stderr);
}

#[test]
fn planted_symlinks_are_not_followed_and_state_files_are_private() {
    let sim = Sim::start(|config| config.outputs_per_job = 1);
    // The links are planted in a folder that is already krea-batch's (a folder it did not make
    // is refused whole), between two runs.
    let work = Workspace::with_jobs("  - {name: first, prompt: a first job}\n");
    work.run(&sim, &[]).expect_code(0);
    work.set_jobs("  - {name: fox, prompt: a fox}\n  - {name: owl, prompt: an owl}\n");
    let outside = tempfile::tempdir().expect("outside");
    let precious = outside.path().join("precious.png");
    std::fs::write(&precious, b"precious").expect("precious file");
    // A link where a result will go, and one where its sidecar will go.
    std::os::unix::fs::symlink(&precious, work.out().join("fox.png")).expect("symlink");
    std::os::unix::fs::symlink(&precious, work.out().join("owl.png.json")).expect("symlink");

    work.run(&sim, &[]).expect_code(0);
    assert_eq!(
        std::fs::read(&precious).expect("still there"),
        b"precious",
        "the link was not followed"
    );
    // A result never replaces a file krea-batch did not write: the link stays, and the
    // result is saved beside it under another name. A sidecar (derived data) replaces the link
    // planted in its place, without following it.
    let link = std::fs::symlink_metadata(work.out().join("fox.png")).expect("still there");
    assert!(link.file_type().is_symlink(), "the planted fox.png was left as it is");
    for name in ["fox-2.png", "fox-2.png.json", "owl.png", "owl.png.json"] {
        let meta = std::fs::symlink_metadata(work.out().join(name)).expect("written");
        assert!(meta.file_type().is_file(), "{name} is a regular file");
    }
    for file in files_under(&work.out()) {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.starts_with(".krea-batch.sqlite") {
            let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{name} has mode {mode:o}");
        }
    }
}

#[test]
fn a_symlinked_folder_for_several_results_is_refused_not_followed() {
    let sim = Sim::start(|config| config.outputs_per_job = 2);
    let work = Workspace::with_jobs("  - {name: first, prompt: a first job}\n");
    work.run(&sim, &[]).expect_code(0);
    work.set_jobs("  - {name: pair, prompt: two images}\n");
    let outside = tempfile::tempdir().expect("outside");
    std::os::unix::fs::symlink(outside.path(), work.out().join("pair")).expect("symlink");
    let run = work.run(&sim, &["--json"]);
    run.expect_code(1);
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("outside").count(),
        0,
        "nothing written outside"
    );
    let manifest = work.manifest();
    let line = manifest.iter().find(|line| line["name"] == "pair").expect("pair listed");
    assert_eq!(line["status"], "download_pending");
    assert!(line["error"].as_str().is_some_and(|e| e.contains("symbolic link")), "{line}");
    assert_eq!(sim.stats().jobs_created, 2);
}

#[test]
fn a_server_that_quotes_the_key_everywhere_leaves_it_in_no_byte_and_no_result_host() {
    use krea_batch::sim::Listener;
    let sim = Sim::start(|config| {
        config.api_key = SECRET.into();
        // Hostile: `Bearer <key>` in failed jobs' error and result.error, created_at and
        // completed_at, Deprecation/Sunset/Link, the last of two result URLs, and a status.
        config.echo_key = true;
        config.outputs_per_job = 2;
        config.job_time = Duration::from_millis(800);
        config.quirks.undocumented_state = Some(format!("warming Bearer {SECRET}"));
    });
    let work = Workspace::with_jobs(
        "  - {name: sea, prompt: a calm sea}\n  - {name: storm, prompt: \"[nsfw] a storm\"}\n",
    );
    let mut command = krea_batch();
    command
        .args(["-vv", "--log-format", "json", "run"])
        .arg(work.job_file())
        .arg("--json")
        .env("KREA_API_BASE", sim.url())
        .env("KREA_API_KEY", SECRET)
        .env("RUST_LOG", "trace");
    let child = crate::support::LiveChild::spawn(command);
    let run = child.finish(Duration::from_mins(1));
    run.expect_code(1);
    assert!(run.stderr.lines().count() > 50, "trace logging was on");
    assert!(run.stderr.contains("Bearer [redacted]"), "server text arrived, redacted");
    assert_nowhere(work.dir.path(), &run);

    let manifest = work.manifest();
    let line = |name: &str| {
        manifest.iter().find(|line| line["name"] == name).cloned().expect("in the manifest")
    };
    let storm = line("storm");
    assert_eq!(storm["status"], "failed");
    assert!(storm["error"].as_str().is_some_and(|e| e.contains("[redacted]")), "{storm}");
    let sea = line("sea");
    assert_eq!(sea["status"], "download_pending", "{sea}");
    assert!(
        sea["error"].as_str().is_some_and(|e| e.contains("quoted the API key")),
        "the URL that quoted the key was refused: {sea}"
    );
    let sidecar: serde_json::Value = serde_json::from_slice(
        &std::fs::read(work.out().join("sea/1.png.json")).expect("the clean result's sidecar"),
    )
    .expect("JSON");
    assert!(sidecar["created_at"].as_str().is_some_and(|t| t.contains("[redacted]")), "{sidecar}");

    let stats = sim.stats();
    let on_file_host: Vec<_> =
        stats.requests.iter().filter(|request| request.listener == Listener::Files).collect();
    assert!(!on_file_host.is_empty(), "the clean result was fetched");
    assert!(
        on_file_host.iter().all(|request| !request.path.contains(SECRET)),
        "no request carried the key to the result host: {on_file_host:?}"
    );
    assert_eq!(stats.auth_header_on_file_host, 0);
}
