//! What krea-batch tells its user: the live counts (a progress bar on a terminal, log lines
//! otherwise), the manifest of every job in the output directory, and the summary at the end.
//!
//! It reads job records and counts; it sends nothing and decides nothing.

use crate::job::JobState;
use crate::pricing::Estimate;
use crate::runner::status::{Counts, EngineStatus, RefusedCancel, StopReason};
use crate::store::JobRecord;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// The manifest's file name, in each output directory.
pub(crate) const MANIFEST: &str = "manifest.jsonl";

/// A job's line in `manifest.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ManifestLine<'a> {
    /// The job's name.
    pub name: &'a str,
    /// `completed`, `failed`, `cancelled`, `not_submitted`, `download_pending`, `unknown` or
    /// `in_flight`.
    pub status: &'static str,
    /// Krea's job id, if it has one.
    pub job_id: Option<&'a str>,
    /// The model.
    pub model: &'a str,
    /// The files, relative to the output directory.
    pub files: Vec<&'a str>,
    /// Why it failed or is not complete.
    pub error: Option<&'a str>,
    /// Its estimated price, if billed (completed).
    pub price_usd: Option<f64>,
    /// The Krea job whose result it took instead of being paid again, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<&'a str>,
    /// Its stage in a chain (`then:`; 0 is the job's own generation), if it is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<u32>,
    /// The job whose result it took as input (its name), for a later stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The local files it took as inputs, as the job file names them (`photos/cat.png`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<&'a str>,
}

impl<'a> ManifestLine<'a> {
    /// The line for `job`.
    #[must_use]
    pub(crate) fn of(job: &'a JobRecord) -> Self {
        let billed = matches!(job.state, JobState::Completed | JobState::Downloaded);
        let (stage, parent) = crate::chain::place(job.chain.as_deref()).unzip();
        Self {
            stage,
            parent: parent.flatten(),
            name: &job.name,
            status: manifest_status(job.state),
            job_id: job.remote_id.as_deref(),
            model: &job.model,
            files: job.files.iter().map(|file| file.path.as_str()).collect(),
            error: job.error.as_deref(),
            price_usd: job.price_usd.filter(|_| billed),
            reused_from: job.reused_from.as_deref(),
            inputs: job.inputs.iter().map(|input| input.path.as_str()).collect(),
        }
    }
}

/// `job`'s request body for people: each local input's placeholder
/// (`krea-batch-file:sha256:…`) replaced by the file's name, where the state knows it.
#[must_use]
pub(crate) fn shown_body(job: &JobRecord) -> std::borrow::Cow<'_, str> {
    let mut body = std::borrow::Cow::Borrowed(&*job.body);
    for input in &job.inputs {
        let quoted = serde_json::Value::String(input.path.clone()).to_string();
        let placeholder = format!("\"{}\"", crate::jobfile::placeholder(&input.sha256));
        if body.contains(&placeholder) {
            body = std::borrow::Cow::Owned(body.replace(&placeholder, &quoted));
        }
    }
    body
}

/// The manifest's name for a local state.
#[must_use]
pub(crate) fn manifest_status(state: JobState) -> &'static str {
    match state {
        JobState::Downloaded => "completed",
        JobState::Completed => "download_pending",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Pending => "not_submitted",
        JobState::Submitting | JobState::Unknown => "unknown",
        JobState::Submitted => "in_flight",
    }
}

/// Appends the lines of jobs that just ended to `<dir>/manifest.jsonl`, in one write.
pub(crate) fn append_manifest<'a>(
    dir: &Path,
    jobs: impl IntoIterator<Item = &'a JobRecord>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut lines = Vec::new();
    for job in jobs {
        lines.extend(serde_json::to_vec(&ManifestLine::of(job)).unwrap_or_default());
        lines.push(b'\n');
    }
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join(MANIFEST))?;
    file.write_all(&lines)
}

/// Rewrites `<dir>/manifest.jsonl` from `jobs` (one line each), atomically. With
/// `ended_only`, jobs that have not ended are left out (the start of a run); otherwise every
/// job is listed (the end of a run).
pub(crate) fn rewrite_manifest<'a>(
    dir: &Path,
    jobs: impl IntoIterator<Item = &'a JobRecord>,
    ended_only: bool,
) -> Result<(), crate::files::FileError> {
    let mut text = Vec::new();
    for job in jobs {
        if ended_only && !job.state.is_final() {
            continue;
        }
        text.extend(serde_json::to_vec(&ManifestLine::of(job)).unwrap_or_default());
        text.push(b'\n');
    }
    // Derived from the state, rewritten at every start: no need to sync it.
    crate::files::write_atomically(&dir.join(MANIFEST), &text, false)
}

/// The end of a run, for people (`Display`) and programs (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Jobs by where they stand.
    pub counts: Counts,
    /// Files on disk for completed jobs.
    pub files: usize,
    /// Their total size.
    pub bytes: u64,
    /// The estimated price of the completed (billed) jobs, USD.
    pub spend_usd: f64,
    /// Completed jobs whose model has no known price.
    pub unpriced: usize,
    /// Jobs the state file holds that the job file no longer lists (not cancelled).
    pub removed_from_file: usize,
    /// Jobs that took a result this state already paid for instead of being paid again.
    pub reused: usize,
    /// Why submitting stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// The first failures: (job name, reason).
    pub failures: Vec<(String, String)>,
    /// Jobs that were to be cancelled and that Krea ran and billed all the same (from the
    /// engine: the state file does not keep refused cancels).
    pub cancels_refused: Vec<RefusedCancel>,
    /// The output directory.
    pub output_dir: String,
    /// How long the run took.
    pub elapsed_seconds: f64,
}

/// How many failures a summary lists by name.
const LISTED_FAILURES: usize = 10;

impl Summary {
    /// Summarises `jobs` after a run.
    #[must_use]
    pub fn of(
        jobs: &[JobRecord],
        stopped: Option<StopReason>,
        output_dir: &Path,
        elapsed: Duration,
    ) -> Self {
        let mut spend = Estimate::default();
        let (mut files, mut bytes) = (0, 0);
        for job in
            jobs.iter().filter(|j| matches!(j.state, JobState::Completed | JobState::Downloaded))
        {
            spend.add(job.price_usd);
            files += job.files.len();
            bytes += job.files.iter().map(|file| file.bytes).sum::<u64>();
        }
        let failures = jobs
            .iter()
            .filter(|job| {
                matches!(job.state, JobState::Failed | JobState::Unknown | JobState::Completed)
            })
            .take(LISTED_FAILURES)
            .map(|job| {
                (job.name.clone(), job.error.clone().unwrap_or_else(|| job.state.to_string()))
            })
            .collect();
        Self {
            // A job gone from the file is still counted when it was sent: it is paid for.
            counts: Counts::of(
                jobs.iter().filter(|job| job.in_file || job.state != JobState::Pending),
            ),
            files,
            bytes,
            spend_usd: crate::pricing::round_usd(spend.usd),
            unpriced: spend.unpriced,
            removed_from_file: jobs.iter().filter(|job| !job.in_file).count(),
            reused: jobs.iter().filter(|job| job.reused_from.is_some()).count(),
            stopped,
            failures,
            cancels_refused: Vec::new(),
            output_dir: output_dir.display().to_string(),
            elapsed_seconds: elapsed.as_secs_f64(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.counts;
        writeln!(f, "{}: {c}", count(c.total, "job"))?;
        writeln!(
            f,
            "{} files ({}) in {}; estimated spend ${:.4}{}; {:.1} s",
            self.files,
            human_bytes(self.bytes),
            self.output_dir,
            self.spend_usd,
            if self.unpriced > 0 {
                format!(" (+ {} unpriced)", self.unpriced)
            } else {
                String::new()
            },
            self.elapsed_seconds
        )?;
        // The page to look the batch over in (written at the end of every run and download).
        writeln!(f, "gallery: {}", Path::new(&self.output_dir).join("index.html").display())?;
        for (name, reason) in &self.failures {
            writeln!(f, "  {name}: {reason}")?;
        }
        write_refused_cancels(f, &self.cancels_refused)?;
        if self.reused > 0 {
            writeln!(
                f,
                "{} took results this state already paid for (same model and request), not \
                 paid again; `reuse: false` in the job file or `run --fresh` generates anew",
                count(self.reused, "job")
            )?;
        }
        if self.removed_from_file > 0 {
            writeln!(
                f,
                "{} in the state file no longer in the job file; left alone",
                count(self.removed_from_file, "job")
            )?;
        }
        match self.stopped {
            Some(StopReason::PaymentRequired) => writeln!(
                f,
                "Stopped submitting: the Krea API balance is exhausted (402). {} finished, {} \
                 not submitted. Top up the API balance, then run the same command again: it \
                 continues where it stopped and submits nothing twice.",
                count(c.finished(), "job"),
                c.pending
            )?,
            Some(StopReason::AuthRefused) => writeln!(
                f,
                "Stopped: Krea refused the API key. Check the key, then run the same command \
                 again; jobs already submitted are polled, not sent again."
            )?,
            Some(StopReason::BudgetReached) => writeln!(
                f,
                "Stopped submitting: the next job would exceed the budget. {} finished, {} not \
                 submitted. Raise the budget (budget: in the job file), then run the same \
                 command again: it continues where it stopped.",
                count(c.finished(), "job"),
                c.pending
            )?,
            Some(StopReason::DailyBudgetReached) => writeln!(
                f,
                "Stopped submitting: the next job would exceed today's budget \
                 (budget.per_day_usd). {} finished, {} not submitted. The daily budget resumes \
                 at midnight UTC: run the same command again then, and it continues where it \
                 stopped.",
                count(c.finished(), "job"),
                c.pending
            )?,
            Some(StopReason::Interrupted) => writeln!(
                f,
                "Interrupted. Run the same command again to continue; jobs already submitted \
                 are polled, not sent again."
            )?,
            None => {}
        }
        Ok(())
    }
}

/// `n` and `noun`, plural unless `n` is 1: `1 job`, `3 jobs`, `0 jobs` (nouns that take `s`).
#[must_use]
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// "2 cancels refused by Krea: these jobs ran and were billed", each job with Krea's reason.
fn write_refused_cancels(
    f: &mut std::fmt::Formatter<'_>,
    refused: &[RefusedCancel],
) -> std::fmt::Result {
    match refused.len() {
        0 => return Ok(()),
        1 => writeln!(f, "1 cancel refused by Krea: this job ran and was billed")?,
        n => writeln!(f, "{n} cancels refused by Krea: these jobs ran and were billed")?,
    }
    for cancel in refused {
        let whose = if cancel.after_timeout { " (cancelled after the job timeout)" } else { "" };
        writeln!(f, "  {}: {}{whose}", cancel.job, cancel.reason)?;
    }
    Ok(())
}

/// `1536` → `1.5 KiB`.
#[must_use]
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// The progress bar's template (`eta_known` is [`progress_style`]'s own key).
/// The counts come last as `wide_msg`, cut to what the terminal leaves, so the bar stays on one
/// line at 80 columns.
const PROGRESS_TEMPLATE: &str =
    "{spinner} {elapsed:>3} {bar:20} {pos}/{len} ETA {eta_known} · {wide_msg}";

/// The progress bar's look: elapsed time, bar, jobs finished of all, the counts, and the time
/// left, which says nothing (`--`) until a first job has finished (before that the estimate
/// is 0 s, which reads as "done").
#[must_use]
pub fn progress_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key("eta_known", |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
            let _ = out.write_str(&eta_text(state.pos(), state.eta()));
        })
}

/// The counts on the progress bar, most telling first (the end may be cut on a narrow
/// terminal).
fn progress_message(now: &Counts) -> String {
    format!(
        "{} in flight · {} done · {} failed · {} to send",
        now.in_flight + now.unknown,
        now.completed,
        now.failed,
        now.pending
    )
}

/// The time left once `finished` jobs have, as indicatif would say it; `--` before any.
fn eta_text(finished: u64, eta: Duration) -> String {
    if finished == 0 { "--".to_owned() } else { format!("{:#}", indicatif::HumanDuration(eta)) }
}

/// What the engine learned of the account, after `separator`; nothing before it learned.
fn learned_suffix(learned: &str, separator: &str) -> String {
    if learned.is_empty() { String::new() } else { format!("{separator}{learned}") }
}

/// The progress log line; `unchanged_for` says how long the counts have stood still, once they
/// have for a whole interval (a line that repeats the last one says it is not stuck silently).
fn progress_line(now: &Counts, learned: &str, unchanged_for: Option<Duration>) -> String {
    let mut line = format!(
        "progress: {}/{} finished; {now}{}",
        now.finished(),
        now.total,
        learned_suffix(learned, "; ")
    );
    if let Some(still) = unchanged_for {
        let still = Duration::from_secs(still.as_secs());
        let _ = write!(line, "; no change for {}", humantime::format_duration(still));
    }
    line
}

/// Shows live counts until `counts` closes: on a progress bar when one is given, else as a log
/// line every `every`, whether or not anything changed (once there are jobs).
pub async fn show_progress(
    mut status: tokio::sync::watch::Receiver<EngineStatus>,
    bar: Option<indicatif::ProgressBar>,
    every: Duration,
) {
    let mut last_logged = Counts::default();
    let mut last_change = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(bar) = &bar {
                    let shown = status.borrow_and_update();
                    let now = shown.counts;
                    bar.set_length(now.total as u64);
                    bar.set_position(now.finished() as u64);
                    bar.set_message(format!(
                        "{}{}",
                        progress_message(&now),
                        learned_suffix(&shown.learned, " · ")
                    ));
                }
            }
            at = tick.tick(), if bar.is_none() => {
                let shown = status.borrow();
                let now = shown.counts;
                if now != last_logged {
                    last_change = at;
                }
                if now.total > 0 {
                    let still = at.duration_since(last_change);
                    let unchanged_for = (still >= every).then_some(still);
                    tracing::info!("{}", progress_line(&now, &shown.learned, unchanged_for));
                }
                last_logged = now;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_moves() {
        let mut counts = Counts::default();
        counts.add(JobState::Pending);
        counts.add(JobState::Pending);
        counts.moved(JobState::Pending, JobState::Submitting);
        counts.moved(JobState::Submitting, JobState::Submitted);
        counts.moved(JobState::Submitted, JobState::Completed);
        assert_eq!((counts.pending, counts.download_pending, counts.total), (1, 1, 2));
        counts.moved(JobState::Completed, JobState::Downloaded);
        assert_eq!(counts.finished(), 1);
    }

    #[test]
    fn manifest_statuses() {
        assert_eq!(manifest_status(JobState::Downloaded), "completed");
        assert_eq!(manifest_status(JobState::Pending), "not_submitted");
        assert_eq!(manifest_status(JobState::Completed), "download_pending");
        assert_eq!(manifest_status(JobState::Submitting), "unknown");
    }

    /// Without a bar, a progress line comes every interval even while nothing changes (a
    /// long wait for Krea is not silence), and says how long nothing has.
    #[tokio::test(start_paused = true)]
    async fn the_progress_line_comes_every_interval_even_without_change() {
        let (lines, _guard) = crate::testlog::capture();
        let mut counts = Counts::default();
        counts.add(JobState::Pending);
        counts.add(JobState::Pending);
        counts.moved(JobState::Pending, JobState::Submitted);
        let status = EngineStatus { counts, ..EngineStatus::default() };
        let (sender, receiver) = tokio::sync::watch::channel(status);
        let every = Duration::from_secs(10);
        let shown = tokio::spawn(show_progress(receiver, None, every));
        // Ticks at 0, 10, 20 and 30 s; nothing changes after the first.
        tokio::time::sleep(Duration::from_secs(35)).await;
        drop(sender);
        shown.await.expect("the display ends when the run does");
        let text = lines.text();
        let progress: Vec<&str> = text.lines().filter(|line| line.contains("progress: ")).collect();
        assert_eq!(progress.len(), 4, "{text}");
        assert!(!progress[0].contains("no change"), "{}", progress[0]);
        assert!(progress[1].ends_with("; no change for 10s"), "{}", progress[1]);
        assert!(progress[3].ends_with("; no change for 30s"), "{}", progress[3]);
    }

    #[test]
    fn progress_lines_count_and_say_how_long_nothing_changed() {
        let mut counts = Counts::default();
        counts.add(JobState::Pending);
        let line = progress_line(&counts, "pace 1/s", None);
        assert!(line.starts_with("progress: 0/1 finished; "), "{line}");
        assert!(line.ends_with("; pace 1/s"), "{line}");
        let still = progress_line(&counts, "", Some(Duration::from_millis(20_400)));
        assert!(still.ends_with("; no change for 20s"), "{still}");
    }

    /// A stop at the daily cap says when room comes back, not to raise the budget; a stop at
    /// the total cap says to raise it.
    #[test]
    fn a_daily_budget_stop_says_it_resumes_at_midnight_utc() {
        let summary = |stopped| Summary {
            counts: Counts::default(),
            files: 0,
            bytes: 0,
            spend_usd: 0.0,
            unpriced: 0,
            removed_from_file: 0,
            reused: 0,
            stopped: Some(stopped),
            failures: Vec::new(),
            cancels_refused: Vec::new(),
            output_dir: "out".into(),
            elapsed_seconds: 1.0,
        };
        let daily = summary(StopReason::DailyBudgetReached).to_string();
        assert!(daily.contains("resumes at midnight UTC"), "{daily}");
        assert!(!daily.contains("Raise the budget"), "{daily}");
        let total = summary(StopReason::BudgetReached).to_string();
        assert!(total.contains("Raise the budget"), "{total}");
    }

    #[test]
    fn no_time_left_is_claimed_before_a_job_has_finished() {
        assert_eq!(eta_text(0, Duration::ZERO), "--");
        assert_eq!(eta_text(3, Duration::from_secs(90)), "2m");
        // A template error would fall back to a bare bar without the counts.
        assert!(indicatif::ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
    }

    /// A terminal of 80 columns that keeps what is drawn on it.
    #[derive(Clone, Debug, Default)]
    struct Narrow(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl indicatif::TermLike for Narrow {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, line: &str) -> std::io::Result<()> {
            self.write_str(line)
        }
        fn write_str(&self, text: &str) -> std::io::Result<()> {
            self.0.lock().expect("not poisoned").push(text.to_owned());
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_progress_bar_stays_on_one_line_at_80_columns() {
        let term = Narrow::default();
        let target = indicatif::ProgressDrawTarget::term_like(Box::new(term.clone()));
        let bar = indicatif::ProgressBar::with_draw_target(Some(100_000), target);
        bar.set_style(progress_style());
        let counts = Counts {
            total: 100_000,
            pending: 88_000,
            in_flight: 8,
            completed: 11_990,
            failed: 2,
            ..Counts::default()
        };
        bar.set_position(11_992);
        bar.set_message(progress_message(&counts));
        // Drawing is rate-limited; abandoning the bar draws it as it stands, at once.
        bar.abandon();
        let drawn = term.0.lock().expect("not poisoned").clone();
        let lines: Vec<&str> =
            drawn.iter().filter(|text| text.contains("ETA")).map(String::as_str).collect();
        assert!(!lines.is_empty(), "the bar was drawn: {drawn:?}");
        for line in &lines {
            assert!(line.chars().count() <= 80, "{} columns: {line:?}", line.chars().count());
        }
        let last = lines.last().copied().unwrap_or_default();
        assert!(last.contains("11992/100000") && last.contains("8 in flight"), "{last:?}");
    }

    #[test]
    fn counted_nouns() {
        assert_eq!(count(1, "job"), "1 job");
        assert_eq!(count(0, "job"), "0 jobs");
        assert_eq!(count(2, "file"), "2 files");
    }

    #[test]
    fn refused_cancels_are_summarised_with_krea_reasons() {
        let summary = |refused: Vec<RefusedCancel>| {
            let mut summary = Summary::of(&[], None, Path::new("out"), Duration::ZERO);
            summary.cancels_refused = refused;
            summary.to_string()
        };
        assert!(!summary(Vec::new()).contains("cancel"), "nothing to say without refusals");
        let refused = |job: &str, reason: &str, after_timeout| RefusedCancel {
            job: job.into(),
            reason: reason.into(),
            after_timeout,
        };
        let text = summary(vec![
            refused("fox-1", "Job cannot be cancelled in state sampling", false),
            refused("fox-2", "Job cannot be cancelled in state backlogged", true),
        ]);
        assert!(
            text.contains("2 cancels refused by Krea: these jobs ran and were billed\n"),
            "{text}"
        );
        assert!(text.contains("  fox-1: Job cannot be cancelled in state sampling\n"), "{text}");
        assert!(
            text.contains("  fox-2: Job cannot be cancelled in state backlogged (cancelled after the job timeout)"),
            "{text}"
        );
        let one = summary(vec![refused("fox-1", "no", false)]);
        assert!(one.contains("1 cancel refused by Krea: this job ran and was billed"), "{one}");
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
