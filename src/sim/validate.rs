//! Request validation against a model's closed schema from the table in `models.rs`: unknown
//! fields, wrong types, values out of range, missing required fields and empty prompts are
//! refused with a message that names the field (`styles[0].strength`), as Krea's 400s do.

use super::models::{Field, ModelSpec, Ty};
use super::picture::Picture;
use serde_json::{Map, Value};

/// What a valid request body means to the rest of the simulation.
#[derive(Debug, PartialEq)]
pub(crate) struct Accepted {
    /// The prompt ("" for models that do not need one).
    pub prompt: String,
    pub price_micros: i64,
    /// Every input URL in the body with the field that holds it (`image_urls[1]`): what Krea
    /// would fetch.
    pub input_urls: Vec<(String, String)>,
    /// What the result pictures show besides the prompt.
    pub picture: Picture,
}

impl ModelSpec {
    /// Checks `body` against the closed schema; the error names the offending field.
    pub(crate) fn validate(&self, body: &Value) -> Result<Accepted, String> {
        let Value::Object(object) = body else {
            return Err(format!("Request body must be a JSON object, got {}", describe(body)));
        };
        let mut input_urls = Vec::new();
        check_object(object, self.fields, self.required, "", &mut input_urls)?;
        let prompt = object.get("prompt").and_then(Value::as_str).unwrap_or_default().to_owned();
        let picture = Picture::of_request(object);
        Ok(Accepted { prompt, price_micros: self.price(object), input_urls, picture })
    }
}

fn check_object(
    object: &Map<String, Value>,
    fields: &[Field],
    required: &[&str],
    prefix: &str,
    urls: &mut Vec<(String, String)>,
) -> Result<(), String> {
    for (name, value) in object {
        let path = format!("{prefix}{name}");
        let Some(field) = fields.iter().find(|field| field.name == name) else {
            let known: Vec<&str> = fields.iter().map(|field| field.name).collect();
            return Err(format!(
                "Unknown field '{path}': this model accepts only {}",
                known.join(", ")
            ));
        };
        check_value(&field.ty, value, &path, urls)?;
    }
    match required.iter().find(|name| !object.contains_key(**name)) {
        Some(missing) => Err(format!("Missing required field '{prefix}{missing}'")),
        None => Ok(()),
    }
}

fn check_value(
    ty: &Ty,
    value: &Value,
    path: &str,
    urls: &mut Vec<(String, String)>,
) -> Result<(), String> {
    let wrong =
        |expected: &str| format!("Field '{path}' must be {expected}, got {}", describe(value));
    match ty {
        Ty::Str { min_len, max_len } => {
            let text = value.as_str().ok_or_else(|| wrong("a string"))?;
            let chars = text.chars().count();
            if text.trim().is_empty() && *min_len > 0 {
                return Err(format!("Field '{path}' must not be empty"));
            }
            if chars < *min_len {
                return Err(format!("Field '{path}' must be at least {min_len} characters"));
            }
            if let Some(max) = max_len.filter(|max| chars > *max) {
                return Err(format!(
                    "Field '{path}' must be at most {max} characters, got {chars}"
                ));
            }
        }
        Ty::Enum(choices) => {
            let text = value.as_str().ok_or_else(|| wrong("a string"))?;
            if !choices.contains(&text) {
                return Err(format!(
                    "Field '{path}' must be one of {}, got {text:?}",
                    choices.join(", ")
                ));
            }
        }
        Ty::Number { min, max } => {
            let number = value.as_f64().ok_or_else(|| wrong("a number"))?;
            check_range(path, number, *min, *max)?;
        }
        Ty::Integer { min, max } => {
            let number = value.as_f64().filter(|n| n.fract() == 0.0);
            let number = number.ok_or_else(|| wrong("an integer"))?;
            check_range(path, number, Some(*min as f64), Some(*max as f64))?;
        }
        Ty::NumberOneOf(choices) => {
            let number = value.as_f64().ok_or_else(|| wrong("a number"))?;
            if !choices.contains(&number) {
                let listed: Vec<String> = choices.iter().map(f64::to_string).collect();
                return Err(format!(
                    "Field '{path}' must be one of {}, got {number}",
                    listed.join(", ")
                ));
            }
        }
        Ty::Bool => {
            value.as_bool().ok_or_else(|| wrong("a boolean"))?;
        }
        Ty::Uri => check_uri(value, path, urls)?,
        Ty::NullableUri => {
            if !value.is_null() {
                check_uri(value, path, urls)?;
            }
        }
        Ty::UriArray => {
            let items = value.as_array().ok_or_else(|| wrong("an array"))?;
            for (index, item) in items.iter().enumerate() {
                check_uri(item, &format!("{path}[{index}]"), urls)?;
            }
        }
        Ty::Objects { fields, required } => {
            let items = value.as_array().ok_or_else(|| wrong("an array of objects"))?;
            for (index, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{index}]");
                let object = item.as_object().ok_or_else(|| {
                    format!("Field '{item_path}' must be an object, got {}", describe(item))
                })?;
                check_object(object, fields, required, &format!("{item_path}."), urls)?;
            }
        }
    }
    Ok(())
}

fn check_range(path: &str, number: f64, min: Option<f64>, max: Option<f64>) -> Result<(), String> {
    let below = min.is_some_and(|min| number < min);
    let above = max.is_some_and(|max| number > max);
    if below || above {
        let bound = |limit: Option<f64>| limit.map_or_else(|| "any".to_owned(), |l| l.to_string());
        return Err(format!(
            "Field '{path}' must be between {} and {}, got {number}",
            bound(min),
            bound(max)
        ));
    }
    Ok(())
}

/// A URI needs a scheme (`https:`, `data:`); the rest is the fetcher's business.
fn check_uri(value: &Value, path: &str, urls: &mut Vec<(String, String)>) -> Result<(), String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("Field '{path}' must be a URL string, got {}", describe(value)))?;
    let scheme = text.split_once(':').map(|(scheme, _)| scheme).unwrap_or_default();
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(format!("Field '{path}' must be a URL, got {text:?}"));
    }
    urls.push((path.to_owned(), text.to_owned()));
    Ok(())
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::models::find;
    use serde_json::json;

    fn model(path: &str) -> &'static ModelSpec {
        find(path).expect("model in the table")
    }

    fn error(path: &str, body: &Value) -> String {
        model(path).validate(body).expect_err("body should be rejected")
    }

    #[test]
    fn errors_name_the_field() {
        let flux = "image/bfl/flux-1-dev";
        assert!(error(flux, &json!({"prompt": "x", "widht": 5})).contains("Unknown field 'widht'"));
        assert!(error(flux, &json!({"width": 1024})).contains("Missing required field 'prompt'"));
        assert!(error(flux, &json!({"prompt": "  "})).contains("'prompt' must not be empty"));
        assert!(error(flux, &json!({"prompt": "x".repeat(1801)})).contains("at most 1800"));
        assert!(
            error(flux, &json!({"prompt": "x", "width": 4000}))
                .contains("'width' must be between 512 and 2368")
        );
        assert!(
            error(flux, &json!({"prompt": "x", "steps": 2.5}))
                .contains("'steps' must be an integer")
        );
        assert!(
            error(flux, &json!({"prompt": 7})).contains("'prompt' must be a string, got a number")
        );
        assert!(
            error(flux, &json!({"prompt": "x", "styles": [{"id": "a", "strength": 3}]}))
                .contains("'styles[0].strength'")
        );
        assert!(
            error(flux, &json!({"prompt": "x", "styles": [{"id": "a"}]}))
                .contains("Missing required field 'styles[0].strength'")
        );
        assert!(error(flux, &json!(["prompt"])).contains("JSON object"));
        let krea = "image/krea/krea-2/medium";
        assert!(
            error(krea, &json!({"prompt": "x", "creativity": "wild"}))
                .contains("'creativity' must be one of raw")
        );
        assert!(
            error("video/kling/kling-2.5", &json!({"prompt": "x", "duration": 7}))
                .contains("'duration'")
        );
        assert!(
            error("image/google/nano-banana-2", &json!({"prompt": "ab"})).contains("at least 3")
        );
        let enhance = "enhance/topaz/standard-enhance";
        assert!(
            error(enhance, &json!({"image_url": "https://x/y.png", "width": 2048, "height": 2048}))
                .contains("'model'")
        );
        assert!(
            error(
                enhance,
                &json!({"image_url": "not a url", "width": 1, "height": 1, "model": "CGI"})
            )
            .contains("'image_url' must be a URL")
        );
    }

    #[test]
    fn input_urls_are_collected() {
        let accepted = model("image/bfl/flux-1-dev")
            .validate(&json!({"prompt": "x", "image_url": "data:image/png;base64,AA", "image_style_references": [{"url": "https://a/b.png", "strength": 1}]}))
            .expect("valid");
        // Fields come in key order: `image_style_references` before `image_url`.
        let urls: Vec<(&str, &str)> =
            accepted.input_urls.iter().map(|(field, url)| (field.as_str(), url.as_str())).collect();
        assert_eq!(
            urls,
            [
                ("image_style_references[0].url", "https://a/b.png"),
                ("image_url", "data:image/png;base64,AA")
            ]
        );
    }
}
