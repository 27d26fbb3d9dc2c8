//! Chains of stages (`then:`): what a job's later stages are, how each stage job is named and
//! keyed, and the request body each one sends once its input is on disk. Pure logic plus one
//! read of a downloaded file's header (its pixel size, `dimensions.rs`); `jobfile` builds a chain, `store` keeps
//! it with each job, the engine (`runner/stages.rs`) makes the stage jobs from it.
//!
//! A chain is carried by every job in it as JSON text (the `chain` column of the state file):
//! the job's place (`base` name, stage number, fan-out `suffix`, its parent) and the stages
//! still to come. A stage job is created only when its input exists, when its parent's results
//! are downloaded, one per result (fan-out); when its parent failed or was cancelled, each
//! later stage is recorded as failed, naming the parent. Both are inserted by a key derived
//! from the parent's key, the stage and the result index, so a rerun finds the same rows.
//!
//! Names and files: stage 0 is the job's own generation. A job `castle` with `then:` is named
//! `castle/0-<model short name>`, its first stage `castle/1-<short name>`, and so on, the short
//! name being the last part of the model path (`enhance/topaz/standard-enhance` →
//! `standard-enhance`). So results land in `<output>/castle/<stage>-<short name>.<ext>`. When a
//! stage's input produced several results, each stage job after it takes `-<i>` (from 1) after
//! its name, kept by its own later stages: `castle/1-standard-enhance-2`,
//! `castle/2-kling-2.5-2`.

use crate::job::{JobKey, JobState};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most stages one job may chain after its own generation.
pub(crate) const MAX_STAGES: usize = 8;

/// One stage still to come, as the state file keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stage {
    /// The full model path.
    pub model: String,
    /// The request body without its input (and without `width`/`height` taken from the input).
    pub body: Map<String, Value>,
    /// The request field that receives the previous stage's result.
    pub input: String,
    /// The estimated price of one stage job, set when the job file is imported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_usd: Option<f64>,
}

/// A job's place in its chain and the stages after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Chain {
    /// The job's name as written, before `/<stage>-<model>`.
    pub base: String,
    /// This job's stage: 0 for the job's own generation.
    pub stage: u32,
    /// The fan-out suffix (`-2`, `-2-1`), empty when every input had one result.
    #[serde(default)]
    pub suffix: String,
    /// The parent job's name, for a stage job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Which of the parent's results this job took (from 0).
    #[serde(default)]
    pub parent_result: u32,
    /// The stages after this one.
    #[serde(default)]
    pub stages: Vec<Stage>,
}

impl Chain {
    /// Reads a chain written by [`Chain::to_text`]; `None` for text that is not one.
    #[must_use]
    pub(crate) fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The stages after the job whose chain is `text` (none outside a chain).
    #[must_use]
    pub(crate) fn stages_after(text: Option<&str>) -> Vec<Stage> {
        text.and_then(Self::parse).map(|chain| chain.stages).unwrap_or_default()
    }

    /// The chain as the state file keeps it.
    #[must_use]
    pub(crate) fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The stage and parent name of a job carrying `chain` (its `chain` column), for the manifest
/// and the gallery: `None` for a job outside any chain.
#[must_use]
pub(crate) fn place(chain: Option<&str>) -> Option<(u32, Option<String>)> {
    let chain = Chain::parse(chain?)?;
    Some((chain.stage, chain.parent))
}

/// The request field a model takes its input image in: `start_image` for video models,
/// `image_url` for image and enhance models.
#[must_use]
pub(crate) fn default_input(model: &str) -> &'static str {
    if model.starts_with("video/") { "start_image" } else { "image_url" }
}

/// The last part of a model path: `enhance/topaz/standard-enhance` → `standard-enhance`.
#[must_use]
pub(crate) fn short_name(model: &str) -> &str {
    model.rsplit('/').next().unwrap_or(model)
}

/// The name of the job at `stage` of the chain of `base`.
#[must_use]
pub(crate) fn stage_name(base: &str, stage: u32, model: &str, suffix: &str) -> String {
    format!("{base}/{stage}-{}{suffix}", short_name(model))
}

/// A stage job to insert into the state file (once: by its key).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NewStageJob {
    pub key: JobKey,
    pub name: String,
    pub model: String,
    pub body: String,
    /// `Pending`, or `Failed` (`Cancelled`) with `error` when its parent failed (was cancelled).
    pub state: JobState,
    pub error: Option<String>,
    pub price_usd: Option<f64>,
    /// The chain as the new job carries it.
    pub chain: String,
}

/// What a finished parent job hands its next stage.
#[derive(Clone, Debug)]
pub(crate) struct ParentOutcome<'a> {
    pub key: &'a JobKey,
    pub name: &'a str,
    pub state: JobState,
    pub error: Option<&'a str>,
    /// Result URLs with the pixel size of each downloaded file, when it could be read.
    pub results: Vec<(&'a str, Option<(u32, u32)>)>,
}

/// The stage jobs that follow `parent`, which carries `chain`: one per result when it was
/// downloaded, else one failed (or, after a cancel, cancelled) job for the next stage, naming
/// the parent. Empty when the chain
/// has no stage left.
#[must_use]
pub(crate) fn next_jobs(chain: &Chain, parent: &ParentOutcome<'_>) -> Vec<NewStageJob> {
    let Some((next, rest)) = chain.stages.split_first() else { return Vec::new() };
    let stage = chain.stage + 1;
    let key_of = |index: u32| {
        let seed = format!("then\0{}\0{stage}\0{index}", parent.key);
        JobKey::from_canonical(&next.model, &seed, 0)
    };
    if parent.state != JobState::Downloaded {
        let why = match parent.error {
            Some(error) => format!(": {error}"),
            None => String::new(),
        };
        let error = format!(
            "not run: its input, stage {} ({}), ended {}{why}",
            chain.stage,
            parent.name,
            parent.state.as_str()
        );
        let child = Chain {
            base: chain.base.clone(),
            stage,
            suffix: chain.suffix.clone(),
            parent: Some(parent.name.to_owned()),
            parent_result: 0,
            stages: rest.to_vec(),
        };
        // A cancelled job's later stages are cancelled with it; a failed one's fail.
        let ended_as = match parent.state {
            JobState::Cancelled => JobState::Cancelled,
            _ => JobState::Failed,
        };
        return vec![NewStageJob {
            key: key_of(0),
            name: stage_name(&chain.base, stage, &next.model, &chain.suffix),
            model: next.model.clone(),
            body: crate::job::canonical_json(&next.body),
            state: ended_as,
            error: Some(error),
            price_usd: None,
            chain: child.to_text(),
        }];
    }
    let several = parent.results.len() > 1;
    let mut jobs = Vec::with_capacity(parent.results.len());
    for (index, (url, size)) in parent.results.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let suffix =
            if several { format!("{}-{}", chain.suffix, index + 1) } else { chain.suffix.clone() };
        let body = stage_body(next, url, *size);
        let child = Chain {
            base: chain.base.clone(),
            stage,
            suffix: suffix.clone(),
            parent: Some(parent.name.to_owned()),
            parent_result: index,
            stages: rest.to_vec(),
        };
        jobs.push(NewStageJob {
            key: key_of(index),
            name: stage_name(&chain.base, stage, &next.model, &suffix),
            model: next.model.clone(),
            body: crate::job::canonical_json(&body),
            state: JobState::Pending,
            error: None,
            price_usd: next.price_usd,
            chain: child.to_text(),
        });
    }
    jobs
}

/// The request body of `stage` given its input's URL and, when it could be read, its size.
#[must_use]
pub(crate) fn stage_body(stage: &Stage, url: &str, size: Option<(u32, u32)>) -> Map<String, Value> {
    let mut body = stage.body.clone();
    body.insert(stage.input.clone(), Value::String(url.to_owned()));
    // Topaz's enhancers require the input's size; the user may still set it.
    if let (true, Some((width, height))) = (stage.model.starts_with("enhance/"), size) {
        body.entry("width").or_insert(Value::from(width));
        body.entry("height").or_insert(Value::from(height));
    }
    body
}

/// The pixel size of the image file at `path`, read from its header.
#[must_use]
pub(crate) fn file_image_size(path: &std::path::Path) -> Option<(u32, u32)> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(64 << 10);
    let limit = crate::dimensions::HEAD_BYTES as u64;
    std::fs::File::open(path).ok()?.take(limit).read_to_end(&mut head).ok()?;
    crate::dimensions::of(&head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain() -> Chain {
        let body = |value: Value| value.as_object().cloned().unwrap_or_default();
        Chain {
            base: "castle".into(),
            stage: 0,
            suffix: String::new(),
            parent: None,
            parent_result: 0,
            stages: vec![
                Stage {
                    model: "enhance/topaz/standard-enhance".into(),
                    body: body(json!({"model": "Standard V2"})),
                    input: "image_url".into(),
                    price_usd: Some(0.1),
                },
                Stage {
                    model: "video/kling/kling-2.5".into(),
                    body: body(json!({"prompt": "push in"})),
                    input: "start_image".into(),
                    price_usd: None,
                },
            ],
        }
    }

    fn parent<'a>(
        key: &'a JobKey,
        results: Vec<(&'a str, Option<(u32, u32)>)>,
    ) -> ParentOutcome<'a> {
        ParentOutcome {
            key,
            name: "castle/0-flux-1-dev",
            state: JobState::Downloaded,
            error: None,
            results,
        }
    }

    #[test]
    fn one_result_makes_one_stage_job_with_the_input_and_its_size() {
        let key = JobKey::from_stored("k".into());
        let jobs = next_jobs(&chain(), &parent(&key, vec![("https://h/r/0.png", Some((32, 24)))]));
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].name, "castle/1-standard-enhance");
        let body: Value = serde_json::from_str(&jobs[0].body).expect("json");
        assert_eq!(body["image_url"], "https://h/r/0.png");
        assert_eq!((body["width"].as_u64(), body["height"].as_u64()), (Some(32), Some(24)));
        let next = Chain::parse(&jobs[0].chain).expect("chain");
        assert_eq!((next.stage, next.stages.len()), (1, 1));
        assert_eq!(next.parent.as_deref(), Some("castle/0-flux-1-dev"));
        // The same parent gives the same key: a rerun finds the row it made.
        let again = next_jobs(&chain(), &parent(&key, vec![("https://h/r/0.png", None)]));
        assert_eq!(again[0].key, jobs[0].key);
    }

    #[test]
    fn several_results_fan_out_with_numbered_names_and_distinct_keys() {
        let key = JobKey::from_stored("k".into());
        let results = vec![("https://h/0.png", None), ("https://h/1.png", None)];
        let jobs = next_jobs(&chain(), &parent(&key, results));
        let names: Vec<&str> = jobs.iter().map(|job| job.name.as_str()).collect();
        assert_eq!(names, ["castle/1-standard-enhance-1", "castle/1-standard-enhance-2"]);
        assert_ne!(jobs[0].key, jobs[1].key);
        let next = Chain::parse(&jobs[1].chain).expect("chain");
        assert_eq!(
            stage_name(&next.base, 2, &next.stages[0].model, &next.suffix),
            "castle/2-kling-2.5-2"
        );
    }

    #[test]
    fn a_failed_parent_fails_the_next_stage_naming_it() {
        let key = JobKey::from_stored("k".into());
        let outcome = ParentOutcome {
            state: JobState::Failed,
            error: Some("moderated"),
            ..parent(&key, Vec::new())
        };
        let jobs = next_jobs(&chain(), &outcome);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].state, JobState::Failed);
        let error = jobs[0].error.as_deref().unwrap_or_default();
        assert!(error.contains("castle/0-flux-1-dev") && error.contains("moderated"), "{error}");
        assert!(next_jobs(&Chain { stages: Vec::new(), ..chain() }, &outcome).is_empty());
        let cancelled = ParentOutcome { state: JobState::Cancelled, ..outcome };
        assert_eq!(next_jobs(&chain(), &cancelled)[0].state, JobState::Cancelled);
    }

    #[test]
    fn inputs_and_short_names_follow_the_model_kind() {
        assert_eq!(default_input("video/kling/kling-2.5"), "start_image");
        assert_eq!(default_input("enhance/topaz/standard-enhance"), "image_url");
        assert_eq!(short_name("image/bfl/flux-1-dev"), "flux-1-dev");
    }
}
