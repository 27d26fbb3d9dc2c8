//! Hostile and broken job files, end to end: each is refused before anything is sent (exit 2),
//! with one line naming the file and the place, in a bounded address space and before a
//! deadline.
//! Requests that the API refuses are reported per job and do not stop the others.

use crate::support::{
    FAST_LIMITS, LiveChild, Run, Sim, ViaShell, Workspace, krea_batch, numbered_jobs,
};
use std::fmt::Write as _;
use std::time::Duration;

/// The address space (KiB) a run is given: a hostile file must not make it need more.
const ADDRESS_SPACE_KIB: u64 = 1 << 20;

/// How long a refusal may take before the test gives up on it. A refusal takes well under a
/// second; the deadline is far above that, so only a file that is not stopped early (quadratic
/// parsing, an alias bomb expanded) reaches it. The parts that keep hostile files cheap are
/// tested in-process in `src/jobfile/` (the flow-nesting pre-scan, the alias budget).
const DEADLINE: Duration = Duration::from_mins(2);

/// `krea-batch run jobs.yaml` against `sim` under `ulimit -v`, killed past [`DEADLINE`].
fn run_bounded(work: &Workspace, sim: &Sim) -> Run {
    let mut command = krea_batch();
    command.env("KREA_API_BASE", sim.url()).env("KREA_API_KEY", sim.key());
    let script = format!("ulimit -v {ADDRESS_SPACE_KIB}; exec \"$0\" run \"$1\"");
    let path = work.job_file();
    let shell = command.via_shell(&script, &[path.to_str().expect("UTF-8 temp path")]);
    LiveChild::spawn(shell).finish_within(DEADLINE, "the hostile file was not refused")
}

/// Where an error must point: the whole file, a line, or a line and column.
#[derive(Clone, Copy, Debug)]
enum Place {
    File,
    Line(usize),
    LineColumn(usize, usize),
}

/// Runs the file `text` and asserts the refusal: exit 2 (before [`DEADLINE`]), one line
/// `krea-batch: <file>:<place>: …` containing `needle`.
#[track_caller]
fn assert_refused(sim: &Sim, text: impl AsRef<[u8]>, place: Place, needle: &str) -> String {
    let work = Workspace::with_file("");
    std::fs::write(work.job_file(), text).expect("job file written");
    let run = run_bounded(&work, sim);
    run.expect_code(2);
    let message = run.stderr.trim_end();
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    let prefix = format!("krea-batch: {}", work.job_file().display());
    let rest = message.strip_prefix(&prefix).unwrap_or_else(|| panic!("{prefix} in {message}"));
    let expected = match place {
        Place::File => ": ".to_owned(),
        Place::Line(line) => format!(":{line}:"),
        Place::LineColumn(line, column) => format!(":{line}:{column}: "),
    };
    assert!(rest.starts_with(&expected), "place {place:?} in {message}");
    assert!(rest.contains(needle), "{needle:?} in {message}");
    message.to_owned()
}

#[test]
fn alias_bombs_are_refused() {
    let sim = Sim::start(|_| {});
    // Billion laughs: ten levels of nine aliases each, 9^10 strings if expanded.
    let mut text = String::from(
        "model: image/bfl/flux-1-dev\nparams:\n  lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for level in 1..10 {
        let refs = vec![format!("*l{}", level - 1); 9].join(", ");
        let _ = writeln!(text, "  lol{level}: &l{level} [{refs}]");
    }
    text.push_str("jobs:\n  - prompt: a fox\n");
    assert_refused(&sim, &text, Place::Line(8), "aliases (*name) expand to too much data");
    // The same under one job's params, and aliases of a large list.
    let big = vec!["0123456789abcdef0123456789abcdef"; 20_000].join(", ");
    let text = format!(
        "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a\n    params: {{big: &b [{big}]}}\n  - prompt: b\n    params: {{copies: [{}]}}\n",
        vec!["*b"; 2000].join(", ")
    );
    assert_refused(&sim, &text, Place::LineColumn(6, 22), "jobs[1].params.copies: ");
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

#[test]
fn deep_nesting_is_refused() {
    let sim = Sim::start(|_| {});
    let head = "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a\n    params: {x: ";
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let text = format!("{head}{}1{}}}\n", open.repeat(10_000), close.repeat(10_000));
        // The 129th level is refused, before libyaml spends quadratic time on the rest.
        let column = 17 + 127 * open.len();
        assert_refused(&sim, &text, Place::LineColumn(4, column), "nested too deeply");
    }
    // Nesting by indentation is refused at serde_yaml's limit, naming the field.
    let mut text = String::from("model: image/bfl/flux-1-dev\nparams:\n  deep:\n");
    for level in 0..2000 {
        let _ = writeln!(text, "{}- ", " ".repeat(4 + 2 * level));
    }
    text.push_str("jobs:\n  - prompt: a\n");
    let message = assert_refused(&sim, &text, Place::LineColumn(130, 257), "nested too deeply");
    assert!(message.contains(": params.deep: "), "{message}");
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

#[test]
fn a_50_mb_file_is_refused_with_the_limit() {
    let sim = Sim::start(|_| {});
    let jobs = numbered_jobs("a lighthouse at dusk, oil painting, warm light", 1_000_000);
    let mut text = format!("model: image/bfl/flux-1-dev\n{FAST_LIMITS}jobs:\n");
    while text.len() < 50_000_000 {
        text.push_str(&jobs);
    }
    let message = assert_refused(&sim, &text, Place::File, "larger than 8 MiB");
    assert!(message.contains("split it into several files"), "{message}");
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

#[test]
fn encodings_tabs_duplicates_and_wrong_types_are_refused_where_written() {
    let sim = Sim::start(|_| {});
    let model = "model: image/bfl/flux-1-dev\n";
    let cases: [(String, Place, &str); 12] = [
        (
            format!("{model}jobs:\n  - prompt: a\n\tname: b\n"),
            Place::LineColumn(4, 1),
            "a tab: YAML indents with spaces only",
        ),
        (format!("{model}jobs:\n\t- prompt: a\n"), Place::LineColumn(3, 1), "tab"),
        (
            format!("{model}model: image/bfl/flux-1-dev\njobs: [{{prompt: a}}]\n"),
            Place::LineColumn(2, 1),
            "model: `model` appears twice at the top level",
        ),
        (
            format!("{model}jobs:\n  - prompt: a\n    name: b\n    name: c\n"),
            Place::LineColumn(5, 5),
            "jobs[0].name: `name` appears twice in a job",
        ),
        (
            format!("{model}jobs:\n  - prompt: a\n    params:\n      steps: 20\n      steps: 30\n"),
            Place::LineColumn(6, 7),
            "jobs[0].params.steps: \"steps\" appears twice",
        ),
        (
            format!("{model}params: {{seed: 1, seed: 2}}\njobs: [{{prompt: a}}]\n"),
            Place::LineColumn(2, 19),
            "params.seed: \"seed\" appears twice",
        ),
        (
            format!("{model}jobs:\n  - prompt: 123\n"),
            Place::LineColumn(3, 13),
            "jobs[0].prompt: expected a string, found the number 123; quote it: \"123\"",
        ),
        (
            format!("{model}jobs:\n  - prompt: true\n"),
            Place::LineColumn(3, 13),
            "found the boolean true",
        ),
        (
            format!("{model}jobs:\n  - prompt: a\n    name: yes\n"),
            Place::LineColumn(4, 11),
            "jobs[0].name: expected a string, found yes",
        ),
        (
            format!("{model}jobs:\n  - prompt: a\n    name: 42\n"),
            Place::LineColumn(4, 11),
            "quote it: \"42\"",
        ),
        (
            "model: 1.5\njobs:\n  - prompt: a\n".to_owned(),
            Place::LineColumn(1, 8),
            "model: expected a string, found the number 1.5",
        ),
        (
            format!("{model}jobs:\n  - prompt: a\n    count: \"3\"\n"),
            Place::LineColumn(4, 12),
            "write it without quotes",
        ),
    ];
    for (text, place, needle) in cases {
        assert_refused(&sim, text, place, needle);
    }
    // Invalid UTF-8: a lone lead byte in a prompt.
    let bytes = b"model: image/bfl/flux-1-dev\njobs:\n  - prompt: \"caf\xC3 au lait\"\n";
    assert_refused(&sim, bytes, Place::LineColumn(3, 17), "not valid UTF-8 (byte 0xC3 here)");
    // UTF-16, which editors on Windows may write.
    let utf16: Vec<u8> = "\u{feff}jobs: []\n".encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert_refused(&sim, utf16, Place::LineColumn(1, 1), "the file is UTF-16; save it as UTF-8");
    assert_eq!(sim.stats().requests_total, 0, "nothing was sent");
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let sim = Sim::start(|_| {});
    let work = Workspace::with_jobs(&numbered_jobs("a harbour at dawn", 2));
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(work.job_file()).expect("job file"));
    std::fs::write(work.job_file(), bytes).expect("job file written");
    work.run(&sim, &[]).expect_code(0);
    let manifest = work.manifest();
    assert_eq!(manifest.len(), 2);
    assert!(manifest.iter().all(|line| line["status"] == "completed"), "{manifest:?}");
}

#[test]
fn requests_the_api_refuses_fail_alone_with_its_message() {
    let sim = Sim::start(|_| {});
    let long = "a very long prompt ".repeat(100);
    assert!(long.chars().count() > 1800);
    let work = Workspace::with_jobs(&format!(
        "  - {{name: first, prompt: a fox in the snow}}\n  - {{name: long, prompt: \"{long}\"}}\n  - {{name: short, prompt: ab, model: image/google/nano-banana-2}}\n  - {{name: typed, prompt: a cat, params: {{steps: many}}}}\n  - {{name: unknown, prompt: a dog, params: {{colour: red}}}}\n  - {{name: ranged, prompt: a cow, params: {{width: 99999}}}}\n  - {{name: last, prompt: a pier at night}}\n"
    ));
    // Without `--no-validate` the run checks the bodies against the API's schemas first and
    // sends nothing; this is the path where the API itself refuses them.
    let run = work.run(&sim, &["--no-validate"]);
    run.expect_code(1);
    let manifest = work.manifest();
    let line = |name: &str| {
        manifest.iter().find(|line| line["name"] == name).unwrap_or_else(|| panic!("{name} listed"))
    };
    for name in ["first", "last"] {
        assert_eq!(line(name)["status"], "completed", "{}", line(name));
    }
    for (name, field) in [
        ("long", "prompt"),
        ("short", "prompt"),
        ("typed", "steps"),
        ("unknown", "colour"),
        ("ranged", "width"),
    ] {
        let entry = line(name);
        assert_eq!(entry["status"], "failed", "{entry}");
        let error = entry["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("'{field}'")), "{field} in {entry}");
    }
    let stats = sim.stats();
    assert_eq!(stats.jobs_created, 2, "only the valid jobs were created");
    assert!(run.stderr.contains("must be at most 1800 characters"), "{}", run.stderr);
}

/// A 400 whose body carries `details` (`{error, details: [{path, message}]}`): each detail, with
/// its path, reaches the manifest and the log line of the failed job.
#[test]
fn the_details_of_a_400_reach_the_manifest_and_the_log() {
    let sim = Sim::start(|config| config.quirks.validation_details = true);
    let work = Workspace::with_jobs(
        "  - {name: ranged, prompt: a fox, params: {steps: 500}}\n  - {name: fine, prompt: an owl}\n",
    );
    let run = work.run(&sim, &["--no-validate"]);
    run.expect_code(1);
    let manifest = work.manifest();
    let ranged = manifest.iter().find(|line| line["name"] == "ranged").expect("listed");
    let error = ranged["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("Krea refused the request (400): Invalid request body: steps: "),
        "{error}"
    );
    assert!(error.contains("'steps' must be between 1 and 100"), "{error}");
    let logged =
        run.stderr.lines().find(|line| line.contains("Krea refused the job")).unwrap_or_default();
    assert!(logged.contains("Invalid request body: steps: "), "{}", run.stderr);
    assert_eq!(sim.stats().jobs_created, 1, "the other job went on");
}
