//! Positions: turning errors into `file:line:column: key: message`.
//!
//! `serde_yaml` knows where each node is but says so only in errors, and only for errors raised
//! while that node is being deserialized. Three tools build on that:
//!
//! - [`LineIndex`] turns a byte offset into a line and column, counting line breaks the way
//!   libyaml does, for offsets learnt from strings `serde_yaml` borrows from the text;
//! - [`locate`] finds any node after the fact (a duplicate name, a limit that contradicts
//!   another): it deserializes the text a second time, walks the path with `IgnoredAny`, and
//!   raises a marked error on reaching the node, whose position `serde_yaml` then reports;
//! - [`convert`] turns a `serde_yaml` error into a [`JobFileError`], using what the
//!   deserializers recorded (the path and message of their own errors) and rewording the few
//!   messages that come from serde itself.

use super::JobFileError;
use super::values::valid_keys_hint;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt::{self, Write as _};
use std::path::Path;

/// One step of a path inside the document: a mapping key or a list index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Seg {
    /// The value under this key of a mapping.
    Key(String),
    /// The element at this index (from 0) of a list.
    Index(usize),
}

impl Seg {
    /// A key step.
    pub(super) fn key(name: &str) -> Self {
        Self::Key(name.to_owned())
    }
}

/// The path as users read it, e.g. `jobs[3].prompt`; `None` for the document itself. Keys
/// with unusual characters are quoted so that the path stays one readable token.
pub(super) fn render_path(path: &[Seg]) -> Option<String> {
    let out = join_path(path, |key| {
        !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "_-/.:".contains(c))
    });
    (!out.is_empty()).then_some(out)
}

/// The path the way `serde_yaml` prints it in front of its messages (keys unquoted).
fn serde_path(path: &[Seg]) -> String {
    join_path(path, |_| true)
}

/// `key.key[index]…`, each key written as is when `plain` says so, else quoted.
fn join_path(path: &[Seg], plain: impl Fn(&str) -> bool) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Index(index) => {
                let _ = write!(out, "[{index}]");
            }
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if plain(key) {
                    out.push_str(key);
                } else {
                    let _ = write!(out, "{key:?}");
                }
            }
        }
    }
    out
}

/// Line starts of a text, to turn byte offsets into 1-based lines and columns.
pub(super) struct LineIndex<'t> {
    text: &'t str,
    /// Byte offset at which each line starts; the first is 0.
    starts: Vec<usize>,
}

impl<'t> LineIndex<'t> {
    /// Indexes `text`. Line breaks are those libyaml counts, so that lines agree with the ones
    /// in `serde_yaml`'s errors: `\r\n`, `\r`, `\n`, NEL, LS and PS.
    pub(super) fn new(text: &'t str) -> Self {
        let mut starts = vec![0];
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '\r' if chars.peek().is_some_and(|(_, next)| *next == '\n') => {}
                '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => starts.push(at + c.len_utf8()),
                _ => {}
            }
        }
        Self { text, starts }
    }

    /// The 1-based line and column (in characters, as libyaml counts them) of a byte offset.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|start| *start <= offset).max(1);
        let start = self.starts[line - 1];
        let column = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line, column + 1)
    }
}

/// What [`locate`] looks for at the end of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// The node the path leads to.
    Node,
    /// The key itself (not its value) of the path's last step, at its `nth` occurrence (from
    /// 0) in that mapping: how a duplicate key is pointed at.
    Key {
        /// Which occurrence of the key.
        nth: usize,
    },
}

/// The marker of the locator's deliberate error, to tell it from a real one.
const FOUND: &str = "\u{0}krea-batch locator: target reached";

/// The 1-based line and column of the node at `path` in the `document`-th (from 0) YAML
/// document of `text`, or `None` when there is no such node.
///
/// A `document` past the first only when `serde_yaml` has read the ones before it without an
/// error: after an error its document iterator resumes mid-document, and reading that panics.
pub(super) fn locate(
    text: &str,
    document: usize,
    path: &[Seg],
    target: Target,
) -> Option<(usize, usize)> {
    let deserializer = serde_yaml::Deserializer::from_str(text).nth(document)?;
    match (Walk { path, target }).deserialize(deserializer) {
        Err(error) if error.to_string().contains(FOUND) => {
            error.location().map(|location| (location.line(), location.column()))
        }
        _ => None,
    }
}

/// Walks `path`, skipping everything else; raises the [`FOUND`] error at the target.
struct Walk<'p> {
    path: &'p [Seg],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            return deserializer.deserialize_any(Found);
        }
        deserializer.deserialize_any(self)
    }
}

// Kinds the walk does not descend into end it with an error that is not FOUND: the defaults of
// `Visitor` do exactly that, so only the two container kinds are written out.
impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a list on the path")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(name), rest)) = self.path.split_first() else { return Ok(()) };
        let key_target = match self.target {
            Target::Key { nth } if rest.is_empty() => Some(nth),
            _ => None,
        };
        let mut matches = 0;
        while let Some(matched) =
            map.next_key_seed(KeyProbe { name, fire: key_target == Some(matches) })?
        {
            if !matched {
                map.next_value::<IgnoredAny>()?;
            } else if key_target.is_some() {
                matches += 1;
                map.next_value::<IgnoredAny>()?;
            } else {
                return map.next_value_seed(Walk { path: rest, target: self.target });
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(index), rest)) = self.path.split_first() else { return Ok(()) };
        for _ in 0..*index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Walk { path: rest, target: self.target }).map(|_| ())
    }
}

/// Reads a key and tells whether it is `name`; with `fire`, a match raises [`FOUND`] instead,
/// so that the error carries the key's own position.
struct KeyProbe<'n> {
    name: &'n str,
    fire: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match key == self.name {
            true if self.fire => Err(E::custom(FOUND)),
            matched => Ok(matched),
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    // serde_yaml skips the rest of a list or mapping left unread.
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<bool, A::Error> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<bool, A::Error> {
        Ok(false)
    }
}

/// The target: every kind of node ends in an error naming [`FOUND`] as what was expected
/// (the `Visitor` defaults), raised while `serde_yaml` is positioned on the node.
struct Found;

impl Visitor<'_> for Found {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }
}

/// An error raised by the job file's own deserializers: the path of the node it concerns and
/// the message, exactly as raised (`serde_yaml` prefixes its own path and appends a position).
#[derive(Clone, Debug)]
pub(super) struct Failure {
    /// Where the offending node is.
    pub(super) path: Vec<Seg>,
    /// What is wrong and what to do.
    pub(super) message: String,
    /// The data built through YAML aliases outgrew its budget: `serde_yaml`'s position is that
    /// of some anchored node, so the error is placed with [`alias_culprit`] instead.
    pub(super) aliases: bool,
}

/// Where to point when YAML aliases expand to too much data: the path as deep as the
/// deserializers went runs through expanded aliases (`params.f[0][3][2]`) and `serde_yaml`'s
/// position is that of an anchor, so point at the entry of `params` (or the job field) the
/// expansion happens under instead.
pub(super) fn alias_culprit(path: &[Seg]) -> Vec<Seg> {
    let end = path
        .iter()
        .position(|seg| *seg == Seg::key("params"))
        .map_or(path.len().min(3), |at| at + 2)
        .min(path.len());
    path[..end].to_vec()
}

/// `serde_yaml`'s whole message for a text of several documents. Matched exactly: messages
/// about unknown keys quote the key, and a key may read "more than one document" (found by the
/// fuzz target: taken for this error, the locator was sent to a second document that did not
/// exist, and `serde_yaml` panicked reading past the first one's error).
const MORE_THAN_ONE_DOCUMENT: &str =
    "deserializing from YAML containing more than one document is not supported";

/// `shown`, a `serde_yaml` error's text, without the " at line L column C" it appends for
/// `location` (it appends none at line 1 column 1).
pub(super) fn without_position<'s>(
    shown: &'s str,
    location: Option<&serde_yaml::Location>,
) -> &'s str {
    location
        .and_then(|l| shown.strip_suffix(&format!(" at line {} column {}", l.line(), l.column())))
        .unwrap_or(shown)
}

/// Turns a `serde_yaml` error into a [`JobFileError`].
///
/// `failure` is the last error the job file's deserializers raised, `path` where they were
/// when the deserialization stopped (they leave their path in place on errors).
pub(super) fn convert(
    error: &serde_yaml::Error,
    failure: Option<Failure>,
    path: &[Seg],
    text: &str,
    file: &Path,
) -> JobFileError {
    let shown = error.to_string();
    let location = error.location();
    let bare = without_position(&shown, location.as_ref());
    let mut position = location.as_ref().map(|l| (l.line(), l.column()));
    let mut key_path = path.to_vec();
    let message;

    if let Some(failure) = failure.filter(|failure| bare.ends_with(&failure.message)) {
        if failure.aliases {
            key_path = alias_culprit(&failure.path);
            position = None;
        } else {
            key_path = failure.path;
        }
        message = failure.message;
    } else if bare.ends_with("recursion limit exceeded") {
        // The path runs 128 levels deep by now: name the field it starts under instead.
        key_path = alias_culprit(&key_path);
        message = "the YAML is nested too deeply (serde_yaml stops at 128 levels)".to_owned();
    } else if bare.ends_with("repetition limit exceeded") {
        key_path = alias_culprit(&key_path);
        position = None;
        message =
            "YAML aliases (*name) expand to too much data; write the values out instead".to_owned();
    } else if bare == MORE_THAN_ONE_DOCUMENT {
        message = "the file holds more than one YAML document (a `---` line after the first \
                   one); put all settings and jobs in a single document"
            .to_owned();
        key_path.clear();
        position = locate(text, 1, &[], Target::Node);
    } else if bare.starts_with("unknown anchor") {
        message = "invalid YAML: an alias (*name) refers to an anchor (&name) that is not \
                   defined before it"
            .to_owned();
        key_path.clear();
    } else if let Some(rest) = strip_serde_prefix(bare, path) {
        // An error from serde itself, raised inside a derived section (`api`, `limits`).
        let (field, inner) = match rest.strip_prefix('.') {
            Some(rest) => match rest.split_once(": ") {
                Some((field, inner)) => (Some(field), inner),
                None => (None, rest),
            },
            None => (None, rest.trim_start_matches(": ")),
        };
        if let Some(field) = field {
            key_path.push(Seg::key(field));
        }
        message = reword_serde_message(inner, &mut key_path, &mut position, text);
    } else {
        key_path.clear();
        let mut described = format!("invalid YAML: {}", strip_positions(bare));
        let mut index = location.as_ref().map(serde_yaml::Location::index);
        // libyaml's reader (control characters and the like) gives a byte offset, no mark.
        if let Some(offset) = byte_offset(bare) {
            position = Some(LineIndex::new(text).position(offset));
            index = Some(offset);
        }
        if index.and_then(|at| text.get(at..)).is_some_and(|rest| rest.starts_with('\t')) {
            described.push_str(" (a tab: YAML indents with spaces only)");
        }
        // `prompt: a cat: sitting`: a second `: ` in a plain value reads as a nested mapping.
        if bare.starts_with("mapping values are not allowed") {
            described.push_str(
                "; a value holding \": \" must be quoted, e.g. prompt: \"a cat: sitting\"",
            );
        }
        message = described;
    }
    if position.is_none() && !key_path.is_empty() {
        position = locate(text, 0, &key_path, Target::Node);
    }
    JobFileError {
        file: file.to_owned(),
        line: position.map(|(line, _)| line),
        column: position.map(|(_, column)| column),
        key: render_path(&key_path),
        message,
    }
}

/// `shown` without `serde_yaml`'s path prefix, when it starts with `path` (the section the job
/// file's deserializers handed to a derived type); `None` otherwise.
fn strip_serde_prefix<'s>(shown: &'s str, path: &[Seg]) -> Option<&'s str> {
    if path.is_empty() {
        return None;
    }
    let rest = shown.strip_prefix(&serde_path(path))?;
    (rest.starts_with(": ") || rest.starts_with('.')).then_some(rest)
}

/// serde's "unknown field `brust`, expected one of `a`, `burst`" as the field and the job
/// file's words for it: `unknown key "brust"; did you mean `burst`? valid keys here: a, burst`;
/// `None` for any other message. The daemon's and the simulation's configurations use it too
/// (`yaml.rs`), so a typo reads alike in every file krea-batch reads.
pub(super) fn reword_unknown_field(message: &str) -> Option<(&str, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.rfind("`, expected")?;
    let field = &rest[..end];
    // After the field: "`, expected one of `a`, `b`" (or "`, expected `a`").
    let valid: Vec<&str> = rest[end + 1..].split('`').skip(1).step_by(2).collect();
    Some((field, format!("unknown key {field:?}; {}", valid_keys_hint(field, &valid))))
}

/// Rewords the messages serde's derived code produces (unknown and duplicate fields, a wrong
/// type for a whole section) in the job file's style; others pass unchanged.
fn reword_serde_message(
    message: &str,
    key_path: &mut Vec<Seg>,
    position: &mut Option<(usize, usize)>,
    text: &str,
) -> String {
    if let Some((field, reworded)) = reword_unknown_field(message) {
        key_path.push(Seg::key(field));
        return reworded;
    }
    if let Some(field) =
        message.strip_prefix("duplicate field `").and_then(|rest| rest.strip_suffix('`'))
    {
        // serde reports it at the enclosing mapping: point at the second occurrence instead.
        key_path.push(Seg::key(field));
        *position = locate(text, 0, key_path, Target::Key { nth: 1 }).or(*position);
        return format!("the key `{field}` appears twice; a key may appear only once in a mapping");
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((found, _)) = rest.split_once(", expected struct ")
    {
        return format!("expected a mapping of settings here, found {found}");
    }
    message.to_owned()
}

/// libyaml's message without its " at line L column C" / " at position N" parts (the position
/// is reported separately).
fn strip_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" at ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 4..];
        let skipped = skip_position(after);
        if skipped.len() == after.len() {
            out.push_str(" at ");
        }
        rest = skipped;
    }
    out.push_str(rest);
    out
}

/// The N of the first " at position N" in a libyaml message, if within the text.
fn byte_offset(message: &str) -> Option<usize> {
    let digits = &message[message.find(" at position ")? + 13..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// `text` after a leading "line L column C" or "position N", or `text` itself.
fn skip_position(text: &str) -> &str {
    fn number(text: &str) -> Option<&str> {
        let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        (end > 0).then(|| &text[end..])
    }
    let line_column = text
        .strip_prefix("line ")
        .and_then(number)
        .and_then(|rest| rest.strip_prefix(" column "))
        .and_then(number);
    line_column.or_else(|| text.strip_prefix("position ").and_then(number)).unwrap_or(text)
}
