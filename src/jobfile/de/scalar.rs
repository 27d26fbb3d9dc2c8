//! Single values: a node read as a [`Scalar`] and checked by a rule while `serde_yaml` is
//! still on it, so that a refusal carries the node's position. The rules for mapping keys,
//! texts (prompt, name, model, output) and `count` live here, with the macro that lets the
//! container visitors refuse the kinds of node they do not take.

use super::Ctx;
use super::ctx::NODE_WEIGHT;
use crate::job::check_name;
use crate::jobfile::MAX_JOBS;
use crate::jobfile::locate::Seg;
use crate::jobfile::values::{parse_model_path, valid_keys_hint};
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// A node as the scalar checks see it. Lists and mappings are reduced to their kind: none of
/// the scalar keys accepts them.
#[derive(Clone, Copy, Debug)]
pub(super) enum Scalar<'s> {
    /// Text, with whether it was written unquoted and its offset in the file when known.
    Text {
        text: &'s str,
        plain: bool,
        offset: Option<usize>,
    },
    Bool(bool),
    Int(i128),
    Float(f64),
    Null,
    List,
    Mapping,
}

impl Scalar<'_> {
    /// "the number 3", "a list", … for messages saying what was found.
    pub(super) fn describe(self) -> String {
        match self {
            Self::Text { text, .. } => format!("the text {text:?}"),
            Self::Bool(value) => format!("the boolean {value}"),
            Self::Int(value) => format!("the number {value}"),
            Self::Float(value) => format!("the number {value}"),
            Self::Null => "nothing (null)".into(),
            Self::List => "a list".into(),
            Self::Mapping => "a mapping".into(),
        }
    }
}

/// Words YAML 1.1 reads as booleans and `serde_yaml` (YAML 1.2) as text: where text is expected
/// they are refused unquoted, since the writer may have meant either.
pub(super) fn is_yaml11_bool(text: &str) -> bool {
    matches!(
        text,
        "yes" | "Yes" | "YES" | "no" | "No" | "NO" | "on" | "On" | "ON" | "off" | "Off" | "OFF"
    )
}

/// Why a scalar was refused: the message, and the key to add to the path when the refused
/// node is a mapping key (so that the path names it).
pub(super) struct Reject {
    key: Option<String>,
    message: String,
}

impl Reject {
    pub(super) fn at_key(key: &str, message: String) -> Self {
        Self { key: Some(key.to_owned()), message }
    }
}

impl From<String> for Reject {
    fn from(message: String) -> Self {
        Self { key: None, message }
    }
}

/// Reads one node as a [`Scalar`] and hands it to `check`, which accepts it (returning the
/// value) or refuses it; the refusal is raised while `serde_yaml` is on the node.
pub(super) struct ScalarSeed<'a, 'de, F> {
    ctx: &'a Ctx<'de>,
    check: F,
}

pub(super) fn scalar<'a, 'de, T, F>(ctx: &'a Ctx<'de>, check: F) -> ScalarSeed<'a, 'de, F>
where
    F: FnOnce(Scalar<'_>) -> Result<T, Reject>,
{
    ScalarSeed { ctx, check }
}

impl<T, F> ScalarSeed<'_, '_, F>
where
    F: FnOnce(Scalar<'_>) -> Result<T, Reject>,
{
    fn finish<E: de::Error>(self, found: Scalar<'_>) -> Result<T, E> {
        if let Scalar::Text { text, .. } = found {
            self.ctx.spend(NODE_WEIGHT + text.len())?;
        }
        (self.check)(found).map_err(|reject| {
            if let Some(key) = reject.key {
                self.ctx.push(Seg::Key(key));
            }
            self.ctx.fail(reject.message)
        })
    }
}

impl<'de, T, F> DeserializeSeed<'de> for ScalarSeed<'_, 'de, F>
where
    F: FnOnce(Scalar<'_>) -> Result<T, Reject>,
{
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T, F> Visitor<'de> for ScalarSeed<'_, 'de, F>
where
    F: FnOnce(Scalar<'_>) -> Result<T, Reject>,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<T, E> {
        let (plain, offset) = (self.ctx.is_plain(text), self.ctx.offset(text));
        self.finish(Scalar::Text { text, plain, offset })
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        self.finish(Scalar::Text { text, plain: false, offset: None })
    }
    fn visit_bool<E: de::Error>(self, value: bool) -> Result<T, E> {
        self.finish(Scalar::Bool(value))
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
        self.finish(Scalar::Int(value.into()))
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
        self.finish(Scalar::Int(value.into()))
    }
    fn visit_i128<E: de::Error>(self, value: i128) -> Result<T, E> {
        self.finish(Scalar::Int(value))
    }
    fn visit_u128<E: de::Error>(self, value: u128) -> Result<T, E> {
        self.finish(Scalar::Int(i128::try_from(value).unwrap_or(i128::MAX)))
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<T, E> {
        self.finish(Scalar::Float(value))
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        self.finish(Scalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        self.finish(Scalar::Null)
    }
    // serde_yaml skips what a visitor leaves unread of a list or mapping.
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.finish(Scalar::List)
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        self.finish(Scalar::Mapping)
    }
    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(tagged(self.ctx))
    }
}

/// The error for a value with a local YAML tag (`!name value`), which `serde_yaml` presents as an
/// enum. Always an error: the tagged value is left unread, so nothing may follow.
pub(super) fn tagged<E: de::Error>(ctx: &Ctx<'_>) -> E {
    ctx.fail("YAML tags (`!name`) are not supported here; remove the tag".into())
}

/// Generates the `visit_*` methods of a container visitor for the kinds it refuses, each
/// calling the visitor's own `wrong(found)`. `visit_enum` (a tagged value) is always refused.
macro_rules! refuse {
    (scalars) => {
        fn visit_bool<E: de::Error>(self, value: bool) -> Result<Self::Value, E> {
            self.wrong(Scalar::Bool(value))
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
            self.wrong(Scalar::Int(value.into()))
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
            self.wrong(Scalar::Int(value.into()))
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
            self.wrong(Scalar::Float(value))
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            self.wrong(Scalar::Text { text, plain: false, offset: None })
        }
        fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(tagged(self.ctx))
        }
    };
    (seq) => {
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            self.wrong(Scalar::List)
        }
    };
    (map) => {
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            self.wrong(Scalar::Mapping)
        }
    };
}
pub(super) use refuse;

/// A key of a fixed set: its index in the set and its byte offset in the file, when known.
pub(super) type FieldHit = (usize, Option<usize>);

/// Reads the key of a mapping with a fixed set of keys: refuses unknown, repeated and
/// non-text keys. Gives the key's index in `keys` and its offset in the file.
pub(super) fn field_key<'a, 'de>(
    ctx: &'a Ctx<'de>,
    keys: &'static [&'static str],
    seen: &'a mut [bool],
    place: &'static str,
) -> ScalarSeed<'a, 'de, impl FnOnce(Scalar<'_>) -> Result<FieldHit, Reject>> {
    scalar(ctx, move |found| match found {
        Scalar::Text { text, offset, .. } => match keys.iter().position(|key| *key == text) {
            Some(index) if seen[index] => Err(Reject::at_key(
                text,
                format!("`{text}` appears twice {place}; a key may appear only once in a mapping"),
            )),
            Some(index) => {
                seen[index] = true;
                Ok((index, offset))
            }
            None => {
                let mut hint = valid_keys_hint(text, keys);
                // A request field (seed, width, …) written beside `prompt:` instead of under
                // `params:`: the commonest unknown key in a job or at the top.
                if keys.contains(&"params") && !hint.starts_with("did you mean") {
                    hint = format!(
                        "request fields go under params:, e.g. `params: {{{text}: …}}`; {hint}"
                    );
                }
                Err(Reject::at_key(text, format!("unknown key {text:?} {place}; {hint}")))
            }
        },
        other => Err(format!(
            "keys {place} must be text; found {}; {}",
            other.describe(),
            valid_keys_hint("", keys)
        )
        .into()),
    })
}

/// The kinds of text value, each with its own rule.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum TextKind {
    Prompt,
    Name,
    Model,
    Output,
    /// `from:`, a data file beside the job file.
    DataFile,
    /// A request field's name (a stage's `input:`).
    Field,
}

/// Reads a text value of the given kind, refusing other types and applying the kind's rule.
pub(super) fn text_value<'a, 'de>(
    ctx: &'a Ctx<'de>,
    kind: TextKind,
) -> ScalarSeed<'a, 'de, impl FnOnce(Scalar<'_>) -> Result<String, Reject>> {
    scalar(ctx, move |found| {
        let text = match found {
            Scalar::Text { text, plain: true, .. } if is_yaml11_bool(text) => {
                return Err(format!(
                    "expected a string, found {text}, which YAML 1.1 tools read as a boolean; \
                     quote it: \"{text}\""
                )
                .into());
            }
            Scalar::Text { text, .. } => text,
            Scalar::Null if kind == TextKind::Prompt => {
                return Err("the prompt is empty; write the text to generate".to_owned().into());
            }
            Scalar::Null => {
                return Err("the value is missing; write a string here".to_owned().into());
            }
            Scalar::Bool(value) => return Err(quote_it(found, &value.to_string())),
            Scalar::Int(value) => return Err(quote_it(found, &value.to_string())),
            Scalar::Float(value) => return Err(quote_it(found, &value.to_string())),
            Scalar::List | Scalar::Mapping => {
                return Err(format!("expected a string, found {}", found.describe()).into());
            }
        };
        match kind {
            TextKind::Prompt if text.trim().is_empty() => {
                Err("the prompt is empty; write the text to generate".to_owned().into())
            }
            // A name with `{variable}` slots is a template of a sweep: checked once expanded.
            TextKind::Name if text.contains('{') => Ok(text.to_owned()),
            TextKind::Name => match check_name(text) {
                Ok(()) => Ok(text.to_owned()),
                Err(why) => Err(format!("invalid name {text:?}: {why}").into()),
            },
            TextKind::DataFile => crate::jobfile::sweep::check_data_path(text)
                .map(|()| text.to_owned())
                .map_err(|why| Reject::from(why.to_string())),
            TextKind::Model => parse_model_path(text).map_err(|why| Reject::from(why.to_string())),
            TextKind::Output if text.trim().is_empty() => {
                Err("the output directory is empty; write a directory, e.g. ./out"
                    .to_owned()
                    .into())
            }
            TextKind::Field
                if text.is_empty()
                    || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Err(format!(
                    "{text:?} is not a request field name; write one such as `image_url` or \
                     `start_image`"
                )
                .into())
            }
            TextKind::Prompt | TextKind::Output | TextKind::Field => Ok(text.to_owned()),
        }
    })
}

fn quote_it(found: Scalar<'_>, written: &str) -> Reject {
    format!("expected a string, found {}; quote it: \"{written}\"", found.describe()).into()
}

/// Reads `count`: a whole number from 1 to [`MAX_JOBS`].
pub(super) fn count_value<'a, 'de>(
    ctx: &'a Ctx<'de>,
) -> ScalarSeed<'a, 'de, impl FnOnce(Scalar<'_>) -> Result<u32, Reject>> {
    scalar(ctx, |found| match found {
        Scalar::Int(0) => Err("count is 0, which asks for no generation at all; set 1 or more, \
                               or remove the job"
            .to_owned()
            .into()),
        Scalar::Int(value) if value < 0 => {
            Err(format!("count is negative ({value}); it must be 1 or more").into())
        }
        Scalar::Int(value) => match u32::try_from(value) {
            Ok(count) if count as usize <= MAX_JOBS => Ok(count),
            _ => Err(format!(
                "count {value} is more than the {MAX_JOBS} jobs a file may hold; split the work"
            )
            .into()),
        },
        Scalar::Float(value) => Err(format!("count must be a whole number, found {value}").into()),
        Scalar::Text { text, .. } => Err(format!(
            "expected a whole number, found the text {text:?}; write it without quotes"
        )
        .into()),
        other => Err(format!("expected a whole number, found {}", other.describe()).into()),
    })
}
