//! Krea's OpenAPI document: where to get it (`<base_url>/openapi.json`, cached for a day in the
//! user's cache folder, one file per API base, see [`cache_path`]; `--offline` uses the cache
//! whatever its age; `--openapi FILE` a file), and
//! each model's request schema in it, so that `check` and `run` can refuse a job file whose
//! bodies Krea would refuse, before anything is spent (`schema.rs` does the checking;
//! [`schema_report`] and [`SchemaChoice`] are what the commands call).
//!
//! A model path the document does not list but lists one close to is a typo, refused with
//! "did you mean"; one far from every listed model gets a warning, not an error (the model
//! list changes every few weeks, and it may be newer than the document). A document that cannot
//! be had gets a warning and the run goes on.

use crate::error::InputError;
use crate::jobfile::{self, JobFile};
use crate::schema::{Problem, validate};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a cached document is used before it is fetched again.
pub(crate) const CACHE_FOR: Duration = Duration::from_hours(24);
/// The file name of the cache beside the state file, where it lives when the user has no cache
/// folder (neither `XDG_CACHE_HOME` nor `HOME` is set), and where earlier versions kept it.
pub(crate) const CACHE_FILE: &str = ".krea-batch.openapi.json";
/// krea-batch's folder in the user's cache folder.
const CACHE_DIR: &str = "krea-batch";

/// The user's cache folder for krea-batch, from `env`: `$XDG_CACHE_HOME/krea-batch`, else
/// `$HOME/.cache/krea-batch` (the XDG base-directory rules: relative values are ignored).
#[must_use]
pub(crate) fn user_cache_dir(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let absolute = |name: &str| env(name).map(PathBuf::from).filter(|path| path.is_absolute());
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".cache")))
        .map(|cache| cache.join(CACHE_DIR))
}

/// The cache file of `base`'s document in `dir`: `openapi-<host>[-<port>]-<hash>.json`, the
/// hash over the whole base URL, so each API (Krea, a proxy, a simulation) has its own.
#[must_use]
pub(crate) fn cache_file_in(dir: &Path, base: &reqwest::Url) -> PathBuf {
    use sha2::Digest as _;
    let normalised = base.as_str().trim_end_matches('/');
    let hash = crate::job::hex(&sha2::Sha256::digest(normalised.as_bytes()));
    let mut host: String = base
        .host_str()
        .unwrap_or("api")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' })
        .take(64)
        .collect();
    if let Some(port) = base.port() {
        host = format!("{host}-{port}");
    }
    dir.join(format!("openapi-{host}-{}.json", &hash[..16]))
}

/// Where the document of `base` is cached: in the user's cache folder ([`user_cache_dir`]),
/// whatever the state file, so `check --offline` finds it from any folder; beside `state`
/// only when the user has no cache folder.
#[must_use]
pub(crate) fn cache_path(base: &reqwest::Url, state: &Path) -> PathBuf {
    match user_cache_dir(|name| std::env::var_os(name)) {
        Some(dir) => cache_file_in(&dir, base),
        None => state.parent().unwrap_or_else(|| Path::new(".")).join(CACHE_FILE),
    }
}
/// The largest document read.
const MAX_BYTES: usize = 32 << 20;

/// Where the document comes from.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// A file given with `--openapi`.
    File(PathBuf),
    /// `<base_url>/openapi.json`, cached in `cache`.
    Api {
        /// The API's base URL.
        base: reqwest::Url,
        /// The cache file.
        cache: PathBuf,
        /// Use the cache only, never the network.
        offline: bool,
    },
}

/// Why no OpenAPI document could be had. Callers warn and go on.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Not JSON.
    #[error("{origin} is not an OpenAPI document: {source}")]
    NotJson {
        /// Where it was read from.
        origin: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// JSON without `paths`.
    #[error("{0} has no `paths`: not an OpenAPI document")]
    NoPaths(String),
    /// `--openapi FILE` cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `--offline` without a cached document.
    #[error("--offline, and there is no cached OpenAPI document at {}", .0.display())]
    NoCache(PathBuf),
    /// The HTTP client could not be set up.
    #[error("cannot set up a client: {0}")]
    Client(#[source] reqwest::Error),
    /// The fetch failed.
    #[error("cannot fetch {url}: {}", crate::api::error_chain(source))]
    Fetch {
        /// The document's URL.
        url: String,
        /// The error.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The document's URL.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
    },
    /// The document is larger than `MAX_BYTES`.
    #[error("{url} is larger than {} MiB", MAX_BYTES >> 20)]
    TooLarge {
        /// The document's URL.
        url: String,
    },
}

/// A parsed OpenAPI document and where it came from.
#[derive(Clone, Debug)]
pub struct ApiDocument {
    doc: Value,
    /// Where it was read from, for messages.
    pub origin: String,
}

impl ApiDocument {
    /// Parses a document.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, DocumentError> {
        let doc: Value = serde_json::from_slice(bytes)
            .map_err(|source| DocumentError::NotJson { origin: origin.to_owned(), source })?;
        if doc.get("paths").and_then(Value::as_object).is_none() {
            return Err(DocumentError::NoPaths(origin.to_owned()));
        }
        Ok(Self { doc, origin: origin.to_owned() })
    }

    /// The whole document, which `$ref`s point into.
    #[must_use]
    pub(crate) fn root(&self) -> &Value {
        &self.doc
    }

    /// The operation that generates with `model` (`POST /generate/<model>`): its summary,
    /// description and request body.
    #[must_use]
    pub(crate) fn operation(&self, model: &str) -> Option<&Value> {
        self.doc.get("paths")?.get(format!("/generate/{model}"))?.get("post")
    }

    /// The request-body schema of `model` (`image/bfl/flux-1-dev`), if the document has it.
    #[must_use]
    pub fn request_schema(&self, model: &str) -> Option<&Value> {
        self.operation(model)?
            .get("requestBody")?
            .get("content")?
            .get("application/json")?
            .get("schema")
    }

    /// The models the document describes (`image/bfl/flux-1-dev`, …).
    pub fn models(&self) -> impl Iterator<Item = &str> {
        let paths = self.doc.get("paths").and_then(Value::as_object).into_iter().flatten();
        paths.filter_map(|(path, item)| {
            item.get("post").and(path.strip_prefix("/generate/")).filter(|model| !model.is_empty())
        })
    }

    /// The problems of `body` (JSON text) for `model`; `None` when the document does not know
    /// the model.
    #[must_use]
    pub fn check(&self, model: &str, body: &str) -> Option<Vec<Problem>> {
        let schema = self.request_schema(model)?;
        let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        Some(validate(schema, &value, &self.doc))
    }
}

/// What checking a job file against the document found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SchemaReport {
    /// Where the document came from (empty when none could be had).
    pub origin: String,
    /// Refusals Krea would give, as `file:line: job NAME (MODEL): field: problem`.
    pub problems: Vec<String>,
    /// Things not checked: the document could not be had, a model it does not know.
    pub warnings: Vec<String>,
}

/// The most problems listed; the rest are counted.
const LISTED_PROBLEMS: usize = 20;

impl SchemaReport {
    /// Checks every job of `file`, or says why nothing could be checked.
    #[must_use]
    pub fn of(document: Result<&ApiDocument, &DocumentError>, file: &JobFile) -> Self {
        let document = match document {
            Ok(document) => document,
            Err(why) => {
                let mut report = Self {
                    warnings: vec![format!("the request bodies were not checked: {why}")],
                    ..Self::default()
                };
                report.problems = unchecked_prompts(file, |_| false);
                return report;
            }
        };
        let mut report = Self { origin: document.origin.clone(), ..Self::default() };
        let models: Vec<&str> = document.models().collect();
        let mut unknown_models = BTreeSet::new();
        let mut typos = HashSet::new();
        let mut seen = HashSet::new();
        let mut params_lines = HashMap::new();
        let mut more = 0;
        let source = file.source.display();
        let mut push = |report: &mut Self, line: String| {
            if report.problems.len() < LISTED_PROBLEMS {
                report.problems.push(line);
            } else {
                more += 1;
            }
        };
        for job in &file.jobs {
            let Some(problems) = document.check(&job.model, &job.body) else {
                // A path close to one the document lists is a typo Krea would refuse; one far
                // from all of them may be a model newer than the document.
                if !unknown_models.insert(job.model.clone()) {
                    continue;
                }
                if let Some(near) = crate::schema::closest(&job.model, &models) {
                    let line = format!(
                        "{source}:{}: job {}: model {}: {} lists no such model; did you mean \
                         {near}?",
                        job.line, job.name, job.model, document.origin
                    );
                    push(&mut report, line);
                    typos.insert(job.model.clone());
                }
                continue;
            };
            let body = if problems.is_empty() { Map::new() } else { job.body_map() };
            for problem in problems {
                // A field the job takes from the top-level `params:` is wrong there, once.
                let field = problem.path.split(['.', '[']).next().unwrap_or_default();
                let default = file.params.get(field).filter(|value| body.get(field) == Some(value));
                let at_params = default.and_then(|_| {
                    *params_lines
                        .entry(field.to_owned())
                        .or_insert_with(|| jobfile::params_line(&file.source, field))
                });
                let (line, text) = match at_params {
                    Some(line) => {
                        (line, format!("{source}:{line}: params ({}): {problem}", job.model))
                    }
                    None => (
                        job.line,
                        format!(
                            "{source}:{}: job {} ({}): {problem}",
                            job.line, job.name, job.model
                        ),
                    ),
                };
                // `count` copies share one entry, and jobs share the defaults: report it once.
                if seen.insert((line, problem.to_string())) {
                    push(&mut report, text);
                }
            }
        }
        for line in stage_problems(document, file) {
            push(&mut report, line);
        }
        let unchecked = unchecked_prompts(file, |model| document.request_schema(model).is_some());
        for problem in unchecked {
            push(&mut report, problem);
        }
        if more > 0 {
            report.problems.push(format!("… and {more} more"));
        }
        for model in unknown_models.iter().filter(|model| !typos.contains(*model)) {
            report.warnings.push(format!(
                "{} does not describe {model}; its jobs were not checked (a new model?)",
                document.origin
            ));
        }
        report
    }
}

/// The problems of the stages' (`then:`) request bodies, each checked as it would be sent with
/// an input in its place (a stage's body is whole only once its input exists: a stand-in URL,
/// and a 1024×1024 size for an enhancer), once per entry and stage. A stage whose model the
/// document does not describe is not checked.
fn stage_problems(document: &ApiDocument, file: &JobFile) -> Vec<String> {
    let source = file.source.display();
    let mut seen = HashSet::new();
    let mut lines = Vec::new();
    for job in &file.jobs {
        let Some(chain) = job.chain.as_deref().and_then(crate::chain::Chain::parse) else {
            continue;
        };
        for (index, stage) in chain.stages.iter().enumerate() {
            if !seen.insert((job.line, index)) {
                continue;
            }
            let body = crate::chain::stage_body(stage, STAND_IN_INPUT, Some((1024, 1024)));
            let body = crate::job::canonical_json(&body);
            for problem in document.check(&stage.model, &body).unwrap_or_default() {
                lines.push(format!(
                    "{source}:{}: job {} stage {} ({}): {problem}",
                    job.line,
                    chain.base,
                    index + 1,
                    stage.model
                ));
            }
        }
    }
    lines
}

/// Jobs without a prompt whose model's schema is not at hand (`has_schema` says which are):
/// only a schema can say that a model takes no prompt, so without one a prompt stays required,
/// as it always was, except for `enhance/` models, which take none (Topaz's enhancers). One
/// line per entry, at its line. With the schema, its `required` decides (`schema.rs`).
fn unchecked_prompts(file: &JobFile, has_schema: impl Fn(&str) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    for job in &file.jobs {
        let no_prompt = !job.body.contains("\"prompt\"") || !job.body_map().contains_key("prompt");
        if !no_prompt || job.model.starts_with("enhance/") || !seen.insert(job.line) {
            continue;
        }
        if has_schema(&job.model) {
            continue;
        }
        lines.push(format!(
            "{}:{}: job {} ({}): no prompt, and without this model's schema krea-batch cannot \
             tell that it takes none; write a `prompt:`, or check again with the schema at hand \
             (online, or --openapi FILE)",
            file.source.display(),
            job.line,
            job.name,
            job.model
        ));
    }
    lines
}

/// The input URL a stage's body is checked with before its input exists.
const STAND_IN_INPUT: &str = "https://example.com/input.png";

/// Gets the document from `source`. Errors say what was tried; callers warn and go on.
pub(crate) async fn obtain(source: &Source) -> Result<ApiDocument, DocumentError> {
    match source {
        Source::File(path) => {
            let bytes = std::fs::read(path)
                .map_err(|source| DocumentError::Read { path: path.clone(), source })?;
            ApiDocument::parse(&bytes, &path.display().to_string())
        }
        Source::Api { base, cache, offline } => {
            let cached = read_cache(cache);
            if let Some((bytes, age)) = &cached {
                if *offline || *age < CACHE_FOR {
                    return ApiDocument::parse(bytes, &format!("{} (cached)", cache.display()));
                }
            } else if *offline {
                return Err(DocumentError::NoCache(cache.clone()));
            }
            match fetch(base).await {
                Ok(bytes) => {
                    let document = ApiDocument::parse(&bytes, &openapi_url(base))?;
                    if let Err(err) = write_cache(cache, &bytes) {
                        tracing::debug!(%err, "cannot cache the OpenAPI document");
                    }
                    Ok(document)
                }
                // A stale copy is better than none.
                Err(err) => match cached {
                    Some((bytes, _)) => {
                        tracing::warn!(%err, "using the cached OpenAPI document");
                        ApiDocument::parse(&bytes, &format!("{} (cached, stale)", cache.display()))
                    }
                    None => Err(err),
                },
            }
        }
    }
}

fn openapi_url(base: &reqwest::Url) -> String {
    format!("{}/openapi.json", base.as_str().trim_end_matches('/'))
}

/// Writes the cache file, creating its folder (private to the user) if needed.
fn write_cache(cache: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if let Some(dir) = cache.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    crate::files::write_atomically(cache, bytes, false)?;
    Ok(())
}

/// The cache's bytes and age, if there is one.
fn read_cache(path: &Path) -> Option<(Vec<u8>, Duration)> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let age = SystemTime::now().duration_since(modified).unwrap_or_default();
    Some((std::fs::read(path).ok()?, age))
}

/// `GET <base>/openapi.json` (public: sent without the key).
async fn fetch(base: &reqwest::Url) -> Result<Vec<u8>, DocumentError> {
    let url = openapi_url(base);
    let client = reqwest::Client::builder()
        .user_agent(crate::api::USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(DocumentError::Client)?;
    let fetch_error = |source| DocumentError::Fetch { url: url.clone(), source };
    let mut response = client.get(&url).send().await.map_err(fetch_error)?;
    if !response.status().is_success() {
        return Err(DocumentError::Status { url, status: response.status() });
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
        if bytes.len() + chunk.len() > MAX_BYTES {
            return Err(DocumentError::TooLarge { url });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// How request bodies are checked against Krea's schemas before anything is sent.
#[derive(Clone, Debug, Default)]
pub struct SchemaChoice {
    /// `--openapi FILE`: this document instead of `<api>/openapi.json`.
    pub openapi: Option<PathBuf>,
    /// `--offline`: the cached document only.
    pub offline: bool,
    /// `--no-validate`: run even with problems (they are still logged).
    pub skip: bool,
}

/// Checks `file`'s bodies against the OpenAPI document `choice` names (cached per user, or
/// beside `state` when the user has no cache folder: `cache_path`).
pub async fn schema_report(
    file: &JobFile,
    base: &reqwest::Url,
    state: &Path,
    choice: &SchemaChoice,
) -> SchemaReport {
    let source = match &choice.openapi {
        Some(path) => Source::File(path.clone()),
        None => Source::Api {
            base: base.clone(),
            cache: cache_path(base, state),
            offline: choice.offline,
        },
    };
    let document = obtain(&source).await;
    SchemaReport::of(document.as_ref(), file)
}

/// Refuses to start a run whose bodies Krea would refuse, unless `--no-validate`; logs the
/// warnings (a model the document does not know, no document at all).
pub(crate) async fn enforce_schema(
    file: &JobFile,
    base: &reqwest::Url,
    state: &Path,
    choice: &SchemaChoice,
) -> Result<(), InputError> {
    let report = schema_report(file, base, state, choice).await;
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    if report.problems.is_empty() {
        return Ok(());
    }
    let listed = report.problems.join("\n  ");
    if choice.skip {
        tracing::warn!("--no-validate: sending bodies Krea may refuse:\n  {listed}");
        return Ok(());
    }
    Err(InputError::msg(format!(
        "Krea would refuse these request bodies (checked against {}):\n  {listed}\n\
         Fix the job file, or run with --no-validate to send them anyway.",
        report.origin
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn document() -> ApiDocument {
        let doc = json!({"paths": {"/generate/image/bfl/flux-1-dev": {"post": {"requestBody": {"content": {
            "application/json": {"schema": {
                "type": "object",
                "properties": {"prompt": {"type": "string"}, "width": {"type": "number", "maximum": 2368}},
                "required": ["prompt"], "additionalProperties": false
            }}
        }}}}}});
        ApiDocument::parse(doc.to_string().as_bytes(), "test").expect("document")
    }

    #[test]
    fn models_are_found_and_checked() {
        let doc = document();
        assert_eq!(
            doc.check("image/bfl/flux-1-dev", r#"{"prompt":"x","width":1024}"#),
            Some(vec![])
        );
        let problems =
            doc.check("image/bfl/flux-1-dev", r#"{"prompt":"x","widht":1}"#).expect("known");
        assert_eq!(problems[0].path, "widht");
        assert_eq!(doc.check("image/new/model", r#"{"prompt":"x"}"#), None, "unknown model");
    }

    /// A job file of prompt-less jobs: one for a model the document knows, one it does not,
    /// one enhance model.
    fn prompt_less() -> JobFile {
        let text = "jobs:\n  - model: image/bfl/flux-1-dev\n  - model: image/new/model\n    \
                    count: 2\n  - model: enhance/topaz/x\n  - model: image/new/model\n    \
                    prompt: fine\n";
        crate::jobfile::parse(text.as_bytes(), Path::new("jobs.yaml")).expect("valid")
    }

    #[test]
    fn a_prompt_is_left_out_only_where_a_schema_allows_or_an_enhance_model() {
        let file = prompt_less();
        let report = SchemaReport::of(Ok(&document()), &file);
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        assert!(
            report.problems[0].contains("jobs.yaml:2:")
                && report.problems[0].contains("prompt: is required")
        );
        assert!(report.problems[1].starts_with("jobs.yaml:3: job"), "{:?}", report.problems);
        assert!(report.problems[1].contains("write a `prompt:`"), "{:?}", report.problems);

        let unreachable = DocumentError::NoCache(PathBuf::from("cache.json"));
        let report = SchemaReport::of(Err(&unreachable), &file);
        let lines: Vec<&str> =
            report.problems.iter().map(|p| p.split(' ').next().unwrap_or_default()).collect();
        assert_eq!(lines, ["jobs.yaml:2:", "jobs.yaml:3:"], "one per entry, enhance spared");
    }

    #[test]
    fn stages_are_checked_with_an_input_in_place_and_named() {
        let doc = json!({"paths": {"/generate/enhance/topaz/standard-enhance": {"post": {
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object",
                "properties": {"image_url": {"type": "string"}, "width": {"type": "number"},
                               "height": {"type": "number"}, "model": {"type": "string"}},
                "required": ["image_url", "width", "height", "model"],
                "additionalProperties": false
            }}}}
        }}}});
        let doc = ApiDocument::parse(doc.to_string().as_bytes(), "test").expect("document");
        let text = "model: image/bfl/flux-1-dev\njobs:\n  - {name: castle, prompt: x, count: 2, \
                    then: [{model: enhance/topaz/standard-enhance, params: {sharpen: 1}}]}\n";
        let file = jobfile::parse(text.as_bytes(), Path::new("jobs.yaml")).expect("valid");
        let problems = stage_problems(&doc, &file);
        // The input and size a stage gets are not missing; its own fields are checked, once
        // for the entry's two copies.
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|line| line.starts_with("jobs.yaml:3: job castle-1 stage 1")));
        assert!(problems.iter().any(|line| line.contains("sharpen")), "{problems:?}");
        assert!(problems.iter().any(|line| line.contains("model")), "{problems:?}");
    }

    #[test]
    fn not_a_document_is_refused() {
        assert!(ApiDocument::parse(b"{}", "x").is_err());
        assert!(ApiDocument::parse(b"<html>", "x").is_err());
    }

    #[test]
    fn the_cache_is_per_user_and_per_api_base() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).into())
            }
        };
        let both = env(&[("XDG_CACHE_HOME", "/x/cache"), ("HOME", "/home/u")]);
        assert_eq!(user_cache_dir(both), Some(PathBuf::from("/x/cache/krea-batch")));
        let home = env(&[("XDG_CACHE_HOME", "relative/ignored"), ("HOME", "/home/u")]);
        assert_eq!(user_cache_dir(home), Some(PathBuf::from("/home/u/.cache/krea-batch")));
        assert_eq!(user_cache_dir(env(&[])), None);

        let dir = Path::new("/c");
        let url = |text: &str| reqwest::Url::parse(text).expect("url");
        let krea = cache_file_in(dir, &url("https://api.krea.ai"));
        assert_eq!(
            krea,
            cache_file_in(dir, &url("https://api.krea.ai/")),
            "a trailing / is the same base"
        );
        assert!(
            krea.to_string_lossy().starts_with("/c/openapi-api.krea.ai-"),
            "{}",
            krea.display()
        );
        let sim = cache_file_in(dir, &url("http://127.0.0.1:4567"));
        let proxy = cache_file_in(dir, &url("https://api.krea.ai/proxy"));
        assert!(sim.to_string_lossy().contains("127.0.0.1-4567"), "{}", sim.display());
        assert_ne!(krea, proxy, "another path, another API");
    }

    #[tokio::test]
    async fn the_cache_folder_is_made_when_the_document_is_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("deeper/krea-batch/openapi.json");
        write_cache(&cache, br#"{"paths": {}}"#).expect("written");
        assert!(read_cache(&cache).is_some());
    }

    #[tokio::test]
    async fn the_cache_serves_offline_and_its_absence_is_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join(CACHE_FILE);
        let base = reqwest::Url::parse("https://api.krea.ai").expect("url");
        let offline = Source::Api { base: base.clone(), cache: cache.clone(), offline: true };
        let message = obtain(&offline).await.expect_err("no cache").to_string();
        assert!(message.contains("--offline"), "{message}");
        std::fs::write(&cache, br#"{"paths": {}}"#).expect("cache");
        assert!(obtain(&offline).await.expect("cached").origin.contains("cached"));
    }

    #[tokio::test]
    async fn the_cache_is_used_for_a_day_then_fetched_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join(CACHE_FILE);
        std::fs::write(&cache, br#"{"paths": {}}"#).expect("cache");
        // Nothing listens on port 1: a fetch fails at once.
        let base = reqwest::Url::parse("http://127.0.0.1:1").expect("url");
        let online = Source::Api { base, cache: cache.clone(), offline: false };
        let fresh = obtain(&online).await.expect("fresh cache");
        assert!(fresh.origin.ends_with("(cached)"), "no fetch within a day: {}", fresh.origin);
        let two_days_ago = SystemTime::now() - Duration::from_hours(48);
        let file = std::fs::File::options().write(true).open(&cache).expect("cache file");
        file.set_modified(two_days_ago).expect("mtime");
        let stale = obtain(&online).await.expect("stale cache, as the fetch failed");
        assert!(stale.origin.ends_with("(cached, stale)"), "fetched again: {}", stale.origin);
    }
}
