//! `params` and `prices`: mappings whose keys are the user's (request fields, model paths),
//! read into JSON and numbers with the rules JSON and prices impose.

use super::Ctx;
use super::ctx::NODE_WEIGHT;
use super::scalar::{Reject, Scalar, is_yaml11_bool, refuse, scalar, tagged};
use crate::jobfile::Params;
use crate::jobfile::locate::Seg;
use crate::jobfile::values::parse_model_path;
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};
use std::collections::BTreeMap;
use std::fmt;

/// `params:`: request fields, passed through as JSON.
pub(super) struct ParamsSeed<'a, 'de> {
    pub(super) ctx: &'a Ctx<'de>,
    /// Reading a job's `matrix:` (variables and their lists of values) rather than `params:`.
    pub(super) matrix: bool,
}

impl<'de> DeserializeSeed<'de> for ParamsSeed<'_, 'de> {
    type Value = Params;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Params, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ParamsSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<Params, E> {
        if self.matrix {
            return Err(self.ctx.fail(format!(
                "`matrix` must be a mapping of variables to lists of values, like \
                 `matrix: {{ seed: [1, 2, 3] }}`; found {}",
                found.describe()
            )));
        }
        Err(self.ctx.fail(format!(
            "`params` must be a mapping of request fields, like `params: {{ width: 1024 }}`; \
             found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for ParamsSeed<'_, 'de> {
    type Value = Params;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request fields")
    }
    refuse!(scalars);
    refuse!(seq);

    // `params:` with nothing after it: no fields.
    fn visit_unit<E: de::Error>(self) -> Result<Params, E> {
        Ok(Params::new())
    }
    fn visit_none<E: de::Error>(self) -> Result<Params, E> {
        Ok(Params::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Params, A::Error> {
        read_object(self.ctx, map, if self.matrix { Top::Matrix } else { Top::Params })
    }
}

/// Reads a mapping into a JSON object: text keys only, each once; values via [`ValueSeed`].
/// Which mapping [`read_object`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Top {
    Params,
    Matrix,
    /// A mapping inside a value.
    Nested,
}

/// `top` marks the `params` or `matrix` mapping itself, where `prompt` is refused.
fn read_object<'de, A: MapAccess<'de>>(
    ctx: &Ctx<'de>,
    mut map: A,
    top: Top,
) -> Result<serde_json::Map<String, Value>, A::Error> {
    let mut object = serde_json::Map::new();
    loop {
        let known = &object;
        let key = map.next_key_seed(scalar(ctx, |found| match found {
            Scalar::Text { text: "prompt", .. } if top == Top::Params => Err(Reject::at_key(
                "prompt",
                "`prompt` does not belong in params; use the job's own `prompt:` key".into(),
            )),
            Scalar::Text { text: "prompt", .. } if top == Top::Matrix => Err(Reject::at_key(
                "prompt",
                "`prompt` cannot be swept directly; sweep a variable and use it in the prompt, \
                 like `prompt: \"a {animal} in snow\"` with `animal: [fox, owl]`"
                    .into(),
            )),
            Scalar::Text { text: "<<", .. } => Err(Reject::at_key(
                "<<",
                "YAML merge keys (`<<`) are not supported; write the keys out".into(),
            )),
            Scalar::Text { text, .. } if known.contains_key(text) => Err(Reject::at_key(
                text,
                format!("{text:?} appears twice; a key may appear only once in a mapping"),
            )),
            Scalar::Text { text, .. } => Ok(text.to_owned()),
            other => Err(format!(
                "keys in params must be text (request field names); found {}; quote it",
                other.describe()
            )
            .into()),
        }))?;
        let Some(key) = key else { return Ok(object) };
        ctx.push(Seg::Key(key.clone()));
        let value = map.next_value_seed(ValueSeed { ctx })?;
        ctx.pop();
        object.insert(key, value);
    }
}

/// Any value inside `params`, as JSON. Refuses what JSON cannot carry (NaN, infinities,
/// integers beyond 64 bits, tags) and unquoted YAML 1.1 booleans, whose meaning is ambiguous.
struct ValueSeed<'a, 'de> {
    ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, 'de> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, 'de> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        self.ctx.spend(NODE_WEIGHT)?;
        Ok(Value::Bool(value))
    }
    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        self.ctx.spend(NODE_WEIGHT)?;
        Ok(Value::from(value))
    }
    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        self.ctx.spend(NODE_WEIGHT)?;
        Ok(Value::from(value))
    }
    fn visit_i128<E: de::Error>(self, value: i128) -> Result<Value, E> {
        match i64::try_from(value) {
            Ok(value) => self.visit_i64(value),
            Err(_) => {
                Err(self.ctx.fail(format!("the number {value} is too large to send as JSON")))
            }
        }
    }
    fn visit_u128<E: de::Error>(self, value: u128) -> Result<Value, E> {
        match u64::try_from(value) {
            Ok(value) => self.visit_u64(value),
            Err(_) => {
                Err(self.ctx.fail(format!("the number {value} is too large to send as JSON")))
            }
        }
    }
    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        self.ctx.spend(NODE_WEIGHT)?;
        match Number::from_f64(value) {
            Some(number) => Ok(Value::Number(number)),
            None => Err(self.ctx.fail(format!(
                "{value} cannot be sent: JSON has no NaN or infinity; write a finite number"
            ))),
        }
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Value, E> {
        if is_yaml11_bool(text) && self.ctx.is_plain(text) {
            return Err(self.ctx.fail(format!(
                "{text} is ambiguous: YAML 1.1 tools read it as a boolean, this one as text; \
                 write true or false for a boolean, or quote it (\"{text}\") for text"
            )));
        }
        self.visit_str(text)
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Value, E> {
        self.ctx.spend(NODE_WEIGHT + text.len())?;
        Ok(Value::String(text.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.ctx.spend(NODE_WEIGHT)?;
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let ctx = self.ctx;
        ctx.spend(NODE_WEIGHT)?;
        let mut items = Vec::new();
        loop {
            ctx.push(Seg::Index(items.len()));
            let Some(item) = seq.next_element_seed(ValueSeed { ctx })? else {
                ctx.pop();
                return Ok(Value::Array(items));
            };
            ctx.pop();
            items.push(item);
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        self.ctx.spend(NODE_WEIGHT)?;
        read_object(self.ctx, map, Top::Nested).map(Value::Object)
    }
    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(tagged(self.ctx))
    }
}

/// `prices:`: USD per generation by model path.
pub(super) struct PricesSeed<'a, 'de> {
    pub(super) ctx: &'a Ctx<'de>,
}

impl<'de> DeserializeSeed<'de> for PricesSeed<'_, 'de> {
    type Value = BTreeMap<String, f64>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl PricesSeed<'_, '_> {
    fn wrong<E: de::Error>(self, found: Scalar<'_>) -> Result<BTreeMap<String, f64>, E> {
        Err(self.ctx.fail(format!(
            "`prices` must be a mapping of model path to USD per generation, like \
             `image/bfl/flux-1-dev: 0.007`; found {}",
            found.describe()
        )))
    }
}

impl<'de> Visitor<'de> for PricesSeed<'_, 'de> {
    type Value = BTreeMap<String, f64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("prices")
    }
    refuse!(scalars);
    refuse!(seq);

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let mut prices = BTreeMap::new();
        loop {
            let known = &prices;
            let key = map.next_key_seed(scalar(ctx, |found| match found {
                Scalar::Text { text, .. } => match parse_model_path(text) {
                    Ok(model) if known.contains_key(&model) => Err(Reject::at_key(
                        text,
                        format!("a price for {model} is already set above"),
                    )),
                    Ok(model) => Ok((text.to_owned(), model)),
                    Err(why) => Err(Reject::at_key(text, why.to_string())),
                },
                other => Err(format!(
                    "keys of `prices` are model paths like image/bfl/flux-1-dev; found {}",
                    other.describe()
                )
                .into()),
            }))?;
            let Some((written, model)) = key else { return Ok(prices) };
            ctx.push(Seg::Key(written));
            let price = map.next_value_seed(scalar(ctx, |found| {
                let price = match found {
                    Scalar::Int(value) => value as f64,
                    Scalar::Float(value) => value,
                    Scalar::Text { text, .. } => {
                        return Err(format!(
                            "expected a price in USD as a number, like 0.007; found the text \
                             {text:?}; write it without quotes or currency sign"
                        )
                        .into());
                    }
                    other => {
                        return Err(format!(
                            "expected a price in USD as a number, like 0.007; found {}",
                            other.describe()
                        )
                        .into());
                    }
                };
                if price.is_nan() || price.is_infinite() {
                    Err(format!("the price {price} is not a number; write 0 or more USD").into())
                } else if price < 0.0 {
                    Err(format!("the price {price} is negative; write 0 or more USD").into())
                } else {
                    Ok(price)
                }
            }))?;
            ctx.pop();
            prices.insert(model, price);
        }
    }
}
