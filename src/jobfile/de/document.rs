//! The top level of the document and the job entries: fixed sets of keys, each read once,
//! with the per-node rules of their values.

use super::ctx::NODE_WEIGHT;
use super::params::{ParamsSeed, PricesSeed};
use super::scalar::{Scalar, TextKind, count_value, field_key, refuse, tagged, text_value};
use super::{Ctx, RawFile, RawJob, RawStage, RawSweep};
use crate::jobfile::locate::Seg;
use crate::jobfile::settings::{ApiSettings, Limits};
use crate::jobfile::{MAX_JOBS, Params};
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;

/// The top-level keys, in the order the example documents them.
const TOP_KEYS: &[&str] =
    &["model", "params", "output", "api", "limits", "prices", "budget", "reuse", "jobs"];
/// The keys of one job entry.
const JOB_KEYS: &[&str] = &["prompt", "name", "model", "params", "count", "matrix", "from", "then"];
/// The keys of one stage under `then:`.
const STAGE_KEYS: &[&str] = &["model", "prompt", "params", "input"];
use crate::chain::MAX_STAGES;

/// The document: a mapping of the top-level keys.
pub(super) struct DocumentSeed<'a, 'de> {
    pub(super) ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_, 'de> {
    type Value = RawFile;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawFile, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl DocumentSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<RawFile, E> {
        Err(self.ctx.fail(format!(
            "the job file must be a YAML mapping with a `jobs:` list (see jobs.example.yaml); \
             found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_, 'de> {
    type Value = RawFile;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job file")
    }
    refuse!(scalars);
    refuse!(seq);

    fn visit_unit<E: de::Error>(self) -> Result<RawFile, E> {
        Err(self.ctx.fail(EMPTY_FILE.into()))
    }
    fn visit_none<E: de::Error>(self) -> Result<RawFile, E> {
        self.visit_unit()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
        let ctx = self.ctx;
        let mut seen = [false; TOP_KEYS.len()];
        let mut file = RawFile {
            model: None,
            params: Params::new(),
            output: None,
            api: ApiSettings::default(),
            limits: Limits::default(),
            prices: BTreeMap::new(),
            budget: None,
            reuse: None,
            jobs: Vec::new(),
            run_settings: Vec::new(),
        };
        let mut has_jobs = false;
        while let Some((index, _)) =
            map.next_key_seed(field_key(ctx, TOP_KEYS, &mut seen, "at the top level"))?
        {
            ctx.push(Seg::key(TOP_KEYS[index]));
            if matches!(TOP_KEYS[index], "output" | "api" | "limits") {
                file.run_settings.push(TOP_KEYS[index]);
            }
            match TOP_KEYS[index] {
                "model" => {
                    file.model = Some(map.next_value_seed(text_value(ctx, TextKind::Model))?);
                }
                "params" => file.params = map.next_value_seed(ParamsSeed { ctx, matrix: false })?,
                "output" => {
                    file.output = Some(map.next_value_seed(text_value(ctx, TextKind::Output))?);
                }
                "api" => file.api = map.next_value()?,
                "limits" => file.limits = map.next_value()?,
                "prices" => file.prices = map.next_value_seed(PricesSeed { ctx })?,
                "budget" => file.budget = Some(map.next_value()?),
                "reuse" => file.reuse = Some(map.next_value()?),
                _ => {
                    file.jobs = map.next_value_seed(JobsSeed { ctx })?;
                    has_jobs = true;
                }
            }
            ctx.pop();
        }
        if seen.iter().all(|seen| !seen) {
            return Err(ctx.fail(EMPTY_FILE.into()));
        }
        if !has_jobs {
            ctx.push(Seg::key("jobs"));
            return Err(ctx.fail(
                "the file has no `jobs:` list, so there is nothing to do; add one, e.g. \
                 `jobs: [{prompt: \"a red fox in fresh snow\"}]`"
                    .into(),
            ));
        }
        Ok(file)
    }
}

const EMPTY_FILE: &str = "the job file is empty; it needs at least a `jobs:` list of prompts \
                          (see jobs.example.yaml)";

const EMPTY_JOBS: &str = "the `jobs` list is empty, so there is nothing to do; add entries \
                          like `- prompt: \"a red fox in fresh snow\"`";

/// `jobs:`: a non-empty list of entries.
struct JobsSeed<'a, 'de> {
    ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for JobsSeed<'_, 'de> {
    type Value = Vec<RawJob>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<RawJob>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl JobsSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<Vec<RawJob>, E> {
        Err(self.ctx.fail(format!(
            "`jobs` must be a list of entries, each line starting with `- prompt:`; found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for JobsSeed<'_, 'de> {
    type Value = Vec<RawJob>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of jobs")
    }
    refuse!(scalars);
    refuse!(map);

    fn visit_unit<E: de::Error>(self) -> Result<Vec<RawJob>, E> {
        Err(self.ctx.fail(EMPTY_JOBS.into()))
    }
    fn visit_none<E: de::Error>(self) -> Result<Vec<RawJob>, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RawJob>, A::Error> {
        let ctx = self.ctx;
        let mut jobs = Vec::new();
        loop {
            ctx.push(Seg::Index(jobs.len()));
            let Some(job) = seq.next_element_seed(JobSeed { ctx })? else {
                ctx.pop();
                break;
            };
            // After the entry is read, not before: exactly MAX_JOBS entries are allowed.
            if jobs.len() == MAX_JOBS {
                return Err(ctx.fail(format!(
                    "more than {MAX_JOBS} jobs in one file; split it into several files"
                )));
            }
            ctx.pop();
            jobs.push(job);
        }
        if jobs.is_empty() {
            return Err(ctx.fail(EMPTY_JOBS.into()));
        }
        Ok(jobs)
    }
}

/// One entry of `jobs:`.
struct JobSeed<'a, 'de> {
    ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for JobSeed<'_, 'de> {
    type Value = RawJob;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawJob, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl JobSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<RawJob, E> {
        Err(self.ctx.fail(format!(
            "each job is a mapping with at least a `prompt:`, written `- prompt: \"...\"`; \
             found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for JobSeed<'_, 'de> {
    type Value = RawJob;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job")
    }
    refuse!(scalars);
    refuse!(seq);

    fn visit_unit<E: de::Error>(self) -> Result<RawJob, E> {
        Err(self.ctx.fail("this job is empty; write at least `prompt: \"...\"`".into()))
    }
    fn visit_none<E: de::Error>(self) -> Result<RawJob, E> {
        self.visit_unit()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawJob, A::Error> {
        let ctx = self.ctx;
        ctx.spend(NODE_WEIGHT)?;
        let mut seen = [false; JOB_KEYS.len()];
        let (mut prompt, mut name, mut model, mut params, mut count) = (None, None, None, None, 1);
        let (mut matrix, mut from, mut then) = (None, None, Vec::new());
        let mut offset = None;
        let mut first = true;
        while let Some((index, key_offset)) =
            map.next_key_seed(field_key(ctx, JOB_KEYS, &mut seen, "in a job"))?
        {
            // The entry starts at its first key (that is also where serde_yaml places a block
            // mapping).
            if first {
                offset = key_offset;
                first = false;
            }
            ctx.push(Seg::key(JOB_KEYS[index]));
            match JOB_KEYS[index] {
                "prompt" => prompt = Some(map.next_value_seed(text_value(ctx, TextKind::Prompt))?),
                "name" => name = Some(map.next_value_seed(text_value(ctx, TextKind::Name))?),
                "model" => model = Some(map.next_value_seed(text_value(ctx, TextKind::Model))?),
                "params" => params = Some(map.next_value_seed(ParamsSeed { ctx, matrix: false })?),
                "count" => count = map.next_value_seed(count_value(ctx))?,
                "matrix" => matrix = Some(map.next_value_seed(ParamsSeed { ctx, matrix: true })?),
                "then" => then = map.next_value_seed(StagesSeed { ctx })?,
                _ => from = Some(map.next_value_seed(text_value(ctx, TextKind::DataFile))?),
            }
            ctx.pop();
        }
        // Rows of a data file bring their prompts: by default its `prompt` column. A folder of
        // images brings none. Without one, the job has no prompt; whether its model takes none
        // is the schema's to say (`openapi.rs`), since the file is read before the schema.
        let from_data = from.as_deref().is_some_and(|from| !crate::jobfile::sweep::is_folder(from));
        if prompt.is_none() && from_data {
            prompt = Some("{prompt}".to_owned());
        }
        Ok(RawJob {
            prompt: prompt.unwrap_or_default(),
            name,
            model,
            params: params.unwrap_or_default(),
            count,
            sweep: (matrix.is_some() || from.is_some())
                .then(|| Box::new(RawSweep { matrix, from })),
            then,
            offset,
        })
    }
}

/// `then:`: a list of stages, each fed the previous one's result.
struct StagesSeed<'a, 'de> {
    ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for StagesSeed<'_, 'de> {
    type Value = Vec<RawStage>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl StagesSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<Vec<RawStage>, E> {
        Err(self.ctx.fail(format!(
            "`then` must be a list of stages, each line starting with `- model:`; found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for StagesSeed<'_, 'de> {
    type Value = Vec<RawStage>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of stages")
    }
    refuse!(scalars);
    refuse!(map);

    fn visit_unit<E: de::Error>(self) -> Result<Vec<RawStage>, E> {
        Ok(Vec::new())
    }
    fn visit_none<E: de::Error>(self) -> Result<Vec<RawStage>, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RawStage>, A::Error> {
        let ctx = self.ctx;
        let mut stages = Vec::new();
        loop {
            ctx.push(Seg::Index(stages.len()));
            let Some(stage) = seq.next_element_seed(StageSeed { ctx })? else {
                ctx.pop();
                break;
            };
            if stages.len() == MAX_STAGES {
                return Err(ctx.fail(format!(
                    "more than {MAX_STAGES} stages in one chain; split the work into several \
                     job files"
                )));
            }
            ctx.pop();
            stages.push(stage);
        }
        Ok(stages)
    }
}

/// One stage of `then:`.
struct StageSeed<'a, 'de> {
    ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for StageSeed<'_, 'de> {
    type Value = RawStage;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawStage, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl StageSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<RawStage, E> {
        Err(self.ctx.fail(format!(
            "each stage is a mapping with at least a `model:`, written `- model: \
             enhance/topaz/standard-enhance`; found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for StageSeed<'_, 'de> {
    type Value = RawStage;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a stage")
    }
    refuse!(scalars);
    refuse!(seq);

    fn visit_unit<E: de::Error>(self) -> Result<RawStage, E> {
        Err(self.ctx.fail("this stage is empty; write at least `model: ...`".into()))
    }
    fn visit_none<E: de::Error>(self) -> Result<RawStage, E> {
        self.visit_unit()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawStage, A::Error> {
        let ctx = self.ctx;
        ctx.spend(NODE_WEIGHT)?;
        let mut seen = [false; STAGE_KEYS.len()];
        let (mut model, mut prompt, mut params, mut input) = (None, None, None, None);
        while let Some((index, _)) =
            map.next_key_seed(field_key(ctx, STAGE_KEYS, &mut seen, "in a stage"))?
        {
            ctx.push(Seg::key(STAGE_KEYS[index]));
            match STAGE_KEYS[index] {
                "model" => model = Some(map.next_value_seed(text_value(ctx, TextKind::Model))?),
                "prompt" => prompt = Some(map.next_value_seed(text_value(ctx, TextKind::Prompt))?),
                "params" => params = Some(map.next_value_seed(ParamsSeed { ctx, matrix: false })?),
                _ => input = Some(map.next_value_seed(text_value(ctx, TextKind::Field))?),
            }
            ctx.pop();
        }
        let Some(model) = model else {
            ctx.push(Seg::key("model"));
            return Err(ctx.fail(
                "this stage has no `model`; name the model that takes the previous result, \
                 e.g. `model: enhance/topaz/standard-enhance`"
                    .into(),
            ));
        };
        Ok(RawStage { model, prompt, params: params.unwrap_or_default(), input })
    }
}
