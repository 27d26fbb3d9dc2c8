//! The other YAML files krea-batch reads, the daemon's configuration and the simulation's
//! (`--simulate-config`, `simulate-api --config`): one document read into a serde type, through
//! [`parse_document`], so that `serde_yaml` and the shape of its errors stay in this folder.
//!
//! These files get none of the job file's workarounds (alias budget, flow-nesting pre-scan,
//! node-by-node checks): they are an operator's own files, small and trusted, and their types
//! are plain serde derives. What they do get is an error that says where: file, line, column,
//! and for a misspelled key the job file's own hint ("did you mean `burst`? valid keys here:
//! …", `locate::reword_unknown_field`), so a typo in the daemon's configuration, at start or on reload,
//! reads like one in a job file.

use super::locate;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A YAML file that is not YAML, or not the settings it should hold (an unknown key, a value
/// of the wrong type): the file, the place when the YAML reader knows it, and what is wrong.
///
/// Shown as `daemon.yaml:4:17: probe_interval: invalid duration "often"`. The YAML reader's own
/// error is not kept as a source: everything it says is in the message already, and an error
/// chain (`main`'s) would say it all a second time, position included.
#[derive(Debug, thiserror::Error)]
#[error("{}", super::render_error(.file, *.line, *.column, None, .message))]
pub struct YamlError {
    /// The file the text was read from.
    pub file: PathBuf,
    /// Line (from 1) of the offending node, when known.
    pub line: Option<usize>,
    /// Column (from 1) of the offending node, when known.
    pub column: Option<usize>,
    /// What is wrong: the YAML reader's message, without the position it appends.
    pub message: String,
}

/// Reads `text`, the contents of `file` (named in errors), as one YAML document of type `T`.
pub fn parse_document<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, YamlError> {
    serde_yaml::from_str(text).map_err(|source| {
        let shown = source.to_string();
        let location = source.location();
        YamlError {
            file: file.to_owned(),
            line: location.as_ref().map(serde_yaml::Location::line),
            column: location.as_ref().map(serde_yaml::Location::column),
            message: with_key_hint(locate::without_position(&shown, location.as_ref())),
        }
    })
}

/// serde's "unknown field `brust`, expected one of `a`, `burst`" in the job file's words
/// ([`locate::reword_unknown_field`]), after any prefix (the section, `limits: `); any other
/// message is left as it is.
fn with_key_hint(message: &str) -> String {
    let start = message.find("unknown field `").unwrap_or(message.len());
    match locate::reword_unknown_field(&message[start..]) {
        Some((_, reworded)) => format!("{}{reworded}", &message[..start]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[allow(dead_code, reason = "read only to check its type")]
        port: u16,
    }

    fn parse(text: &str) -> Result<Settings, YamlError> {
        parse_document(text, Path::new("/etc/sim.yaml"))
    }

    #[test]
    fn an_error_names_file_line_and_column_once() {
        let err = parse("port: 1\nprot: 2\n").expect_err("unknown key");
        assert_eq!((err.line, err.column), (Some(2), Some(1)));
        let shown = err.to_string();
        assert!(shown.starts_with("/etc/sim.yaml:2:1: "), "{shown}");
        assert!(shown.contains("prot"), "{shown}");
        assert!(!shown.contains(" at line "), "the position is said once: {shown}");
        assert!(
            shown.ends_with("unknown key \"prot\"; did you mean `port`? valid keys here: port"),
            "the job file's did-you-mean: {shown}"
        );
        assert_eq!(crate::api::error_chain(&err), shown, "an error chain says it once too");
    }

    #[test]
    fn a_wrong_type_is_refused_and_a_good_document_read() {
        let err = parse("port: many\n").expect_err("not a number");
        assert!(err.to_string().starts_with("/etc/sim.yaml:1:7: port: "), "{err}");
        assert!(parse("port: 8080\n").is_ok());
    }

    #[test]
    fn without_a_position_the_file_is_still_named() {
        let err = parse("").expect_err("an empty document is no settings");
        assert!(err.to_string().starts_with("/etc/sim.yaml"), "{err}");
    }
}
