//! The seven scenarios of issue 5 and issue 12's "unknown account", one function each. Every
//! scenario works in a fresh temporary folder with its own simulation (killed when the scenario
//! ends), runs `krea-batch` there, and reports its figures against the targets. Sizes are the timed ones, or the smoke ones.

use crate::Mode;
use crate::harness::{
    ChildGuard, Limits, Sim, cpu_seconds, describe, krea_batch, run_timed, scratch_dir, sim_config,
    tail, write_job_file,
};
use crate::report::Findings;
use crate::report::Target::{AtLeast, AtMost};
use anyhow::{Context as _, bail, ensure};
use krea_batch::sim::{Listener, SimConfig, SimStats};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `krea-batch run` as every scenario runs it.
const RUN: &[&str] = &["run", "jobs.yaml", "--json", "--no-progress"];

const MIB: f64 = 1024.0 * 1024.0;

/// 10,000 jobs that complete at once, 4 KiB results, no client limits: what the client itself
/// costs per job.
pub(crate) fn overhead(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let jobs = mode.pick(10_000, 300);
    let dir = scratch_dir()?;
    let sim = Sim::start(
        dir.path(),
        &SimConfig {
            job_time: Duration::ZERO,
            result_bytes: 4096,
            concurrency: 100_000,
            backlog: 100_000,
            ..sim_config()
        },
    )?;
    let limits = limits([
        ("submissions_per_minute", "10000000"),
        ("burst", "100000"),
        ("max_in_flight", "100000"),
        ("poll_interval", "10ms"),
        ("poll_interval_max", "100ms"),
        ("download_concurrency", "16"),
    ]);
    write_job_file(dir.path(), &limits, "overhead job", jobs)?;

    let run = run_timed(dir.path(), Some(&sim), RUN)?;
    run.expect_code(0, "krea-batch run")?;
    expect_completed(&run.json()?, jobs)?;

    found.row("jobs/s end to end", jobs as f64 / run.wall, "jobs/s", AtLeast(1000.0));
    found.row("client CPU per job", run.cpu / jobs as f64 * 1000.0, "ms", AtMost(1.0));
    found.row("peak RSS", run.rss_mib(), "MiB", AtMost(64.0));
    found.note(format_args!(
        "{jobs} jobs in {:.2} s wall, {:.2} s CPU; client limits: {}",
        run.wall,
        run.cpu,
        describe(&limits)
    ));
    Ok(())
}

/// 300 jobs at 600 submissions a minute (burst 1), 1 s each: does the run keep to the rate,
/// and without a single 429?
pub(crate) fn pacing(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let (jobs, per_minute, job_secs) = mode.pick((300, 600, 1.0), (20, 1200, 0.2));
    let dir = scratch_dir()?;
    let mut sim = Sim::start(
        dir.path(),
        &SimConfig {
            job_time: Duration::from_secs_f64(job_secs),
            concurrency: 32,
            backlog: 32,
            ..sim_config()
        },
    )?;
    let limits = limits([
        ("submissions_per_minute", &per_minute.to_string()),
        ("burst", "1"),
        ("max_in_flight", "64"),
        ("poll_interval", "100ms"),
    ]);
    write_job_file(dir.path(), &limits, "paced job", jobs)?;

    let run = run_timed(dir.path(), Some(&sim), RUN)?;
    run.expect_code(0, "krea-batch run")?;
    expect_completed(&run.json()?, jobs)?;
    let stats = complete_log(sim.stats()?)?;

    let ideal = jobs as f64 / (f64::from(per_minute) / 60.0) + job_secs;
    found.row("makespan / (N / rate + job time)", run.wall / ideal, "", AtMost(1.03));
    found.row("429 responses", stats.responses_429 as f64, "", AtMost(0.0));
    // Never above the pace: with burst 1, no second-long window may hold more POSTs than the
    // pace allows in a second, plus the one the burst lets go at once.
    let mut posts: Vec<u64> = stats
        .requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/generate/"))
        .map(|r| r.at_ms)
        .collect();
    posts.sort_unstable();
    let busiest = posts
        .iter()
        .enumerate()
        .map(|(i, &start)| posts[i..].iter().take_while(|&&at| at < start + 1000).count())
        .max()
        .unwrap_or(0);
    let allowed = f64::from(per_minute) / 60.0 + 1.0;
    found.row("most POSTs in any second", busiest as f64, "", AtMost(allowed));
    found.note(format_args!(
        "makespan {:.2} s against {ideal:.2} s; sim concurrency 32, backlog 32, job time {}; \
         client limits: {} (the rest default)",
        run.wall,
        seconds(job_secs),
        describe(&limits)
    ));
    Ok(())
}

/// 400 jobs of 1 s against a server that runs 8 at a time and answers 429 beyond them, while
/// the client may keep 64 in flight: how close to 8 at a time does it get, at what cost in 429s?
pub(crate) fn unknown_concurrency(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let (jobs, job_secs) = mode.pick((400, 1.0), (40, 0.2));
    let server_concurrency = 8;
    let dir = scratch_dir()?;
    let mut sim = Sim::start(
        dir.path(),
        &SimConfig {
            job_time: Duration::from_secs_f64(job_secs),
            concurrency: server_concurrency,
            backlog: 0,
            ..sim_config()
        },
    )?;
    let mut limits = limits([
        ("submissions_per_minute", "60000"),
        ("burst", "64"),
        ("max_in_flight", "64"),
        ("poll_interval", "100ms"),
    ]);
    if mode == Mode::Smoke {
        // The default 5 s pause after a 429 would be most of a smoke run.
        limits.push(("retry_backoff", "200ms".to_owned()));
    }
    write_job_file(dir.path(), &limits, "squeezed job", jobs)?;

    let run = run_timed(dir.path(), Some(&sim), RUN)?;
    run.expect_code(0, "krea-batch run")?;
    expect_completed(&run.json()?, jobs)?;
    let stats = complete_log(sim.stats()?)?;
    let posts = stats
        .requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/generate/"))
        .count();

    let ideal = jobs as f64 * job_secs / server_concurrency as f64;
    found.row("makespan / (N x job time / 8)", run.wall / ideal, "", AtMost(1.20));
    found.row("429s per POST", stats.responses_429 as f64 / posts as f64, "", AtMost(0.10));
    found.note(format_args!(
        "makespan {:.2} s against {ideal:.2} s; {} 429s in {posts} POSTs; sim concurrency \
         {server_concurrency}, backlog 0, job time {}; client limits: {} (the rest default)",
        run.wall,
        stats.responses_429,
        seconds(job_secs),
        describe(&limits)
    ));
    Ok(())
}

/// Issue 12's grid against an account of unknown size, with the default job file (no
/// `limits`): concurrency 2, 8 and 32; backlog 0 and 20; POST round trip 0, 100 and 300 ms;
/// jobs of 1.5 s (the middle of the 1–2 s: the simulation has one job time); 200 jobs.
/// Per cell: the makespan against the account's bound, 429s per POST, and the deepest backlog
/// held at Krea. `KREA_BATCH_BENCH_CELLS` ("8/0/300 32/20/0": concurrency/backlog/round trip
/// in ms) and `KREA_BATCH_BENCH_JOBS` run a subset, scaled down.
pub(crate) fn unknown_account(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let job_secs = mode.pick(1.5, 0.5);
    let jobs = std::env::var("KREA_BATCH_BENCH_JOBS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(mode.pick(200, 30));
    let cells: Vec<(usize, usize, u64)> = match std::env::var("KREA_BATCH_BENCH_CELLS") {
        Ok(text) => text.split_whitespace().map(parse_cell).collect::<anyhow::Result<_>>()?,
        Err(_) if mode == Mode::Smoke => vec![(8, 20, 100)],
        Err(_) => {
            let mut grid = Vec::new();
            for concurrency in [2, 8, 32] {
                for backlog in [0, 20] {
                    for round_trip in [0, 100, 300] {
                        grid.push((concurrency, backlog, round_trip));
                    }
                }
            }
            grid
        }
    };
    for (concurrency, backlog, round_trip_ms) in cells {
        let dir = scratch_dir()?;
        let mut sim = Sim::start(
            dir.path(),
            &SimConfig {
                job_time: Duration::from_secs_f64(job_secs),
                concurrency,
                backlog,
                post_latency: Duration::from_millis(round_trip_ms),
                ..sim_config()
            },
        )?;
        write_job_file(dir.path(), &Limits::new(), "unknown-account job", jobs)?;
        let run = run_timed(dir.path(), Some(&sim), RUN)?;
        run.expect_code(0, "krea-batch run")?;
        expect_completed(&run.json()?, jobs)?;
        let stats = complete_log(sim.stats()?)?;
        let posts: Vec<&krea_batch::sim::RequestRecord> = stats
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.starts_with("/generate/"))
            .collect();
        let created: Vec<u64> =
            posts.iter().filter(|r| (200..300).contains(&r.status)).map(|r| r.at_ms).collect();
        let deepest = deepest_backlog(&created, concurrency, (job_secs * 1000.0) as u64);

        let cell = format!("C {concurrency}, backlog {backlog}, POST {round_trip_ms} ms");
        let bound = jobs as f64 * job_secs / concurrency as f64 + job_secs;
        let allowance = (concurrency / 4).max(2) as f64;
        found.row(&format!("{cell}: makespan / bound"), run.wall / bound, "", AtMost(1.15));
        let share = stats.responses_429 as f64 / posts.len().max(1) as f64;
        found.row(&format!("{cell}: 429s per POST"), share, "", AtMost(0.05));
        found.row(&format!("{cell}: deepest backlog"), deepest as f64, "jobs", AtMost(allowance));
        found.note(format_args!(
            "{cell}: {jobs} jobs of {} in {:.2} s against a bound of {bound:.2} s; {} 429s in \
             {} POSTs; no client limits",
            seconds(job_secs),
            run.wall,
            stats.responses_429,
            posts.len()
        ));
    }
    Ok(())
}

/// `"8/20/300"`: concurrency, backlog, POST round trip in ms.
fn parse_cell(text: &str) -> anyhow::Result<(usize, usize, u64)> {
    let parts: Vec<&str> = text.split('/').collect();
    let [concurrency, backlog, round_trip] = parts[..] else {
        bail!("KREA_BATCH_BENCH_CELLS: {text:?} is not concurrency/backlog/round-trip-ms");
    };
    Ok((concurrency.parse()?, backlog.parse()?, round_trip.parse()?))
}

/// The deepest backlog the simulation held, rebuilt from when its jobs were created (ms, in
/// order): it runs `concurrency` jobs at once in creation order, each for `job_ms`, so a job
/// starts when the one `concurrency` places before it ends; at each creation, the jobs created
/// and not yet started are the backlog.
fn deepest_backlog(created: &[u64], concurrency: usize, job_ms: u64) -> usize {
    let mut starts: Vec<u64> = Vec::with_capacity(created.len());
    let mut deepest = 0;
    for (index, &at) in created.iter().enumerate() {
        let start = match index.checked_sub(concurrency) {
            Some(before) => at.max(starts[before] + job_ms),
            None => at,
        };
        starts.push(start);
        let waiting = starts.iter().filter(|&&start| start > at).count();
        deepest = deepest.max(waiting);
    }
    deepest
}

/// 200 jobs of 20 s with the default polling schedule: how many status requests per job,
/// against what the documented schedule implies?
pub(crate) fn polling(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let (jobs, job_secs, first_poll) = mode.pick((200, 20.0, 2.0), (10, 2.0, 0.2));
    let max_poll = 30.0;
    let dir = scratch_dir()?;
    let mut sim = Sim::start(
        dir.path(),
        &SimConfig {
            job_time: Duration::from_secs_f64(job_secs),
            concurrency: jobs,
            ..sim_config()
        },
    )?;
    let limits = limits([
        ("submissions_per_minute", "60000"),
        ("burst", &jobs.to_string()),
        ("max_in_flight", &jobs.to_string()),
        ("poll_interval", &seconds(first_poll)),
        ("poll_interval_max", &seconds(max_poll)),
    ]);
    write_job_file(dir.path(), &limits, "slow job", jobs)?;

    let run = run_timed(dir.path(), Some(&sim), RUN)?;
    run.expect_code(0, "krea-batch run")?;
    expect_completed(&run.json()?, jobs)?;
    let stats = complete_log(sim.stats()?)?;
    let gets = stats
        .requests
        .iter()
        .filter(|r| {
            r.listener == Listener::Api && r.method == "GET" && r.path.starts_with("/jobs/")
        })
        .count();

    let implied = implied_polls(first_poll, max_poll, job_secs);
    let per_job = gets as f64 / jobs as f64;
    found.row("GET /jobs/{id} per job", per_job, "", AtMost(f64::from(implied + 2)));
    found.note(format_args!(
        "{gets} GETs for {jobs} jobs of {}; the schedule ({} first, x1.5 each time, capped at \
         {}) implies {implied} polls per job, so the target is {implied} + 2 (the schedule \
         restarts when a job reports sampling or intermediate-complete, which adds one or two); \
         client limits: {}",
        seconds(job_secs),
        seconds(first_poll),
        seconds(max_poll),
        describe(&limits)
    ));
    Ok(())
}

/// A 100,000-job file: `check`, the import (a run that stops at the first POST's 402) and
/// `status` afterwards.
pub(crate) fn scale(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let jobs = mode.pick(100_000, 2_000);
    let dir = scratch_dir()?;
    write_job_file(dir.path(), &Limits::new(), "p", jobs)?;

    let check = run_timed(dir.path(), None, &["check", "jobs.yaml", "--json"])?;
    check.expect_code(0, "krea-batch check")?;
    let mut sim = Sim::start(dir.path(), &SimConfig { balance_usd: 0.0, ..sim_config() })?;
    let import = run_timed(dir.path(), Some(&sim), RUN)?;
    import.expect_code(3, "krea-batch run against an empty balance")?;
    let sim_stats = sim.stats()?;
    ensure!(
        sim_stats.responses_402 >= 1 && sim_stats.jobs_created == 0,
        "the run should have met a 402 and created nothing: {} 402s, {} jobs created",
        sim_stats.responses_402,
        sim_stats.jobs_created
    );
    let status = run_timed(dir.path(), None, &["status", "jobs.yaml", "--json"])?;
    status.expect_code(0, "krea-batch status")?;

    let peak = [&check, &import, &status].iter().map(|run| run.rss_mib()).fold(0.0, f64::max);
    found.row("check time", check.wall, "s", AtMost(3.0));
    found.row("import (run to first 402)", import.wall, "s", AtMost(5.0));
    found.row("status time", status.wall, "s", AtMost(0.3));
    found.row("peak RSS (max of the three)", peak, "MiB", AtMost(200.0));
    found.note(format_args!(
        "{jobs} jobs; peak RSS check {:.1} MiB, run {:.1} MiB, status {:.1} MiB",
        check.rss_mib(),
        import.rss_mib(),
        status.rss_mib()
    ));
    Ok(())
}

/// One job whose result is 1 GiB: memory must not grow with the file, and the download should
/// go at least half as fast as curl's.
pub(crate) fn big_file(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let bytes: u64 = mode.pick(1 << 30, 16 << 20);
    let dir = scratch_dir()?;
    let (small, _) = one_result_run(&dir.path().join("small"), 4096)?;
    let (big, mut sim) = one_result_run(&dir.path().join("big"), bytes)?;

    // The same URL, fetched once more by curl (after the run's copy is gone, to spare the disk).
    let stats = sim.stats()?;
    let url = stats.served_files.keys().next().context("the simulation served no file")?;
    std::fs::remove_dir_all(dir.path().join("big").join("out"))?;
    let copy = dir.path().join("curl.bin");
    let started = Instant::now();
    let curl = Command::new("curl").arg("-s").arg("-o").arg(&copy).arg(url).status()?;
    let curl_secs = started.elapsed().as_secs_f64();
    ensure!(curl.success(), "curl {url} failed: {curl}");
    ensure!(std::fs::metadata(&copy)?.len() == bytes, "curl fetched a short file");
    std::fs::remove_file(&copy)?;

    // Within the noise of the two runs (a small smoke file), count a millisecond.
    let download_secs = (big.wall - small.wall).max(0.001);
    let size_mib = bytes as f64 / MIB;
    let curl_speed = size_mib / curl_secs;
    let growth = big.rss_mib() - small.rss_mib();
    found.row("peak RSS growth", growth, "MiB", AtMost(32.0));
    found.row("download throughput", size_mib / download_secs, "MiB/s", AtLeast(0.5 * curl_speed));
    found.note(format_args!(
        "{size_mib:.0} MiB result: run {:.2} s vs {:.2} s with 4 KiB, so {download_secs:.2} s of \
         download; curl took {curl_secs:.2} s ({curl_speed:.1} MiB/s; the target is half of \
         that); peak RSS {:.1} MiB vs {:.1} MiB with 4 KiB",
        big.wall,
        small.wall,
        big.rss_mib(),
        small.rss_mib()
    ));
    Ok(())
}

/// `krea-batch run` in `dir` of one job whose result is `bytes` long, against its own
/// simulation (returned, still running, so its file can be fetched again).
fn one_result_run(dir: &Path, bytes: u64) -> anyhow::Result<(crate::harness::Timed, Sim)> {
    std::fs::create_dir(dir)?;
    let sim = Sim::start(
        dir,
        &SimConfig { job_time: Duration::ZERO, result_bytes: bytes, ..sim_config() },
    )?;
    let limits = limits([("poll_interval", "100ms"), ("max_result_size", "2GiB")]);
    write_job_file(dir, &limits, "big file", 1)?;
    let run = run_timed(dir, Some(&sim), RUN)?;
    run.expect_code(0, "krea-batch run")?;
    let summary = run.json()?;
    expect_completed(&summary, 1)?;
    ensure!(summary["bytes"] == bytes, "the run wrote {} bytes, not {bytes}", summary["bytes"]);
    Ok((run, sim))
}

/// The daemon with an empty inbox: CPU used over 60 s, from 5 s after its start.
pub(crate) fn idle_daemon(mode: Mode, found: &mut Findings) -> anyhow::Result<()> {
    let (settle, window) = mode.pick((5, 60), (1, 3));
    let dir = scratch_dir()?;
    let sim = Sim::start(dir.path(), &sim_config())?;
    std::fs::create_dir(dir.path().join("inbox"))?;
    std::fs::write(
        dir.path().join("daemon.yaml"),
        format!(
            "inbox: inbox\noutput: out\nstate: state.sqlite\napi:\n  base_url: {}\n",
            sim.url()
        ),
    )?;
    let stderr = dir.path().join("daemon.stderr");
    let child = krea_batch(dir.path(), Some(&sim), &["daemon", "--config", "daemon.yaml"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .context("cannot start krea-batch daemon")?;
    let mut daemon = ChildGuard::new(child);

    let mut cpu_now = || -> anyhow::Result<f64> {
        if !daemon.running() {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            bail!("the daemon exited; its stderr ends:\n{}", tail(&text));
        }
        cpu_seconds(daemon.pid())
    };
    std::thread::sleep(Duration::from_secs(settle));
    let before = cpu_now()?;
    std::thread::sleep(Duration::from_secs(window));
    let used = cpu_now()? - before;

    found.row(&format!("CPU seconds over {window} s idle"), used, "s", AtMost(0.1));
    found.note(format_args!(
        "measured from {settle} s after the start, in clock ticks of 10 ms (utime + stime)"
    ));
    Ok(())
}

/// A job file's limits from literal pairs.
fn limits<const N: usize>(pairs: [(&'static str, &str); N]) -> Limits {
    pairs.into_iter().map(|(key, value)| (key, value.to_owned())).collect()
}

/// A duration in seconds as a job file or sim config writes it: `2s`, `200ms`.
fn seconds(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs_f64(secs)).to_string()
}

/// Polls the documented schedule makes before a job of `job_secs` can be seen finished: delays
/// of `first`, then 1.5 times the previous, capped at `max`, until they add up to the job time.
fn implied_polls(first: f64, max: f64, job_secs: f64) -> u32 {
    let (mut delay, mut elapsed, mut polls) = (first.min(max), 0.0, 0);
    while elapsed < job_secs {
        elapsed += delay;
        polls += 1;
        delay = (delay * 1.5).min(max);
    }
    polls
}

/// Fails unless the run's summary (`--json`) counts `jobs` completed jobs.
fn expect_completed(summary: &serde_json::Value, jobs: usize) -> anyhow::Result<()> {
    let completed = &summary["counts"]["completed"];
    ensure!(*completed == jobs, "the run completed {completed} jobs of {jobs}: {summary}");
    Ok(())
}

/// The stats, provided the request log kept every request (the figures count in it).
fn complete_log(stats: SimStats) -> anyhow::Result<SimStats> {
    ensure!(
        stats.requests.len() as u64 == stats.requests_total,
        "the request log kept {} of {} requests; raise request_log_limit",
        stats.requests.len(),
        stats.requests_total
    );
    Ok(stats)
}
