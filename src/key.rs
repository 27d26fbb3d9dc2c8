//! Where the API key comes from, and the type that keeps it out of logs.
//!
//! The key is never in a job file. It is read from, in this order: the file named by
//! `--api-key-file`, the `KREA_API_KEY` environment variable, or the systemd credential
//! `$CREDENTIALS_DIRECTORY/krea-api-key` (`LoadCredential=` in a unit). [`ApiKey`] prints as
//! `<redacted>` in `Debug` and `Display`, so no log line or error can carry it by accident, and
//! [`ApiKey::redact`] removes it from text that came from the network (a hostile or buggy
//! server may quote the `Authorization` header back).

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable holding the key.
pub(crate) const KEY_ENV: &str = "KREA_API_KEY";
/// The name of the systemd credential holding the key.
pub(crate) const CREDENTIAL_NAME: &str = "krea-api-key";
/// What stands where server text quoted the key.
pub(crate) const REDACTED: &str = "[redacted]";

/// A Krea API token. Only [`ApiKey::expose`] reveals it, for the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a token, trimming surrounding white space (key files usually end in a newline).
    pub fn new(token: &str) -> Result<Self, KeyError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(KeyError::Empty);
        }
        if token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(KeyError::Malformed);
        }
        Ok(Self(token.to_owned()))
    }

    /// The token itself. Call only to build the `Authorization` header or to redact it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with the key replaced by `[redacted]` (`REDACTED`) wherever it appears. Text that holds the key
    /// only in percent-encoded form (a URL's query, say) is replaced whole, since its parts
    /// cannot be told apart safely.
    #[must_use]
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        self.redacted(text).map_or(Cow::Borrowed(text), Cow::Owned)
    }

    /// The redacted text, or `None` when `text` does not carry the key.
    fn redacted(&self, text: &str) -> Option<String> {
        if text.contains(&self.0) {
            return Some(text.replace(&self.0, REDACTED));
        }
        (text.contains('%') && percent_decoded(text).contains(&self.0)).then(|| REDACTED.to_owned())
    }

    /// Redacts every string of a JSON value, object keys included (JSON escapes are already
    /// decoded by then, so `\u0073k-…` cannot hide the key).
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::String(text) => {
                if let Some(clean) = self.redacted(text) {
                    *text = clean;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.redact_json(item)),
            Value::Object(object) => {
                let tainted: Vec<String> =
                    object.keys().filter(|key| self.redacted(key).is_some()).cloned().collect();
                for key in tainted {
                    if let Some(item) = object.remove(&key) {
                        object.insert(self.redact(&key).into_owned(), item);
                    }
                }
                object.values_mut().for_each(|item| self.redact_json(item));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// `%XX` sequences decoded (invalid ones kept as they are), lossily as UTF-8.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
        if bytes[index] == b'%'
            && let (Some(high), Some(low)) = (hex(index + 1), hex(index + 2))
        {
            out.push(u8::try_from(high * 16 + low).unwrap_or_default());
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a key was found, for a log line that says which source won.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `--api-key-file`.
    File(PathBuf),
    /// `KREA_API_KEY`.
    Environment,
    /// `$CREDENTIALS_DIRECTORY/krea-api-key`.
    Credential(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "the file {}", path.display()),
            Self::Environment => write!(f, "the environment variable {KEY_ENV}"),
            Self::Credential(path) => write!(f, "the systemd credential {}", path.display()),
        }
    }
}

/// Why no usable key was found.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No source had a key.
    #[error(
        "no Krea API key: set {KEY_ENV}, pass --api-key-file FILE, or provide the systemd \
         credential {CREDENTIAL_NAME} ($CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME})"
    )]
    Missing,
    /// A source was there but empty.
    #[error("the Krea API key is empty")]
    Empty,
    /// The key has spaces or control characters inside it.
    #[error("the Krea API key contains spaces or control characters; check how it was saved")]
    Malformed,
    /// A key file could not be read.
    #[error("cannot read the API key file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A key and where it came from, plus a warning to log when the key file is readable by others.
#[derive(Debug)]
pub struct LoadedKey {
    /// The key.
    pub key: ApiKey,
    /// Where it was found.
    pub source: KeySource,
    /// Set when a key file is readable by its group or by everyone.
    pub permission_warning: Option<String>,
}

/// Finds the key: `--api-key-file`, then `KREA_API_KEY`, then the systemd credential.
///
/// `env` looks up an environment variable; `main` passes `std::env::var`, tests pass a map.
pub fn load(
    key_file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<LoadedKey, KeyError> {
    if let Some(path) = key_file {
        return read_key_file(path, KeySource::File(path.to_owned()));
    }
    if let Some(value) = env(KEY_ENV) {
        return Ok(LoadedKey {
            key: ApiKey::new(&value)?,
            source: KeySource::Environment,
            permission_warning: None,
        });
    }
    if let Some(dir) = env("CREDENTIALS_DIRECTORY") {
        let path = Path::new(&dir).join(CREDENTIAL_NAME);
        if path.exists() {
            return read_key_file(&path, KeySource::Credential(path.clone()));
        }
    }
    Err(KeyError::Missing)
}

fn read_key_file(path: &Path, source: KeySource) -> Result<LoadedKey, KeyError> {
    let unreadable = |source| KeyError::Unreadable { path: path.to_owned(), source };
    let text = std::fs::read_to_string(path).map_err(unreadable)?;
    let permission_warning = loose_permissions(path);
    Ok(LoadedKey { key: ApiKey::new(&text)?, source, permission_warning })
}

/// A warning when `path` can be read by its group or by everyone (the key file should be 0600).
fn loose_permissions(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "the API key file {} is readable by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_key_never_prints() {
        let key = ApiKey::new("sk-secret-123\n").expect("valid");
        assert_eq!(key.expose(), "sk-secret-123");
        assert!(!format!("{key:?} {key}").contains("secret"));
    }

    #[test]
    fn missing_key_names_all_three_sources() {
        let message = load(None, env_of(&[])).expect_err("no key").to_string();
        for source in ["KREA_API_KEY", "--api-key-file", "CREDENTIALS_DIRECTORY", "krea-api-key"] {
            assert!(message.contains(source), "{message}");
        }
        assert!(!message.contains('\n'));
    }

    #[test]
    fn sources_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cred = dir.path().join(CREDENTIAL_NAME);
        std::fs::write(&cred, "from-credential\n").expect("write");
        let dir_text = dir.path().to_str().expect("utf-8 temp path");

        let loaded = load(None, env_of(&[("CREDENTIALS_DIRECTORY", dir_text)])).expect("cred");
        assert_eq!(loaded.key.expose(), "from-credential");
        assert_eq!(loaded.source, KeySource::Credential(cred.clone()));

        let env = env_of(&[("CREDENTIALS_DIRECTORY", dir_text), (KEY_ENV, "from-env")]);
        let loaded = load(None, &env).expect("env");
        assert_eq!(loaded.key.expose(), "from-env");

        let loaded = load(Some(&cred), &env).expect("file");
        assert_eq!(loaded.source, KeySource::File(cred));
    }

    #[test]
    fn loose_key_file_gets_a_warning() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "k").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let warning = load(Some(&path), env_of(&[])).expect("key").permission_warning;
        assert!(warning.expect("warned").contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(load(Some(&path), env_of(&[])).expect("key").permission_warning.is_none());
    }

    #[test]
    fn the_key_is_redacted_from_server_text_and_json() {
        let key = ApiKey::new("sk-echo/1").expect("key");
        assert_eq!(key.redact("invalid token Bearer sk-echo/1"), "invalid token Bearer [redacted]");
        assert_eq!(key.redact("https://h/x?t=sk-echo%2F1"), REDACTED, "percent-encoded");
        assert_eq!(key.redact("100% fine"), "100% fine");
        let mut json = serde_json::json!({
            "a": ["Bearer sk-echo/1", 3, {"sk-echo/1": "x"}],
            "b": "https://h/r.png?k=sk%2Decho%2F1",
        });
        key.redact_json(&mut json);
        let text = json.to_string();
        assert!(!text.contains("sk-echo") && !text.contains("sk%2Decho"), "{text}");
        assert_eq!(json["a"][0], "Bearer [redacted]");
    }

    #[test]
    fn empty_or_malformed_keys_are_refused() {
        assert!(matches!(ApiKey::new(" \n"), Err(KeyError::Empty)));
        assert!(matches!(ApiKey::new("two words"), Err(KeyError::Malformed)));
    }
}
