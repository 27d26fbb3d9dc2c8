//! Krea's pipeline files: the JSON that Krea's own `pipeline.py` script (in its `krea-ai/skills`
//! repository) runs, read by translating it into a krea-batch job file, so that a pipeline gets
//! every guarantee of a job file (exactly once, resume, budget, the manifest) with no change to
//! the engine.
//!
//! The format: a top-level `steps` list, run in order, each step an object with an `action`:
//!
//! - `generate_image`: `model` (default `image/google/nano-banana-2`, the script's), `prompt`;
//! - `generate_video`: `model` (default `video/google/veo-3.1-fast`), `prompt`;
//! - `enhance`: `enhancer` (default `topaz-standard-enhance`); its `model` is the enhancer's own
//!   `model` field (`"Standard V2"`), sent as such; its input is `image_url`; `width` and
//!   `height` (the result's size) are required, as the script requires them, except where the
//!   step takes the previous result, whose size the engine reads from the downloaded file;
//! - `fan_out`: runs its `step` once for each of `sources` (a list of URLs or local files) or,
//!   with `use_previous: true`, once for each result of the previous step; `{i}` in the
//!   sub-step's `prompt` and `filename` is the run's number, from 1.
//!
//! `use_previous: true` feeds the previous step's result to the step, `filename` names the
//! result, and every other key of a step is a request field. `{{name}}` anywhere in a step's
//! strings is replaced by `name` from the file's top-level `variables` object (the script
//! takes them as `--var name=value`; krea-batch reads them from the file, so that every
//! command, `status` and `retry` too, reads the same jobs from it: a prompt is part of a
//! job's identity).
//!
//! What maps to what:
//!
//! - A step without `use_previous` starts a job (a chain); each later `use_previous` step is
//!   one of its stages (`then:`), fed the previous stage's result through the model's default
//!   input field (`image_url`, or `start_image` for video models).
//! - A `fan_out` over `sources` makes one job per source, the source in the sub-step's input
//!   field, `{i}` its position; a `fan_out` with `use_previous` is one stage, which the engine
//!   runs once per result of the stage before, as the script does. Its `{i}` is known only when
//!   each job has one result there (it is then the job's position); otherwise the error says
//!   to drop `{i}` or to list the inputs under `sources`.
//! - A plain `use_previous` step after a step with several results (a fan-out, a
//!   `batchSize`): the script would take the first result and drop the others; krea-batch
//!   refuses the file and says to write a `fan_out` instead.
//! - Request fields are sent in Krea's current `snake_case`: every camelCase key of a step
//!   becomes `snake_case` (`imageUrl` → `image_url`, `startImage` → `start_image`,
//!   `aspectRatio` → `aspect_ratio`); Krea refuses the camelCase names the script still
//!   sends since 2026-06-19. Nested values are sent as written, and so is `guidance_scale`
//!   (the script renames it `guidance_scale_flux`, which Krea's Flux schema does not have).
//! - A model is a krea-batch model path (`image/bfl/flux-1-dev`, or `bfl/flux-1-dev`); the
//!   script's endpoint form `/generate/image/bfl/flux-1-dev` and enhancer names
//!   `topaz-standard-enhance` are read too. A bare name (`flux-1-dev`) has no provider and is
//!   refused with the form to write: the job file is read without Krea's model list.
//! - `filename` of a chain's first step names the job (an extension dropped); the files of
//!   a chain go where a job file's chain puts them, `<output>/<name>/<stage>-<model>.<ext>`,
//!   so the `filename` of a later step is not used. `parallel` is not needed: every job runs
//!   as soon as krea-batch's limits allow.
//! - Besides `steps` and `variables`, the file may hold krea-batch's own settings `output`,
//!   `budget`, `limits`, `prices`, `api` and `reuse`, which are passed on as written.
//!
//! Errors name the step as the script numbers it (from 1) with its action, and say what to
//! write instead. The translation is text that [`super::parse`] reads like any job file: one
//! line per job, so a job's line there leads back to its step here ([`Translation::origins`]).
//! That text is held to the job file's size limit too (8 MiB): a fan-out over tens of
//! thousands of sources is refused, saying to split it.

use serde_json::{Map, Value};
use std::fmt::Write as _;

/// The keys of a pipeline file besides `steps` and `variables`: krea-batch's own settings,
/// passed on to the job file as written.
const SETTINGS: [&str; 6] = ["output", "budget", "limits", "prices", "api", "reuse"];

/// The step keys that are the pipeline's own, not request fields.
const OWN_KEYS: [&str; 6] = ["action", "model", "enhancer", "prompt", "filename", "use_previous"];

/// The keys of a `fan_out` step.
const FAN_OUT_KEYS: [&str; 5] = ["action", "use_previous", "step", "sources", "parallel"];

/// The actions a step may take.
const ACTIONS: &str = "generate_image, generate_video, enhance or fan_out";

/// Whether `document` (the file read as JSON) is a pipeline file: an object with a
/// top-level `steps`, which a krea-batch job file never has.
pub(super) fn is_pipeline(document: &Value) -> bool {
    document.as_object().is_some_and(|top| top.contains_key("steps"))
}

/// The byte offset of each element of the top-level `steps` list in `text`, JSON that
/// `serde_json` has read: one pass, so that a pipeline of many jobs finds their steps' lines
/// without reading the file again per job.
pub(super) fn step_offsets(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut at) = (0_usize, 0);
    let mut last_key: Option<&str> = None;
    let (mut steps_next, mut in_steps, mut element_next) = (false, false, false);
    let mut offsets = Vec::new();
    while at < bytes.len() {
        let byte = bytes[at];
        if element_next && !byte.is_ascii_whitespace() {
            element_next = false;
            if byte != b']' {
                offsets.push(at);
            }
        }
        match byte {
            b'"' => {
                let start = at + 1;
                at = start;
                while at < bytes.len() && bytes[at] != b'"' {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                if depth == 1 {
                    last_key = text.get(start..at.min(bytes.len()));
                }
            }
            b':' if depth == 1 => steps_next = last_key == Some("steps"),
            b',' if depth == 1 => steps_next = false,
            b',' if depth == 2 && in_steps => element_next = true,
            b'[' | b'{' => {
                depth += 1;
                if byte == b'[' && depth == 2 && steps_next {
                    // A repeated `steps` key: the last one is the one read.
                    offsets.clear();
                    (in_steps, element_next) = (true, true);
                }
            }
            b']' | b'}' => {
                if depth == 2 {
                    in_steps = false;
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        at += 1;
    }
    offsets
}

/// Where a job's stage came from: the step, numbered from 1 as the script numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StepRef {
    /// The step's number, from 1.
    pub(super) number: usize,
    /// The step's action.
    pub(super) action: &'static str,
    /// For a `fan_out` over `sources`, which source (from 1).
    pub(super) source: Option<usize>,
}

impl std::fmt::Display for StepRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {} ({})", self.number, self.action)?;
        if let Some(source) = self.source {
            write!(f, ", source {source}")?;
        }
        Ok(())
    }
}

/// A pipeline that cannot be translated: the step (when the fault is in one) and what to
/// write instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PipelineError {
    /// The step at fault, `None` for the file as a whole.
    pub(super) step: Option<StepRef>,
    /// What is wrong and what to write instead.
    pub(super) message: String,
}

/// A translated pipeline.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Translation {
    /// The job file, as a document: settings, then `jobs:`, each with `then:` stages.
    pub(super) document: Value,
    /// For each job of `document`, the step of its first stage followed by those of its
    /// `then:` stages.
    pub(super) origins: Vec<Vec<StepRef>>,
}

impl Translation {
    /// The job file as text for [`super::parse`]: each top-level setting on one line, then
    /// `jobs:`, then one line per job (JSON is YAML), so job `n` is on line
    /// [`Self::first_job_line`]` + n`.
    pub(super) fn text(&self) -> String {
        let mut out = String::new();
        let top = self.document.as_object().into_iter().flatten();
        for (key, value) in top.filter(|(key, _)| *key != "jobs") {
            let _ = writeln!(out, "{}: {value}", Value::String(key.clone()));
        }
        out.push_str("jobs:\n");
        for job in self.document["jobs"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "- {job}");
        }
        out
    }

    /// The line (from 1) of the first job in [`Self::text`].
    pub(super) fn first_job_line(&self) -> usize {
        self.document.as_object().map_or(0, |top| top.len() - 1) + 2
    }
}

/// The step behind `key`, a path in the translated job file of the job whose origin is
/// `steps` (`jobs[3].then[1].params.width`), and the rest of the key in the step's words
/// (`width`).
pub(super) fn stage_of_key<'s>(steps: &'s [StepRef], key: &str) -> (Option<&'s StepRef>, String) {
    let after_job = key.strip_prefix("jobs[").and_then(|rest| rest.split_once(']'));
    let Some((_, rest)) = after_job else { return (steps.first(), key.to_owned()) };
    let rest = rest.trim_start_matches('.');
    let (stage, rest) = match rest.strip_prefix("then[").and_then(|rest| rest.split_once(']')) {
        Some((index, rest)) => (index.parse::<usize>().ok().map(|index| index + 1), rest),
        None => (Some(0), rest),
    };
    let rest = rest.trim_start_matches('.');
    let rest = rest.strip_prefix("params.").unwrap_or(rest);
    (stage.and_then(|stage| steps.get(stage)), rest.to_owned())
}

/// One stage as read from a step.
#[derive(Clone, Debug)]
struct Stage {
    model: String,
    prompt: Option<String>,
    params: Map<String, Value>,
    filename: Option<String>,
    /// How many results one run of it gives (`batch_size`, else 1).
    results: u64,
    from: StepRef,
}

impl Stage {
    /// The stage under `then:`.
    fn then_entry(&self) -> Value {
        let mut entry = Map::new();
        entry.insert("model".into(), Value::String(self.model.clone()));
        if let Some(prompt) = &self.prompt {
            entry.insert("prompt".into(), Value::String(prompt.clone()));
        }
        if !self.params.is_empty() {
            entry.insert("params".into(), Value::Object(self.params.clone()));
        }
        Value::Object(entry)
    }

    /// The field of its request that takes the previous result.
    fn input_field(&self) -> &'static str {
        super::values::default_input_field(&self.model)
    }
}

/// One job being built: its first stage and the stages after it.
struct Chain {
    first: Stage,
    name: Option<String>,
    then: Vec<Stage>,
}

impl Chain {
    fn entry(&self) -> Value {
        let mut entry = Map::new();
        if let Some(name) = &self.name {
            entry.insert("name".into(), Value::String(name.clone()));
        }
        let first = self.first.then_entry();
        entry.extend(first.as_object().cloned().unwrap_or_default());
        if !self.then.is_empty() {
            entry.insert("then".into(), self.then.iter().map(Stage::then_entry).collect());
        }
        Value::Object(entry)
    }
}

/// Translates a pipeline document (see [`is_pipeline`]) into a job file.
pub(super) fn translate(document: &Value) -> Result<Translation, PipelineError> {
    let whole = |message: String| PipelineError { step: None, message };
    let top = document.as_object().ok_or_else(|| whole("a pipeline file is an object".into()))?;
    let mut settings = Map::new();
    for (key, value) in top {
        match key.as_str() {
            "steps" | "variables" => {}
            known if SETTINGS.contains(&known) => {
                settings.insert(key.clone(), value.clone());
            }
            other => {
                return Err(whole(format!(
                    "unknown top-level key {other:?} in a pipeline file; it may hold `steps`, \
                     `variables` and krea-batch's settings {}",
                    SETTINGS.join(", ")
                )));
            }
        }
    }
    let variables = read_variables(top.get("variables")).map_err(whole)?;
    let steps = match top.get("steps") {
        Some(Value::Array(steps)) if !steps.is_empty() => steps,
        _ => {
            return Err(whole(
                "`steps` must be a non-empty list of steps, each an object such as \
                 {\"action\": \"generate_image\", \"prompt\": \"...\"}"
                    .into(),
            ));
        }
    };
    let mut builder = Builder { chains: Vec::new(), current: Vec::new(), per_chain: 1 };
    for (index, raw) in steps.iter().enumerate() {
        let number = index + 1;
        let action = action_of(raw, number)?;
        let at = StepRef { number, action, source: None };
        let step = substitute(raw, &variables)
            .map_err(|message| PipelineError { step: Some(at), message })?;
        builder
            .add(&step, at)
            .map_err(|(from, message)| PipelineError { step: Some(from), message })?;
    }
    let jobs: Vec<Value> = builder.chains.iter().map(Chain::entry).collect();
    let origins = builder
        .chains
        .iter()
        .map(|chain| {
            std::iter::once(&chain.first).chain(&chain.then).map(|stage| stage.from).collect()
        })
        .collect();
    settings.insert("jobs".into(), Value::Array(jobs));
    Ok(Translation { document: Value::Object(settings), origins })
}

/// The fault of a step, with the step (or sub-step source) it is about.
type StepFault = (StepRef, String);

/// The chains built so far and those the previous step ended.
struct Builder {
    chains: Vec<Chain>,
    /// The chains (indices into `chains`) whose last stage is the previous step's.
    current: Vec<usize>,
    /// How many results each current chain has at its last stage.
    per_chain: u64,
}

impl Builder {
    fn add(&mut self, step: &Map<String, Value>, at: StepRef) -> Result<(), StepFault> {
        let fault = |message: String| (at, message);
        let uses_previous = match step.get("use_previous") {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(other) => {
                return Err(fault(format!("`use_previous` must be true or false, not {other}")));
            }
        };
        if uses_previous && at.number == 1 {
            return Err(fault(
                "`use_previous` on the first step has no previous step to use; remove it, \
                 and give the step its input (for example \"image_url\": \"photo.png\")"
                    .into(),
            ));
        }
        if at.action == "fan_out" {
            return self.fan_out(step, &at, uses_previous);
        }
        let stage = read_stage(step, at, None)?;
        if !uses_previous {
            return self.start(vec![stage]);
        }
        let total = (self.current.len() as u64).saturating_mul(self.per_chain);
        if total != 1 {
            return Err(fault(format!(
                "`use_previous` takes the previous step's results, and it has {total}: Krea's \
                 script would use the first and drop the others, which krea-batch does not do. \
                 To run this step on each result, write it as {{\"action\": \"fan_out\", \
                 \"use_previous\": true, \"step\": {{…this step without use_previous…}}}}"
            )));
        }
        self.extend(|_| Ok(stage.clone()))
    }

    /// Starts one chain per stage; they become the current ones.
    fn start(&mut self, stages: Vec<Stage>) -> Result<(), StepFault> {
        // A stage's enhancer gets the size of its input from the downloaded file; a chain's
        // first has no downloaded input, and Krea requires the size (so does the script).
        let unsized_enhance = stages.iter().find(|stage| {
            stage.model.starts_with("enhance/")
                && !(stage.params.contains_key("width") && stage.params.contains_key("height"))
        });
        if let Some(stage) = unsized_enhance {
            return Err((
                stage.from,
                "an enhance step that does not take the previous step's result needs `width` \
                 and `height`, the size of the result, as Krea's script requires; add, for \
                 example, \"width\": 4096, \"height\": 4096"
                    .into(),
            ));
        }
        self.current.clear();
        self.per_chain = stages.first().map_or(1, |stage| stage.results);
        for stage in stages {
            let name = stage.filename.clone();
            self.current.push(self.chains.len());
            self.chains.push(Chain { first: stage, name, then: Vec::new() });
        }
        Ok(())
    }

    /// Appends a stage to each current chain, made by `stage_for` from the chain's position.
    fn extend(
        &mut self,
        stage_for: impl Fn(usize) -> Result<Stage, StepFault>,
    ) -> Result<(), StepFault> {
        let mut results = 1;
        for (position, chain) in self.current.iter().enumerate() {
            let stage = stage_for(position)?;
            if stage.params.contains_key(stage.input_field()) {
                return Err((
                    stage.from,
                    format!(
                        "the step has `use_previous`, which puts the previous result in `{0}`, \
                         and also its own `{0}`; remove one of them (without `use_previous` \
                         the step starts a new chain from its own `{0}`)",
                        stage.input_field()
                    ),
                ));
            }
            results = stage.results;
            self.chains[*chain].then.push(stage);
        }
        self.per_chain = self.per_chain.saturating_mul(results);
        Ok(())
    }

    fn fan_out(
        &mut self,
        step: &Map<String, Value>,
        at: &StepRef,
        uses_previous: bool,
    ) -> Result<(), StepFault> {
        let fault = |message: String| (*at, message);
        if let Some(key) = step.keys().find(|key| !FAN_OUT_KEYS.contains(&key.as_str())) {
            return Err(fault(format!(
                "`{key}` is not a key of a fan_out step, which has {}; put request fields \
                 inside its `step`",
                FAN_OUT_KEYS.join(", ")
            )));
        }
        let Some(Value::Object(template)) = step.get("step") else {
            return Err(fault(
                "a fan_out step needs `step`, the step to run for each input, for example \
                 \"step\": {\"action\": \"enhance\", \"enhancer\": \"topaz-standard-enhance\"}"
                    .into(),
            ));
        };
        let sub_action = action_of(&Value::Object(template.clone()), at.number)
            .map_err(|error| fault(format!("in its `step`: {}", error.message)))?;
        if sub_action == "fan_out" {
            return Err(fault(
                "the `step` of a fan_out cannot be another fan_out; write two fan_out steps \
                 one after the other, the second with \"use_previous\": true"
                    .into(),
            ));
        }
        let sub_at = |source: Option<usize>| StepRef { source, ..*at };
        let sub_at = |source| StepRef { action: sub_action, ..sub_at(source) };
        match (uses_previous, step.get("sources")) {
            (true, Some(_)) => Err(fault(
                "a fan_out takes either `sources` or \"use_previous\": true, not both; remove \
                 one"
                .into(),
            )),
            (true, None) => {
                let numbered = mentions_index(template);
                if numbered && self.per_chain != 1 {
                    return Err(fault(format!(
                        "`{{i}}` in the `step` would number each result, but each chain has \
                         {} results here, which krea-batch runs as one stage with one prompt; \
                         write the prompt without `{{i}}`, or list the inputs under `sources` \
                         (one job each)",
                        self.per_chain
                    )));
                }
                self.extend(|position| read_stage(template, sub_at(None), Some(position + 1)))
            }
            (false, Some(Value::Array(sources))) if !sources.is_empty() => {
                let mut stages = Vec::with_capacity(sources.len());
                for (index, source) in sources.iter().enumerate() {
                    let Value::String(source) = source else {
                        return Err(fault(format!(
                            "source {} is {source}; each source is a URL or a file beside the \
                             pipeline file, as a string",
                            index + 1
                        )));
                    };
                    let mut stage = read_stage(template, sub_at(Some(index + 1)), Some(index + 1))?;
                    let field = stage.input_field();
                    if stage.params.contains_key(field) {
                        return Err(fault(format!(
                            "the `step` has its own `{field}`, where each source goes; remove it"
                        )));
                    }
                    stage.params.insert(field.into(), Value::String(source.clone()));
                    if sources.len() > 1 && !mentions_index(template) {
                        stage.filename = stage.filename.map(|name| format!("{name}-{}", index + 1));
                    }
                    stages.push(stage);
                }
                self.start(stages)
            }
            _ => Err(fault(
                "a fan_out needs its inputs: \"use_previous\": true for the previous step's \
                 results, or \"sources\": [\"https://…\", \"photo.png\"]"
                    .into(),
            )),
        }
    }
}

/// The action of a step, checked.
fn action_of(step: &Value, number: usize) -> Result<&'static str, PipelineError> {
    let fault = |message: String| PipelineError {
        step: Some(StepRef { number, action: "?", source: None }),
        message,
    };
    let Value::Object(step) = step else {
        return Err(fault(format!(
            "a step is an object such as {{\"action\": \"generate_image\", \"prompt\": \
             \"...\"}}, not {step}"
        )));
    };
    match step.get("action") {
        None => Err(fault(format!("the step has no `action`; write \"action\": one of {ACTIONS}"))),
        Some(Value::String(action)) => ["generate_image", "generate_video", "enhance", "fan_out"]
            .into_iter()
            .find(|known| known == action)
            .ok_or_else(|| fault(format!("unknown action {action:?}; write one of {ACTIONS}"))),
        Some(other) => Err(fault(format!("`action` is {other}; write one of {ACTIONS}"))),
    }
}

/// Reads a non-fan_out step as a stage; `index` is the fan-out run's number for `{i}`.
fn read_stage(
    step: &Map<String, Value>,
    from: StepRef,
    index: Option<usize>,
) -> Result<Stage, StepFault> {
    let fault = |message: String| (from, message);
    let number = |text: &str| match index {
        Some(index) => text.replace("{i}", &index.to_string()),
        None => text.to_owned(),
    };
    let text = |key: &str| -> Result<Option<String>, StepFault> {
        match step.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(number(text))),
            Some(other) => Err(fault(format!("`{key}` must be a string, not {other}"))),
        }
    };
    let (kind, default_model) = match from.action {
        "generate_image" => ("image", "image/google/nano-banana-2"),
        "generate_video" => ("video", "video/google/veo-3.1-fast"),
        _ => ("enhance", "topaz-standard-enhance"),
    };
    let model_key = if kind == "enhance" { "enhancer" } else { "model" };
    let written = text(model_key)?;
    let model = model_path(kind, written.as_deref().unwrap_or(default_model))
        .map_err(|message| fault(format!("`{model_key}`: {message}")))?;
    let prompt = text("prompt")?;
    if kind != "enhance" && prompt.is_none() {
        return Err(fault("the step has no `prompt`; add \"prompt\": \"...\"".into()));
    }
    let mut params = Map::new();
    for (key, value) in step {
        let own = OWN_KEYS.contains(&key.as_str()) && !(kind == "enhance" && key == "model");
        if own {
            continue;
        }
        if matches!(key.as_str(), "step" | "sources" | "parallel") {
            return Err(fault(format!(
                "`{key}` belongs to a fan_out step; write {{\"action\": \"fan_out\", \
                 \"{key}\": …, \"step\": {{…}}}}"
            )));
        }
        let field = snake_case(key);
        if params.insert(field.clone(), value.clone()).is_some() {
            return Err(fault(format!(
                "the request field `{field}` is written twice (as camelCase and snake_case); \
                 keep one"
            )));
        }
    }
    let results = match params.get("batch_size") {
        Some(value) => value.as_u64().filter(|count| *count >= 1).ok_or_else(|| {
            fault(format!("`batchSize` must be a whole number from 1, not {value}"))
        })?,
        None => 1,
    };
    let filename = text("filename")?.map(|name| without_extension(&name).to_owned());
    Ok(Stage { model, prompt, params, filename, results, from })
}

/// A step's model as a krea-batch model path of `kind` (`image`, `video` or `enhance`).
fn model_path(kind: &str, written: &str) -> Result<String, String> {
    let path = written.trim_start_matches('/').trim_start_matches("generate/");
    if path.contains('/') {
        let first = path.split('/').next().unwrap_or_default();
        return Ok(if ["image", "video", "enhance"].contains(&first) {
            path.to_owned()
        } else {
            format!("{kind}/{path}")
        });
    }
    if let (true, Some((provider, model))) = (kind == "enhance", path.split_once('-')) {
        return Ok(format!("enhance/{provider}/{model}"));
    }
    Err(format!(
        "{written:?} names no provider; write the model's path, such as \
         \"{kind}/<provider>/{written}\" (`krea-batch models` lists them)"
    ))
}

/// `aspectRatio` → `aspect_ratio`; a key in `snake_case` is left as it is.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for (index, c) in key.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if index > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A `filename` without the extension the script would add or keep.
fn without_extension(name: &str) -> &str {
    [".png", ".jpg", ".jpeg", ".webp", ".mp4"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
        .unwrap_or(name)
}

/// Whether a fan-out's `step` numbers its runs with `{i}`.
fn mentions_index(template: &Map<String, Value>) -> bool {
    ["prompt", "filename"].iter().any(|key| {
        template.get(*key).and_then(Value::as_str).is_some_and(|text| text.contains("{i}"))
    })
}

/// The file's `variables`: names to text (numbers and booleans as written).
fn read_variables(variables: Option<&Value>) -> Result<Map<String, Value>, String> {
    let Some(variables) = variables else { return Ok(Map::new()) };
    let Value::Object(variables) = variables else {
        return Err(
            "`variables` is an object of names and values, such as {\"subject\": \"a red car\"}"
                .into(),
        );
    };
    let mut out = Map::new();
    for (name, value) in variables {
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Number(_) | Value::Bool(_) => value.to_string(),
            other => {
                return Err(format!(
                    "variable {name:?} is {other}; a variable is a string, number or boolean"
                ));
            }
        };
        out.insert(name.clone(), Value::String(text));
    }
    Ok(out)
}

/// The step with every `{{name}}` in its strings replaced from `variables`.
fn substitute(step: &Value, variables: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    fn walk(value: &Value, variables: &Map<String, Value>) -> Result<Value, String> {
        Ok(match value {
            Value::String(text) => Value::String(fill(text, variables)?),
            Value::Array(items) => Value::Array(
                items.iter().map(|item| walk(item, variables)).collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| Ok((key.clone(), walk(item, variables)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
    match walk(step, variables)? {
        Value::Object(map) => Ok(map),
        _ => Ok(Map::new()),
    }
}

/// `text` with each `{{name}}` (a name of letters, digits and `_`) replaced.
fn fill(text: &str, variables: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let name_len =
            after.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(after.len());
        let name = &after[..name_len];
        if name.is_empty() || !after[name_len..].starts_with("}}") {
            out.push_str(&rest[..start + 2]);
            rest = after;
            continue;
        }
        let Some(value) = variables.get(name).and_then(Value::as_str) else {
            return Err(format!(
                "`{{{{{name}}}}}` is not defined; add it to the file's variables: \
                 \"variables\": {{\"{name}\": \"...\"}}"
            ));
        };
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &after[name_len + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
