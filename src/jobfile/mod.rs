//! The job file: the YAML a user writes, read and validated into the list of jobs to run; a
//! JSON pipeline file of Krea's `pipeline.py` (top-level `steps`) is translated into one first
//! (`pipeline.rs`).
//!
//! A job file names defaults (model, request fields, output directory, API address, limits,
//! prices, budget) and a list of jobs, each a prompt (left out for models that take none: the
//! schema check in `openapi.rs` decides) with optional name, model, fields and count, or a
//! sweep (`matrix:`, `from:` a CSV or JSON Lines file, or a folder of images, `folder.rs`);
//! `jobs.example.yaml` at the top of the repository documents every key. [`parse`] turns the
//! text into a [`JobFile`]: one [`JobSpec`] per generation, with its full request body and its
//! stable [`JobKey`].
//! Everything that can be wrong is refused here, before anything is sent, with the file, line,
//! column and key of the offending node ([`JobFileError`]), or the line of the data file.
//!
//! What it leaves to others: the file is read once by [`load`], and the only other I/O here is
//! reading the files beside the job file that `from:` names (data, or a folder of images) and
//! that URL fields name (local inputs, checked and hashed in `inputs.rs`; `uploads.rs` uploads
//! them); the request body is passed
//! through as written (Krea validates it, per model; `schema.rs` checks it first); prices and
//! the budget are only read, `pricing` and the runner apply them; the runner decides what to
//! send and when, the store what was already sent. `api:`, `limits:` and `budget:` are reused
//! by the daemon configuration.
//!
//! How it is built: `nesting` first refuses flow nesting deeper than `serde_yaml` accepts
//! (libyaml would take quadratic time over it); `de` then deserializes the document by hand,
//! checking each node as it is read (so `serde_yaml` gives the node's position), within a budget
//! that stops alias bombs; this file then checks the rules spanning several nodes (unique
//! names, a model per job, limits that contradict each other), has `sweep` expand matrices and
//! data files, and finds positions with `locate`.
//!
//! Outside tests, `serde_yaml` is called only in this folder, with its workarounds. The
//! crate's other YAML files, the daemon's configuration (`daemon/config.rs`) and the
//! simulation's (`main.rs`, `--simulate-config`), are read through [`yaml::parse_document`],
//! which names the file, line and column of an error. Two test-side uses remain, with no
//! workaround: the simulation's own unit tests read its default configuration (`sim/config.rs`;
//! the simulation imports nothing from the rest of the crate), and the benchmark writes a
//! configuration for the simulation it starts (`benches/bench/harness.rs`). Replacing
//! `serde_yaml` means this folder and those two.

mod de;
mod folder;
mod inputs;
mod locate;
mod nesting;
mod pipeline;
mod settings;
pub(crate) mod sweep;
mod values;
pub(crate) mod yaml;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use folder::{FolderUse, Skipped};
pub(crate) use inputs::{
    LocalFile, MAX_INPUT_BYTES, PLACEHOLDER_PREFIX, placeholder, placeholders,
};
#[doc(hidden)]
pub use nesting::flow_depth;
pub(crate) use settings::duration as deserialize_duration;
pub(crate) use settings::{ApiSettings, Budget, Limits, NoCap};
#[cfg(test)]
use values::{parse_model_path, parse_size};

use crate::job::{JobKey, canonical_json, check_name, derive_name};
use de::{RawFile, RawJob};
use locate::{LineIndex, Seg, Target, locate, render_path};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Component, Path, PathBuf};
use sweep::{DataRows, Instance, Matrix, Refusal};
use values::default_input_field;

/// The largest job file [`load`] reads: 8 MiB, room for about 150,000 one-line jobs (a
/// 100,000-job file is about 5 MB). Reading takes memory in proportion: `serde_yaml` holds
/// every event of the document at once, up to about 80 bytes for each byte of the densest YAML
/// (a file of nothing but `[1,1,1,…]` took 680 MB at 8 MiB, 2.7 GB at 32 MiB), so this limit is
/// what keeps any job file within the memory budget in README ("Memory").
pub(crate) const MAX_FILE_SIZE: u64 = 8 << 20;

/// The most jobs one file may expand to (entries times their `count`, sweeps and data rows
/// included): each job costs about a kilobyte while it is read, imported and run.
pub const MAX_JOBS: usize = 100_000;

/// The largest data file (`from:`) read. Its rows are not held, only its text.
pub(crate) const MAX_DATA_SIZE: u64 = 32 << 20;

/// Request fields as written under `params:`.
type Params = Map<String, Value>;

/// A validated job file.
#[derive(Clone, Debug, PartialEq)]
pub struct JobFile {
    /// The file it was read from, as given.
    pub source: PathBuf,
    /// Where results go: `output:` (default `./out`) resolved against the file's directory.
    pub output_dir: PathBuf,
    /// The `api:` section.
    pub api: ApiSettings,
    /// The `limits:` section, checked.
    pub limits: Limits,
    /// USD per generation by full model path, overriding the built-in price table.
    pub prices: BTreeMap<String, f64>,
    /// The `budget:` section: caps on the estimated spend, at least one set.
    pub budget: Option<Budget>,
    /// `reuse:` (default true): a job whose model and request body match one that the state
    /// already completed for another job file takes that result instead of being paid again;
    /// `false` asks for new generations.
    pub reuse: bool,
    /// One entry per generation, in file order (`count` copies next to each other).
    pub jobs: Vec<JobSpec>,
    /// The top-level `params:`, the request fields every job starts from: a mistake in one
    /// is reported at its own line ([`params_line`]), not at each job's.
    pub params: Map<String, Value>,
    /// The local files the jobs take as inputs, once per content (by SHA-256), checked; in the
    /// bodies each stands as its [`placeholder`] until `uploads.rs` puts its URL there.
    pub local_files: Vec<LocalFile>,
    /// Which of `output:`, `api:` and `limits:` the file writes, in file order: settings of a
    /// run, which the service ignores (its configuration governs), and says so.
    pub run_settings: Vec<&'static str>,
    /// The folders of images entries take their jobs from (`from: photos/`), in file order.
    pub folders: Vec<FolderUse>,
}

/// One generation to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    /// Unique in the file (also ignoring ASCII case): the explicit `name`, or one derived from
    /// the position and prompt; `-1`, `-2`, … appended when `count` > 1.
    pub name: String,
    /// Full model path, e.g. `image/bfl/flux-1-dev`.
    pub model: String,
    /// The full request body as canonical JSON text ([`crate::job::canonical_json`]), `prompt`
    /// included: the default `params`, the job's `params` merged over them key by key. Text,
    /// not a map: a one-key map costs ten times the memory, and a file may hold 100,000 jobs.
    pub body: String,
    /// How many earlier jobs in the file have the same model and body.
    pub occurrence: u32,
    /// `JobKey::new(&model, &body, occurrence)`: the same job keeps its key when the file is
    /// edited around it, renamed or reordered.
    pub key: JobKey,
    /// Line (from 1) of the job's entry in the file.
    pub line: usize,
    /// The job's chain (`then:`) as the state file keeps it ([`crate::chain::Chain`]), when
    /// the entry has stages; the job's name then ends in `/0-<model short name>`.
    pub chain: Option<String>,
}

impl JobSpec {
    /// The request body as a map (for prices and checks).
    #[must_use]
    pub fn body_map(&self) -> Map<String, Value> {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

/// Why a job file was refused: where, which key, what is wrong and what to do.
///
/// Shown as `jobs.yaml:12:5: jobs[3].prompt: the prompt is empty; write the text to generate`.
/// Job indices in key paths count from 0, as in `serde_yaml`'s messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_error(.file, *.line, *.column, .key.as_deref(), .message))]
pub struct JobFileError {
    /// The job file.
    pub file: PathBuf,
    /// Line (from 1) of the offending node, when known.
    pub line: Option<usize>,
    /// Column (from 1, in characters) of the offending node, when known.
    pub column: Option<usize>,
    /// Path of the offending key, e.g. `jobs[3].prompt`.
    pub key: Option<String>,
    /// What is wrong and what to do about it.
    pub message: String,
}

fn render_error(
    file: &Path,
    line: Option<usize>,
    column: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut out = file.display().to_string();
    if let Some(line) = line {
        let _ = write!(out, ":{line}");
        if let Some(column) = column {
            let _ = write!(out, ":{column}");
        }
    }
    out.push_str(": ");
    if let Some(key) = key {
        let _ = write!(out, "{key}: ");
    }
    out.push_str(message);
    out
}

impl JobFileError {
    /// An error about the whole file (no position).
    fn whole_file(file: &Path, message: String) -> Self {
        Self { file: file.to_owned(), line: None, column: None, key: None, message }
    }
}

/// Reads and parses the job file at `path` (at most 8 MiB, `MAX_FILE_SIZE`).
pub fn load(path: &Path) -> Result<JobFile, JobFileError> {
    let cannot_read = |error: std::io::Error| {
        JobFileError::whole_file(path, format!("cannot read the job file: {error}"))
    };
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    // The size up front spares reading a file that is too large; the limit on the read (which
    // `parse` refuses past) covers what has no size, such as a pipe, or grows meanwhile.
    if file.metadata().is_ok_and(|meta| meta.is_file() && meta.len() > MAX_FILE_SIZE) {
        return Err(too_large(path));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes).map_err(cannot_read)?;
    parse(&bytes, path)
}

/// The line (from 1) of `field` under the top-level `params:` of the job file at `path`, read
/// again: only asked when that field is wrong, so loading a file does not pay for it.
#[must_use]
pub(crate) fn params_line(path: &Path, field: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let at = [Seg::key("params"), Seg::key(field)];
    locate(&text, 0, &at, Target::Key { nth: 0 }).map(|(line, _)| line)
}

/// The error for a file larger than [`MAX_FILE_SIZE`].
fn too_large(path: &Path) -> JobFileError {
    JobFileError::whole_file(
        path,
        format!(
            "the job file is larger than {} MiB, the most krea-batch reads; split it into \
             several files",
            MAX_FILE_SIZE >> 20
        ),
    )
}

/// The output directory a job file names, without validating the rest: for commands that only
/// need to find the state (`status`), so they stay quick on a file of 100,000 jobs. Reads the
/// top-level `output:` line; anything unusual (a flow mapping at the top level, a quoted or
/// complex key, a value it cannot read) falls back to [`load`].
pub fn output_dir_of(path: &Path) -> Result<PathBuf, JobFileError> {
    let cannot_read = |error: std::io::Error| {
        JobFileError::whole_file(path, format!("cannot read the job file: {error}"))
    };
    let bytes = std::fs::read(path).map_err(cannot_read)?;
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return load(path).map(|file| file.output_dir);
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut found = None;
    for line in text.lines() {
        let unusual = line.starts_with('{')
            || line.starts_with("? ")
            || line.starts_with("\"output")
            || line.starts_with("'output");
        if unusual {
            return load(path).map(|file| file.output_dir);
        }
        if let Some(value) = line.strip_prefix("output:") {
            match serde_yaml::from_str::<Option<String>>(value.trim()) {
                Ok(value) if found.is_none() => found = Some(value),
                _ => return load(path).map(|file| file.output_dir),
            }
        }
    }
    Ok(output_dir(path, found.flatten().as_deref().unwrap_or("./out")))
}

/// Parses job-file text read from `source` (used for messages, to resolve `output`, and to
/// find the data files of `from:` entries, the only I/O here). Text longer than 8 MiB (`MAX_FILE_SIZE`) is refused, as [`load`] refuses the file:
/// the daemon reads its inbox files up to one byte past the limit and hands them here.
pub fn parse(text_bytes: &[u8], source: &Path) -> Result<JobFile, JobFileError> {
    if text_bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large(source));
    }
    let text = decode(text_bytes, source)?;
    if let Err(offset) = nesting::scan(text, nesting::MAX_FLOW_DEPTH) {
        let (line, column) = LineIndex::new(text).position(offset);
        return Err(JobFileError {
            line: Some(line),
            column: Some(column),
            ..JobFileError::whole_file(
                source,
                format!(
                    "the YAML is nested too deeply (more than {} levels of `[` and `{{`)",
                    nesting::MAX_FLOW_DEPTH
                ),
            )
        });
    }
    if let Some(pipeline) = pipeline_document(text, source)? {
        return parse_pipeline(&pipeline, text, source);
    }
    let ctx = de::Ctx::new(text, read_budget(text));
    let raw = match de::read(&ctx) {
        Ok(raw) => raw,
        Err(error) => {
            let (failure, path) = ctx.into_parts();
            return Err(locate::convert(&error, failure, &path, text, source));
        }
    };
    let fallbacks_left = (LOCATE_BUDGET / text.len().max(1)).min(64);
    Assembly { text, source, lines: LineIndex::new(text), fallbacks_left }.build(raw)
}

/// The document of a Krea pipeline file (`pipeline.rs`), `None` for a job file: a JSON object
/// with a top-level `steps`. Pipeline files are JSON, as Krea's script reads them: a YAML file
/// with a top-level `steps:` is refused with what to write (YAML read into a plain value would
/// get none of the job file's limits on aliases). Text that is not JSON is left to the
/// job-file reader, whose errors say where.
fn pipeline_document(text: &str, source: &Path) -> Result<Option<Value>, JobFileError> {
    if text.trim_start().starts_with('{') {
        let document = serde_json::from_str::<Value>(text).ok();
        return Ok(document.filter(pipeline::is_pipeline));
    }
    match text.lines().position(|line| line.starts_with("steps:")) {
        Some(index) => Err(JobFileError {
            line: Some(index + 1),
            column: Some(1),
            key: Some("steps".into()),
            ..JobFileError::whole_file(
                source,
                "Krea's pipeline files are read as JSON, as its pipeline.py reads them; write \
                 this file as JSON ({\"steps\": [...]}), or as a job file with `jobs:` and \
                 `then:` stages"
                    .into(),
            )
        }),
        None => Ok(None),
    }
}

/// Reads a Krea pipeline file, `text` read from `source`, through its translation into a job
/// file: errors and job lines lead back to the pipeline's steps.
fn parse_pipeline(document: &Value, text: &str, source: &Path) -> Result<JobFile, JobFileError> {
    let lines = LineIndex::new(text);
    let step_lines: Vec<usize> =
        pipeline::step_offsets(text).into_iter().map(|at| lines.position(at).0).collect();
    let step_line = |number: usize| step_lines.get(number - 1).copied();
    let translation = pipeline::translate(document).map_err(|error| JobFileError {
        line: error.step.as_ref().and_then(|step| step_line(step.number)),
        key: error.step.as_ref().map(ToString::to_string),
        ..JobFileError::whole_file(source, error.message)
    })?;
    let first = translation.first_job_line();
    let origin = |line: usize| {
        let job = line.checked_sub(first)?;
        translation.origins.get(job)
    };
    let translated = translation.text();
    if translated.len() as u64 > MAX_FILE_SIZE {
        return Err(JobFileError::whole_file(
            source,
            format!(
                "this pipeline makes {} jobs, a job file larger than {} MiB, the most \
                 krea-batch reads; split its sources into several pipeline files",
                translation.origins.len(),
                MAX_FILE_SIZE >> 20
            ),
        ));
    }
    match parse(translated.as_bytes(), source) {
        Ok(mut file) => {
            for job in &mut file.jobs {
                let step = origin(job.line).and_then(|steps| steps.first());
                job.line = step.and_then(|step| step_line(step.number)).unwrap_or(1);
            }
            Ok(file)
        }
        Err(error) => {
            let steps = error.line.and_then(origin);
            let (step, rest) = match (steps, error.key.as_deref()) {
                (Some(steps), Some(key)) => pipeline::stage_of_key(steps, key),
                (Some(steps), None) => (steps.first(), String::new()),
                (None, key) => (None, key.unwrap_or_default().to_owned()),
            };
            let key = match step {
                Some(step) if rest.is_empty() => Some(step.to_string()),
                Some(step) => Some(format!("{step} {rest}")),
                None => (!rest.is_empty()).then_some(rest),
            };
            Err(JobFileError {
                line: step.and_then(|step| step_line(step.number)),
                column: None,
                key,
                ..error
            })
        }
    }
}

/// How much text (in bytes) the locator may read again to find the lines of entries whose
/// offset is unknown: each search parses the whole file once more, so a large file gets few.
const LOCATE_BUDGET: usize = 16 << 20;

/// How much data (in `de`'s weight units, about bytes) reading `text` may build. A file
/// written out in full stays under 8 units per byte; the rest leaves room for YAML aliases
/// shared by many jobs, but not for an alias bomb.
fn read_budget(text: &str) -> usize {
    (4 << 20) + 8 * text.len()
}

/// How much request data the jobs of `text` may expand to through `count`.
fn expansion_budget(text: &str) -> usize {
    (64 << 20) + 8 * text.len()
}

/// The text of the file: UTF-8, a leading byte-order mark skipped.
fn decode<'b>(bytes: &'b [u8], source: &Path) -> Result<&'b str, JobFileError> {
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(JobFileError {
            line: Some(1),
            column: Some(1),
            ..JobFileError::whole_file(source, "the file is UTF-16; save it as UTF-8".into())
        });
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|error| {
        let valid = std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default();
        let (line, column) = LineIndex::new(valid).position(valid.len());
        let bad = bytes.get(error.valid_up_to()).copied().unwrap_or_default();
        JobFileError {
            line: Some(line),
            column: Some(column),
            ..JobFileError::whole_file(
                source,
                format!("the file is not valid UTF-8 (byte 0x{bad:02X} here); save it as UTF-8"),
            )
        }
    })
}

/// The checks spanning several nodes, and the expansion of entries into jobs.
struct Assembly<'t> {
    text: &'t str,
    source: &'t Path,
    lines: LineIndex<'t>,
    /// Entries whose line is found by the (slow) locator rather than from an offset; past
    /// this many the previous entry's line is used, so that no file makes parsing quadratic.
    fallbacks_left: usize,
}

/// Which node of an entry a name comes from, to point at it in errors.
#[derive(Clone, Copy)]
enum NameSource {
    /// The entry's `name:`.
    Explicit,
    /// Derived from the position and prompt.
    Derived,
    /// Made by a sweep (`matrix:` or `from:`).
    Swept,
}

/// An entry's checked `matrix:` and read `from:` rows (boxed where kept per entry: most
/// entries have none, and a file may hold 100,000 of them).
type Sweep = Box<(Option<Matrix>, Option<DataRows>)>;

impl Assembly<'_> {
    /// The `limits:` and `budget:` rules spanning several keys.
    fn check_settings(&self, raw: &RawFile) -> Result<(), JobFileError> {
        if let Err((field, message)) = raw.limits.check() {
            let path = [Seg::key("limits"), Seg::key(field)];
            let at = if self.find(&path, Target::Node).is_some() { &path[..] } else { &path[..1] };
            return Err(self.error(at, message));
        }
        // A first delay left at its default is capped by the schedule; only one the user wrote
        // above the cap is a contradiction worth refusing.
        if let Some((field, message)) = raw.limits.first_poll_above_cap() {
            let path = [Seg::key("limits"), Seg::key(field)];
            if self.find(&path, Target::Node).is_some() {
                return Err(self.error(&path, message));
            }
        }
        if let Some(Err(message)) = raw.budget.map(|budget| budget.check()) {
            return Err(self.error(&[Seg::key("budget")], message.to_string()));
        }
        Ok(())
    }

    fn build(mut self, raw: RawFile) -> Result<JobFile, JobFileError> {
        self.check_settings(&raw)?;
        let mut jobs = Vec::new();
        // Names taken so far (lowercased: names become file names, and two names differing
        // only in case are one file on macOS and Windows), with the entry that took them.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut entry_lines = Vec::with_capacity(raw.jobs.len());
        let mut occurrences: HashMap<JobKey, u32> = HashMap::new();
        let (sweeps, stages) = (self.read_sweeps(&raw)?, self.read_stages(&raw)?);
        let mut local = inputs::Resolver::default();
        self.check_expansion(&raw, &sweeps)?;
        for ((index, job), sweep) in raw.jobs.iter().enumerate().zip(&sweeps) {
            let line = self.entry_line(index, job, entry_lines.last().copied());
            entry_lines.push(line);
            let source = match (sweep, &job.name) {
                (Some(_), _) => NameSource::Swept,
                (None, Some(_)) => NameSource::Explicit,
                (None, None) => NameSource::Derived,
            };
            let mut add = |instance: Instance<'_>| -> Result<(), JobFileError> {
                let Some(model) =
                    instance.model.as_ref().or(job.model.as_ref()).or(raw.model.as_ref())
                else {
                    return Err(self.error(
                        &[Seg::key("jobs"), Seg::Index(index), Seg::key("model")],
                        "this job has no model; set `model:` in the job or at the top of the \
                         file, e.g. `model: image/bfl/flux-1-dev`"
                            .into(),
                    ));
                };
                let image = enhanced_image(sweep.as_ref(), model, &instance.fields);
                let mut body = if instance.fields.is_empty() {
                    merge_body(&raw.params, &job.params, &instance.prompt)
                } else {
                    let mut own = job.params.clone();
                    own.extend(instance.fields);
                    merge_body(&raw.params, &own, &instance.prompt)
                };
                if let Err(refused) = local.localize(&mut body, self.source) {
                    return Err(self.input_error(index, refused));
                }
                set_size(&mut body, image.and_then(|image| local.size_of(&image)));
                let body = canonical_json(&body);
                let first_key = JobKey::from_canonical(model, &body, 0);
                for copy in 1..=job.count {
                    let base = &instance.name;
                    let name = if job.count > 1 { format!("{base}-{copy}") } else { base.clone() };
                    self.claim_name(&mut names, &name, index, source, job.count > 1, &entry_lines)?;
                    let occurrence = occurrences.entry(first_key.clone()).or_insert(0);
                    let key = match *occurrence {
                        0 => first_key.clone(),
                        later => JobKey::from_canonical(model, &body, later),
                    };
                    let (name, chain) = chained(name, model, stages[index].as_deref());
                    jobs.push(JobSpec {
                        name,
                        model: model.clone(),
                        body: body.clone(),
                        occurrence: *occurrence,
                        key,
                        line,
                        chain,
                    });
                    *occurrence += 1;
                }
                Ok(())
            };
            match sweep {
                None => add(Instance {
                    prompt: Cow::Borrowed(&job.prompt),
                    name: job.name.clone().unwrap_or_else(|| derive_name(index + 1, &job.prompt)),
                    model: None,
                    fields: Params::new(),
                })?,
                Some(sweep) => {
                    let (matrix, rows) = &**sweep;
                    let mut emit = |instance| add(instance).map_err(Refusal::Data);
                    let expanded = sweep::expand(
                        index,
                        &job.prompt,
                        job.name.as_deref(),
                        matrix.as_ref(),
                        rows.as_ref(),
                        &mut emit,
                    );
                    expanded.map_err(|refusal| self.refused(refusal))?;
                }
            }
        }
        Ok(JobFile {
            local_files: local.distinct_files(),
            folders: self.folder_uses(&raw, &sweeps),
            source: self.source.to_owned(),
            output_dir: output_dir(self.source, raw.output.as_deref().unwrap_or("./out")),
            api: raw.api,
            limits: raw.limits,
            prices: raw.prices,
            budget: raw.budget,
            reuse: raw.reuse.unwrap_or(true),
            jobs,
            params: raw.params,
            run_settings: raw.run_settings,
        })
    }

    /// The matrix and data rows of each entry that has them, checked and read.
    fn read_sweeps(&self, raw: &RawFile) -> Result<Vec<Option<Sweep>>, JobFileError> {
        let mut sweeps = Vec::with_capacity(raw.jobs.len());
        for (index, job) in raw.jobs.iter().enumerate() {
            let Some(written) = &job.sweep else {
                sweeps.push(None);
                continue;
            };
            let matrix = match &written.matrix {
                Some(written) => {
                    Some(Matrix::check(index, written).map_err(|refusal| self.refused(refusal))?)
                }
                None => None,
            };
            let rows = match &written.from {
                Some(written) if sweep::is_folder(written) => {
                    // The model's input field takes each image; a file with no model at all
                    // is refused when its jobs are made, with its own message.
                    let model = job.model.as_deref().or(raw.model.as_deref()).unwrap_or_default();
                    let field = default_input_field(model);
                    Some(
                        sweep::read_folder(self.source, index, written, field)
                            .map_err(|refusal| self.refused(refusal))?,
                    )
                }
                Some(written) => Some(
                    sweep::read_rows(self.source, index, written)
                        .map_err(|refusal| self.refused(refusal))?,
                ),
                None => None,
            };
            sweeps.push(Some(Box::new((matrix, rows))));
        }
        Ok(sweeps)
    }

    /// The stages (`then:`) of each entry that has them, each body merged and its input field
    /// chosen and checked.
    fn read_stages(
        &self,
        raw: &RawFile,
    ) -> Result<Vec<Option<Vec<crate::chain::Stage>>>, JobFileError> {
        let mut all = Vec::with_capacity(raw.jobs.len());
        for (index, job) in raw.jobs.iter().enumerate() {
            if job.then.is_empty() {
                all.push(None);
                continue;
            }
            let mut stages = Vec::with_capacity(job.then.len());
            for (number, stage) in job.then.iter().enumerate() {
                let at = |key: &str| {
                    vec![
                        Seg::key("jobs"),
                        Seg::Index(index),
                        Seg::key("then"),
                        Seg::Index(number),
                        Seg::key(key),
                    ]
                };
                let input = stage
                    .input
                    .clone()
                    .unwrap_or_else(|| crate::chain::default_input(&stage.model).to_owned());
                if stage.params.contains_key(&input) {
                    let mut path = at("params");
                    path.push(Seg::key(&input));
                    return Err(self.error(
                        &path,
                        format!(
                            "`{input}` is where this stage receives the previous stage's \
                             result; remove it from the stage's params, or name another field \
                             with `input:`"
                        ),
                    ));
                }
                // A stage's body is its own: the file's top-level `params:` belong to the
                // jobs' own model, not to the enhancer or video model after it.
                let mut body = Map::new();
                for (key, value) in &stage.params {
                    if !value.is_null() {
                        body.insert(key.clone(), value.clone());
                    }
                }
                if let Some(prompt) = &stage.prompt {
                    body.insert("prompt".into(), Value::String(prompt.clone()));
                }
                stages.push(crate::chain::Stage {
                    model: stage.model.clone(),
                    body,
                    input,
                    price_usd: None,
                });
            }
            all.push(Some(stages));
        }
        Ok(all)
    }

    /// The folders of images of the entries, with the line of each `from:`.
    fn folder_uses(&self, raw: &RawFile, sweeps: &[Option<Sweep>]) -> Vec<FolderUse> {
        let mut uses = Vec::new();
        for ((index, job), sweep) in raw.jobs.iter().enumerate().zip(sweeps) {
            let Some(rows) = sweep.as_ref().and_then(|sweep| sweep.1.as_ref()) else { continue };
            let Some(skipped) = rows.skipped() else { continue };
            let at = [Seg::key("jobs"), Seg::Index(index), Seg::key("from")];
            let line = self.find(&at, Target::Node).map_or(0, |(line, _)| line);
            let folder =
                job.sweep.as_ref().and_then(|sweep| sweep.from.clone()).unwrap_or_default();
            uses.push(FolderUse { line, folder, images: rows.len(), skipped });
        }
        uses
    }

    /// A local input of entry `index` that cannot be used, at the field that names it: the
    /// job's own `params`, else the defaults', else the entry's `from:`, else the entry.
    fn input_error(&self, index: usize, refused: inputs::Refused) -> JobFileError {
        let own: Vec<Seg> = [Seg::key("jobs"), Seg::Index(index), Seg::key("params")]
            .into_iter()
            .chain(refused.field.iter().cloned())
            .collect();
        let defaults: Vec<Seg> =
            std::iter::once(Seg::key("params")).chain(refused.field.iter().cloned()).collect();
        // Else the value came from the entry's data file or folder of images.
        let from = vec![Seg::key("jobs"), Seg::Index(index), Seg::key("from")];
        let at = if self.find(&own, Target::Node).is_some() {
            own
        } else if self.find(&defaults, Target::Node).is_some() {
            defaults
        } else if self.find(&from, Target::Node).is_some() {
            from
        } else {
            own
        };
        self.error(&at, refused.message)
    }

    fn refused(&self, refusal: Refusal) -> JobFileError {
        match refusal {
            Refusal::At(path, message) => self.error(&path, message),
            Refusal::Data(error) => error,
        }
    }

    /// Checks, before building anything, that the entries expand to at most [`MAX_JOBS`] jobs
    /// and to no more request data than the expansion budget.
    fn check_expansion(&self, raw: &RawFile, sweeps: &[Option<Sweep>]) -> Result<(), JobFileError> {
        let defaults = params_weight(&raw.params);
        let (mut jobs, mut weight) = (0_usize, 0_usize);
        for ((index, job), sweep) in raw.jobs.iter().enumerate().zip(sweeps) {
            // Rows and combinations multiply the count, and their values add to the bodies: a
            // sweep must not be an alias bomb by other means.
            let (mut swept, mut swept_weight, mut row_text) = (1, 0, 0);
            if let Some(sweep) = sweep {
                let (matrix, rows) = &**sweep;
                let combinations = matrix.as_ref().map_or(1, Matrix::combinations);
                let rows_len = rows.as_ref().map_or(1, DataRows::len);
                swept = combinations.saturating_mul(rows_len);
                // A value can appear once in the fields and once per slot of the prompt.
                let uses = 1 + job.prompt.matches('{').count();
                swept_weight =
                    matrix.as_ref().map_or(0, Matrix::weight_per_combination).saturating_mul(uses);
                // Each row's text goes into one job per combination and copy.
                row_text = rows
                    .as_ref()
                    .map_or(0, DataRows::text_len)
                    .saturating_mul(uses)
                    .saturating_mul(combinations)
                    .saturating_mul(job.count as usize);
            }
            let count = (job.count as usize).saturating_mul(swept);
            // An upper bound of the merged body's weight: defaults and own fields both counted.
            let body = defaults + params_weight(&job.params) + 16 + job.prompt.len() + swept_weight;
            jobs = jobs.saturating_add(count);
            weight = weight.saturating_add(body.saturating_mul(count)).saturating_add(row_text);
            if jobs > MAX_JOBS || weight > expansion_budget(self.text) {
                return Err(self.error(
                    &self.count_path(index, job),
                    format!(
                        "the jobs expand to more than the file may hold ({MAX_JOBS} jobs, or \
                         their request data); lower the count or split the file"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that `name` is valid and not taken, then takes it for entry `index`.
    fn claim_name(
        &self,
        names: &mut HashMap<String, usize>,
        name: &str,
        index: usize,
        source: NameSource,
        counted: bool,
        entry_lines: &[usize],
    ) -> Result<(), JobFileError> {
        let at = match source {
            NameSource::Explicit => vec![Seg::key("jobs"), Seg::Index(index), Seg::key("name")],
            NameSource::Derived | NameSource::Swept => vec![Seg::key("jobs"), Seg::Index(index)],
        };
        let origin = match (source, counted) {
            (NameSource::Explicit, false) => String::new(),
            (NameSource::Explicit, true) => " (made by `count`)".to_owned(),
            (NameSource::Derived, false) => {
                " (derived from the position and prompt, as the job has no `name:`)".to_owned()
            }
            (NameSource::Derived, true) => {
                " (derived from the position and prompt, numbered by `count`)".to_owned()
            }
            (NameSource::Swept, _) => " (made by the sweep; a `name:` template such as \
                                       \"fox-{seed}\" chooses another)"
                .to_owned(),
        };
        if let Err(why) = check_name(name) {
            return Err(self.error(&at, format!("the job name {name:?}{origin} is invalid: {why}")));
        }
        let folded = name.to_ascii_lowercase();
        if let Some(&other) = names.get(&folded)
            && other == index
        {
            return Err(self.error(
                &at,
                format!(
                    "this entry makes two jobs named {name:?}{origin}; job names must be unique, \
                     ignoring case (in a folder, `cat.png` and `cat.jpg` are both `{{file}}` = \
                     cat: rename one)"
                ),
            ));
        }
        if let Some(&other) = names.get(&folded) {
            let line = entry_lines.get(other).copied().unwrap_or_default();
            return Err(self.error(
                &at,
                format!(
                    "the job name {name:?}{origin} is already used by jobs[{other}] (line \
                     {line}); job names must be unique, ignoring case; give one of them \
                     another `name:`"
                ),
            ));
        }
        names.insert(folded, index);
        Ok(())
    }

    /// Where to point when the expansion of entry `index` is too large: its `count` if set.
    fn count_path(&self, index: usize, job: &RawJob) -> Vec<Seg> {
        let count = vec![Seg::key("jobs"), Seg::Index(index), Seg::key("count")];
        if job.count > 1 && self.find(&count, Target::Node).is_some() {
            count
        } else {
            vec![Seg::key("jobs"), Seg::Index(index)]
        }
    }

    /// The line of entry `index`: from the offset of its first key, else from the locator.
    fn entry_line(&mut self, index: usize, job: &RawJob, previous: Option<usize>) -> usize {
        if let Some(offset) = job.offset {
            return self.lines.position(offset).0;
        }
        if self.fallbacks_left > 0 {
            self.fallbacks_left -= 1;
            if let Some((line, _)) = self.find(&[Seg::key("jobs"), Seg::Index(index)], Target::Node)
            {
                return line;
            }
        }
        previous.unwrap_or(1)
    }

    fn find(&self, path: &[Seg], target: Target) -> Option<(usize, usize)> {
        locate(self.text, 0, path, target)
    }

    /// An error about the node at `path`, or where it belongs: a missing key is reported at
    /// the nearest node that exists on its path.
    fn error(&self, path: &[Seg], message: String) -> JobFileError {
        let position = (1..=path.len()).rev().find_map(|len| self.find(&path[..len], Target::Node));
        JobFileError {
            file: self.source.to_owned(),
            line: position.map(|(line, _)| line),
            column: position.map(|(_, column)| column),
            key: render_path(path),
            message,
        }
    }
}

/// A job's name and chain: as written without stages; with them, the name of stage 0
/// (`castle/0-flux-1-dev`) and the chain that the state file keeps with the job.
fn chained(
    name: String,
    model: &str,
    stages: Option<&[crate::chain::Stage]>,
) -> (String, Option<String>) {
    let Some(stages) = stages else { return (name, None) };
    let first = crate::chain::stage_name(&name, 0, model, "");
    let chain = crate::chain::Chain {
        base: name,
        stage: 0,
        suffix: String::new(),
        parent: None,
        parent_result: 0,
        stages: stages.to_vec(),
    };
    (first, Some(chain.to_text()))
}

/// The image (its path, as a local input) that a job of a folder entry enhances: only
/// enhance models get the size of their input (`set_size`); `None` for other entries.
fn enhanced_image(sweep: Option<&Sweep>, model: &str, fields: &Params) -> Option<String> {
    let field = sweep?.1.as_ref()?.input_field()?;
    model.starts_with("enhance/").then(|| fields.get(field)?.as_str().map(str::to_owned))?
}

/// Puts an image's `size` into `body` as `width` and `height`, which enhancers (Topaz) require,
/// unless the body has either already (written in `params`, it wins).
fn set_size(body: &mut Map<String, Value>, size: Option<(u32, u32)>) {
    if let Some((width, height)) = size
        && !body.contains_key("width")
        && !body.contains_key("height")
    {
        body.insert("width".into(), width.into());
        body.insert("height".into(), height.into());
    }
}

/// The request body of a job: the defaults, the job's fields over them key by key (a `null`
/// leaves the field out), then the prompt, when it has one (an empty prompt is none: the body
/// has no `prompt`, for models that take none).
fn merge_body(defaults: &Params, own: &Params, prompt: &str) -> Map<String, Value> {
    let mut body = Map::new();
    for (key, value) in defaults.iter().chain(own) {
        if value.is_null() {
            body.remove(key);
        } else {
            body.insert(key.clone(), value.clone());
        }
    }
    if !prompt.is_empty() {
        body.insert("prompt".into(), Value::String(prompt.to_owned()));
    }
    body
}

/// About the memory request fields take, in the weight units of the read budget.
fn params_weight(body: &Params) -> usize {
    body.iter().map(|(key, value)| key.len() + value_weight(value)).sum()
}

/// About the memory one JSON value takes, in the weight units of the read budget.
fn value_weight(value: &Value) -> usize {
    16 + match value {
        Value::String(text) => text.len(),
        Value::Array(items) => items.iter().map(value_weight).sum(),
        Value::Object(object) => {
            object.iter().map(|(key, value)| key.len() + value_weight(value)).sum()
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// `output` resolved against the directory of `source`, without `.` components.
fn output_dir(source: &Path, output: &str) -> PathBuf {
    let base = source.parent().unwrap_or_else(|| Path::new(""));
    let path: PathBuf =
        base.join(output).components().filter(|part| *part != Component::CurDir).collect();
    if path.as_os_str().is_empty() { PathBuf::from(".") } else { path }
}
