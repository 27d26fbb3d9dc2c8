//! The `api:`, `limits:` and `budget:` sections. They are plain `Deserialize` types (unknown
//! keys refused, every field optional with its default) so that the daemon configuration can
//! embed them too.
//!
//! Every per-value rule lives in a visitor below rather than in a check after deserialization:
//! an error raised while a node is being read carries that node's line and column, one raised
//! afterwards only the enclosing mapping's. The one rule spanning two fields (a first poll
//! delay above the cap) is [`Limits::check`], which the job file applies after reading.

use super::values::{parse_limit_duration, parse_size};
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::fmt;
use std::time::Duration;

/// Where the Krea API is: the `api:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// The API's base URL, `http://` or `https://`, without a trailing `/`; `None` means
    /// `https://api.krea.ai`. Tests and `--simulate` point it at the simulated API.
    #[serde(default, deserialize_with = "base_url")]
    pub base_url: Option<String>,
}

/// How hard krea-batch may push: the `limits:` section.
///
/// Krea publishes no numbers for its rate and concurrency limits, so the four pushing limits
/// (`submissions_per_minute`, `burst`, `max_in_flight`, `submission_concurrency`) are
/// **ceilings, per key**: a key written in the job file is a ceiling the controller
/// (`runner/controller.rs`) never exceeds, whatever it learns; a key left out (`None`) puts no
/// ceiling there, and the controller finds the account's capacity by itself. It is decided key
/// by key, not by whether a `limits:` section exists: a file that sets only `poll_interval`
/// still lets every pace be discovered, and a user under a quota writes just that quota.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Ceiling of the submission rate, POSTs per minute. Left out: learned from Krea's 429s.
    #[serde(deserialize_with = "some_positive_u32")]
    pub submissions_per_minute: Option<u32>,
    /// Ceiling of the submissions allowed at once before the rate applies. Left out: chosen.
    #[serde(deserialize_with = "some_positive_u32")]
    pub burst: Option<u32>,
    /// Ceiling of the jobs submitted and not yet terminal, backlogged ones included. Left out:
    /// the account's running capacity as learned, plus a shallow backlog.
    #[serde(deserialize_with = "some_positive_u32")]
    pub max_in_flight: Option<u32>,
    /// Ceiling of the submissions (POSTs) waiting for their answer at once, chosen under it
    /// from the measured round trip and the rate needed. Left out: 1, so that a lost answer
    /// is always attributed (`Ceilings::from_limits`).
    #[serde(deserialize_with = "some_positive_u32")]
    pub submission_concurrency: Option<u32>,
    /// Delay before the first poll of an image or enhance job. Default 2 s.
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Duration,
    /// Delay before the first poll of a video job. Default 5 s.
    #[serde(deserialize_with = "duration")]
    pub video_poll_interval: Duration,
    /// Cap of the exponential back-off between polls. Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub poll_interval_max: Duration,
    /// A job still unfinished this long after submission is given up on (and cancelled).
    /// Default 2 h 10 min: Krea's own timeout for external providers is 2 h.
    #[serde(deserialize_with = "duration")]
    pub job_timeout: Duration,
    /// Read timeout of each HTTP request. Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// Result files downloaded at once. Default 4.
    #[serde(deserialize_with = "positive_u32")]
    pub download_concurrency: u32,
    /// Largest result file accepted, in bytes. Default 2 GiB.
    #[serde(deserialize_with = "size")]
    pub max_result_size: u64,
    /// One result file's deadline: its headers must come within this, and the whole file
    /// within this plus its announced size at `download_min_rate`. Default 10 min.
    #[serde(deserialize_with = "duration")]
    pub download_timeout: Duration,
    /// The slowest a download may go, in bytes per second, over every 30 s (`16KiB`; a `/s`
    /// may be written after it). Default 16 KiB/s.
    #[serde(deserialize_with = "rate")]
    pub download_min_rate: u64,
    /// After the first Ctrl-C or SIGTERM, how long a download under way may go on before it is
    /// stopped (the job stays download pending for the next run or `krea-batch download`).
    /// Default 10 s; the service stops downloads within its `drain_time` in any case.
    #[serde(deserialize_with = "duration")]
    pub download_grace: Duration,
    /// First wait after a 429, a failed poll or a failed download; later waits grow from it.
    /// Default 5 s, as Krea's own scripts wait 5, 15, 45 s after a 429.
    #[serde(deserialize_with = "duration")]
    pub retry_backoff: Duration,
    /// After a submission that got no answer, how long past its own timeout to wait before
    /// looking for the job at Krea (`GET /jobs` may show a new job with a delay). Submissions
    /// pause meanwhile. Default 5 s.
    #[serde(deserialize_with = "duration")]
    pub reconcile_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            submissions_per_minute: None,
            burst: None,
            max_in_flight: None,
            submission_concurrency: None,
            poll_interval: Duration::from_secs(2),
            video_poll_interval: Duration::from_secs(5),
            poll_interval_max: Duration::from_secs(30),
            job_timeout: Duration::from_mins(2 * 60 + 10),
            request_timeout: Duration::from_secs(30),
            download_concurrency: 4,
            max_result_size: 2 << 30,
            download_timeout: Duration::from_mins(10),
            download_min_rate: 16 << 10,
            download_grace: Duration::from_secs(10),
            retry_backoff: Duration::from_secs(5),
            reconcile_after: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// Checks the rules deserialization cannot see alone: every count and duration above zero
    /// (also for values built in code). Returns the offending field and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let counts = [
            ("submissions_per_minute", self.submissions_per_minute),
            ("burst", self.burst),
            ("max_in_flight", self.max_in_flight),
            ("submission_concurrency", self.submission_concurrency),
            ("download_concurrency", Some(self.download_concurrency)),
        ];
        if let Some((field, _)) = counts.iter().find(|(_, value)| *value == Some(0)) {
            return Err((field, format!("{field} is 0; it must be at least 1")));
        }
        let durations = [
            ("poll_interval", self.poll_interval),
            ("video_poll_interval", self.video_poll_interval),
            ("poll_interval_max", self.poll_interval_max),
            ("job_timeout", self.job_timeout),
            ("request_timeout", self.request_timeout),
            ("retry_backoff", self.retry_backoff),
            ("reconcile_after", self.reconcile_after),
            ("download_timeout", self.download_timeout),
            ("download_grace", self.download_grace),
        ];
        if let Some((field, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
            return Err((field, format!("{field} is zero; it must be longer than that")));
        }
        if self.max_result_size == 0 {
            return Err(("max_result_size", "max_result_size is 0 bytes".into()));
        }
        if self.download_min_rate == 0 {
            return Err(("download_min_rate", "download_min_rate is 0 bytes per second".into()));
        }
        Ok(())
    }

    /// A first poll delay longer than `poll_interval_max`: the field and what is wrong. The
    /// poll schedule caps such a delay, so this is only worth refusing when the user wrote the
    /// delay (the job file checks that); a default above a low cap is simply capped.
    #[must_use]
    pub fn first_poll_above_cap(&self) -> Option<(&'static str, String)> {
        [("poll_interval", self.poll_interval), ("video_poll_interval", self.video_poll_interval)]
            .into_iter()
            .find(|(_, first)| *first > self.poll_interval_max)
            .map(|(field, first)| {
                (
                    field,
                    format!(
                        "{field} ({}) is longer than poll_interval_max ({}), the cap of the \
                         back-off; lower it or raise poll_interval_max",
                        humantime::format_duration(first),
                        humantime::format_duration(self.poll_interval_max),
                    ),
                )
            })
    }
}

/// Caps on the estimated spend: the `budget:` section of a job file or the daemon
/// configuration. Prices come from [`crate::pricing`]; the runner enforces the caps before
/// each submission (see `runner/budget.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The most all jobs of the state may cost, USD: those completed (billed) and those in
    /// flight at their estimated price.
    #[serde(default, deserialize_with = "usd")]
    pub max_usd: Option<f64>,
    /// The most jobs may cost per UTC day (by the day they completed, plus those in flight),
    /// USD; submitting resumes at midnight UTC.
    #[serde(default, deserialize_with = "usd")]
    pub per_day_usd: Option<f64>,
}

impl Budget {
    /// Checks the rule deserialization cannot see alone: at least one cap is set (`budget: {}`
    /// sets none). The job file and the daemon configuration both apply it.
    pub fn check(&self) -> Result<(), NoCap> {
        if self.max_usd.is_some() || self.per_day_usd.is_some() {
            return Ok(());
        }
        Err(NoCap)
    }
}

/// A budget that sets no cap (`budget: {}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the budget sets no cap; write `max_usd:` (all jobs) and/or `per_day_usd:` (per UTC day), \
     e.g. `budget: {{max_usd: 25}}`"
)]
pub struct NoCap;

/// An amount in USD: a number, 0 or more, written without quotes or currency sign.
fn usd<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    struct Usd;
    impl<'de> Visitor<'de> for Usd {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an amount in USD, like 25 or 7.50")
        }
        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
            inner.deserialize_any(self)
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
            #[allow(clippy::cast_precision_loss, reason = "dollar amounts are far below 2^52")]
            Ok(Some(value as f64))
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
            Err(E::custom(format!("{value} is negative; write 0 or more USD")))
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
            if !value.is_finite() {
                Err(E::custom(format!("{value} is not an amount; write 0 or more USD")))
            } else if value < 0.0 {
                Err(E::custom(format!("{value} is negative; write 0 or more USD")))
            } else {
                Ok(Some(value))
            }
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "expected an amount in USD as a number, like 25; found the text {value:?}; \
                 write it without quotes or currency sign"
            )))
        }
    }
    deserializer.deserialize_option(Usd)
}

/// A count limit: a whole number from 1 to 4294967295, written without quotes.
fn positive_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    struct PositiveU32;
    impl Visitor<'_> for PositiveU32 {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number of at least 1")
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<u32, E> {
            match u32::try_from(value) {
                Ok(0) => Err(E::custom("0 is out of range; it must be at least 1")),
                Ok(value) => Ok(value),
                Err(_) => {
                    Err(E::custom(format!("{value} is too large; the limit is {}", u32::MAX)))
                }
            }
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<u32, E> {
            match u64::try_from(value) {
                Ok(value) => self.visit_u64(value),
                Err(_) => Err(E::custom(format!("{value} is negative; it must be at least 1"))),
            }
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<u32, E> {
            Err(E::custom(format!("{value} is not a whole number")))
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<u32, E> {
            Err(E::custom(format!(
                "expected a whole number, found the string {value:?}; write it without quotes"
            )))
        }
    }
    deserializer.deserialize_any(PositiveU32)
}

/// A ceiling written in the file: a whole number from 1 to 4294967295 (see [`positive_u32`]).
fn some_positive_u32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    positive_u32(deserializer).map(Some)
}

/// A duration limit in humantime syntax: `500ms`, `2s`, `1m30s`, `2h`.
pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationText;
    impl Visitor<'_> for DurationText {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration like 500ms, 2s, 1m30s or 2h")
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
            parse_limit_duration(value).map_err(E::custom)
        }
        // A bare number is ambiguous (seconds? milliseconds?): ask for the unit.
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Duration, E> {
            Err(E::custom(format!("{value} has no unit; write it like {value}s or {value}ms")))
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Duration, E> {
            Err(E::custom(format!("{value} is not a duration; write it like 2s or 500ms")))
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Duration, E> {
            Err(E::custom(format!("{value} has no unit; write it like 1500ms or 1m30s")))
        }
    }
    deserializer.deserialize_any(DurationText)
}

/// A size limit: bytes as a number, or text with a unit (`512MiB`, `2GiB`); more than zero.
fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeText { per_second: false })
}

/// A rate in bytes per second: a size (`16KiB`, `100000`), optionally followed by `/s`.
fn rate<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeText { per_second: true })
}

/// A size, or (`per_second`) a rate written as a size with an optional `/s`.
struct SizeText {
    per_second: bool,
}

impl Visitor<'_> for SizeText {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per_second {
            f.write_str("a rate in bytes per second like 16KiB, 1MiB/s or 20000")
        } else {
            f.write_str("a size like 512MiB, 2GiB or 1000000 (bytes)")
        }
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        if value == 0 {
            return Err(E::custom("the size is 0 bytes; it must be more than that"));
        }
        Ok(value)
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        Err(E::custom(format!("{value} is negative; a size must be more than 0 bytes")))
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
        Err(E::custom(format!("{value} is not a whole number of bytes; use a unit, like 1536MiB")))
    }
    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        let trimmed = value.trim();
        let size =
            if self.per_second { trimmed.strip_suffix("/s").unwrap_or(trimmed) } else { value };
        self.visit_u64(parse_size(size).map_err(E::custom)?)
    }
}

/// The base URL: `http://` or `https://` and a host, no spaces; a trailing `/` is dropped.
fn base_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct BaseUrl;
    impl<'de> Visitor<'de> for BaseUrl {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL like https://api.krea.ai")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
            inner.deserialize_str(self)
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            let rest = value.strip_prefix("https://").or_else(|| value.strip_prefix("http://"));
            match rest {
                Some(rest)
                    if !rest.is_empty()
                        && !rest.starts_with('/')
                        && !value.contains(char::is_whitespace) =>
                {
                    Ok(Some(value.trim_end_matches('/').to_owned()))
                }
                _ => Err(E::custom(format!(
                    "{value:?} is not a base URL; expected http:// or https:// and a host, \
                     like https://api.krea.ai"
                ))),
            }
        }
    }
    deserializer.deserialize_option(BaseUrl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushing_limit_is_a_ceiling_only_where_written() {
        let written: Limits =
            serde_yaml::from_str("max_in_flight: 12\nsubmission_concurrency: 3\n").expect("valid");
        assert_eq!(written.max_in_flight, Some(12));
        assert_eq!(written.submission_concurrency, Some(3));
        assert_eq!((written.submissions_per_minute, written.burst), (None, None), "discovered");
        let other: Limits = serde_yaml::from_str("poll_interval: 1s\n").expect("valid");
        assert_eq!(other.max_in_flight, None, "another key sets no ceiling");
        for bad in ["submission_concurrency: 0", "max_in_flight: null", "burst: -1"] {
            assert!(serde_yaml::from_str::<Limits>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn download_limits_read_rates_and_durations() {
        let limits: Limits = serde_yaml::from_str(
            "download_timeout: 90s\ndownload_min_rate: 1MiB/s\ndownload_grace: 2s\n",
        )
        .expect("valid");
        assert_eq!(limits.download_timeout, Duration::from_secs(90));
        assert_eq!(limits.download_min_rate, 1 << 20);
        assert_eq!(limits.download_grace, Duration::from_secs(2));
        let plain: Limits = serde_yaml::from_str("download_min_rate: 16KiB").expect("valid");
        assert_eq!(plain.download_min_rate, 16 << 10);
        for bad in ["download_min_rate: 0", "download_min_rate: fast", "download_grace: 10"] {
            assert!(serde_yaml::from_str::<Limits>(bad).is_err(), "{bad}");
        }
    }
}
