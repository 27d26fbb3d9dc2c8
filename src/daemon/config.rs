//! The daemon's configuration file (`/etc/krea-batch/daemon.yaml`; `contrib/daemon.yaml`
//! documents every key). Paths are relative to the file's folder. Unknown keys are refused, and
//! every error names the file, line and column.

use crate::jobfile::yaml::{YamlError, parse_document};
use crate::jobfile::{ApiSettings, Budget, Limits, deserialize_duration};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The daemon's settings.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The folder job files are dropped into; `accepted/` and `rejected/` are made inside it.
    pub inbox: PathBuf,
    /// The output root: each job file's results go to a folder of its name under it.
    pub output: PathBuf,
    /// The state file.
    pub state: PathBuf,
    /// Where the API is.
    #[serde(default)]
    pub api: ApiSettings,
    /// Pacing and polling, as in a job file.
    #[serde(default)]
    pub limits: Limits,
    /// While submitting is paused by a 402 (or a refused key), one submission probes this often.
    #[serde(default = "default_probe_interval", deserialize_with = "deserialize_duration")]
    pub probe_interval: Duration,
    /// On SIGTERM, how long the requests under way may take before the daemon exits anyway.
    #[serde(default = "default_drain_time", deserialize_with = "deserialize_duration")]
    pub drain_time: Duration,
    /// How often the inbox is scanned for new files.
    #[serde(default = "default_scan_interval", deserialize_with = "deserialize_duration")]
    pub inbox_scan_interval: Duration,
    /// The Prometheus endpoint; off when absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Spending caps; none when absent.
    #[serde(default)]
    pub budget: Option<Budget>,
}

/// The `metrics:` section.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address and port, e.g. `127.0.0.1:9184`.
    pub listen: SocketAddr,
}

fn default_probe_interval() -> Duration {
    Duration::from_mins(10)
}

fn default_drain_time() -> Duration {
    Duration::from_secs(10)
}

fn default_scan_interval() -> Duration {
    Duration::from_secs(2)
}

/// A configuration error: the file, the place, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, or not a configuration (an unknown key, a value of the wrong type): the
    /// file, line and column, and what is wrong.
    #[error(transparent)]
    Yaml(#[from] YamlError),
    /// A limit out of range or contradicting another.
    #[error("{}: limits.{field}: {message}", path.display())]
    Limits {
        /// The file.
        path: PathBuf,
        /// The key under `limits:`.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A budget without a cap.
    #[error("{}: budget: {source}", path.display())]
    Budget {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::jobfile::NoCap,
    },
    /// A metrics address that is not loopback.
    #[error("{}: metrics.listen: {source}", path.display())]
    Listen {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::metrics::ListenRefused,
    },
}

impl DaemonConfig {
    /// Reads and checks the file; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = parse_document(text, path)?;
        config.limits.check().map_err(|(field, message)| ConfigError::Limits {
            path: path.to_owned(),
            field,
            message,
        })?;
        if let Some(Err(source)) = config.budget.map(|budget| budget.check()) {
            return Err(ConfigError::Budget { path: path.to_owned(), source });
        }
        if let Some(metrics) = &config.metrics {
            crate::metrics::check_listen(&metrics.listen)
                .map_err(|source| ConfigError::Listen { path: path.to_owned(), source })?;
        }
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for dir in [&mut config.inbox, &mut config.output, &mut config.state] {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_file_keeps_its_io_error() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let err = DaemonConfig::load(&dir.path().join("missing.yaml")).expect_err("missing");
        let io = err.source().and_then(|source| source.downcast_ref::<std::io::Error>());
        assert_eq!(io.map(std::io::Error::kind), Some(std::io::ErrorKind::NotFound), "{err}");
    }

    fn parse(text: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse(text, Path::new("/etc/krea-batch/daemon.yaml"))
    }

    #[test]
    fn the_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/daemon.yaml");
        let config = DaemonConfig::load(&path).expect("contrib/daemon.yaml is valid");
        assert_eq!(config.probe_interval, Duration::from_mins(10));
        assert_eq!(config.drain_time, Duration::from_secs(10));
    }

    #[test]
    fn defaults_and_relative_paths() {
        let config = parse("inbox: in\noutput: /srv/out\nstate: state.sqlite\n").expect("valid");
        assert_eq!(config.inbox, Path::new("/etc/krea-batch/in"));
        assert_eq!(config.output, Path::new("/srv/out"));
        assert_eq!(config.inbox_scan_interval, Duration::from_secs(2));
        assert!(config.metrics.is_none());
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn errors_name_the_place() {
        let message = parse("inbox: in\noutput: out\nstate: s\nprobe_interval: often\n")
            .expect_err("bad duration")
            .to_string();
        assert!(message.starts_with("/etc/krea-batch/daemon.yaml:4:"), "{message}");
        assert!(message.contains("probe_interval"), "{message}");
        let message =
            parse("inbox: in\noutput: out\nstate: s\ninbx: x\n").expect_err("unknown").to_string();
        assert!(message.contains("did you mean `inbox`?"), "{message}");
        let message = parse("inbox: in\noutput: out\nstate: s\nlimits:\n  brust: 3\n")
            .expect_err("unknown")
            .to_string();
        assert!(
            message.contains("limits: unknown key \"brust\"; did you mean `burst`?"),
            "{message}"
        );
        let message =
            parse("inbox: in\noutput: out\nstate: s\nmetrics: {listen: '0.0.0.0:9184'}\n")
                .expect_err("not loopback")
                .to_string();
        assert!(message.contains("metrics.listen"), "{message}");
    }
}
