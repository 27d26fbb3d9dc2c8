//! The daemon as systemd runs it: a real process with a `NOTIFY_SOCKET` the test listens on,
//! job files dropped into its inbox, the balance running out and being topped up, signals.

use crate::support::{LiveChild, Run, Sim, krea_batch, numbered_jobs, wait_until};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fake systemd: a datagram socket collecting every notification.
struct Systemd {
    path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
}

impl Systemd {
    fn listen(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut buffer = vec![0_u8; 4096];
            while let Ok(len) = socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..len]).into_owned();
                sink.lock().expect("messages").push(text);
            }
        });
        Self { path, messages }
    }

    /// Waits until a message satisfies `test`; returns it.
    fn wait_for(&self, what: &str, test: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        wait_until(Duration::from_secs(30), what, || {
            found = self.messages.lock().expect("messages").iter().find(|m| test(m)).cloned();
            found.is_some()
        });
        found.expect("found")
    }

    fn count(&self, test: impl Fn(&str) -> bool) -> usize {
        self.messages.lock().expect("messages").iter().filter(|m| test(m)).count()
    }
}

/// A daemon's folders and configuration.
struct Service {
    dir: tempfile::TempDir,
}

impl Service {
    fn new(sim: &Sim, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "inbox: inbox\noutput: results\nstate: state.sqlite\napi:\n  base_url: {}\n\
             limits:\n  submissions_per_minute: 6000\n  burst: 1\n  max_in_flight: 4\n  \
             poll_interval: 50ms\n  poll_interval_max: 200ms\n  retry_backoff: 50ms\n  request_timeout: 2s\n\
             probe_interval: 1h\ndrain_time: 2s\ninbox_scan_interval: 100ms\n{extra}",
            sim.url()
        );
        std::fs::write(dir.path().join("daemon.yaml"), config).expect("config");
        Self { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("daemon.yaml")
    }

    fn start(&self, sim: &Sim, systemd: &Systemd) -> LiveChild {
        let mut command = krea_batch();
        command
            .args(["daemon", "--config"])
            .arg(self.config())
            .env("KREA_API_KEY", sim.key())
            .env("NOTIFY_SOCKET", &systemd.path)
            .env("WATCHDOG_USEC", "1000000");
        LiveChild::spawn(command)
    }

    /// Writes a job file elsewhere and renames it into the inbox, as operators are told to.
    fn drop_file(&self, name: &str, text: &str) {
        let staging = self.dir.path().join(format!("staging-{name}"));
        std::fs::write(&staging, text).expect("job file");
        std::fs::rename(&staging, self.dir.path().join("inbox").join(name)).expect("renamed in");
    }

    /// What `krea-batch status --config` prints once it shows a pause.
    fn status_once_paused(&self) -> String {
        let mut shown = String::new();
        wait_until(Duration::from_secs(10), "status shows the pause", || {
            shown = self.status();
            shown.contains("submitting paused since")
        });
        shown
    }

    /// What `krea-batch status --config` prints now.
    fn status(&self) -> String {
        let output = krea_batch()
            .args(["status", "--config"])
            .arg(self.config())
            .output()
            .expect("status runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn results(&self, batch: &str) -> usize {
        let dir = self.dir.path().join("results").join(batch);
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "png")).count()
        })
    }
}

fn job_file(stem: &str, jobs: usize) -> String {
    format!("model: image/bfl/flux-1-dev\njobs:\n{}", numbered_jobs(stem, jobs))
}

#[test]
fn the_daemon_takes_files_pauses_on_402_resumes_on_sighup_and_drains_on_sigterm() {
    // Room for four of the six jobs of the first two files ($0.007 each).
    let sim = Sim::start(|config| {
        config.balance_usd = 0.028;
        config.job_time = Duration::from_millis(800);
    });
    let service = Service::new(&sim, "");
    let systemd = Systemd::listen(service.dir.path());
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.lines().any(|l| l == "READY=1"));
    systemd.wait_for("WATCHDOG=1 from the engine's loop", |m| m.contains("WATCHDOG=1"));

    service.drop_file("catalogue.yaml", &job_file("a catalogue item", 3));
    service.drop_file("sweep.yml", &job_file("a sweep variant", 3));
    service.drop_file("broken.yaml", "model: image/bfl/flux-1-dev\njobs:\n  - prompt: ''\n");

    // The broken file is rejected with its place named.
    let error_file = service.dir.path().join("inbox/rejected/broken.yaml.error.txt");
    wait_until(Duration::from_secs(10), "the broken file is rejected", || error_file.is_file());
    let error = std::fs::read_to_string(&error_file).expect("error text");
    assert!(error.contains(":3:") && error.contains("prompt"), "{error}");
    let accepted = service.dir.path().join("inbox/accepted/catalogue.yaml");
    wait_until(Duration::from_secs(10), "catalogue.yaml is accepted", || accepted.is_file());

    // The balance runs out: STATUS says paused; the four jobs in flight finish and download.
    systemd.wait_for("STATUS says paused", |m| m.contains("paused") && m.contains("402"));
    wait_until(Duration::from_secs(30), "four results", || {
        service.results("catalogue") + service.results("sweep") == 4
    });
    assert_eq!(sim.stats().jobs_created, 4);
    assert_eq!(
        sim.stats().posts_after_402,
        0,
        "one probe per interval, and the interval is an hour"
    );
    // `status --config` says so, why, since when, with Krea's words, and per job file.
    let shown = service.status_once_paused();
    assert!(shown.contains("the Krea API balance is exhausted (402)"), "{shown}");
    assert!(shown.contains("top up your API balance"), "Krea's message: {shown}");
    assert!(shown.contains("krea-batch resume --config"), "what ends it: {shown}");
    assert!(shown.contains("by job file:"), "{shown}");
    // Each file by its name in the inbox without its extension, as its results folder is named.
    for file in ["catalogue:", "sweep:"] {
        assert!(shown.lines().any(|line| line.trim_start().starts_with(file)), "{file}: {shown}");
    }

    // Top up, SIGHUP: reload (RELOADING=1 with MONOTONIC_USEC, then READY=1) and the rest.
    sim.server().set_balance(1.0);
    let ready_before = systemd.count(|m| m.contains("READY=1"));
    daemon.signal("HUP");
    systemd.wait_for("RELOADING=1", |m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="));
    wait_until(Duration::from_secs(10), "READY=1 again", || {
        systemd.count(|m| m.contains("READY=1")) > ready_before
    });
    wait_until(Duration::from_secs(30), "six results", || {
        service.results("catalogue") + service.results("sweep") == 6
    });

    // Importing the same content again adds nothing.
    service.drop_file("catalogue-again.yaml", &job_file("a catalogue item", 3));
    let accepted = service.dir.path().join("inbox/accepted/catalogue-again.yaml");
    wait_until(Duration::from_secs(10), "the copy is accepted", || accepted.is_file());
    assert_eq!(sim.stats().jobs_created, 6);

    // SIGTERM while jobs run: exit 0; nothing is lost. That the exit comes within the drain
    // time is shown on virtual time by the engine's tests
    // (`sigterm_drains_the_service_leaving_jobs_running_at_krea`,
    // `sigterm_stops_a_download_under_way_after_its_grace`); here the wait only has a deadline.
    service.drop_file("late.yaml", &job_file("a late job", 4));
    wait_until(Duration::from_secs(10), "late jobs are submitted", || {
        sim.stats().jobs_created >= 8
    });
    daemon.signal("TERM");
    let run = daemon.finish(Duration::from_secs(30));
    run.expect_code(0);
    systemd.wait_for("STOPPING=1", |m| m.contains("STOPPING=1"));
    // The stop line counts the jobs left running at Krea (at most the four late ones), not
    // every job the state holds (13).
    let stop_line = run.stderr.lines().find(|line| line.contains("jobs in flight are resumed"));
    let stop_line = stop_line.expect("the stop line");
    let in_flight: usize = stop_line
        .split("in_flight=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("a count of jobs in flight: {stop_line}"));
    assert!(in_flight <= 4, "{stop_line}");

    // The next start polls what was in flight and submits the rest; nothing twice.
    let daemon = service.start(&sim, &systemd);
    wait_until(Duration::from_secs(30), "the late results", || service.results("late") == 4);
    daemon.signal("TERM");
    daemon.finish(Duration::from_secs(10)).expect_code(0);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 10);
    assert!(
        stats.creations_by_prompt.values().all(|count| *count == 1),
        "{:?}",
        stats.creations_by_prompt
    );
    assert_eq!(stats.auth_header_on_file_host, 0);
}

#[test]
fn cancel_and_resume_reach_the_running_daemon_and_metrics_show_it() {
    let sim = Sim::start(|config| config.cancel_any_pending = false);
    // Port 0: the daemon binds a free port and logs it. A port picked here and freed for the
    // daemon could be taken by another program in between.
    let service = Service::new(&sim, "metrics:\n  listen: 127.0.0.1:0\n");
    let systemd = Systemd::listen(service.dir.path());
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.contains("READY=1"));
    let listen = daemon.log_field("metrics at /metrics", "listen", Duration::from_secs(30));
    let port: u16 = listen
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("the metrics address {listen:?} has a port"));
    assert_ne!(port, 0, "the bound port is logged, not the configured one");
    // Stuck jobs stay processing at Krea until cancelled; four in flight, two waiting.
    let jobs = numbered_jobs("[stuck] job", 6);
    service.drop_file("stuck.yaml", &format!("model: image/bfl/flux-1-dev\njobs:\n{jobs}"));
    wait_until(Duration::from_secs(10), "four stuck jobs run", || sim.stats().jobs_created == 4);
    wait_until(Duration::from_secs(10), "they are processing", || {
        sim.stats().jobs.iter().filter(|job| job.status == "processing").count() == 4
    });

    let cancel = crate::support::Run::of(
        &krea_batch()
            .args(["cancel", "--all", "--config"])
            .arg(service.config())
            .output()
            .expect("cancel runs"),
    );
    cancel.expect_code(0);
    assert!(
        cancel.stdout.contains("asked the running krea-batch to cancel 6 jobs"),
        "{}",
        cancel.stdout
    );
    wait_until(Duration::from_secs(20), "Krea cancelled the four", || {
        sim.stats().jobs.iter().filter(|job| job.status == "cancelled").count() == 4
    });
    let status = || {
        let run = crate::support::Run::of(
            &krea_batch()
                .args(["status", "--json", "--config"])
                .arg(service.config())
                .output()
                .expect("status"),
        );
        serde_json::from_str::<serde_json::Value>(&run.stdout).expect("JSON status")
    };
    wait_until(Duration::from_secs(10), "all six cancelled", || {
        status()["counts"]["cancelled"] == 6
    });
    let created = sim.stats();
    assert_eq!(created.jobs_created, 4, "the two waiting jobs were never sent");
    assert!(created.jobs.iter().all(|job| !job.charged), "cancelled jobs are not billed");

    let metrics = crate::support::http_get(port, "/metrics");
    assert!(metrics.contains("krea_batch_jobs{state=\"cancelled\"} 6"), "{metrics}");
    assert!(metrics.contains("krea_batch_submissions_total 4"), "{metrics}");

    let resume = crate::support::Run::of(
        &krea_batch()
            .args(["resume", "--config"])
            .arg(service.config())
            .output()
            .expect("resume runs"),
    );
    resume.expect_code(0);
    assert!(resume.stdout.contains("probe now"), "{}", resume.stdout);
    daemon.signal("TERM");
    daemon.finish(Duration::from_secs(10)).expect_code(0);
}

#[test]
fn a_daily_budget_pauses_submitting_and_a_reload_with_a_higher_cap_resumes() {
    let sim = Sim::start(|_| {});
    // Three flux jobs ($0.007 each) fit in $0.021.
    let service = Service::new(&sim, "budget:\n  per_day_usd: 0.021\n");
    let systemd = Systemd::listen(service.dir.path());
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.contains("READY=1"));
    service.drop_file("five.yaml", &job_file("a budgeted job", 5));
    systemd.wait_for("STATUS says the budget is reached", |m| m.contains("budget is reached"));
    let shown = service.status_once_paused();
    assert!(shown.contains("the daily budget is reached; resumes at midnight UTC"), "{shown}");
    assert!(shown.contains("T00:00:00Z"), "the midnight it resumes at: {shown}");
    wait_until(Duration::from_secs(20), "three results", || service.results("five") == 3);
    assert_eq!(sim.stats().jobs_created, 3, "nothing submitted past the budget");

    // The budget is the service's: a file with its own, or with jobs it cannot price, is
    // rejected with the reason.
    let own = format!("budget: {{max_usd: 100}}\n{}", job_file("its own budget", 1));
    service.drop_file("own.yaml", &own);
    let unpriced = "model: image/new/model\njobs: [{prompt: a thing with no price}]\n";
    service.drop_file("unpriced.yaml", unpriced);
    for (name, needle) in [
        ("own", "the service's budget is set in its configuration file"),
        ("unpriced", "knows no price for image/new/model (1 job)"),
    ] {
        let error_file = service.dir.path().join(format!("inbox/rejected/{name}.yaml.error.txt"));
        wait_until(Duration::from_secs(10), "the file is rejected", || error_file.is_file());
        let error = std::fs::read_to_string(&error_file).expect("error text");
        assert!(error.contains(needle), "{error}");
    }

    // A job file reading its prompts from a CSV beside it in the inbox: accepted (waiting for
    // the budget like the rest); the CSV stays where it is.
    let csv = service.dir.path().join("inbox/rows.csv");
    std::fs::write(
        &csv,
        "prompt,seed
a row from a file,1
another row,2
",
    )
    .expect("csv");
    service.drop_file(
        "rows.yaml",
        "model: image/bfl/flux-1-dev
jobs:
  - from: rows.csv
",
    );
    let accepted = service.dir.path().join("inbox/accepted/rows.yaml");
    wait_until(Duration::from_secs(10), "the file is accepted", || accepted.is_file());

    // A typo on reload gets the job file's did-you-mean, and the current config is kept.
    let config = std::fs::read_to_string(service.config()).expect("config");
    std::fs::write(service.config(), config.replace("per_day_usd: 0.021", "per_dya_usd: 1"))
        .expect("config with a typo");
    daemon.signal("HUP");
    daemon.wait_for_log("did you mean `per_day_usd`?", Duration::from_secs(10));
    daemon.wait_for_log("keeping the current one", Duration::from_secs(1));
    std::fs::write(service.config(), config.replace("per_day_usd: 0.021", "per_day_usd: 1"))
        .expect("config raised");
    daemon.signal("HUP");
    wait_until(Duration::from_secs(20), "all five results", || service.results("five") == 5);
    wait_until(Duration::from_secs(20), "both rows' results", || service.results("rows") == 2);
    assert!(csv.is_file(), "the data file stays in the inbox");
    daemon.signal("TERM");
    let run = daemon.finish(Duration::from_secs(10));
    run.expect_code(0);
    assert!(!run.stderr.contains("rows.csv"), "no warning about the data file: {}", run.stderr);
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 7);
    assert!(stats.creations_by_prompt.values().all(|count| *count == 1));
}

/// A job file of `jobs` numbered jobs, as text cut in two at the job boundary after `first`.
fn halves(stem: &str, jobs: usize, first: usize) -> (String, String) {
    let text = job_file(stem, jobs);
    let cut = text
        .match_indices("  - ")
        .nth(first)
        .map_or_else(|| panic!("job {first} in {text}"), |(at, _)| at);
    (text[..cut].to_owned(), text[cut..].to_owned())
}

#[test]
fn a_half_written_file_is_taken_only_once_its_writer_has_closed_it() {
    use std::io::Write as _;
    let sim = Sim::start(|_| {});
    // The settle time is the scan interval: 100 ms.
    let service = Service::new(&sim, "");
    let systemd = Systemd::listen(service.dir.path());
    let inbox = service.dir.path().join("inbox");
    // Present at start-up with its writer still at work: the kernel has told the service
    // nothing about it, so the settle time alone decides (documented), and it is taken half
    // written; its writer's next write is reported.
    let early = inbox.join("early.yaml");
    std::fs::create_dir_all(&inbox).expect("inbox");
    let (head, tail) = halves("an early job", 4, 2);
    let mut early_writer = std::fs::File::create(&early).expect("create");
    early_writer.write_all(head.as_bytes()).expect("first half");
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.contains("READY=1"));
    let accepted = inbox.join("accepted");
    wait_until(Duration::from_secs(10), "early.yaml is taken", || {
        accepted.join("early.yaml").is_file()
    });
    early_writer.write_all(tail.as_bytes()).expect("second half");
    drop(early_writer);
    daemon.wait_for_log("an accepted job file changed after it was taken", Duration::from_secs(10));
    daemon.wait_for_log("accepted/early.yaml", Duration::from_secs(1));

    // Copied in with a pause in the middle, cut at a job boundary: half of 20 jobs written,
    // the writer's handle still open.
    let (head, tail) = halves("a copied job", 20, 10);
    let mut writer = std::fs::File::create(inbox.join("twenty.yaml")).expect("create");
    writer.write_all(head.as_bytes()).expect("first half");
    // A file copied in after it, complete (written and closed): once the service has taken it,
    // it has also looked at the half-written file, untouched for longer than the settle time.
    std::fs::write(inbox.join("marker.yaml"), job_file("a marker job", 1)).expect("marker");
    wait_until(Duration::from_secs(10), "marker.yaml is taken", || {
        accepted.join("marker.yaml").is_file()
    });
    assert!(inbox.join("twenty.yaml").is_file(), "the half-written file is not taken");
    assert!(!accepted.join("twenty.yaml").exists());
    assert!(!inbox.join("processing/twenty.yaml").exists());
    let stats = sim.stats();
    assert!(
        !stats.creations_by_prompt.keys().any(|prompt| prompt.starts_with("a copied job")),
        "{:?}",
        stats.creations_by_prompt
    );

    writer.write_all(tail.as_bytes()).expect("second half");
    drop(writer);
    wait_until(Duration::from_secs(30), "all 20 results", || service.results("twenty") == 20);
    daemon.signal("TERM");
    let run = daemon.finish(Duration::from_secs(10));
    run.expect_code(0);
    assert!(!run.stderr.contains("twenty.yaml changed"), "{}", run.stderr);
    let stats = sim.stats();
    let copied = stats.creations_by_prompt.iter().filter(|(p, _)| p.starts_with("a copied job"));
    assert_eq!(copied.clone().count(), 20, "{:?}", stats.creations_by_prompt);
    assert!(copied.map(|(_, count)| *count).all(|count| count == 1));
}

#[test]
fn files_the_service_cannot_hold_or_may_not_read_are_rejected_and_it_goes_on() {
    let sim = Sim::start(|_| {});
    let service = Service::new(&sim, "");
    let systemd = Systemd::listen(service.dir.path());
    let inbox = service.dir.path().join("inbox");
    // Left in processing/ by a service that stopped while reading it (killed for its memory):
    // rejected at the next start, never read again.
    std::fs::create_dir_all(inbox.join("processing")).expect("processing/");
    std::fs::write(inbox.join("processing/crashed.yaml"), job_file("a crashing job", 2))
        .expect("left file");
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.contains("READY=1"));
    let note = |name: &str| {
        let path = inbox.join("rejected").join(format!("{name}.error.txt"));
        wait_until(Duration::from_secs(20), &format!("{name} is rejected"), || path.is_file());
        std::fs::read_to_string(&path).expect("note")
    };
    let crashed = note("crashed.yaml");
    assert!(crashed.contains("the service stopped while reading this file"), "{crashed}");
    assert!(inbox.join("rejected/crashed.yaml").is_file());

    // Over the cap of jobs per file: one more row than a file may make.
    let rows: String = std::iter::once("prompt".to_owned())
        .chain((0..=krea_batch::MAX_JOBS).map(|row| format!("row {row}")))
        .map(|line| line + "\n")
        .collect();
    std::fs::write(inbox.join("huge.csv"), rows).expect("huge.csv");
    service.drop_file("huge.yaml", "model: image/bfl/flux-1-dev\njobs:\n  - from: huge.csv\n");
    // A data file behind a symbolic link to a folder outside the inbox.
    let private = tempfile::tempdir().expect("private folder");
    std::fs::write(private.path().join("customers.csv"), "prompt\nJane Doe, card 4111\n")
        .expect("private rows");
    std::os::unix::fs::symlink(private.path(), inbox.join("data")).expect("symlink");
    service.drop_file(
        "private.yaml",
        "model: image/bfl/flux-1-dev\njobs:\n  - from: data/customers.csv\n",
    );
    // A file with a run's own settings: taken, with a warning naming what is ignored.
    let own_settings = format!(
        "output: ./elsewhere\nlimits: {{burst: 1}}\napi: {{}}\n{}",
        job_file("the next job", 2)
    );
    service.drop_file("next.yaml", &own_settings);

    let huge = note("huge.yaml");
    let lies = inbox.join("rejected/huge.yaml");
    assert!(huge.contains(&format!("now lies at {}.", lies.display())), "{huge}");
    let limit = krea_batch::MAX_JOBS;
    assert!(huge.contains(&format!("huge.csv:{}: more than {limit} rows", limit + 2)), "{huge}");
    let private_note = note("private.yaml");
    assert!(
        private_note.contains(
            "private.yaml:3:11: jobs[0].from: data/customers.csv: `data` is a symbolic link"
        ),
        "{private_note}"
    );
    assert!(!private_note.contains("Jane"), "{private_note}");
    wait_until(Duration::from_secs(30), "the next file's results", || service.results("next") == 2);
    assert!(inbox.join("huge.csv").is_file(), "data files stay");
    let entries = std::fs::read_dir(inbox.join("processing")).expect("processing/").count();
    assert_eq!(entries, 0, "nothing left in processing/");
    daemon.signal("TERM");
    let run = daemon.finish(Duration::from_secs(10));
    run.expect_code(0);
    let warning =
        run.stderr.lines().find(|line| line.contains("file=next.yaml") && line.contains("ignored"));
    let warning = warning.unwrap_or_else(|| panic!("a warning about next.yaml: {}", run.stderr));
    assert!(warning.contains("`output:`, `limits:`, `api:` are ignored"), "{warning}");
    assert!(!service.dir.path().join("elsewhere").exists(), "results go to the service's folder");
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 2, "{:?}", stats.creations_by_prompt);
}

#[test]
fn the_same_jobs_in_a_new_file_are_not_paid_again() {
    let sim = Sim::start(|_| {});
    let service = Service::new(&sim, "");
    let systemd = Systemd::listen(service.dir.path());
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.lines().any(|l| l == "READY=1"));

    service.drop_file("v1.yaml", &job_file("a product shot", 10));
    wait_until(Duration::from_secs(30), "ten results", || service.results("v1") == 10);
    // The same ten and one more, in a new file: only the new one is paid for.
    let mut v2 = job_file("a product shot", 10);
    v2.push_str(&numbered_jobs("a new product", 1));
    service.drop_file("v2.yaml", &v2);
    wait_until(Duration::from_secs(30), "eleven results", || service.results("v2") == 11);
    assert_eq!(sim.stats().jobs_created, 11, "the ten known jobs were not bought again");
    // Asked for deliberately, new generations are paid for.
    let fresh = format!("reuse: false\n{}", job_file("a product shot", 2));
    service.drop_file("fresh.yaml", &fresh);
    wait_until(Duration::from_secs(30), "two fresh results", || service.results("fresh") == 2);
    assert_eq!(sim.stats().jobs_created, 13);

    daemon.signal("TERM");
    let run = daemon.finish(Duration::from_secs(10));
    run.expect_code(0);
    assert!(run.stderr.contains("not paid again"), "the log says so: {}", run.stderr);
    let results = service.dir.path().join("results");
    let manifest = std::fs::read_to_string(results.join("v2/manifest.jsonl")).expect("manifest");
    let reused = manifest.lines().filter(|line| line.contains("\"reused_from\"")).count();
    assert_eq!(reused, 10, "{manifest}");
    // The reused results are the very files paid for in v1, with sidecars of their own.
    let first = std::fs::read(results.join("v1/001-a-product-shot-0.png")).expect("v1 file");
    let again = std::fs::read(results.join("v2/001-a-product-shot-0.png")).expect("v2 file");
    assert_eq!(first, again);
    assert!(results.join("v2/001-a-product-shot-0.png.json").is_file());
}

/// The service uploads an inbox file's local inputs (beside it in the inbox) once per content,
/// also for a second file naming the same bytes, and refuses a file whose input leaves the
/// inbox.
#[test]
fn the_service_uploads_local_inputs_once_and_refuses_escapes() {
    let sim = Sim::start(|_| {});
    let service = Service::new(&sim, "");
    let systemd = Systemd::listen(service.dir.path());
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.lines().any(|l| l == "READY=1"));
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10a cat";
    std::fs::write(service.dir.path().join("inbox/cat.png"), png).expect("cat.png");
    let with_cat = |stem: &str| {
        format!(
            "model: image/bfl/flux-1-dev\njobs:\n  - prompt: {stem}\n    params: {{image_url: cat.png}}\n"
        )
    };
    service.drop_file("first.yaml", &with_cat("a cat"));
    wait_until(Duration::from_secs(30), "the first result", || service.results("first") == 1);
    service.drop_file("second.yaml", &with_cat("another cat"));
    wait_until(Duration::from_secs(30), "the second result", || service.results("second") == 1);
    let uploads = |stats: &krea_batch::sim::SimStats| {
        stats.requests.iter().filter(|r| r.method == "POST" && r.path == "/assets").count()
    };
    assert_eq!(uploads(&sim.stats()), 1, "one upload for one content");
    service.drop_file(
        "escape.yaml",
        "model: image/bfl/flux-1-dev\njobs:\n  - prompt: x\n    params: {image_url: ../cat.png}\n",
    );
    let error_file = service.dir.path().join("inbox/rejected/escape.yaml.error.txt");
    wait_until(Duration::from_secs(10), "the escape is rejected", || error_file.is_file());
    let error = std::fs::read_to_string(&error_file).expect("error text");
    assert!(error.contains("not inside") && error.contains(":4:"), "{error}");
    daemon.signal("TERM");
    daemon.finish(Duration::from_secs(10)).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 2);
}

/// The service takes Krea's pipeline files (`.json`) from its inbox, runs their chains, and
/// rejects an unclear one with the step named.
#[test]
fn the_service_runs_a_krea_pipeline_file_and_rejects_an_unclear_one() {
    let sim = Sim::start(|config| config.video_job_time = Duration::from_millis(200));
    let service = Service::new(&sim, "");
    let systemd = Systemd::listen(service.dir.path());
    let daemon = service.start(&sim, &systemd);
    systemd.wait_for("READY=1", |m| m.lines().any(|l| l == "READY=1"));
    service.drop_file(
        "car.json",
        r#"{"steps": [
  {"action": "generate_image", "model": "bfl/flux-1-dev", "prompt": "a red car", "filename": "car"},
  {"action": "generate_video", "use_previous": true, "model": "video/kling/kling-2.5",
   "prompt": "the car drives off", "aspectRatio": "16:9"}
]}"#,
    );
    let video = service.dir.path().join("results/car/car/1-kling-2.5.mp4");
    wait_until(Duration::from_secs(30), "the chain's video", || video.is_file());
    service.drop_file("unclear.json", r#"{"steps": [{"action": "animate", "prompt": "x"}]}"#);
    let error_file = service.dir.path().join("inbox/rejected/unclear.json.error.txt");
    wait_until(Duration::from_secs(10), "the unclear file is rejected", || error_file.is_file());
    let error = std::fs::read_to_string(&error_file).expect("error text");
    assert!(error.contains("step 1") && error.contains("unknown action"), "{error}");
    daemon.signal("TERM");
    daemon.finish(Duration::from_secs(10)).expect_code(0);
    assert_eq!(sim.stats().jobs_created, 2);
    assert_eq!(sim.stats().creations_by_prompt.get("the car drives off"), Some(&1));
}

/// The unit file waits for reloads (`Type=notify-reload`: the daemon sends `RELOADING=1` with
/// `MONOTONIC_USEC`), points at the documentation, and does not restart a daemon that exited 2
/// for a bad config, which a restart cannot fix; the daemon does exit 2 for one.
#[test]
fn the_unit_file_waits_for_reloads_and_does_not_restart_a_bad_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/krea-batch.service");
    let unit = std::fs::read_to_string(&path).expect("the unit file");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for line in [
        "Type=notify-reload",
        "Documentation=file:/usr/share/doc/krea-batch/README.md",
        "RestartPreventExitStatus=2",
    ] {
        assert!(lines.contains(&line), "{} lacks {line}", path.display());
    }
    // notify-reload sends SIGHUP itself; an ExecReload= would be run instead of it.
    assert!(!lines.iter().any(|l| l.starts_with("ExecReload=")), "{unit}");

    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("daemon.yaml");
    std::fs::write(&config, "inbx: /tmp/nowhere\n").expect("config written");
    let run =
        Run::of(&krea_batch().arg("daemon").arg("--config").arg(&config).output().expect("runs"));
    run.expect_code(2);
}
