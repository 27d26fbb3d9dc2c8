//! The kill test: a batch run under faults (answers dropped after the job is created, 5xx,
//! resets, truncated downloads) is killed with SIGKILL at random moments and restarted, again
//! and again, until it completes. Then every job must have been created exactly once at the
//! simulated Krea, every file must be whole (its SHA-256 what the server sent), no temporary
//! file may be left, and the manifest must list every job once.
//!
//! Scale with `KREA_BATCH_KILL_JOBS` (default 200) and `KREA_BATCH_KILLS` (default 30);
//! `KREA_BATCH_KILL_SEED` replays a run (the seed is printed).

use crate::support::{
    Sim, Workspace, assert_each_result_where_it_belongs, files_under, numbered_jobs, sha256_of,
};
use krea_batch::sim::{Faults, SimStats};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|text| text.parse().ok()).unwrap_or(default)
}

/// The account the kill tests run against: 16 jobs at once, a deep backlog, 0.8 s jobs (videos
/// too).
fn killing_ground(seed: u64, faults: Faults) -> Sim {
    Sim::start(|config| {
        config.seed = seed;
        config.job_time = Duration::from_millis(800);
        config.video_job_time = Duration::from_millis(800);
        config.concurrency = 16;
        config.backlog = 64;
        config.faults = faults;
    })
}

/// Runs the batch to its end after the kills: retries of failed downloads may take a rerun or
/// two. True when a run exited 0.
fn runs_to_the_end(work: &Workspace, sim: &Sim) -> bool {
    for _ in 0..5 {
        let run = work.spawn_run(sim).finish(Duration::from_mins(5));
        assert!(run.code == 0 || run.code == 1, "exit {}: {}", run.code, run.stderr);
        if run.code == 0 {
            return true;
        }
    }
    false
}

/// Asserts that the result `file` (relative to the output folder) is what the server sent,
/// as its sidecar names it; returns its path.
fn assert_whole(work: &Workspace, stats: &SimStats, file: &str) -> std::path::PathBuf {
    let path = work.out().join(file);
    let sidecar: Value = serde_json::from_slice(
        &std::fs::read(work.out().join(format!("{file}.json"))).expect("sidecar"),
    )
    .expect("sidecar JSON");
    let served = &stats.served_files[sidecar["source_url"].as_str().expect("url")];
    assert_eq!(sha256_of(&path), served.sha256, "{file} is whole");
    path
}

/// Starts a run and kills it (SIGKILL) at a random moment `window` ms in: the whole point is
/// not to choose it. `None` once killed; the exit code if the run had ended by itself first.
fn run_killed_at_random(
    work: &Workspace,
    sim: &Sim,
    rng: &mut fastrand::Rng,
    window: std::ops::Range<u64>,
) -> Option<i32> {
    let mut child = work.spawn_run(sim);
    std::thread::sleep(Duration::from_millis(rng.u64(window)));
    if child.has_exited() {
        return Some(child.finish(Duration::from_secs(5)).code);
    }
    child.signal("KILL");
    child.finish(Duration::from_secs(10));
    None
}

/// A job file with the kill tests' quick limits (`extra_limits` added to them) and `jobs`.
fn killed_job_file(extra_limits: &str, jobs: &str) -> String {
    format!(
        "model: image/bfl/flux-1-dev\nlimits:\n  submissions_per_minute: 60000\n  burst: 50\n  \
         max_in_flight: 16\n{extra_limits}  poll_interval: 50ms\n  poll_interval_max: 200ms\n  \
         retry_backoff: 20ms\n  request_timeout: 1s\n  reconcile_after: 50ms\njobs:\n{jobs}"
    )
}

#[test]
fn killed_again_and_again_it_still_pays_once_and_loses_nothing() {
    let jobs = env_number("KREA_BATCH_KILL_JOBS", 200) as usize;
    let kills = env_number("KREA_BATCH_KILLS", 30);
    let seed = env_number("KREA_BATCH_KILL_SEED", fastrand::u64(..));
    eprintln!("kill test: {jobs} jobs, {kills} kills, KREA_BATCH_KILL_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let sim = killing_ground(
        seed,
        Faults {
            post_drop_rate: 0.05,
            server_error_rate: 0.03,
            reset_rate: 0.03,
            download_truncate_rate: 0.1,
            download_error_rate: 0.03,
            ..Faults::default()
        },
    );
    // One POST at a time: every job must end under its own name, which several POSTs on the
    // wire cannot promise when kills leave their answers lost together (the test below).
    let one_at_a_time = "  submission_concurrency: 1\n";
    let work =
        Workspace::with_file(&killed_job_file(one_at_a_time, &numbered_jobs("a killed run", jobs)));

    let started = Instant::now();
    let mut killed = 0;
    while killed < kills {
        if let Some(code) = run_killed_at_random(&work, &sim, &mut rng, 20..500) {
            assert_ne!(
                code, 0,
                "the batch finished after {killed} kills; slow the simulation down"
            );
            continue;
        }
        killed += 1;
    }
    eprintln!("kill test: {killed} kills in {:.1} s", started.elapsed().as_secs_f64());

    assert!(runs_to_the_end(&work, &sim), "the batch completed");
    eprintln!("kill test: done in {:.1} s", started.elapsed().as_secs_f64());

    let stats = sim.stats();
    let duplicated: Vec<_> =
        stats.creations_by_prompt.iter().filter(|(_, count)| **count != 1).collect();
    assert!(duplicated.is_empty(), "paid more than once: {duplicated:?}");
    assert_eq!(stats.creations_by_prompt.len(), jobs, "every job was created");
    assert_eq!(stats.auth_header_on_file_host, 0);

    let manifest = work.manifest();
    let names: HashSet<&str> = manifest.iter().filter_map(|line| line["name"].as_str()).collect();
    assert_eq!((manifest.len(), names.len()), (jobs, jobs), "every job listed once");
    for line in &manifest {
        assert_eq!(line["status"], "completed", "{line}");
        let file = line["files"][0].as_str().expect("a file");
        assert_whole(&work, &stats, file);
    }
    let partials: Vec<_> = files_under(&work.out())
        .into_iter()
        .filter(|path| {
            path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(".krea-part-"))
        })
        .collect();
    assert!(partials.is_empty(), "temporary files left: {partials:?}");
}

/// The same with four POSTs on the wire (`limits.submission_concurrency: 4`), lost answers and
/// kills: still nothing created twice, no result filed under a job whose prompt did not create
/// it, and every job Krea created reaches the user, under its job or, where lost answers of
/// POSTs on the wire together cannot be told apart, in `unattributed/` with the job among the
/// candidates its sidecar names.
///
/// Scale with `KREA_BATCH_KILL_POSTS_JOBS` (default 60) and `KREA_BATCH_KILL_POSTS_KILLS`
/// (default 10); `KREA_BATCH_KILL_SEED` replays a run.
#[test]
fn killed_with_several_posts_on_the_wire_it_pays_once_and_misfiles_nothing() {
    let jobs = env_number("KREA_BATCH_KILL_POSTS_JOBS", 60) as usize;
    let kills = env_number("KREA_BATCH_KILL_POSTS_KILLS", 10);
    let seed = env_number("KREA_BATCH_KILL_SEED", fastrand::u64(..));
    eprintln!(
        "kill test, 4 POSTs at once: {jobs} jobs, {kills} kills, KREA_BATCH_KILL_SEED={seed}"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let sim = killing_ground(
        seed,
        Faults {
            post_drop_rate: 0.1,
            server_error_rate: 0.03,
            reset_rate: 0.03,
            ..Faults::default()
        },
    );
    let work = Workspace::with_file(&killed_job_file(
        "  submission_concurrency: 4\n",
        &numbered_jobs("posts on the wire", jobs),
    ));
    let mut killed = 0;
    while killed < kills {
        if run_killed_at_random(&work, &sim, &mut rng, 20..500).is_some() {
            break;
        }
        killed += 1;
    }
    // Then run to the end. Jobs set aside as unattributable stay unknown, so the exit code
    // may stay 1; two runs in a row with the same manifest mean nothing is left to do.
    let mut last = None;
    for _ in 0..6 {
        let run = work.spawn_run(&sim).finish(Duration::from_mins(5));
        assert!(run.code == 0 || run.code == 1, "exit {}: {}", run.code, run.stderr);
        let lines = std::fs::read_to_string(work.out().join("manifest.jsonl")).unwrap_or_default();
        if run.code == 0 || last.as_ref() == Some(&lines) {
            break;
        }
        last = Some(lines);
    }

    let stats = sim.stats();
    let duplicated: Vec<_> =
        stats.creations_by_prompt.iter().filter(|(_, count)| **count != 1).collect();
    assert!(duplicated.is_empty(), "paid more than once: {duplicated:?}");
    let (attributed, parked) =
        assert_each_result_where_it_belongs("kill test, 4 POSTs at once", &work, &stats);
    eprintln!(
        "kill test, 4 POSTs at once: {attributed} results attributed, {parked} unattributed, \
         {killed} kills"
    );
}

/// Chains of three stages (generate, enhance, animate) over 10 jobs, killed at random moments
/// while stages run, under lost answers and cut downloads: every stage of every job is created
/// once (each generation per prompt, each later stage per input URL, its parent's result),
/// every file is whole, each stage names its parent, and the enhancer's result is larger.
///
/// `KREA_BATCH_KILL_SEED` replays a run.
#[test]
fn killed_during_chains_every_stage_is_created_once_and_every_file_is_whole() {
    const JOBS: usize = 10;
    let seed = env_number("KREA_BATCH_KILL_SEED", fastrand::u64(..));
    eprintln!("kill test, chains: {JOBS} jobs of 3 stages, KREA_BATCH_KILL_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let sim = killing_ground(
        seed,
        Faults { post_drop_rate: 0.05, download_truncate_rate: 0.1, ..Faults::default() },
    );
    let mut jobs = String::new();
    for index in 1..=JOBS {
        let _ = write!(
            jobs,
            "  - name: castle-{index:02}\n    prompt: a chained castle {index}\n    then:\n      \
             - model: enhance/topaz/standard-enhance\n        params: {{model: Standard V2, \
             image_scaling_factor: 2}}\n      - model: video/kling/kling-2.5\n        \
             prompt: slow push-in\n"
        );
    }
    // One POST at a time: every stage must end under its own job (see the first test).
    let work = Workspace::with_file(&killed_job_file("  submission_concurrency: 1\n", &jobs));

    let mut killed = 0;
    for _ in 0..4 {
        if run_killed_at_random(&work, &sim, &mut rng, 300..1500).is_some() {
            continue;
        }
        killed += 1;
    }
    let stages_before_the_end = sim.stats().creations_by_input.len();
    eprintln!("kill test, chains: {killed} kills, {stages_before_the_end} later stages created");
    assert!(runs_to_the_end(&work, &sim), "the chains completed after {killed} kills");

    let stats = sim.stats();
    for index in 1..=JOBS {
        let prompt = format!("a chained castle {index}");
        assert_eq!(stats.creations_by_prompt.get(&prompt), Some(&1), "{prompt}");
    }
    assert_eq!(stats.creations_by_prompt.get("slow push-in"), Some(&(JOBS as u32)));
    let twice: Vec<_> = stats.creations_by_input.iter().filter(|(_, count)| **count != 1).collect();
    assert!(twice.is_empty(), "a stage paid more than once: {twice:?}");
    assert_eq!(stats.creations_by_input.len(), 2 * JOBS, "every later stage was created");
    assert_eq!(stats.jobs_created, 3 * JOBS as u64);

    let manifest = work.manifest();
    let names: HashSet<&str> = manifest.iter().filter_map(|line| line["name"].as_str()).collect();
    assert_eq!((manifest.len(), names.len()), (3 * JOBS, 3 * JOBS), "every stage listed once");
    for line in &manifest {
        assert_eq!(line["status"], "completed", "{line}");
        let name = line["name"].as_str().expect("a name");
        let file = line["files"][0].as_str().expect("a file");
        let stage = line["stage"].as_u64().expect("a stage");
        let (base, rest) = name.split_once('/').expect("<name>/<stage>-<model>");
        let model = ["flux-1-dev", "standard-enhance", "kling-2.5"][stage as usize];
        assert_eq!(rest, format!("{stage}-{model}"));
        if stage > 0 {
            let parent = line["parent"].as_str().expect("a parent");
            assert!(parent.starts_with(&format!("{base}/{}-", stage - 1)), "{line}");
        }
        let path = assert_whole(&work, &stats, file);
        let head = std::fs::read(&path).expect("the file");
        match stage {
            // The PNG header's width: the enhancer's result is twice the generator's.
            0 => assert_eq!(head[16..20], 512_u32.to_be_bytes(), "{file}"),
            1 => assert_eq!(head[16..20], 1024_u32.to_be_bytes(), "{file}"),
            _ => assert_eq!(&head[4..8], b"ftyp", "{file} is an MP4"),
        }
    }
}
