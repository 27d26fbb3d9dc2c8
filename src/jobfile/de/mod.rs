//! Reading the YAML document into raw values, enforcing every rule that concerns one node.
//!
//! The top level, the job entries, `params` and `prices` are deserialized by hand rather than
//! derived, for four reasons serde's derive cannot serve:
//!
//! - an error raised inside a node's visitor carries that node's line and column, so each rule
//!   is checked where its node is read (a duplicate key at that key, an empty prompt at it);
//! - `serde_yaml` keeps the last of two equal keys in a map without a word: every mapping here
//!   refuses duplicates itself;
//! - YAML aliases can expand a small file into a huge one; a budget shared by all visitors
//!   bounds the data built, so an alias bomb ends in an error instead of exhausting memory;
//! - the visitors keep the path they are at ([`Ctx`]) and record their own errors, which gives
//!   exact key paths and messages without parsing `serde_yaml`'s error text.
//!
//! Rules spanning several nodes (unique names, a model for every job) are checked afterwards,
//! in `jobfile/mod.rs`, which finds positions with `locate`. `api` and `limits` are derived types
//! (see `settings.rs`).
//!
//! Files: `ctx.rs` (the state the visitors share), `scalar.rs` (single values: keys, texts,
//! counts), `document.rs` (the top level and the job entries), `params.rs` (request fields and
//! prices).

mod ctx;
mod document;
mod params;
mod scalar;

pub(crate) use ctx::Ctx;

use super::Params;
use super::settings::{ApiSettings, Budget, Limits};
use serde::de::DeserializeSeed;
use std::collections::BTreeMap;

/// The job file as written, every node checked on its own.
#[derive(Debug)]
pub(crate) struct RawFile {
    /// Default model, normalised.
    pub(crate) model: Option<String>,
    /// Default request fields.
    pub(crate) params: Params,
    /// Output directory as written.
    pub(crate) output: Option<String>,
    /// The `api:` section.
    pub(crate) api: ApiSettings,
    /// The `limits:` section.
    pub(crate) limits: Limits,
    /// Prices by normalised model path.
    pub(crate) prices: BTreeMap<String, f64>,
    /// The `budget:` section.
    pub(crate) budget: Option<Budget>,
    /// `reuse:`, when written.
    pub(crate) reuse: Option<bool>,
    /// The job entries, in file order; never empty.
    pub(crate) jobs: Vec<RawJob>,
    /// Which of `output`, `api` and `limits` the file writes, in file order.
    pub(crate) run_settings: Vec<&'static str>,
}

/// One entry of `jobs:` as written.
#[derive(Debug)]
pub(crate) struct RawJob {
    /// The prompt as written, not blank; empty when the entry has none (an enhance model
    /// takes none: the request body then has no `prompt`).
    pub(crate) prompt: String,
    /// The name, valid per `job::check_name`.
    pub(crate) name: Option<String>,
    /// The model, normalised.
    pub(crate) model: Option<String>,
    /// Request fields of this job; `null` values mean "leave the default out".
    pub(crate) params: Params,
    /// How many generations, at least 1.
    pub(crate) count: u32,
    /// `matrix:` and `from:`, when the entry has either (boxed: most entries have neither,
    /// and a file may hold 100,000 entries).
    pub(crate) sweep: Option<Box<RawSweep>>,
    /// `then:`: the stages fed this job's results, in order (usually none).
    pub(crate) then: Vec<RawStage>,
    /// Byte offset of the entry's first key, when `serde_yaml` lent it from the text.
    pub(crate) offset: Option<usize>,
}

/// One stage of a job's `then:` as written.
#[derive(Debug)]
pub(crate) struct RawStage {
    /// The model, normalised.
    pub(crate) model: String,
    /// The stage's own prompt, if any.
    pub(crate) prompt: Option<String>,
    /// The stage's request fields.
    pub(crate) params: Params,
    /// The request field that receives the previous stage's result, when written.
    pub(crate) input: Option<String>,
}

/// The sweep keys of a job entry as written.
#[derive(Debug)]
pub(crate) struct RawSweep {
    /// `matrix:`: variable names and their lists of values, checked by `sweep`.
    pub(crate) matrix: Option<Params>,
    /// `from:`: a CSV or JSON Lines file beside the job file, one job per row, or a folder of
    /// images (written with a trailing `/`), one job per image.
    pub(crate) from: Option<String>,
}

/// Deserializes the document.
pub(crate) fn read(ctx: &Ctx<'_>) -> Result<RawFile, serde_yaml::Error> {
    document::DocumentSeed { ctx }.deserialize(serde_yaml::Deserializer::from_str(ctx.text()))
}
