//! The simulation's settings: [`SimConfig`] (what the simulated Krea account and its models look
//! like), [`Faults`] (what goes wrong, and how often) and [`Quirks`] (the places where Krea's own
//! documents disagree, and which variant the simulation answers with). Plain data, read from YAML
//! or JSON; durations are written the humantime way (`"2s"`, `"150ms"`) or as seconds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Every setting at its default, each with one line saying what it does: what
/// `simulate-api --print-config` prints, and a valid configuration file as it is.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("default_config.yaml");

/// One line per setting (`faults.reset_rate  API requests whose connection …`), from
/// [`DEFAULT_CONFIG_YAML`]: the knobs as `simulate-api --help` lists them.
#[must_use]
pub fn config_keys_help() -> String {
    let mut help = String::from(
        "Settings (YAML, for --config; `--print-config` prints them all with their defaults):\n",
    );
    let mut comment = String::new();
    let mut parents: Vec<(usize, String)> = Vec::new();
    for line in DEFAULT_CONFIG_YAML.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() {
            comment.clear();
        } else if let Some(said) = text.strip_prefix('#') {
            said.trim().clone_into(&mut comment);
        } else if let Some((key, value)) = text.split_once(':') {
            parents.retain(|(depth, _)| *depth < indent);
            let mut path: Vec<&str> = parents.iter().map(|(_, name)| name.as_str()).collect();
            path.push(key);
            let _ = writeln!(help, "  {:<34} {comment}", path.join("."));
            if value.trim().is_empty() {
                parents.push((indent, key.to_owned()));
            }
            comment.clear();
        }
    }
    help
}

/// Everything the simulated Krea API can be told. `Default` is a pleasant demo account: a few
/// jobs at once, a few seconds per image, a generous balance, no faults.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[allow(clippy::struct_excessive_bools, reason = "independent switches, each one behaviour")]
pub struct SimConfig {
    /// Port of the API listener on 127.0.0.1 (0: any free port).
    pub api_port: u16,
    /// Port of the result-file host on 127.0.0.1 (0: any free port).
    pub files_port: u16,
    /// Port of the third origin that some redirect faults point at (0: any free port).
    pub redirect_port: u16,
    /// The one API key the server accepts, as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Seed of every random choice (ids, random failures, faults), so runs are reproducible.
    pub seed: u64,
    /// Jobs that run at once; later jobs wait as `backlogged`.
    pub concurrency: usize,
    /// Jobs that may wait beyond `concurrency`; a POST beyond both gets 429.
    pub backlog: usize,
    /// `Retry-After` seconds sent with the concurrency 429 (Krea documents none).
    pub retry_after_secs: Option<u64>,
    /// How long every `POST /generate` takes to be answered: the request is handled (its job
    /// created) on arrival and its answer held back this long, as a distant API's round trip
    /// would. Each connection waits on its own; other requests are not held up.
    #[serde(with = "duration_text")]
    pub post_latency: Duration,
    /// A request-rate limit on `POST /generate` (none by default): beyond it, 429 with
    /// `Retry-After` and [`RATE_LIMIT_MESSAGE`], a different text from the concurrency 429's.
    pub post_rate_limit: Option<RateLimit>,
    /// Starting API balance in USD.
    pub balance_usd: f64,
    /// Time an image or enhance job runs once started (0: it completes at once).
    #[serde(with = "duration_text")]
    pub job_time: Duration,
    /// Time a video job runs once started.
    #[serde(with = "duration_text")]
    pub video_job_time: Duration,
    /// Result files per completed job.
    pub outputs_per_job: u32,
    /// Size in bytes every result file is padded to (0: the natural size, a few KB). Files of
    /// any size (gibibytes too) are streamed, never held in memory.
    pub result_bytes: u64,
    /// A prompt containing this text fails with a content-moderation error.
    pub moderation_marker: String,
    /// A prompt containing this text stays `processing` until cancelled (or timed out).
    pub stuck_marker: String,
    /// Fraction (0..1) of jobs that fail with a provider error.
    pub fail_rate: f64,
    /// Krea's automatic timeout: a job still running this long after it started fails.
    #[serde(with = "optional_duration_text")]
    pub auto_timeout: Option<Duration>,
    /// Model paths (`image/bfl/flux-1-dev`) that answer 403.
    pub forbidden_models: Vec<String>,
    /// Model paths that the account's plan does not include: they answer 402 with
    /// a message asking for a higher plan, Krea's other 402, which
    /// says nothing of the balance.
    pub plan_required_models: Vec<String>,
    /// Model paths that answer 410 `model_unavailable`, with what to say.
    pub sunset_models: BTreeMap<String, SunsetNotice>,
    /// Model paths whose responses carry `Deprecation`, `Sunset` and `Link` headers.
    pub deprecated_models: Vec<String>,
    /// Zero-data-retention mode: any input URL that is not a `data:` URL gets 422.
    pub zero_data_retention: bool,
    /// Allow `DELETE /jobs/{id}` in every pending state, not only `queued` and `processing`.
    pub cancel_any_pending: bool,
    /// How many requests the request log keeps (the most recent ones); counters count all.
    pub request_log_limit: usize,
    /// Hostile tests only (Krea does not do this): quote `Bearer <key>` in every failed job's
    /// `error` and `result.error`, in `created_at` and `completed_at`, in `Deprecation`,
    /// `Sunset` and `Link` headers on every `POST /generate`, and, when a job has more than one
    /// result, in the query of its last result URL. (A status string quoting the key is
    /// [`Quirks::undocumented_state`] set to such a text.)
    pub echo_key: bool,
    /// Hostile tests only (Krea does not do this): every job after the first is answered with
    /// the first job's id. The new job still runs and is billed, but no id reaches it: what a
    /// client sees from an API that hands out an id twice.
    pub reuse_job_ids: bool,
    /// Variants of the response shapes Krea's documents disagree about.
    pub quirks: Quirks,
    /// Fault injection at start; change it later with `SimServer::set_faults`.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_port: 0,
            files_port: 0,
            redirect_port: 0,
            api_key: "sim-key".to_owned(),
            seed: 42,
            concurrency: 4,
            backlog: 16,
            retry_after_secs: None,
            post_latency: Duration::ZERO,
            post_rate_limit: None,
            balance_usd: 100.0,
            job_time: Duration::from_secs(3),
            video_job_time: Duration::from_secs(12),
            outputs_per_job: 1,
            result_bytes: 0,
            moderation_marker: "[nsfw]".to_owned(),
            stuck_marker: "[stuck]".to_owned(),
            fail_rate: 0.0,
            auto_timeout: None,
            forbidden_models: Vec::new(),
            plan_required_models: Vec::new(),
            sunset_models: BTreeMap::new(),
            deprecated_models: Vec::new(),
            zero_data_retention: false,
            cancel_any_pending: false,
            request_log_limit: 20_000,
            echo_key: false,
            reuse_job_ids: false,
            quirks: Quirks::default(),
            faults: Faults::default(),
        }
    }
}

/// What a sunset model's 410 says.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SunsetNotice {
    /// Why the model went away.
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
    /// The day it stopped, `YYYY-MM-DD`.
    pub sunset_date: String,
    /// The model path to use instead, if any.
    pub replacement: Option<String>,
}

impl Default for SunsetNotice {
    fn default() -> Self {
        Self {
            reason: "This model has been retired.".to_owned(),
            message: "This model is no longer available. Please switch to its replacement."
                .to_owned(),
            sunset_date: "2026-01-01".to_owned(),
            replacement: None,
        }
    }
}

/// The documented-but-inconsistent response shapes. Each `false`/default is the shape of Krea's
/// OpenAPI document; each alternative is one a Krea page or report describes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
// Independent switches, each naming one documented variant; a state machine would hide that.
#[allow(clippy::struct_excessive_bools)]
pub struct Quirks {
    /// Spell the listing's cursor `nextCursor` (the docs page) instead of `next_cursor`.
    pub next_cursor_camel_case: bool,
    /// Give result URLs as objects `{"url": ...}` instead of strings.
    pub result_urls_as_objects: bool,
    /// Leave `status` out of the create response.
    pub omit_status_on_create: bool,
    /// Put failure details in `result.error` instead of a top-level `error: {code, message}`.
    pub failure_in_result: bool,
    /// Spell the 402 body `{"error": ...}` (the OpenAPI document) instead of `{"message": ...}`.
    pub payment_error_key: bool,
    /// An undocumented state name (say `"warming"`) a job passes through before `processing`.
    pub undocumented_state: Option<String>,
    /// Answer a request body the model refuses with `{"error", "details": [{path, message}]}`
    /// (the shape Krea's 400s are said to take) instead of `{"error": message}`.
    pub validation_details: bool,
}

/// Fault injection. Every rate is a probability per request in 0..1, drawn from the seeded RNG;
/// all zero (the default) means a well-behaved server. API faults hit `/generate` and `/jobs`,
/// download faults hit the file host; the control endpoints and `/openapi.json` are never faulted.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// API requests answered 500/502/503 before being handled (nothing is created).
    pub server_error_rate: f64,
    /// API requests whose connection is closed without a response, before being handled.
    pub reset_rate: f64,
    /// POSTs that create the job (it will be billed) or the uploaded asset and then close
    /// without answering.
    pub post_drop_rate: f64,
    /// API requests handled, then answered only after `slow_delay` (a POST creates its job).
    pub slow_rate: f64,
    /// How long a slow response waits; longer than a sane client's read timeout.
    #[serde(with = "duration_text")]
    pub slow_delay: Duration,
    /// GETs answered 200 with truncated or malformed JSON.
    pub malformed_json_rate: f64,
    /// GETs answered 200 with a huge (streamed) JSON body of `huge_body_bytes`.
    pub huge_body_rate: f64,
    /// Size of the huge body.
    pub huge_body_bytes: u64,
    /// Downloads answered 503.
    pub download_error_rate: f64,
    /// Downloads cut off partway, short of their `Content-Length`.
    pub download_truncate_rate: f64,
    /// Downloads redirected to a third origin that serves the same file.
    pub redirect_other_origin_rate: f64,
    /// Downloads redirected to the API origin, which also serves the file (and records whether
    /// the client brought its `Authorization` header along).
    pub redirect_api_origin_rate: f64,
    /// Downloads redirected to a plain-`http://` non-loopback address (TEST-NET, unreachable).
    pub redirect_insecure_rate: f64,
    /// Downloads redirected in an endless loop.
    pub redirect_loop_rate: f64,
    /// Downloads that drip: one byte per second, never finishing in any sane time (a result
    /// host that has stalled without closing the connection).
    pub download_drip_rate: f64,
    /// A 429 storm, starting when these faults are set.
    pub storm: Option<Storm>,
    /// POSTs whose prompt contains this text are answered 500 every time, and create nothing
    /// (a request Krea's servers choke on).
    pub server_error_marker: Option<String>,
    /// The first this many POSTs after these faults are set are answered 500 before being
    /// handled (nothing is created): a lost answer that tests can count on, unlike a rate.
    pub server_error_first_posts: u32,
    /// `GET /jobs` lists, after the account's jobs, an old item whose id is 300 characters long
    /// (no client can use it as a job id).
    pub unreadable_list_item: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            server_error_rate: 0.0,
            reset_rate: 0.0,
            post_drop_rate: 0.0,
            slow_rate: 0.0,
            slow_delay: Duration::from_secs(30),
            malformed_json_rate: 0.0,
            huge_body_rate: 0.0,
            huge_body_bytes: 100 * 1024 * 1024,
            download_error_rate: 0.0,
            download_truncate_rate: 0.0,
            redirect_other_origin_rate: 0.0,
            redirect_api_origin_rate: 0.0,
            redirect_insecure_rate: 0.0,
            redirect_loop_rate: 0.0,
            download_drip_rate: 0.0,
            storm: None,
            server_error_marker: None,
            server_error_first_posts: 0,
            unreadable_list_item: false,
        }
    }
}

/// The request-rate 429's message. Krea publishes none; this one names the request rate so that
/// a client can tell it from the concurrency 429 ("maximum number of concurrent jobs").
pub const RATE_LIMIT_MESSAGE: &str = "Too many requests: the request rate limit was exceeded.";

/// A request-rate limit: at most `requests` POSTs to `/generate` in any window of `per` (a
/// sliding window). POSTs refused by it do not count against it, so a client that waits out
/// `Retry-After` gets through.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// POSTs allowed per window (0 refuses every POST).
    pub requests: u32,
    /// The window's length.
    #[serde(with = "duration_text")]
    pub per: Duration,
}

/// A window during which a fraction of API requests get 429.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Storm {
    /// Fraction of API requests answered 429 during the window.
    pub rate: f64,
    /// Length of the window, from the moment the faults are set.
    #[serde(with = "duration_text")]
    pub duration: Duration,
    /// `Retry-After` seconds on the storm's 429s, if any.
    pub retry_after_secs: Option<u64>,
}

impl Default for Storm {
    fn default() -> Self {
        Self { rate: 0.5, duration: Duration::from_secs(5), retry_after_secs: None }
    }
}

/// A duration as text (`"2s"`, `"1m 30s"`) or as a number of seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum DurationText {
    Text(String),
    Seconds(f64),
}

impl DurationText {
    fn into_duration<E: serde::de::Error>(self) -> Result<Duration, E> {
        match self {
            Self::Text(text) => humantime::parse_duration(text.trim())
                .map_err(|err| E::custom(format!("invalid duration {text:?}: {err}"))),
            Self::Seconds(secs) => Duration::try_from_secs_f64(secs)
                .map_err(|err| E::custom(format!("invalid duration {secs} s: {err}"))),
        }
    }
}

/// Serde for `Duration` fields as humantime text.
mod duration_text {
    use super::DurationText;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(value: &Duration, out: S) -> Result<S::Ok, S::Error> {
        out.collect_str(&humantime::format_duration(*value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Duration, D::Error> {
        DurationText::deserialize(input)?.into_duration()
    }
}

/// Serde for `Option<Duration>` fields as humantime text or null.
mod optional_duration_text {
    use super::DurationText;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    // serde's `with` hands over a reference to the field's own type.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        out: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => out.collect_str(&humantime::format_duration(*duration)),
            None => out.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        input: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<DurationText>::deserialize(input)?.map(DurationText::into_duration).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_humantime_and_seconds() {
        let config: SimConfig = serde_yaml::from_str(
            "job_time: 250ms\nvideo_job_time: 1.5\nauto_timeout: 3m\nfaults:\n  storm:\n    duration: 2s\n",
        )
        .expect("valid config");
        assert_eq!(config.job_time, Duration::from_millis(250));
        assert_eq!(config.video_job_time, Duration::from_millis(1500));
        assert_eq!(config.auto_timeout, Some(Duration::from_mins(3)));
        assert_eq!(config.faults.storm.map(|storm| storm.duration), Some(Duration::from_secs(2)));
        assert_eq!(config.api_key, "sim-key");
        let limited: SimConfig =
            serde_yaml::from_str("post_latency: 300ms\npost_rate_limit: {requests: 10, per: 1s}\n")
                .expect("valid config");
        assert_eq!(limited.post_latency, Duration::from_millis(300));
        let limit = RateLimit { requests: 10, per: Duration::from_secs(1) };
        assert_eq!(limited.post_rate_limit, Some(limit));
        assert!(serde_yaml::from_str::<SimConfig>("post_rate_limit: {requests: 10}").is_err());
    }

    #[test]
    fn the_printed_default_config_is_the_default_and_names_every_key() {
        let printed: SimConfig = serde_yaml::from_str(DEFAULT_CONFIG_YAML).expect("valid YAML");
        let json = |config: &SimConfig| serde_json::to_value(config).expect("serialisable");
        assert_eq!(json(&printed), json(&SimConfig::default()));
        let help = config_keys_help();
        let defaults = json(&SimConfig::default());
        let mut keys = Vec::new();
        for (key, value) in defaults.as_object().expect("an object") {
            match value.as_object() {
                Some(inner) if key != "sunset_models" => {
                    keys.extend(inner.keys().map(|inner| format!("{key}.{inner}")));
                }
                _ => keys.push(key.clone()),
            }
        }
        for key in keys {
            let line = help.lines().find(|line| line.split_whitespace().next() == Some(&key));
            let line = line.unwrap_or_else(|| panic!("{key} missing from\n{help}"));
            assert!(line.len() > key.len() + 10, "{key} has no description: {line}");
        }
        assert!(!help.contains("SimConfig"));
    }

    #[test]
    fn config_round_trips_and_rejects_unknown_fields() {
        let text = serde_json::to_string(&SimConfig::default()).expect("serialisable");
        let back: SimConfig = serde_json::from_str(&text).expect("round trip");
        assert_eq!(back.job_time, SimConfig::default().job_time);
        assert!(serde_json::from_str::<SimConfig>(r#"{"concurency": 3}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"reset_rate": 0.5, "typo": 1}"#).is_err());
    }
}
