//! Tests of the job file: the example, each rejection with its position, merging, names,
//! counts and key stability, and inputs that must fail cleanly (never panic or hang).

use super::*;
use serde_json::json;
use std::fmt::Write as _;
use std::time::Duration;

fn parse_str(text: &str) -> Result<JobFile, JobFileError> {
    parse(text.as_bytes(), Path::new("dir/jobs.yaml"))
}

#[track_caller]
fn ok(text: &str) -> JobFile {
    match parse_str(text) {
        Ok(file) => file,
        Err(error) => panic!("refused: {error}\n--- text:\n{text}"),
    }
}

#[track_caller]
fn refused(text: &str) -> JobFileError {
    match parse_str(text) {
        Ok(file) => panic!("accepted: {file:?}\n--- text:\n{text}"),
        Err(error) => error,
    }
}

/// Asserts the position, key and (part of the) message of the error `text` gets.
#[track_caller]
fn check(text: &str, line: usize, column: usize, key: Option<&str>, needle: &str) -> JobFileError {
    let error = refused(text);
    let shown = error.to_string();
    assert_eq!((error.line, error.column), (Some(line), Some(column)), "position of: {shown}");
    assert_eq!(error.key.as_deref(), key, "key of: {shown}");
    assert!(error.message.contains(needle), "{needle:?} not in: {shown}");
    assert!(!shown.contains(" at line "), "serde_yaml's position left in: {shown}");
    error
}

/// One job line under a default model, for the many tests about one key.
fn with_job(job: &str) -> String {
    format!("model: image/bfl/flux-1-dev\njobs:\n  - {job}\n")
}

fn body(value: &serde_json::Value) -> Map<String, Value> {
    value.as_object().cloned().expect("test bodies are objects")
}

#[test]
fn the_example_parses_with_documented_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs.example.yaml");
    let file = load(&path).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(file.output_dir, Path::new(env!("CARGO_MANIFEST_DIR")).join("out"));
    assert_eq!(file.api.base_url.as_deref(), Some("https://api.krea.ai"));
    // The example spells out every default.
    assert_eq!(file.limits, Limits::default());
    assert_eq!(file.prices.get("image/bfl/flux-1-dev"), Some(&0.007));
    assert_eq!(file.budget, Some(Budget { max_usd: Some(25.0), per_day_usd: None }));
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "fox-1",
            "fox-2",
            "fox-3",
            "002-a-lighthouse-at-dusk-oil-painting",
            "harbour",
            "owls_animal-owl_seed-1",
            "owls_animal-owl_seed-2",
            "owls_animal-fox_seed-1",
            "owls_animal-fox_seed-2",
        ]
    );
    let fox = &file.jobs[0];
    assert_eq!(fox.model, "image/krea/krea-2/medium");
    assert_eq!(
        fox.body_map(),
        body(&json!({"prompt": "a red fox in fresh snow", "aspect_ratio": "16:9"}))
    );
    assert_eq!(
        file.jobs.iter().map(|job| job.occurrence).collect::<Vec<_>>(),
        [0, 1, 2, 0, 0, 0, 0, 0, 0]
    );
    let lighthouse = &file.jobs[3];
    assert_eq!(lighthouse.model, "image/bfl/flux-1-dev");
    assert_eq!(
        lighthouse.body_map(),
        body(&json!({"prompt": "a lighthouse at dusk, oil painting",
                    "width": 1024, "height": 1024, "steps": 25}))
    );
    let harbour = &file.jobs[4];
    assert_eq!(
        harbour.body_map()["prompt"],
        "a quiet harbour at dawn, fishing boats, mist over the water"
    );
    assert_eq!(harbour.body_map()["seed"], 42);
    // Lines point at each entry's first key.
    let text = std::fs::read_to_string(&path).expect("the example is readable");
    for job in &file.jobs {
        let line = text.lines().nth(job.line - 1).expect("the line exists");
        assert!(line.trim_start().starts_with("- "), "{}: line {} is {line:?}", job.name, job.line);
    }
}

#[test]
fn defaults_apply_when_sections_are_absent() {
    let file = ok("jobs:\n  - prompt: a fox\n    model: bfl/flux-1-dev\n");
    assert_eq!(file.limits, Limits::default());
    assert_eq!(file.limits.job_timeout, Duration::from_mins(130));
    assert_eq!(file.limits.max_result_size, 2 << 30);
    assert_eq!(file.api, ApiSettings::default());
    assert!(file.prices.is_empty());
    assert_eq!(file.output_dir, Path::new("dir/out"));
    assert_eq!(file.jobs[0].model, "image/bfl/flux-1-dev");
    assert_eq!(file.jobs[0].name, "001-a-fox");
    assert_eq!(file.jobs[0].line, 2);
}

#[test]
fn limits_and_output_are_read() {
    let file = ok("output: /tmp/results/./x\napi: {base_url: 'http://127.0.0.1:8080/'}\n\
                   limits:\n  burst: 1\n  poll_interval: 500ms\n  video_poll_interval: 1m\n  \
                   poll_interval_max: 1m30s\n  max_result_size: 512MiB\n  job_timeout: 3h\n\
                   jobs: [{prompt: x, model: video/kling/kling-2.5}]\n");
    assert_eq!(file.output_dir, Path::new("/tmp/results/x"));
    assert_eq!(file.api.base_url.as_deref(), Some("http://127.0.0.1:8080"));
    assert_eq!(file.limits.burst, Some(1));
    assert_eq!(file.limits.poll_interval, Duration::from_millis(500));
    assert_eq!(file.limits.video_poll_interval, Duration::from_mins(1));
    assert_eq!(file.limits.poll_interval_max, Duration::from_secs(90));
    assert_eq!(file.limits.job_timeout, Duration::from_hours(3));
    assert_eq!(file.limits.max_result_size, 512 << 20);
    assert_eq!(file.limits.submissions_per_minute, None, "not written: no ceiling");
    assert_eq!(file.jobs[0].line, 10);
}

#[test]
fn params_merge_key_by_key_and_the_job_wins() {
    let file = ok("model: bfl/flux-1-dev\nparams: {width: 1024, height: 768, steps: 25}\n\
                   jobs:\n  - prompt: a\n    params: {width: 512, seed: 7, steps: null, \
                   styles: [{id: s1, strength: 0.5}]}\n  - prompt: b\n");
    assert_eq!(
        file.jobs[0].body_map(),
        body(&json!({"prompt": "a", "width": 512, "height": 768, "seed": 7,
                     "styles": [{"id": "s1", "strength": 0.5}]}))
    );
    assert_eq!(
        file.jobs[1].body_map(),
        body(&json!({"prompt": "b", "width": 1024, "height": 768, "steps": 25}))
    );
}

#[test]
fn model_paths_are_normalised_and_checked() {
    assert_eq!(parse_model_path("bfl/flux-1-dev").as_deref(), Ok("image/bfl/flux-1-dev"));
    assert_eq!(parse_model_path("image/bfl/flux-1-dev").as_deref(), Ok("image/bfl/flux-1-dev"));
    assert_eq!(parse_model_path("krea/krea-2/medium").as_deref(), Ok("image/krea/krea-2/medium"));
    assert_eq!(parse_model_path("video/kling/kling-2.5").as_deref(), Ok("video/kling/kling-2.5"));
    assert_eq!(
        parse_model_path("enhance/topaz/standard-enhance").as_deref(),
        Ok("enhance/topaz/standard-enhance")
    );
    for bad in [
        "",
        "/image/bfl/x",
        "image/../x",
        "image/./x",
        "image//x",
        "image/bfl/",
        "bfl",
        "video/kling",
        "Image/bfl/x",
        "image/bfl/flux 1",
        "image/bfl/fl\u{fc}x",
        "a\\b/c",
    ] {
        let why = parse_model_path(bad).expect_err(bad).to_string();
        assert!(why.contains("image/bfl/flux-1-dev"), "{bad:?}: no expected form in {why}");
    }
    assert!(parse_model_path(&format!("image/bfl/{}", "x".repeat(300))).is_err());
    let file = ok("model: bfl/flux-1-dev\nprices: {bfl/flux-1-dev: 0.01, video/kling/k: 1}\n\
                   jobs: [{prompt: a}]\n");
    assert_eq!(file.prices.get("image/bfl/flux-1-dev"), Some(&0.01));
    assert_eq!(file.prices.get("video/kling/k"), Some(&1.0));
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("1000000"), Ok(1_000_000));
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("2 gib"), Ok(2 << 30));
    assert_eq!(parse_size("10MB"), Ok(10_000_000));
    assert_eq!(parse_size("1k"), Ok(1000));
    assert_eq!(parse_size("3B"), Ok(3));
    for bad in ["", "MiB", "1.5GiB", "-1", "2 parsecs", "99999999999999999999", "20000000TiB"] {
        assert!(parse_size(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn count_expands_into_numbered_jobs() {
    let file = ok(&with_job("{prompt: a fox, name: fox, count: 3}"));
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["fox-1", "fox-2", "fox-3"]);
    assert!(file.jobs.iter().all(|job| job.line == 3));
    let file = ok(&with_job("{prompt: a fox, count: 2}"));
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["001-a-fox-1", "001-a-fox-2"]);
    assert_eq!(ok(&with_job("{prompt: a fox, name: fox, count: 1}")).jobs[0].name, "fox");
}

fn keys(file: &JobFile) -> Vec<JobKey> {
    file.jobs.iter().map(|job| job.key.clone()).collect()
}

#[test]
fn identical_jobs_are_told_apart_by_occurrence() {
    let file = ok("model: bfl/flux-1-dev\njobs:\n  - prompt: a\n  - prompt: b\n  - prompt: a\n");
    assert_eq!(file.jobs.iter().map(|job| job.occurrence).collect::<Vec<_>>(), [0, 0, 1]);
    let keys = keys(&file);
    assert_ne!(keys[0], keys[2]);
    assert_eq!(keys[0], JobKey::new("image/bfl/flux-1-dev", &body(&json!({"prompt": "a"})), 0));
    assert_eq!(keys[2], JobKey::new("image/bfl/flux-1-dev", &body(&json!({"prompt": "a"})), 1));
    // The same prompt under another model, or with other fields, is another job.
    let file = ok("model: bfl/flux-1-dev\njobs:\n  - prompt: a\n  - {prompt: a, model: bfl/x}\n\
                   - {prompt: a, params: {seed: 1}}\n"
        .replace("\n- ", "\n  - ")
        .as_str());
    assert_eq!(file.jobs.iter().map(|job| job.occurrence).collect::<Vec<_>>(), [0, 0, 0]);
}

#[test]
fn growing_a_count_adds_exactly_one_key() {
    let three = keys(&ok(&with_job("{prompt: a fox, name: fox, count: 3}")));
    let four = keys(&ok(&with_job("{prompt: a fox, name: fox, count: 4}")));
    assert_eq!(three.len(), 3);
    assert_eq!(&four[..3], &three[..]);
    assert!(!three.contains(&four[3]));
    let occurrences: Vec<u32> =
        ok(&with_job("{prompt: a fox, count: 3}")).jobs.iter().map(|job| job.occurrence).collect();
    assert_eq!(occurrences, [0, 1, 2]);
}

#[test]
fn keys_ignore_names_param_order_and_where_params_come_from() {
    let a = keys(&ok(&with_job("{prompt: a fox, name: fox, params: {seed: 1, steps: 20}}")));
    let b = keys(&ok(&with_job("{prompt: a fox, name: renamed, params: {steps: 20, seed: 1}}")));
    let c = keys(&ok("model: image/bfl/flux-1-dev\nparams: {steps: 20}\n\
                      jobs: [{prompt: a fox, params: {seed: 1}}]\n"));
    assert_eq!(a, b);
    assert_eq!(a, c);
    // Another job in front changes no key.
    let d =
        keys(&ok("model: image/bfl/flux-1-dev\njobs:\n  - prompt: first\n  - {prompt: a fox, \
                      params: {seed: 1, steps: 20}}\n"));
    assert_eq!(d[1], a[0]);
}

#[test]
fn derived_names_are_unique() {
    let text = format!("model: bfl/flux-1-dev\njobs:\n{}", "  - prompt: same words\n".repeat(12));
    let file = ok(&text);
    let mut names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names[0], "001-same-words");
    assert_eq!(names[11], "012-same-words");
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 12);
}

#[test]
fn the_error_reads_file_line_column_key_message() {
    let error = JobFileError {
        file: PathBuf::from("jobs.yaml"),
        line: Some(12),
        column: Some(5),
        key: Some("jobs[3].prompt".into()),
        message: "the prompt is empty; write the text to generate".into(),
    };
    assert_eq!(
        error.to_string(),
        "jobs.yaml:12:5: jobs[3].prompt: the prompt is empty; write the text to generate"
    );
    let bare = JobFileError { line: None, column: None, key: None, ..error };
    assert_eq!(bare.to_string(), "jobs.yaml: the prompt is empty; write the text to generate");
}

// ---- rejections: one per rule, each with its position ----

/// A request field written in the job (or at the top) instead of under `params:` says where
/// it goes.
#[test]
fn a_request_field_beside_the_prompt_is_told_to_go_under_params() {
    let error = check(
        "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a fox\n    seed: 3\n",
        4,
        5,
        Some("jobs[0].seed"),
        "unknown key \"seed\" in a job; request fields go under params:, e.g. `params: {seed: …}`",
    );
    assert!(error.message.contains("valid keys here: prompt"), "{error}");
    check("seed: 3\njobs: [{prompt: a}]\n", 1, 1, Some("seed"), "request fields go under params:");
    // A close job key is suggested instead.
    let typo =
        check(&with_job("prompt: a\n    nmae: b"), 4, 5, Some("jobs[0].nmae"), "did you mean");
    assert!(!typo.message.contains("params:"), "{typo}");
}

/// `prompt: a cat: sitting` is YAML's nested mapping where none may start: quote the value.
#[test]
fn a_colon_in_a_plain_value_gets_a_quote_it_hint() {
    let error = refused(&with_job("prompt: a cat: sitting"));
    assert_eq!(error.line, Some(3), "{error}");
    assert!(error.message.contains(r#"must be quoted, e.g. prompt: "a cat: sitting""#), "{error}");
}

#[test]
fn unknown_keys_are_refused_with_the_valid_ones() {
    let error =
        check("modle: x\njobs: [{prompt: a}]\n", 1, 1, Some("modle"), "unknown key \"modle\"");
    assert!(error.message.contains("did you mean `model`?"), "{error}");
    assert!(
        error.message.contains("model, params, output, api, limits, prices, budget, reuse, jobs"),
        "{error}"
    );
    let error = check(
        &with_job("{prompt: a, promt: b}"),
        3,
        17,
        Some("jobs[0].promt"),
        "did you mean `prompt`?",
    );
    assert!(error.message.contains("prompt, name, model, params, count"), "{error}");
    let error = check(
        "limits:\n  burts: 5\njobs: [{prompt: a}]\n",
        2,
        3,
        Some("limits.burts"),
        "unknown key \"burts\"",
    );
    assert!(error.message.contains("did you mean `burst`?"), "{error}");
    assert!(error.message.contains("max_in_flight"), "{error}");
    check("api:\n  url: http://x\njobs: [{prompt: a}]\n", 2, 3, Some("api.url"), "base_url");
}

#[test]
fn prompts_may_be_left_out_but_not_written_blank() {
    // Whether the model takes no prompt is its schema's to say (`openapi.rs`): the body then
    // has none, not an empty one.
    let file = ok(&with_job(
        "name: fox
    params: {seed: 1}",
    ));
    assert_eq!(file.jobs[0].body_map(), body(&json!({"seed": 1})));
    assert_eq!(ok(&with_job("params: {seed: 1}")).jobs[0].name, "001");
    check(
        &with_job("prompt: ''"),
        3,
        13,
        Some("jobs[0].prompt"),
        "the prompt is empty; write the text",
    );
    check(&with_job("prompt: \"  \\t \""), 3, 13, Some("jobs[0].prompt"), "the prompt is empty");
    check(&with_job("prompt:"), 3, 12, Some("jobs[0].prompt"), "the prompt is empty");
    check(&with_job("prompt: ~"), 3, 13, Some("jobs[0].prompt"), "the prompt is empty");
    check("model: bfl/x\njobs:\n  - prompt: a\n  -\n", 4, 4, Some("jobs[1]"), "this job is empty");
    check("model: bfl/x\njobs:\n  - a fox\n", 3, 5, Some("jobs[0]"), "`- prompt: \"...\"`");
}

#[test]
fn strings_must_be_strings() {
    check(
        &with_job("prompt: 123"),
        3,
        13,
        Some("jobs[0].prompt"),
        "expected a string, found the number 123; quote it: \"123\"",
    );
    check(
        &with_job("{prompt: a, name: yes}"),
        3,
        23,
        Some("jobs[0].name"),
        "expected a string, found yes, which YAML 1.1",
    );
    check(&with_job("{prompt: a, name: true}"), 3, 23, Some("jobs[0].name"), "quote it: \"true\"");
    check(&with_job("{prompt: a, model: 1.5}"), 3, 24, Some("jobs[0].model"), "quote it");
    check(
        &with_job("{prompt: [a, b]}"),
        3,
        14,
        Some("jobs[0].prompt"),
        "expected a string, found a list",
    );
    check(
        "output: 7\njobs: [{prompt: a, model: bfl/x}]\n",
        1,
        9,
        Some("output"),
        "quote it: \"7\"",
    );
    // Quoted, the same words are text.
    let file = ok(&with_job("{prompt: '123', name: \"yes\"}"));
    assert_eq!(
        (file.jobs[0].name.as_str(), &file.jobs[0].body_map()["prompt"]),
        ("yes", &json!("123"))
    );
}

#[test]
fn names_are_checked() {
    check(
        &with_job("{prompt: a, name: ../x}"),
        3,
        23,
        Some("jobs[0].name"),
        "invalid name \"../x\": the name contains '/'",
    );
    check(&with_job("{prompt: a, name: CON}"), 3, 23, Some("jobs[0].name"), "device name");
    let long = "x".repeat(119);
    check(
        &with_job(&format!("{{prompt: a, name: {long}, count: 10}}")),
        3,
        23,
        Some("jobs[0].name"),
        "(made by `count`) is invalid",
    );
}

#[test]
fn duplicate_names_point_at_the_second() {
    let text = "model: bfl/x\njobs:\n  - prompt: a\n    name: fox\n  - prompt: b\n    name: fox\n";
    check(text, 6, 11, Some("jobs[1].name"), "\"fox\" is already used by jobs[0] (line 3)");
    let text = "model: bfl/x\njobs:\n  - {prompt: a, name: Fox}\n  - {prompt: b, name: fox}\n";
    check(text, 4, 23, Some("jobs[1].name"), "ignoring case");
    // A derived name colliding with an explicit one: the entry without a name is pointed at.
    let text = "model: bfl/x\njobs:\n  - {prompt: a, name: 002-fox}\n  - prompt: fox\n";
    check(text, 4, 5, Some("jobs[1]"), "\"002-fox\" (derived from the position and prompt");
    // A name made by count colliding with an earlier job.
    let text =
        "model: bfl/x\njobs:\n  - {prompt: a, name: fox-2}\n  - {prompt: b, name: fox, count: 3}\n";
    check(
        text,
        4,
        23,
        Some("jobs[1].name"),
        "\"fox-2\" (made by `count`) is already used by jobs[0]",
    );
    // The earlier job's expansion taking a later explicit name.
    let text =
        "model: bfl/x\njobs:\n  - {prompt: a, name: fox, count: 2}\n  - {prompt: b, name: fox-1}\n";
    check(text, 4, 23, Some("jobs[1].name"), "already used by jobs[0]");
}

#[test]
fn counts_are_whole_positive_numbers() {
    check(&with_job("{prompt: a, count: 0}"), 3, 24, Some("jobs[0].count"), "count is 0");
    check(&with_job("{prompt: a, count: -2}"), 3, 24, Some("jobs[0].count"), "negative");
    check(&with_job("{prompt: a, count: 1.5}"), 3, 24, Some("jobs[0].count"), "whole number");
    check(&with_job("{prompt: a, count: '3'}"), 3, 24, Some("jobs[0].count"), "without quotes");
    check(
        &with_job("{prompt: a, count: 4294967296}"),
        3,
        24,
        Some("jobs[0].count"),
        "split the work",
    );
    check(&with_job("{prompt: a, count: 200000}"), 3, 24, Some("jobs[0].count"), "split the work");
    // Several counts adding up past the cap: reported at the count that crosses it.
    let text =
        "model: bfl/x\njobs:\n  - {prompt: a, count: 60000}\n  - {prompt: b, count: 60000}\n";
    check(text, 4, 24, Some("jobs[1].count"), "more than the file may hold");
}

#[test]
fn a_file_may_hold_exactly_max_jobs_entries_and_no_more() {
    let mut text = String::from("model: bfl/x\njobs:\n");
    text.push_str(&"- {prompt: a}\n".repeat(MAX_JOBS));
    let file = parse(text.as_bytes(), Path::new("dir/jobs.yaml")).expect("at the cap");
    assert_eq!(file.jobs.len(), MAX_JOBS);
    text.push_str("- {prompt: one too many}\n");
    let error = parse(text.as_bytes(), Path::new("dir/jobs.yaml")).expect_err("past the cap");
    assert_eq!(error.key.as_deref(), Some("jobs[100000]"), "{error}");
    assert!(error.message.contains("more than 100000 jobs in one file"), "{error}");
}

#[test]
fn durations_and_sizes_are_checked_where_written() {
    let limits = |line: &str| format!("limits:\n  {line}\njobs: [{{prompt: a, model: bfl/x}}]\n");
    check(
        &limits("poll_interval: 2"),
        2,
        18,
        Some("limits.poll_interval"),
        "no unit; write it like 2s",
    );
    check(
        &limits("poll_interval: 2 parsecs"),
        2,
        18,
        Some("limits.poll_interval"),
        "not a duration",
    );
    check(&limits("job_timeout: 0s"), 2, 16, Some("limits.job_timeout"), "zero");
    check(&limits("job_timeout: 400d"), 2, 16, Some("limits.job_timeout"), "30 days");
    check(&limits("max_result_size: 2 GB!"), 2, 20, Some("limits.max_result_size"), "unknown unit");
    check(&limits("max_result_size: 0"), 2, 20, Some("limits.max_result_size"), "0 bytes");
    check(&limits("max_result_size: -5"), 2, 20, Some("limits.max_result_size"), "negative");
}

#[test]
fn limits_out_of_range_are_refused() {
    let limits = |lines: &str| format!("limits:\n{lines}jobs: [{{prompt: a, model: bfl/x}}]\n");
    check(&limits("  burst: 0\n"), 2, 10, Some("limits.burst"), "at least 1");
    check(&limits("  max_in_flight: -1\n"), 2, 18, Some("limits.max_in_flight"), "negative");
    check(
        &limits("  submissions_per_minute: 0\n"),
        2,
        27,
        Some("limits.submissions_per_minute"),
        "at least 1",
    );
    check(
        &limits("  download_concurrency: '4'\n"),
        2,
        25,
        Some("limits.download_concurrency"),
        "without quotes",
    );
    check(&limits("  burst: 5000000000\n"), 2, 10, Some("limits.burst"), "too large");
    // A low cap with the first delays left at their defaults is fine: the schedule caps them.
    let capped = ok(&limits("  poll_interval_max: 200ms\n"));
    assert_eq!(capped.limits.video_poll_interval, Duration::from_secs(5));
    check(
        &limits("  poll_interval: 40s\n"),
        2,
        18,
        Some("limits.poll_interval"),
        "longer than poll_interval_max (30s)",
    );
    check(
        "limits: 5\njobs: [{prompt: a, model: bfl/x}]\n",
        1,
        9,
        Some("limits"),
        "expected a mapping of settings",
    );
    check(
        "api: {base_url: ftp://x}\njobs: [{prompt: a, model: bfl/x}]\n",
        1,
        17,
        Some("api.base_url"),
        "http:// or https://",
    );
}

#[test]
fn models_are_required_and_checked() {
    check("jobs:\n  - prompt: a\n", 2, 5, Some("jobs[0].model"), "this job has no model");
    check("model: Image/X\njobs: [{prompt: a}]\n", 1, 8, Some("model"), "lowercase");
    check(
        &with_job("{prompt: a, model: /image/x/y}"),
        3,
        24,
        Some("jobs[0].model"),
        "starts with '/'",
    );
    check(
        &with_job("{prompt: a, model: image/../y}"),
        3,
        24,
        Some("jobs[0].model"),
        "\"..\" segment",
    );
    check(
        &with_job("{prompt: a, model: ''}"),
        3,
        24,
        Some("jobs[0].model"),
        "empty; expected a path like image/bfl/flux-1-dev",
    );
    check(&with_job("{prompt: a, model: bfl}"), 3, 24, Some("jobs[0].model"), "no model");
}

#[test]
fn params_are_checked() {
    check(
        &with_job("{prompt: a, params: {prompt: b}}"),
        3,
        26,
        Some("jobs[0].params.prompt"),
        "use the job's own `prompt:` key",
    );
    check(
        "params:\n  prompt: x\njobs: [{prompt: a, model: bfl/x}]\n",
        2,
        3,
        Some("params.prompt"),
        "does not belong in params",
    );
    check(
        &with_job("{prompt: a, params: [1]}"),
        3,
        25,
        Some("jobs[0].params"),
        "must be a mapping of request fields",
    );
    check(&with_job("{prompt: a, params: 5}"), 3, 25, Some("jobs[0].params"), "found the number 5");
    check(
        &with_job("{prompt: a, params: {1: x}}"),
        3,
        26,
        Some("jobs[0].params"),
        "keys in params must be text",
    );
    check(
        &with_job("{prompt: a, params: {s: [{true: 1}]}}"),
        3,
        31,
        Some("jobs[0].params.s[0]"),
        "found the boolean true",
    );
    check(
        &with_job("{prompt: a, params: {x: .nan}}"),
        3,
        29,
        Some("jobs[0].params.x"),
        "JSON has no NaN or infinity",
    );
    check(
        &with_job("{prompt: a, params: {x: -.inf}}"),
        3,
        29,
        Some("jobs[0].params.x"),
        "JSON has no NaN",
    );
    check(
        &with_job("{prompt: a, params: {x: 99999999999999999999999}}"),
        3,
        29,
        Some("jobs[0].params.x"),
        "too large",
    );
    check(
        &with_job("{prompt: a, params: {hd: on}}"),
        3,
        30,
        Some("jobs[0].params.hd"),
        "write true or false",
    );
    check(
        &with_job("{prompt: a, params: {x: !tag 1}}"),
        3,
        29,
        Some("jobs[0].params.x"),
        "YAML tags",
    );
    check(
        &with_job("{prompt: a, params: {<<: {x: 1}}}"),
        3,
        26,
        Some("jobs[0].params.\"<<\""),
        "merge keys",
    );
    let file = ok(&with_job(
        "{prompt: a, params: {hd: 'on', big: 18446744073709551615, neg: -3, f: 0.25}}",
    ));
    assert_eq!(
        file.jobs[0].body_map(),
        body(&json!({"prompt": "a", "hd": "on", "big": 18_446_744_073_709_551_615_u64,
                    "neg": -3, "f": 0.25}))
    );
}

#[test]
fn prices_are_checked() {
    let prices = |line: &str| format!("prices:\n  {line}\njobs: [{{prompt: a, model: bfl/x}}]\n");
    check(&prices("bfl/x: -1"), 2, 10, Some("prices.bfl/x"), "write 0 or more USD");
    check(&prices("bfl/x: '$0.5'"), 2, 10, Some("prices.bfl/x"), "without quotes");
    check(&prices("bfl/x: .nan"), 2, 10, Some("prices.bfl/x"), "0 or more");
    check(&prices("Bad Model: 1"), 2, 3, Some("prices.\"Bad Model\""), "lowercase");
    check(
        "prices:\n  bfl/x: 1\n  image/bfl/x: 2\njobs: [{prompt: a, model: bfl/x}]\n",
        3,
        3,
        Some("prices.image/bfl/x"),
        "already set above",
    );
    check(
        "prices: [1]\njobs: [{prompt: a, model: bfl/x}]\n",
        1,
        9,
        Some("prices"),
        "mapping of model path",
    );
}

#[test]
fn duplicate_keys_are_refused_everywhere() {
    check(
        "jobs: [{prompt: a, model: bfl/x}]\njobs: [{prompt: b, model: bfl/x}]\n",
        2,
        1,
        Some("jobs"),
        "`jobs` appears twice at the top level",
    );
    check(
        &with_job("prompt: a\n    prompt: b"),
        4,
        5,
        Some("jobs[0].prompt"),
        "appears twice in a job",
    );
    check(
        &with_job("{prompt: a, params: {w: 1, w: 2}}"),
        3,
        32,
        Some("jobs[0].params.w"),
        "appears twice",
    );
    check(
        &with_job("{prompt: a, params: {s: {id: 1, id: 2}}}"),
        3,
        37,
        Some("jobs[0].params.s.id"),
        "appears twice",
    );
    check(
        "limits:\n  burst: 1\n  burst: 2\njobs: [{prompt: a, model: bfl/x}]\n",
        3,
        3,
        Some("limits.burst"),
        "`burst` appears twice",
    );
    check(
        "api:\n  base_url: http://a\n  base_url: http://b\njobs: [{prompt: a, model: bfl/x}]\n",
        3,
        3,
        Some("api.base_url"),
        "appears twice",
    );
}

#[test]
fn empty_files_and_lists_are_refused() {
    for text in ["", "\n\n", "# only a comment\n", "~\n", "{}\n"] {
        let error = refused(text);
        assert!(error.message.contains("the job file is empty"), "{text:?}: {error}");
        // serde_yaml places an empty document at its end.
        assert!(error.line.is_some() && error.column.is_some(), "{text:?}: {error}");
    }
    check(
        "model: bfl/x\njobs: []\n",
        2,
        7,
        Some("jobs"),
        "the `jobs` list is empty, so there is nothing to do",
    );
    check("model: bfl/x\njobs:\n", 2, 6, Some("jobs"), "nothing to do");
    check("model: bfl/x\n", 1, 1, Some("jobs"), "no `jobs:` list");
    check("- prompt: a\n", 1, 1, None, "must be a YAML mapping");
    check("model: bfl/x\njobs: {prompt: a}\n", 2, 7, Some("jobs"), "must be a list");
}

#[test]
fn encodings_are_handled() {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(with_job("prompt: a").as_bytes());
    let file = parse(&bytes, Path::new("jobs.yaml")).expect("a BOM is skipped");
    assert_eq!(file.jobs[0].line, 3);
    let mut bytes = with_job("prompt: \"caf\u{e9} ").into_bytes();
    bytes.truncate(bytes.len() - 1);
    bytes.extend_from_slice(b"\xFF\"\n");
    let error = parse(&bytes, Path::new("jobs.yaml")).expect_err("invalid UTF-8");
    assert_eq!((error.line, error.column), (Some(3), Some(19)), "{error}");
    assert!(error.message.contains("not valid UTF-8 (byte 0xFF here)"), "{error}");
    let error = parse(b"\xFF\xFEj\0o\0", Path::new("jobs.yaml")).expect_err("UTF-16");
    assert!(error.message.contains("UTF-16"), "{error}");
}

#[test]
fn yaml_errors_keep_their_position() {
    let error = check("model: bfl/x\njobs:\n\t- prompt: a\n", 3, 1, None, "invalid YAML");
    assert!(error.message.contains("tab"), "{error}");
    check("model: bfl/x\njobs:\n  - prompt: a\n   name: b\n", 4, 4, None, "invalid YAML");
    check("model: bfl/x\njobs: *nowhere\n", 2, 7, None, "not defined before it");
    check(
        "model: bfl/x\njobs: [{prompt: a}]\n---\njobs: []\n",
        4,
        1,
        None,
        "more than one YAML document",
    );
    check(&with_job("{prompt: !fancy a}"), 3, 14, Some("jobs[0].prompt"), "YAML tags");
    check("model: bfl/x\njobs: [{prompt: \"a\0\"}]\n", 2, 19, None, "invalid YAML");
}

#[test]
fn alias_bombs_end_in_a_positioned_error() {
    let mut text = String::from(
        "model: bfl/x\nparams:\n  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for level in 1..12 {
        let previous = format!("*a{}", level - 1);
        let _ = writeln!(text, "  a{level}: &a{level} [{}]", vec![previous; 9].join(", "));
    }
    text.push_str("jobs: [{prompt: a}]\n");
    let started = std::time::Instant::now();
    let error = refused(&text);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // Pointed at the parameter whose expansion is too large, not at the anchor inside it.
    assert_eq!(error.key.as_deref(), Some("params.a5"), "{error}");
    assert_eq!((error.line, error.column), (Some(8), Some(7)), "{error}");
    assert!(error.message.contains("aliases (*name) expand to too much data"), "{error}");
}

#[test]
fn quadratic_aliases_hit_the_budget() {
    // Few aliases to a large list: within serde_yaml's repetition limit, stopped by the budget.
    let big = vec!["0123456789abcdef0123456789abcdef"; 20_000].join(", ");
    let mut text = format!("model: bfl/x\nparams:\n  big: &big [{big}]\n  copies: [");
    text.push_str(&vec!["*big"; 1000].join(", "));
    text.push_str("]\njobs: [{prompt: a}]\n");
    let error = refused(&text);
    assert!(error.message.contains("too much data"), "{error}");
    assert_eq!(error.key.as_deref(), Some("params.copies"), "{error}");
    assert_eq!((error.line, error.column), (Some(4), Some(11)), "{error}");
}

#[test]
fn deep_nesting_ends_in_a_positioned_error() {
    let text =
        with_job(&format!("{{prompt: a, params: {{x: {}{}}}}}", "[".repeat(300), "]".repeat(300)));
    let error = refused(&text);
    assert!(error.message.contains("nested too deeply"), "{error}");
    assert_eq!(error.line, Some(3), "{error}");
    // Block nesting is left to serde_yaml's own limit; the key names the field it is under,
    // not 128 levels of path.
    let mut text = String::from("model: bfl/x\nparams:\n  deep:\n");
    for level in 0..200 {
        let _ = writeln!(text, "{}- ", " ".repeat(4 + 2 * level));
    }
    text.push_str("jobs: [{prompt: a}]\n");
    let error = refused(&text);
    assert!(error.message.contains("nested too deeply"), "{error}");
    assert_eq!(error.key.as_deref(), Some("params.deep"), "{error}");
    assert!(error.line.is_some_and(|line| line > 100), "{error}");
}

#[test]
fn deep_flow_nesting_is_refused_before_libyaml_reads_it() {
    // libyaml takes time quadratic in flow depth (40,000 `[` took 11 s): the pre-scan refuses
    // the 129th level at once, and points at it.
    let text =
        format!("model: bfl/x\njobs:\n  - prompt: a\n    params: {{x: {}", "[".repeat(200_000));
    let started = std::time::Instant::now();
    let error = refused(&text);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!((error.line, error.column), (Some(4), Some(17 + 127)), "{error}");
    assert!(error.message.contains("nested too deeply (more than 128 levels"), "{error}");
    // Brackets in text are not nesting, and 128 levels (serde_yaml's own limit) are accepted.
    let prompt = format!("\"{}\"", "[".repeat(5000));
    assert_eq!(ok(&with_job(&format!("prompt: {prompt}"))).jobs.len(), 1);
    let text = format!(
        "{{model: bfl/x, jobs: [{{prompt: a, params: {{x: {}{}}}}}]}}\n",
        "[".repeat(124),
        "]".repeat(124)
    );
    assert_eq!(ok(&text).jobs.len(), 1, "128 levels in all");
}

#[test]
fn files_over_the_size_limit_are_refused_by_parse_too() {
    // The daemon hands `parse` what it read of an inbox file: one byte past the limit.
    let mut bytes = with_job("prompt: a").into_bytes();
    bytes.resize(usize::try_from(MAX_FILE_SIZE).expect("fits") + 1, b'#');
    let error = parse(&bytes, Path::new("big.yaml")).expect_err("too large");
    assert_eq!(
        error.to_string(),
        "big.yaml: the job file is larger than 8 MiB, the most krea-batch reads; split it into \
         several files"
    );
}

#[test]
fn a_key_that_reads_like_a_yaml_error_is_not_taken_for_one() {
    // Found by the fuzz target: this panicked in serde_yaml, the unknown key being taken for
    // serde_yaml's message about several documents.
    check(
        "limits:\n more than one document: [*a]\njobs: [{prompt: a, model: bfl/x}]\n",
        2,
        2,
        Some("limits.\"more than one document\""),
        "unknown key \"more than one document\"",
    );
    check(
        "model: bfl/x\njobs: [{prompt: a}]\nlimits: {recursion limit exceeded: 1}\n",
        3,
        10,
        Some("limits.\"recursion limit exceeded\""),
        "unknown key",
    );
}

#[test]
fn no_input_panics() {
    // Every prefix of the example, and bytes flipped in it, fail cleanly or parse.
    let example = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs.example.yaml"))
        .expect("the example is readable");
    for end in (0..example.len()).step_by(7) {
        let _ = parse(&example[..end], Path::new("x.yaml"));
    }
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet = b" \n\t-:[]{}&*!|>'\"#,?0aZ\\\xFF";
    for _ in 0..400 {
        let mut bytes = example.clone();
        for _ in 0..3 {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = alphabet[(next() % alphabet.len() as u64) as usize];
        }
        if let Err(error) = parse(&bytes, Path::new("x.yaml")) {
            assert!(!error.message.is_empty());
        }
    }
    // Short random documents of YAML punctuation and the job file's own words.
    let words: [&[u8]; 16] = [
        b"jobs:",
        b"prompt: ",
        b"params:",
        b"name: ",
        b"count: ",
        b"model: bfl/x",
        b"- ",
        b"\n",
        b"\n  ",
        b"&a ",
        b"*a",
        b"!t ",
        b"{",
        b"}, ",
        b"[",
        b"], ",
    ];
    for _ in 0..3000 {
        let mut bytes = Vec::new();
        for _ in 0..(next() % 24) {
            if next() % 3 == 0 {
                bytes.push(alphabet[(next() % alphabet.len() as u64) as usize]);
            } else {
                bytes.extend_from_slice(words[(next() % words.len() as u64) as usize]);
            }
        }
        let _ = parse(&bytes, Path::new("x.yaml"));
    }
}

#[test]
fn load_reports_io_errors() {
    let error = load(Path::new("/nonexistent/jobs.yaml")).expect_err("no such file");
    assert!(
        error.to_string().starts_with("/nonexistent/jobs.yaml: cannot read the job file"),
        "{error}"
    );
}

#[test]
fn limits_and_api_deserialize_on_their_own() {
    // The daemon configuration embeds these sections, possibly from another format.
    let limits: Limits =
        serde_json::from_str(r#"{"burst": 2, "poll_interval": "1s", "max_result_size": 1024}"#)
            .expect("valid limits");
    assert_eq!(
        limits,
        Limits {
            burst: Some(2),
            poll_interval: Duration::from_secs(1),
            max_result_size: 1024,
            ..Limits::default()
        }
    );
    let error = serde_json::from_str::<Limits>(r#"{"burst": 0}"#).expect_err("zero burst");
    assert!(error.to_string().contains("at least 1"), "{error}");
    assert!(serde_json::from_str::<Limits>(r#"{"brust": 1}"#).is_err());
    let api: ApiSettings = serde_json::from_str(r#"{"base_url": "https://example.test/"}"#)
        .expect("valid api settings");
    assert_eq!(api.base_url.as_deref(), Some("https://example.test"));
    assert_eq!(serde_json::from_str::<ApiSettings>("{}").ok(), Some(ApiSettings::default()));
}

#[test]
fn limits_check_catches_values_built_in_code() {
    assert_eq!(Limits::default().check(), Ok(()));
    let zero = Limits { max_in_flight: Some(0), ..Limits::default() };
    assert_eq!(zero.check().map_err(|(field, _)| field), Err("max_in_flight"));
    let slow = Limits { video_poll_interval: Duration::from_mins(1), ..Limits::default() };
    assert_eq!(slow.check(), Ok(()), "capped by the schedule, not refused");
    assert_eq!(slow.first_poll_above_cap().map(|(field, _)| field), Some("video_poll_interval"));
}

#[test]
fn the_output_directory_is_found_without_a_full_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |text: &str| {
        let path = dir.path().join("jobs.yaml");
        std::fs::write(&path, text).expect("written");
        output_dir_of(&path).expect("found")
    };
    assert_eq!(write("model: x\njobs: []\n"), dir.path().join("out"));
    assert_eq!(write("output: results # here\njobs: []\n"), dir.path().join("results"));
    assert_eq!(
        write("output: \"/srv/a b\"\njobs:\n  - prompt: 'output: no'\n"),
        Path::new("/srv/a b")
    );
    // Unusual forms fall back to the full parse, which agrees.
    let flow = write("{output: flow, model: image/bfl/x, jobs: [{prompt: a}]}\n");
    assert_eq!(flow, dir.path().join("flow"));
}

#[test]
fn a_budget_is_read_with_its_caps_and_checked_where_written() {
    let file = ok("budget: {max_usd: 25, per_day_usd: 7.5}\nmodel: bfl/x\njobs: [{prompt: a}]\n");
    assert_eq!(file.budget, Some(Budget { max_usd: Some(25.0), per_day_usd: Some(7.5) }));
    assert_eq!(ok(&with_job("prompt: a")).budget, None);
    check(
        "model: bfl/x\nbudget: {}\njobs: [{prompt: a}]\n",
        2,
        9,
        Some("budget"),
        "the budget sets no cap",
    );
    check(
        "model: bfl/x\nbudget:\n  max_usd: -3\njobs: [{prompt: a}]\n",
        3,
        12,
        Some("budget.max_usd"),
        "-3 is negative",
    );
    check(
        "model: bfl/x\nbudget:\n  max_usd: \"$25\"\njobs: [{prompt: a}]\n",
        3,
        12,
        Some("budget.max_usd"),
        "without quotes or currency sign",
    );
    check(
        "model: bfl/x\nbudget:\n  max_dollars: 25\njobs: [{prompt: a}]\n",
        3,
        3,
        Some("budget.max_dollars"),
        "unknown key \"max_dollars\"; valid keys here: max_usd, per_day_usd",
    );
}

// ---- sweeps: matrix, templates, data files ----

/// A folder holding `jobs.yaml` with `text` and the data files `files` (name, contents).
fn with_files(
    text: &str,
    files: &[(&str, &str)],
) -> (tempfile::TempDir, Result<JobFile, JobFileError>) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("jobs.yaml"), text).expect("job file");
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).expect("data file");
    }
    let loaded = load(&dir.path().join("jobs.yaml"));
    (dir, loaded)
}

#[test]
fn a_matrix_expands_into_the_cross_product_with_readable_names() {
    let file = ok("model: bfl/x\njobs:\n  - prompt: a {animal} in snow\n    name: snow\n    \
                   matrix: {animal: [fox, owl], seed: [1, 2, 3]}\n");
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "snow_animal-fox_seed-1",
            "snow_animal-fox_seed-2",
            "snow_animal-fox_seed-3",
            "snow_animal-owl_seed-1",
            "snow_animal-owl_seed-2",
            "snow_animal-owl_seed-3",
        ]
    );
    // The prompt uses `animal`; `seed`, unused there, is a request field.
    assert_eq!(file.jobs[4].body_map(), body(&json!({"prompt": "a owl in snow", "seed": 2})));
    // Without a name: derived from the entry's position and the prompt's fixed words.
    let file = ok("model: bfl/x\njobs:\n  - prompt: \"{style} lighthouse\"\n    \
                   matrix: {style: [oil painting, \"16:9 photo\"]}\n");
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["001-lighthouse_style-oil-painting", "001-lighthouse_style-16-9-photo"]);
    // A name template chooses the pattern; `{{` is a literal brace.
    let file =
        ok("model: bfl/x\njobs:\n  - prompt: \"{{x}} {n}\"\n    name: \"n{n}-{model}\"\n    \
                   matrix: {n: [1, 2], model: [bfl/a, bfl/b]}\n");
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["n1-bfl-a", "n2-bfl-a", "n1-bfl-b", "n2-bfl-b"]);
    assert!(
        file.jobs
            .iter()
            .all(|job| job.body_map()["prompt"].as_str().is_some_and(|p| p.starts_with("{x} ")))
    );
    assert_eq!(file.jobs[1].model, "image/bfl/a");
    assert_eq!(file.jobs[2].model, "image/bfl/b");
}

#[test]
fn growing_a_sweep_keeps_the_keys_of_the_jobs_already_there() {
    let keys = |values: &str| -> Vec<(String, JobKey)> {
        ok(&format!(
            "model: bfl/x\njobs:\n  - prompt: a fox\n    name: fox\n    matrix: {{seed: [{values}]}}\n"
        ))
        .jobs
        .into_iter()
        .map(|job| (job.name, job.key))
        .collect()
    };
    let before = keys("1, 2");
    let after = keys("3, 1, 2");
    assert_eq!(after.len(), 3);
    for job in &before {
        assert!(after.contains(job), "{job:?} kept");
    }
}

#[test]
fn sweep_mistakes_are_refused_where_written() {
    check(
        "model: bfl/x\njobs:\n  - prompt: a {colour} fox\n    matrix: {seed: [1]}\n",
        3,
        13,
        Some("jobs[0].prompt"),
        "`{colour}` is not a variable of this job (its variables: seed)",
    );
    check(
        "model: bfl/x\njobs:\n  - prompt: a fox\n    matrix:\n      seed: 3\n",
        5,
        13,
        Some("jobs[0].matrix.seed"),
        "needs a list of values, like `seed: [1, 2, 3]`",
    );
    check(
        "model: bfl/x\njobs:\n  - prompt: a fox\n    matrix:\n      seed: [1, 2, 1]\n",
        5,
        13,
        Some("jobs[0].matrix.seed"),
        "the value 1 appears twice",
    );
    check(
        "model: bfl/x\njobs:\n  - prompt: a fox\n    matrix:\n      prompt: [a, b]\n",
        5,
        7,
        Some("jobs[0].matrix.prompt"),
        "cannot be swept directly",
    );
    check(
        "model: bfl/x\njobs:\n  - prompt: a {seed fox\n    matrix: {seed: [1]}\n",
        3,
        13,
        Some("jobs[0].prompt"),
        "is not a `{variable}`",
    );
    // Values whose names collide after slugging: a name template fixes it.
    check(
        "model: bfl/x\njobs:\n  - prompt: \"{ar} fox\"\n    matrix: {ar: [\"1:1\", \"1-1\"]}\n",
        3,
        5,
        Some("jobs[0]"),
        "made by the sweep",
    );
    // A plain entry is not a template: its braces are text.
    let file = ok(&with_job("prompt: \"a {red} fox }\""));
    assert_eq!(file.jobs[0].body_map()["prompt"], "a {red} fox }");
}

#[test]
fn rows_of_a_csv_file_become_jobs_with_typed_fields() {
    let csv = "prompt,name,seed,style,guidance\na red fox,fox,7,oil,\n\"a lighthouse, at dusk\",,8,ink,3.5\n";
    let text = "model: bfl/x\njobs:\n  - from: prompts.csv\n    prompt: \"{prompt}, {style}\"\n";
    let (_dir, file) = with_files(text, &[("prompts.csv", csv)]);
    let file = file.unwrap_or_else(|error| panic!("{error}"));
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["fox", "prompts-002-a-lighthouse-at-dusk-ink"]);
    assert_eq!(file.jobs[0].body_map(), body(&json!({"prompt": "a red fox, oil", "seed": 7})));
    assert_eq!(
        file.jobs[1].body_map(),
        body(&json!({"prompt": "a lighthouse, at dusk, ink", "seed": 8, "guidance": 3.5}))
    );
    // With a matrix too: rows times combinations.
    let text = "model: bfl/x\njobs:\n  - from: prompts.csv\n    prompt: \"{prompt}\"\n    \
                matrix: {steps: [10, 20]}\n";
    let (_dir, file) = with_files(text, &[("prompts.csv", csv)]);
    assert_eq!(file.expect("valid").jobs.len(), 4);
}

#[test]
fn rows_of_a_json_lines_file_keep_their_types() {
    let jsonl = "{\"prompt\": \"a fox\", \"seed\": 1, \"refs\": [\"u\"]}\n\n{\"prompt\": \"an owl\", \"model\": \"bfl/y\"}\n";
    let text = "model: bfl/x\njobs:\n  - from: rows.jsonl\n";
    let (_dir, file) = with_files(text, &[("rows.jsonl", jsonl)]);
    let file = file.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(file.jobs.len(), 2);
    assert_eq!(
        file.jobs[0].body_map(),
        body(&json!({"prompt": "a fox", "seed": 1, "refs": ["u"]}))
    );
    assert_eq!(file.jobs[1].model, "image/bfl/y");
    assert_eq!(file.jobs[1].name, "rows-002-an-owl");
}

#[test]
fn data_file_mistakes_name_the_data_file_and_line() {
    let text = "model: bfl/x\njobs:\n  - from: prompts.csv\n";
    let shown = |files: &[(&str, &str)]| {
        let (dir, file) = with_files(text, files);
        let error = file.expect_err("refused").to_string();
        error.replace(&format!("{}/", dir.path().display()), "")
    };
    assert_eq!(
        shown(&[("prompts.csv", "prompt,seed\na fox,1\nan owl\n")]),
        "prompts.csv:3: this row has 1 cells, the header 2; quote cells that contain commas"
    );
    assert_eq!(
        shown(&[("prompts.csv", "prompt,seed\na fox,1\n\"  \",2\n")]),
        "prompts.csv:3: the prompt is empty; write the text to generate"
    );
    assert_eq!(
        shown(&[("prompts.csv", "text,seed\na fox,1\n")]),
        "jobs.yaml:3:11: jobs[0].from: prompts.csv has no `prompt` column; add one, or give \
         this job a `prompt:` template that uses its columns (text, seed)"
    );
    assert!(shown(&[]).starts_with("jobs.yaml:3:11: jobs[0].from: cannot read prompts.csv:"));
    let text = "model: bfl/x\njobs:\n  - from: rows.jsonl\n";
    let (dir, file) = with_files(text, &[("rows.jsonl", "{\"prompt\": \"a\"}\n{\"prompt\": \n")]);
    let error = file.expect_err("refused");
    assert_eq!(error.file, dir.path().join("rows.jsonl"));
    assert_eq!(error.line, Some(2));
    // A symbolic link is not followed, even to a file in the folder.
    let text = "model: bfl/x\njobs:\n  - from: prompts.csv\n";
    let (dir, _) = with_files(text, &[("real.csv", "prompt\na fox\n")]);
    std::os::unix::fs::symlink(dir.path().join("real.csv"), dir.path().join("prompts.csv"))
        .expect("symlink");
    let error = load(&dir.path().join("jobs.yaml")).expect_err("refused").to_string();
    assert!(error.contains("`prompts.csv` is a symbolic link"), "{error}");
    // Nor a linked folder on the way, wherever it points.
    let text = "model: bfl/x\njobs:\n  - from: data/customers.csv\n";
    let (dir, _) = with_files(text, &[]);
    let private = tempfile::tempdir().expect("another folder");
    std::fs::write(private.path().join("customers.csv"), "prompt\nprivate row\n").expect("csv");
    std::os::unix::fs::symlink(private.path(), dir.path().join("data")).expect("symlink");
    let error = load(&dir.path().join("jobs.yaml")).expect_err("refused").to_string();
    let shown = error.replace(&format!("{}/", dir.path().display()), "");
    assert!(
        shown.starts_with(
            "jobs.yaml:3:11: jobs[0].from: data/customers.csv: `data` is a symbolic link"
        ),
        "{shown}"
    );
    check(
        "model: bfl/x\njobs:\n  - from: ../secrets.csv\n",
        3,
        11,
        Some("jobs[0].from"),
        "is not inside the job file's folder",
    );
}

#[test]
fn sweeps_that_would_expand_past_the_limits_are_refused_before_expanding() {
    // 2^20 combinations: past MAX_JOBS.
    let mut text = String::from("model: bfl/x\njobs:\n  - prompt: a fox\n    matrix:\n");
    for variable in 0..20 {
        let _ = writeln!(text, "      v{variable}: [a, b]");
    }
    let started = std::time::Instant::now();
    check(&text, 3, 5, Some("jobs[0]"), "the jobs expand to more than the file may hold");
    // 2^16 combinations of 1 KB values: within MAX_JOBS, but not the request data.
    let mut text = String::from("model: bfl/x\njobs:\n  - prompt: a fox\n    matrix:\n");
    let long = "x".repeat(1000);
    for variable in 0..16 {
        let _ = writeln!(text, "      v{variable}: [a{long}, b{long}]");
    }
    check(&text, 3, 5, Some("jobs[0]"), "the jobs expand to more than the file may hold");
    // One large row, repeated by a matrix and a count.
    let csv = format!("prompt\n{}\n", "a fox ".repeat(200_000));
    let text = "model: bfl/x\njobs:\n  - from: big.csv\n    count: 50\n    \
                matrix: {seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n";
    let (_dir, file) = with_files(text, &[("big.csv", &csv)]);
    let error = file.expect_err("refused");
    assert!(error.message.contains("expand to more than the file may hold"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// A local file in a URL field stands in the body as its content's hash: the key follows the
/// content, not the name; every problem with the file is refused at the field's line.
#[test]
fn local_inputs_become_content_hashes_and_bad_ones_are_refused_at_their_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let png = b"\x89PNG\r\n\x1a\nthe cat";
    std::fs::write(dir.path().join("cat.png"), png).expect("file");
    std::fs::write(dir.path().join("same.png"), png).expect("file");
    std::fs::write(dir.path().join("dog.png"), b"\x89PNG\r\n\x1a\nthe dog").expect("file");
    let source = dir.path().join("jobs.yaml");
    let parse_at = |text: &str| parse(text.as_bytes(), &source);
    let file = parse_at(
        "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a\n    params: {image_url: ./cat.png}\n  \
         - prompt: a\n    params: {image_url: same.png}\n  - prompt: a\n    params:\n      \
         image_style_references: [{url: dog.png, strength: 1}]\n  - prompt: a\n    params: \
         {image_url: 'https://example.com/x.png'}\n",
    )
    .expect("valid");
    let sha: String = {
        use sha2::Digest as _;
        format!("{:x}", sha2::Sha256::digest(png))
    };
    let body = file.jobs[0].body_map();
    assert_eq!(body["image_url"], json!(placeholder(&sha)));
    assert_eq!(file.jobs[0].body, file.jobs[1].body, "same content, same body");
    assert_eq!(file.jobs[1].occurrence, 1, "the same request twice");
    assert!(file.jobs[2].body.contains(PLACEHOLDER_PREFIX));
    assert_eq!(file.jobs[3].body_map()["image_url"], "https://example.com/x.png");
    assert_eq!(file.local_files.len(), 2, "two contents: {:?}", file.local_files);
    let cat = file.local_files.iter().find(|f| f.sha256 == sha).expect("the cat");
    assert_eq!((cat.mime_type, cat.bytes), ("image/png", png.len() as u64));

    std::fs::write(dir.path().join("big.png"), b"").expect("file");
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("big.png"))
        .and_then(|f| f.set_len(MAX_INPUT_BYTES + 1))
        .expect("sparse file");
    std::os::unix::fs::symlink(dir.path().join("cat.png"), dir.path().join("link.png"))
        .expect("link");
    for (value, needle) in [
        ("missing.png", "missing.png"),
        ("../cat.png", "not inside"),
        ("/etc/hosts.png", "not inside"),
        ("link.png", "symbolic link"),
        ("big.png", "75 MB"),
        ("jobs.yaml", "JPEG, PNG"),
    ] {
        let text = format!(
            "model: image/bfl/flux-1-dev\njobs:\n  - prompt: fine\n  - prompt: a\n    params:\n      \
             image_url: {value}\n"
        );
        let error = parse_at(&text).expect_err(value);
        assert_eq!(error.line, Some(6), "{error}");
        assert_eq!(error.key.as_deref(), Some("jobs[1].params.image_url"), "{error}");
        assert!(error.message.contains(needle), "{needle} in {error}");
    }
    let defaults =
        "model: image/bfl/flux-1-dev\nparams:\n  start_image: gone.png\njobs:\n  - prompt: a\n";
    let error = parse_at(defaults).expect_err("missing");
    assert_eq!(
        (error.line, error.key.as_deref()),
        (Some(3), Some("params.start_image")),
        "{error}"
    );
}

const CHAIN: &str = "model: image/bfl/flux-1-dev
jobs:
  - name: castle
    prompt: a castle on a cliff at dawn
    count: 2
    then:
      - model: enhance/topaz/standard-enhance
        params: { model: Standard V2, image_scaling_factor: 2 }
      - model: video/kling/kling-2.5
        prompt: slow aerial push-in
        params: { duration: 5 }
  - prompt: a plain job
";

#[test]
fn stages_are_kept_with_each_job_with_their_default_input_fields() {
    let file = ok(CHAIN);
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["castle-1/0-flux-1-dev", "castle-2/0-flux-1-dev", "002-a-plain-job"]);
    assert_eq!(file.jobs[2].chain, None);
    let chain = crate::chain::Chain::parse(file.jobs[1].chain.as_deref().expect("chained"))
        .expect("readable");
    assert_eq!((chain.base.as_str(), chain.stage), ("castle-2", 0));
    let inputs: Vec<&str> = chain.stages.iter().map(|stage| stage.input.as_str()).collect();
    assert_eq!(inputs, ["image_url", "start_image"]);
    assert_eq!(
        chain.stages[0].body,
        body(&json!({"model": "Standard V2", "image_scaling_factor": 2}))
    );
    assert_eq!(
        chain.stages[1].body,
        body(&json!({"prompt": "slow aerial push-in", "duration": 5}))
    );
    // The stages are not part of the job's key: adding `then:` to a job pays for nothing again.
    let plain = ok("model: image/bfl/flux-1-dev
jobs:
  - name: castle
    prompt: a castle on a cliff at dawn
    count: 2
");
    assert_eq!(plain.jobs[0].key, file.jobs[0].key);
}

#[test]
fn a_stage_input_can_be_named_and_its_mistakes_are_found_at_their_line() {
    let named =
        ok(&with_job("{prompt: x, then: [{model: video/kling/kling-2.5, input: end_image}]}"));
    let chain = crate::chain::Chain::parse(named.jobs[0].chain.as_deref().expect("chained"))
        .expect("readable");
    assert_eq!(chain.stages[0].input, "end_image");
    check(
        &with_job("{prompt: x, then: [{params: {a: 1}}]}"),
        3,
        24,
        Some("jobs[0].then[0].model"),
        "this stage has no `model`",
    );
    check(
        &with_job(
            "{prompt: x, then: [{model: enhance/topaz/standard-enhance, params: {image_url: https://a/b.png}}]}",
        ),
        3,
        84,
        Some("jobs[0].then[0].params.image_url"),
        "receives the previous stage's result",
    );
    check(
        &with_job("{prompt: x, then: [{model: video/kling/kling-2.5, input: \"no such\"}]}"),
        3,
        62,
        Some("jobs[0].then[0].input"),
        "not a request field name",
    );
    check(
        &with_job("{prompt: x, then: [{model: video/kling/kling-2.5, size: 2}]}"),
        3,
        55,
        Some("jobs[0].then[0].size"),
        "unknown key",
    );
    check(&with_job("{prompt: x, then: 3}"), 3, 23, Some("jobs[0].then"), "list of stages");
}

/// A job file `jobs.yaml` in a temporary folder with `photos/` holding `images` (PNG bytes
/// that differ per name), parsed.
fn with_photos(images: &[&str], text: &str) -> (tempfile::TempDir, Result<JobFile, JobFileError>) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("photos")).expect("folder");
    for name in images {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(name.as_bytes());
        std::fs::write(dir.path().join("photos").join(name), png).expect("image");
    }
    let source = dir.path().join("jobs.yaml");
    let parsed = parse(text.as_bytes(), &source);
    (dir, parsed)
}

const ENHANCE_FOLDER: &str = "model: enhance/topaz/standard-enhance\nparams: {model: Standard V2}\n\
                              jobs:\n  - from: photos/\n    name: \"{file}-2x\"\n";

#[test]
fn a_folder_makes_one_job_per_image_sorted_with_file_as_name_and_input() {
    let images = ["b.png", "a.png", ".hidden.png", "notes.txt", "C.PNG"];
    let (dir, parsed) = with_photos(&images, ENHANCE_FOLDER);
    let file = parsed.expect("valid");
    let names: Vec<&str> = file.jobs.iter().map(|job| job.name.as_str()).collect();
    assert_eq!(names, ["C-2x", "a-2x", "b-2x"], "byte order of the file names");
    let body = file.jobs[1].body_map();
    assert!(!body.contains_key("prompt") && !body.contains_key("file"), "{body:?}");
    let sha =
        &file.local_files.iter().find(|f| f.path == Path::new("photos/a.png")).expect("a").sha256;
    assert_eq!(body["image_url"], json!(placeholder(sha)));
    assert_eq!(body["model"], "Standard V2");
    assert_eq!(file.local_files.len(), 3);
    assert_eq!(file.folders.len(), 1);
    let folder = &file.folders[0];
    assert_eq!((folder.line, folder.folder.as_str(), folder.images), (4, "photos/", 3));
    assert_eq!((folder.skipped.hidden, folder.skipped.not_images), (1, 1));

    // A video model takes the image as its first frame; no `name:` names the job `{file}`,
    // and a prompt template may use `{file}`.
    let video = "model: video/kling/kling-2.5\njobs:\n  - from: ./photos/\n    prompt: \"{file} comes alive\"\n";
    let file = parse(video.as_bytes(), &dir.path().join("jobs.yaml")).expect("valid");
    assert_eq!(file.jobs[0].name, "C");
    let body = file.jobs[1].body_map();
    assert_eq!(body["prompt"], "a comes alive");
    assert!(body["start_image"].as_str().is_some_and(|url| url.starts_with(PLACEHOLDER_PREFIX)));
}

#[test]
fn adding_images_to_a_folder_adds_only_their_jobs() {
    let (_dir, before) = with_photos(&["a.png", "b.png"], ENHANCE_FOLDER);
    let (_more, after) = with_photos(&["a.png", "b.png", "0.png", "c.png"], ENHANCE_FOLDER);
    let before: Vec<JobKey> = keys(&before.expect("valid"));
    let after = after.expect("valid");
    let after_keys = keys(&after);
    assert!(before.iter().all(|key| after_keys.contains(key)), "the first images keep their keys");
    assert_eq!(after_keys.len(), before.len() + 2);
}

#[test]
fn folders_that_escape_link_are_missing_or_empty_are_refused_at_from() {
    for (written, needle) in [("../photos/", "not inside"), ("/tmp/", "not inside")] {
        let text = format!("model: enhance/topaz/x\njobs:\n  - from: {written}\n");
        check(&text, 3, 11, Some("jobs[0].from"), needle);
    }
    check(&with_job("from: photos"), 3, 11, Some("jobs[0].from"), "trailing `/`");
    let (dir, parsed) = with_photos(
        &["notes.txt"],
        "model: enhance/topaz/x\njobs:\n  - prompt: a\n  - from: photos/\n",
    );
    let error = parsed.expect_err("no image");
    assert_eq!((error.line, error.key.as_deref()), (Some(4), Some("jobs[1].from")), "{error}");
    assert!(error.message.contains("holds no image"), "{error}");
    let missing =
        parse(b"model: enhance/topaz/x\njobs:\n  - from: gone/\n", &dir.path().join("jobs.yaml"))
            .expect_err("missing");
    assert_eq!(error_line_key(&missing), (Some(3), Some("jobs[0].from".to_owned())), "{missing}");
    assert!(missing.message.contains("gone"), "{missing}");
    std::os::unix::fs::symlink(dir.path().join("photos"), dir.path().join("linked")).expect("link");
    let linked =
        parse(b"model: enhance/topaz/x\njobs:\n  - from: linked/\n", &dir.path().join("jobs.yaml"))
            .expect_err("linked");
    assert!(linked.message.contains("symbolic link"), "{linked}");
    std::fs::write(dir.path().join("photos/real.png"), b"\x89PNG\r\n\x1a\n").expect("image");
    std::os::unix::fs::symlink(
        dir.path().join("photos/real.png"),
        dir.path().join("photos/alias.png"),
    )
    .expect("link");
    let inner =
        parse(b"model: enhance/topaz/x\njobs:\n  - from: photos/\n", &dir.path().join("jobs.yaml"))
            .expect_err("inner link");
    assert!(inner.message.contains("photos/alias.png is a symbolic link"), "{inner}");
    std::fs::remove_file(dir.path().join("photos/alias.png")).expect("link removed");
    std::fs::write(dir.path().join("photos/fake.png"), b"GIF89a").expect("not a PNG");
    let fake =
        parse(b"model: enhance/topaz/x\njobs:\n  - from: photos/\n", &dir.path().join("jobs.yaml"))
            .expect_err("not a PNG");
    assert_eq!(error_line_key(&fake), (Some(3), Some("jobs[0].from".to_owned())), "{fake}");
    assert!(fake.message.contains("photos/fake.png does not hold"), "{fake}");
    std::fs::remove_file(dir.path().join("photos/fake.png")).expect("removed");
    std::fs::write(dir.path().join("photos/real.jpg"), b"\xFF\xD8\xFF\xE0").expect("a JPEG");
    let twice =
        parse(b"model: enhance/topaz/x\njobs:\n  - from: photos/\n", &dir.path().join("jobs.yaml"))
            .expect_err("real twice");
    assert!(twice.message.contains("two jobs named \"real\""), "{twice}");
}

fn error_line_key(error: &JobFileError) -> (Option<usize>, Option<String>) {
    (error.line, error.key.clone())
}

#[test]
fn an_enhancer_gets_each_images_size_unless_params_write_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("photos")).expect("folder");
    let png = |width: u8| {
        let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\x04".to_vec();
        bytes.extend_from_slice(&[width, 0, 0, 0x03, 0x00]);
        bytes
    };
    std::fs::write(dir.path().join("photos/a.png"), png(0)).expect("image");
    std::fs::write(dir.path().join("photos/b.png"), png(1)).expect("image");
    let source = dir.path().join("jobs.yaml");
    let file = parse(ENHANCE_FOLDER.as_bytes(), &source).expect("valid");
    let sizes: Vec<(Value, Value)> = file
        .jobs
        .iter()
        .map(|job| (job.body_map()["width"].clone(), job.body_map()["height"].clone()))
        .collect();
    assert_eq!(sizes, [(json!(1024), json!(768)), (json!(1025), json!(768))]);
    let written = ENHANCE_FOLDER.replace("{model: Standard V2}", "{model: Standard V2, width: 9}");
    let file = parse(written.as_bytes(), &source).expect("valid");
    let body = file.jobs[0].body_map();
    assert_eq!((body.get("width"), body.get("height")), (Some(&json!(9)), None), "params win");
    let video = "model: video/kling/kling-2.5\njobs:\n  - from: photos/\n";
    let body = parse(video.as_bytes(), &source).expect("valid").jobs[0].body_map();
    assert!(!body.contains_key("width"), "only enhancers get the size: {body:?}");
}
