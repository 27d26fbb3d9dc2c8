//! Krea's OpenAPI document: where to get it (`<base_url>/openapi.json`, cached beside the state
//! file for a day; `--offline` uses the cache whatever its age; `--openapi FILE` a file), and
//! each model's request schema in it, so that `check` and `run` can refuse a job file whose
//! bodies Krea would refuse, before anything is spent (`schema.rs` does the checking).
//!
//! A model the document does not know gets a warning, not an error (the model list changes
//! every few weeks); a document that cannot be had gets a warning and the run goes on.

use crate::jobfile::JobFile;
use crate::schema::{Problem, validate};
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a cached document is used before it is fetched again.
pub const CACHE_FOR: Duration = Duration::from_hours(24);
/// The file name of the cache, beside the state file.
pub const CACHE_FILE: &str = ".krea-batch.openapi.json";
/// The largest document read.
const MAX_BYTES: usize = 32 << 20;

/// Where the document comes from.
#[derive(Clone, Debug)]
pub enum Source {
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

/// A parsed OpenAPI document and where it came from.
#[derive(Clone, Debug)]
pub struct ApiDocument {
    doc: Value,
    /// Where it was read from, for messages.
    pub origin: String,
}

impl ApiDocument {
    /// Parses a document.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_slice(bytes)
            .map_err(|err| format!("{origin} is not an OpenAPI document: {err}"))?;
        if doc.get("paths").and_then(Value::as_object).is_none() {
            return Err(format!("{origin} has no `paths`: not an OpenAPI document"));
        }
        Ok(Self { doc, origin: origin.to_owned() })
    }

    /// The request-body schema of `model` (`image/bfl/flux-1-dev`), if the document has it.
    #[must_use]
    pub fn request_schema(&self, model: &str) -> Option<&Value> {
        self.doc
            .get("paths")?
            .get(format!("/generate/{model}"))?
            .get("post")?
            .get("requestBody")?
            .get("content")?
            .get("application/json")?
            .get("schema")
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
    pub fn of(document: Result<&ApiDocument, &str>, file: &JobFile) -> Self {
        let document = match document {
            Ok(document) => document,
            Err(why) => {
                return Self {
                    warnings: vec![format!("the request bodies were not checked: {why}")],
                    ..Self::default()
                };
            }
        };
        let mut report = Self { origin: document.origin.clone(), ..Self::default() };
        let mut unknown_models = BTreeSet::new();
        let mut seen = HashSet::new();
        let mut more = 0;
        for job in &file.jobs {
            match document.check(&job.model, &job.body) {
                None => {
                    unknown_models.insert(job.model.clone());
                }
                Some(problems) => {
                    for problem in problems {
                        let line = format!(
                            "{}:{}: job {} ({}): {problem}",
                            file.source.display(),
                            job.line,
                            job.name,
                            job.model
                        );
                        // `count` copies share one entry: report it once.
                        if !seen.insert((job.line, problem.to_string())) {
                            continue;
                        }
                        if report.problems.len() < LISTED_PROBLEMS {
                            report.problems.push(line);
                        } else {
                            more += 1;
                        }
                    }
                }
            }
        }
        if more > 0 {
            report.problems.push(format!("… and {more} more"));
        }
        for model in unknown_models {
            report.warnings.push(format!(
                "{} does not describe {model}; its jobs were not checked (a new model?)",
                document.origin
            ));
        }
        report
    }
}

/// Gets the document from `source`. Errors say what was tried; callers warn and go on.
pub async fn obtain(source: &Source) -> Result<ApiDocument, String> {
    match source {
        Source::File(path) => {
            let bytes = std::fs::read(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            ApiDocument::parse(&bytes, &path.display().to_string())
        }
        Source::Api { base, cache, offline } => {
            let cached = read_cache(cache);
            if let Some((bytes, age)) = &cached {
                if *offline || *age < CACHE_FOR {
                    return ApiDocument::parse(bytes, &format!("{} (cached)", cache.display()));
                }
            } else if *offline {
                return Err(format!(
                    "--offline, and there is no cached OpenAPI document at {}",
                    cache.display()
                ));
            }
            match fetch(base).await {
                Ok(bytes) => {
                    let document = ApiDocument::parse(&bytes, &openapi_url(base))?;
                    if let Err(err) = crate::download::write_atomically(cache, &bytes, false) {
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

/// The cache's bytes and age, if there is one.
fn read_cache(path: &Path) -> Option<(Vec<u8>, Duration)> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let age = SystemTime::now().duration_since(modified).unwrap_or_default();
    Some((std::fs::read(path).ok()?, age))
}

/// `GET <base>/openapi.json` (public: sent without the key).
async fn fetch(base: &reqwest::Url) -> Result<Vec<u8>, String> {
    let url = openapi_url(base);
    let client = reqwest::Client::builder()
        .user_agent(crate::api::USER_AGENT)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|err| format!("cannot set up a client: {err}"))?;
    let mut response = client
        .get(&url)
        .send()
        .await
        .map_err(|err| format!("cannot fetch {url}: {}", crate::api::error_chain(&err)))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| format!("cannot fetch {url}: {}", crate::api::error_chain(&err)))?
    {
        if bytes.len() + chunk.len() > MAX_BYTES {
            return Err(format!("{url} is larger than {} MiB", MAX_BYTES >> 20));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
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

    #[test]
    fn not_a_document_is_refused() {
        assert!(ApiDocument::parse(b"{}", "x").is_err());
        assert!(ApiDocument::parse(b"<html>", "x").is_err());
    }

    #[tokio::test]
    async fn the_cache_serves_offline_and_its_absence_is_explained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join(CACHE_FILE);
        let base = reqwest::Url::parse("https://api.krea.ai").expect("url");
        let offline = Source::Api { base: base.clone(), cache: cache.clone(), offline: true };
        let message = obtain(&offline).await.expect_err("no cache");
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
