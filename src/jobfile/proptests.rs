//! Property tests of the job file, run in CI (a few seconds): generated job files built from
//! every key, written in block or flow style, parse into the expected jobs; the same files
//! mutated (cut short, bytes flipped, tabs inserted, lines repeated or dropped) never panic,
//! and are refused with one line that names the file and, where it has one, the place.
//! Generated matrices expand into their cross product with unique names and keys, and growing
//! one keeps every earlier key. The fuzz target (`fuzz/`) explores the same ground for longer,
//! without the structure.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;
use std::fmt::Write as _;

/// A generated job entry.
#[derive(Clone, Debug)]
struct GenJob {
    prompt: String,
    /// Whether to write the prompt unquoted (only for prompts that stay text that way).
    plain: bool,
    /// The name's tail, after `j<index>` (which keeps names unique).
    name: Option<String>,
    model: Option<&'static str>,
    params: Vec<(String, Value)>,
    count: u32,
}

/// A generated job file: its parts, to know what it must parse into.
#[derive(Clone, Debug)]
struct GenFile {
    model: Option<&'static str>,
    params: Vec<(String, Value)>,
    limits: Vec<(&'static str, String)>,
    flow: bool,
    jobs: Vec<GenJob>,
}

const MODELS: [&str; 4] =
    ["image/bfl/flux-1-dev", "bfl/flux-1-dev", "image/krea/krea-2/medium", "video/kling/kling-2.5"];

/// Prompt text: letters, digits, accents, CJK, emoji, quotes, backslashes and YAML punctuation.
fn prompt() -> impl Strategy<Value = (String, bool)> {
    let any = "[a-zA-Z0-9 éüßΩ日本語🦊'\"\\\\#:\\[\\]{},&*!|>%@`?-]{1,40}"
        .prop_filter("not blank", |text: &String| !text.trim().is_empty())
        .prop_map(|text| (text, false));
    let plain = "[a-z]{1,8}( [a-z]{1,8}){0,4}"
        .prop_filter("stays text unquoted", |text: &String| {
            !["yes", "no", "on", "off", "true", "false", "null", "y", "n"].contains(&text.as_str())
        })
        .prop_map(|text| (text, true));
    prop_oneof![3 => any, 1 => plain]
}

/// A request field's value: scalars, and lists and mappings of them two levels deep.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i32>().prop_map(Value::from),
        (-1000.0..1000.0_f64).prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        "[a-zA-Z0-9 é日'\":#\\[{-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn params() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::btree_map("(width|height|steps|seed|style|[a-z_]{1,8})", value(), 0..4)
        .prop_filter("no prompt in params", |map| !map.contains_key("prompt"))
        .prop_map(|map| map.into_iter().collect())
}

/// Limits with valid values: durations and sizes in several units, counts.
fn limits() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let duration = |low: u64, high: u64| {
        prop_oneof![
            (low..=high).prop_map(|s| format!("{s}s")),
            (low..=high).prop_map(|s| format!("{}ms", s * 1000)),
            (low..=high).prop_map(|s| format!("{}m{}s", s / 60, s % 60)),
        ]
        .prop_filter("not zero", |text| text != "0m0s")
    };
    (
        prop::option::of(duration(1, 20)),
        prop::option::of(duration(20, 90)),
        prop::option::of(duration(60, 7200)),
        prop::option::of(
            (1_u64..4096, prop::sample::select(vec!["MiB", "GiB", "MB", "kB", ""]))
                .prop_map(|(n, unit)| format!("{n}{unit}")),
        ),
        prop::option::of(1_u32..1000),
        prop::option::of(1_u32..64),
    )
        .prop_map(|(poll, poll_max, timeout, size, rate, burst)| {
            let mut limits = Vec::new();
            limits.extend(poll.map(|value| ("poll_interval", value)));
            limits.extend(poll_max.map(|value| ("poll_interval_max", value)));
            limits.extend(timeout.map(|value| ("job_timeout", value)));
            limits.extend(size.map(|value| ("max_result_size", value)));
            limits.extend(rate.map(|value| ("submissions_per_minute", value.to_string())));
            limits.extend(burst.map(|value| ("burst", value.to_string())));
            limits
        })
}

fn job() -> impl Strategy<Value = GenJob> {
    (
        prompt(),
        prop::option::of("[A-Za-z0-9._-]{0,12}"),
        prop::option::of(prop::sample::select(&MODELS[..])),
        params(),
        1_u32..=5,
    )
        .prop_map(|((prompt, plain), name, model, params, count)| GenJob {
            prompt,
            plain,
            name,
            model,
            params,
            count,
        })
}

fn file() -> impl Strategy<Value = GenFile> {
    (
        prop::option::of(prop::sample::select(&MODELS[..])),
        params(),
        limits(),
        any::<bool>(),
        prop::collection::vec(job(), 1..6),
    )
        .prop_map(|(model, params, limits, flow, mut jobs)| {
            // Every job needs a model: from the top, or its own.
            if model.is_none() {
                for job in &mut jobs {
                    job.model.get_or_insert(MODELS[0]);
                }
            }
            GenFile { model, params, limits, flow, jobs }
        })
}

/// JSON text is YAML: strings come out double-quoted with JSON's escapes.
fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("JSON")
}

fn render_map(entries: &[(String, Value)]) -> String {
    let fields: Vec<String> =
        entries.iter().map(|(key, value)| format!("{}: {}", json(key), json(value))).collect();
    format!("{{{}}}", fields.join(", "))
}

impl GenFile {
    fn render(&self) -> String {
        let mut text = String::from("# generated\n");
        if let Some(model) = self.model {
            let _ = writeln!(text, "model: {model}");
        }
        if !self.params.is_empty() {
            let _ = writeln!(text, "params: {}", render_map(&self.params));
        }
        if !self.limits.is_empty() {
            text.push_str("limits:\n");
            for (key, value) in &self.limits {
                let _ = writeln!(text, "  {key}: {value}");
            }
        }
        text.push_str("jobs:\n");
        for (index, job) in self.jobs.iter().enumerate() {
            let prompt = if job.plain { job.prompt.clone() } else { json(&job.prompt) };
            let mut fields = vec![format!("prompt: {prompt}")];
            if let Some(tail) = &job.name {
                fields.push(format!("name: j{index}{tail}"));
            }
            if let Some(model) = job.model {
                fields.push(format!("model: {model}"));
            }
            if !job.params.is_empty() {
                fields.push(format!("params: {}", render_map(&job.params)));
            }
            if job.count > 1 || index % 2 == 0 {
                fields.push(format!("count: {}", job.count));
            }
            if self.flow {
                let _ = writeln!(text, "  - {{{}}}", fields.join(", "));
            } else {
                let _ = writeln!(text, "  - {}", fields.join("\n    "));
            }
        }
        text
    }
}

/// What every accepted file must hold, generated or mutated.
fn check_accepted(file: &JobFile) -> Result<(), TestCaseError> {
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    prop_assert!(!file.jobs.is_empty());
    for job in &file.jobs {
        prop_assert!(check_name(&job.name).is_ok(), "invalid name {:?}", job.name);
        prop_assert!(names.insert(job.name.to_ascii_lowercase()), "name {:?} twice", job.name);
        prop_assert!(keys.insert(job.key.clone()), "key of {:?} twice", job.name);
        let body = job.body_map();
        // A prompt may be left out (the schema check decides), but one sent is never blank.
        if let Some(prompt) = body.get("prompt") {
            let text = prompt.as_str().unwrap_or_default();
            prop_assert!(!text.trim().is_empty(), "job {:?} has a blank prompt", job.name);
        }
        prop_assert!(parse_model_path(&job.model).is_ok(), "model {:?}", job.model);
    }
    Ok(())
}

/// What every refusal must hold: one line, starting with the file, a sane place.
fn check_refused(error: &JobFileError, text: &[u8]) -> Result<(), TestCaseError> {
    let shown = error.to_string();
    prop_assert!(shown.starts_with("jobs.yaml:"), "no file in {shown:?}");
    prop_assert!(!shown.contains(['\n', '\r']), "not one line: {shown:?}");
    prop_assert!(!error.message.is_empty());
    prop_assert!(!shown.contains(" at line "), "serde_yaml's position left in: {shown}");
    // Lines as libyaml counts them: a lone `\r`, NEL, LS and PS break lines too.
    let text = String::from_utf8_lossy(text);
    let lines = 1 + text
        .char_indices()
        .filter(|(at, c)| match c {
            '\r' => !text[at + 1..].starts_with('\n'),
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => true,
            _ => false,
        })
        .count();
    if let Some(line) = error.line {
        prop_assert!((1..=lines + 1).contains(&line), "line {line} of {lines}: {shown}");
        prop_assert!(error.column.is_none_or(|column| column >= 1), "{shown}");
    }
    Ok(())
}

/// One change to a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    Tab(usize),
    DuplicateLine(usize),
    DropLine(usize),
    Insert(usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        at.prop_map(Mutation::Truncate),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::Flip(at, byte)),
        at.prop_map(Mutation::Tab),
        at.prop_map(Mutation::DuplicateLine),
        at.prop_map(Mutation::DropLine),
        (
            at,
            prop::sample::select(vec![
                "[", "]", "{", "}", ": ", "- ", "\n", "\n  ", "&a ", "*a", "!t ", "'", "\"", "#",
                "---\n", "\u{feff}", "\r", "|\n", "? ", "<<: ", "~", "0x1F", "1e999",
            ])
        )
            .prop_map(|(at, text)| Mutation::Insert(at, text)),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len().max(1);
    let line_bounds = |bytes: &[u8], nth: usize| {
        let starts: Vec<usize> = std::iter::once(0)
            .chain(bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1))
            .filter(|start| *start < bytes.len())
            .collect();
        let start = *starts.get(nth % starts.len().max(1)).unwrap_or(&0);
        let end = bytes[start..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |at| start + at + 1);
        (start, end)
    };
    match mutation {
        Mutation::Truncate(at) => bytes.truncate(at % len),
        Mutation::Flip(at, byte) => {
            if let Some(slot) = bytes.get_mut(at % len) {
                *slot = *byte;
            }
        }
        Mutation::Tab(at) => bytes.insert((at % len).min(bytes.len()), b'\t'),
        Mutation::DuplicateLine(nth) => {
            let (start, end) = line_bounds(bytes, *nth);
            let line = bytes[start..end].to_vec();
            bytes.splice(end..end, line);
        }
        Mutation::DropLine(nth) => {
            let (start, end) = line_bounds(bytes, *nth);
            bytes.drain(start..end);
        }
        Mutation::Insert(at, text) => {
            let at = (at % len).min(bytes.len());
            bytes.splice(at..at, text.bytes());
        }
    }
}

proptest! {
    // 300 cases of each take about two seconds in a debug build; PROPTEST_CASES asks for more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(300),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_files_parse_into_the_expected_jobs(generated in file()) {
        let text = generated.render();
        let parsed = parse(text.as_bytes(), Path::new("jobs.yaml"));
        let file = match parsed {
            Ok(file) => file,
            Err(error) => return Err(TestCaseError::fail(format!("refused: {error}\n{text}"))),
        };
        check_accepted(&file)?;
        let expected: u32 = generated.jobs.iter().map(|job| job.count).sum();
        prop_assert_eq!(file.jobs.len(), expected as usize, "{}", text);
        // Each entry's copies, in order, carry its prompt, model and fields.
        let mut jobs = file.jobs.iter();
        for (index, entry) in generated.jobs.iter().enumerate() {
            let base = match &entry.name {
                Some(tail) => format!("j{index}{tail}"),
                None => derive_name(index + 1, &entry.prompt),
            };
            for copy in 1..=entry.count {
                let job = jobs.next().expect("counted above");
                let name = if entry.count > 1 { format!("{base}-{copy}") } else { base.clone() };
                prop_assert_eq!(&job.name, &name);
                let body = job.body_map();
                prop_assert_eq!(body.get("prompt").and_then(Value::as_str), Some(entry.prompt.as_str()));
                let model = entry.model.or(generated.model).expect("every job has a model");
                prop_assert_eq!(&job.model, &parse_model_path(model).expect("valid"));
                for (key, value) in &entry.params {
                    // Read back through JSON text as the body is: serde_json's float parser
                    // is not exact, so the value itself can differ in the last digit.
                    let expected: Value = serde_json::from_str(&json(value)).expect("JSON");
                    prop_assert_eq!(body.get(key), Some(&expected), "{} in {}", key, job.body);
                }
            }
        }
    }

    #[test]
    fn mutated_files_never_panic_and_errors_name_the_place(
        generated in file(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = generated.render().into_bytes();
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        match parse(&bytes, Path::new("jobs.yaml")) {
            Ok(file) => check_accepted(&file)?,
            Err(error) => check_refused(&error, &bytes)?,
        }
    }
}

/// A generated sweep: variables (distinct names, not used in the prompt except `animal`) with
/// lists of distinct scalar values, and a count.
fn sweep() -> impl Strategy<Value = (Vec<(String, Vec<Value>)>, u32)> {
    let values = prop_oneof![
        prop::collection::btree_set(-50_i64..50, 1..4)
            .prop_map(|set| set.into_iter().map(Value::from).collect::<Vec<_>>()),
        prop::collection::btree_set("[a-z][a-z0-9]{0,6}", 1..4)
            .prop_map(|set| set.into_iter().map(Value::from).collect::<Vec<_>>()),
    ];
    (prop::collection::btree_map("v_[a-z]{1,5}", values, 1..4), 1_u32..=3)
        .prop_map(|(map, count)| (map.into_iter().collect(), count))
}

fn render_sweep(variables: &[(String, Vec<Value>)], count: u32) -> String {
    let mut text = String::from(
        "model: image/bfl/flux-1-dev\njobs:\n  - prompt: a {animal} at dawn\n    name: s\n",
    );
    let _ = writeln!(text, "    count: {count}\n    matrix:\n      animal: [fox, owl]");
    for (variable, values) in variables {
        let _ = writeln!(text, "      {variable}: {}", json(values));
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(100),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A matrix makes the cross product, names and keys are unique, every combination's values
    /// are its request fields, and adding a value keeps the key of every job already there.
    #[test]
    fn sweeps_expand_into_unique_stable_jobs((variables, count) in sweep(), extra in 50_i64..60) {
        let text = render_sweep(&variables, count);
        let file = parse(text.as_bytes(), Path::new("jobs.yaml"))
            .map_err(|error| TestCaseError::fail(format!("refused: {error}\n{text}")))?;
        check_accepted(&file)?;
        let product: usize = variables.iter().map(|(_, values)| values.len()).product();
        prop_assert_eq!(file.jobs.len(), 2 * product * count as usize, "{}", text);
        let names: HashSet<String> =
            file.jobs.iter().map(|job| job.name.to_ascii_lowercase()).collect();
        prop_assert_eq!(names.len(), file.jobs.len(), "names unique");
        let keys: HashSet<&JobKey> = file.jobs.iter().map(|job| &job.key).collect();
        prop_assert_eq!(keys.len(), file.jobs.len(), "keys unique");
        for job in &file.jobs {
            let body = job.body_map();
            for (variable, values) in &variables {
                prop_assert!(body.get(variable).is_some_and(|value| values.contains(value)));
            }
        }
        // Grow the first list by a value no list holds.
        let mut grown = variables.clone();
        grown[0].1.push(Value::from(extra));
        let text = render_sweep(&grown, count);
        let bigger = parse(text.as_bytes(), Path::new("jobs.yaml"))
            .map_err(|error| TestCaseError::fail(format!("refused: {error}\n{text}")))?;
        let grown_keys: HashSet<&JobKey> = bigger.jobs.iter().map(|job| &job.key).collect();
        prop_assert!(keys.is_subset(&grown_keys), "every earlier job keeps its key");
        let per_value = file.jobs.len() / variables[0].1.len();
        prop_assert_eq!(bigger.jobs.len(), file.jobs.len() + per_value, "one value's worth added");
    }
}
