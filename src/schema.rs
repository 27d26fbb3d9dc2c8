//! Checking a request body against its model's JSON Schema, as Krea's OpenAPI document gives
//! it, before anything is spent: an unknown field (with the closest valid name), a wrong type,
//! a number out of range, a value not in the enum, a missing required field.
//!
//! Only the part of JSON Schema that Krea's document uses is understood: `type` (one or a list),
//! `enum`, `const`, `minimum`/`maximum` (and their exclusive forms), `minLength`/`maxLength`,
//! `minItems`/`maxItems`, `items`, `properties`, `required`, `additionalProperties`,
//! `anyOf`/`oneOf`/`allOf`, and local `$ref`s. Anything else (`format`, `pattern`, …) is not
//! checked: Krea still has the last word. Pure: no I/O (`openapi.rs` finds the schemas).

use serde_json::{Map, Value};

/// One thing wrong with a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where in the body, e.g. `width` or `styles[0].strength`.
    pub path: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// How deep `$ref`s and nested schemas are followed (a cycle in a broken document ends here).
const MAX_DEPTH: usize = 32;

/// The problems of `value` against `schema`; `root` is the document `$ref`s point into.
#[must_use]
pub(crate) fn validate(schema: &Value, value: &Value, root: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    check(schema, value, root, "", 0, &mut problems);
    problems
}

fn check(
    schema: &Value,
    value: &Value,
    root: &Value,
    path: &str,
    depth: usize,
    out: &mut Vec<Problem>,
) {
    if depth > MAX_DEPTH {
        return;
    }
    let Some(schema) = schema.as_object() else { return };
    if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
        if let Some(resolved) = resolve(root, target) {
            check(resolved, value, root, path, depth + 1, out);
        }
        return;
    }
    for all in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        check(all, value, root, path, depth + 1, out);
    }
    for (key, exactly_one) in [("anyOf", false), ("oneOf", true)] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            check_alternatives(branches, exactly_one, value, root, path, depth, out);
        }
    }
    if let Some(types) = schema.get("type")
        && !type_matches(types, value)
    {
        let message = format!("expected {}, got {}", describe_type(types), describe(value));
        out.push(problem(path, message));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.iter().any(|allowed| same(allowed, value))
    {
        let list: Vec<String> = allowed.iter().map(short).collect();
        out.push(problem(path, format!("{} is not one of {}", short(value), list.join(", "))));
    }
    if let Some(constant) = schema.get("const")
        && !same(constant, value)
    {
        out.push(problem(path, format!("must be {}, got {}", short(constant), short(value))));
    }
    match value {
        Value::Number(number) => {
            check_number(schema, number.as_f64().unwrap_or_default(), path, out);
        }
        Value::String(text) => check_length(schema, text.chars().count(), "characters", path, out),
        Value::Array(items) => {
            check_items(schema, items.len(), path, out);
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    check(item_schema, item, root, &format!("{path}[{index}]"), depth + 1, out);
                }
            }
        }
        Value::Object(object) => check_object(schema, object, root, path, depth, out),
        Value::Bool(_) | Value::Null => {}
    }
}

/// A value must fit one of the `branches` (`anyOf`), or exactly one (`oneOf`, when
/// `exactly_one`). When none fits: if every branch is a set of values (`const`, `enum`, or
/// `null`), every allowed value is listed; otherwise the problems of the branch that came
/// closest (fewest problems) are reported.
fn check_alternatives(
    branches: &[Value],
    exactly_one: bool,
    value: &Value,
    root: &Value,
    path: &str,
    depth: usize,
    out: &mut Vec<Problem>,
) {
    let mut best: Option<Vec<Problem>> = None;
    let mut fitting = 0;
    for branch in branches {
        let mut problems = Vec::new();
        check(branch, value, root, path, depth + 1, &mut problems);
        if problems.is_empty() {
            fitting += 1;
            if !exactly_one {
                return;
            }
        } else if best.as_ref().is_none_or(|best| problems.len() < best.len()) {
            best = Some(problems);
        }
    }
    if fitting > 1 {
        let message = format!(
            "{} fits {fitting} of the {} alternatives where exactly one must fit (oneOf)",
            short(value),
            branches.len()
        );
        return out.push(problem(path, message));
    }
    if fitting == 1 {
        return;
    }
    match allowed_values(branches, root) {
        Some(allowed) if !allowed.is_empty() => {
            let list: Vec<String> = allowed.into_iter().map(short).collect();
            out.push(problem(path, format!("{} is not one of {}", short(value), list.join(", "))));
        }
        _ => out.extend(best.unwrap_or_default()),
    }
}

/// The values the branches allow, when each is only a set of values: `const`, `enum`, or
/// `type: null` (with `$ref`s followed one step); `None` when a branch allows more.
pub(crate) fn allowed_values<'a>(branches: &'a [Value], root: &'a Value) -> Option<Vec<&'a Value>> {
    static NULL: Value = Value::Null;
    let mut allowed = Vec::new();
    for branch in branches {
        let branch = match branch.get("$ref").and_then(Value::as_str) {
            Some(target) => resolve(root, target)?,
            None => branch,
        };
        if let Some(constant) = branch.get("const") {
            allowed.push(constant);
        } else if let Some(list) = branch.get("enum").and_then(Value::as_array) {
            allowed.extend(list);
        } else if branch.get("type").and_then(Value::as_str) == Some("null") {
            allowed.push(&NULL);
        } else {
            return None;
        }
    }
    Some(allowed)
}

/// Equality as JSON Schema defines it: numbers by value (`5` equals `5.0`), arrays item by
/// item, objects key by key; `serde_json`'s own `==` tells an integer from a float.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => {
            match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
                (Some(a), Some(b), _, _) => a == b,
                (_, _, Some(a), Some(b)) => a == b,
                // Exact, as the schema means it: `5.0` is 5, and 5.000001 is not.
                #[allow(clippy::float_cmp, reason = "JSON Schema equality is exact")]
                _ => a.as_f64().zip(b.as_f64()).is_some_and(|(a, b)| a == b),
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(key, a)| b.get(key).is_some_and(|b| same(a, b)))
        }
        _ => a == b,
    }
}

fn check_number(schema: &Map<String, Value>, number: f64, path: &str, out: &mut Vec<Problem>) {
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Some(min) = bound("minimum").filter(|min| number < *min) {
        out.push(problem(path, format!("{number} is below the minimum {min}")));
    }
    if let Some(max) = bound("maximum").filter(|max| number > *max) {
        out.push(problem(path, format!("{number} is above the maximum {max}")));
    }
    if let Some(min) = bound("exclusiveMinimum").filter(|min| number <= *min) {
        out.push(problem(path, format!("{number} must be above {min}")));
    }
    if let Some(max) = bound("exclusiveMaximum").filter(|max| number >= *max) {
        out.push(problem(path, format!("{number} must be below {max}")));
    }
}

fn check_length(
    schema: &Map<String, Value>,
    len: usize,
    unit: &str,
    path: &str,
    out: &mut Vec<Problem>,
) {
    let bound =
        |key: &str| schema.get(key).and_then(Value::as_u64).and_then(|n| usize::try_from(n).ok());
    if let Some(min) = bound("minLength").filter(|min| len < *min) {
        out.push(problem(path, format!("{len} {unit}, at least {min} needed")));
    }
    if let Some(max) = bound("maxLength").filter(|max| len > *max) {
        out.push(problem(path, format!("{len} {unit}, at most {max} allowed")));
    }
}

fn check_items(schema: &Map<String, Value>, len: usize, path: &str, out: &mut Vec<Problem>) {
    let bound =
        |key: &str| schema.get(key).and_then(Value::as_u64).and_then(|n| usize::try_from(n).ok());
    if let Some(min) = bound("minItems").filter(|min| len < *min) {
        out.push(problem(path, format!("{len} items, at least {min} needed")));
    }
    if let Some(max) = bound("maxItems").filter(|max| len > *max) {
        out.push(problem(path, format!("{len} items, at most {max} allowed")));
    }
}

fn check_object(
    schema: &Map<String, Value>,
    object: &Map<String, Value>,
    root: &Value,
    path: &str,
    depth: usize,
    out: &mut Vec<Problem>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let join =
        |field: &str| if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") };
    for required in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        if let Some(field) = required.as_str().filter(|field| !object.contains_key(*field)) {
            out.push(problem(&join(field), "is required and missing".to_owned()));
        }
    }
    for (field, value) in object {
        match properties.and_then(|properties| properties.get(field)) {
            Some(field_schema) => check(field_schema, value, root, &join(field), depth + 1, out),
            None => match schema.get("additionalProperties") {
                Some(Value::Bool(false)) => {
                    let known: Vec<&str> = properties
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let hint = closest(field, &known).map_or_else(
                        || format!("valid fields: {}", known.join(", ")),
                        |name| format!("did you mean {name}?"),
                    );
                    out.push(problem(&join(field), format!("unknown field; {hint}")));
                }
                Some(extra @ Value::Object(_)) => {
                    check(extra, value, root, &join(field), depth + 1, out);
                }
                _ => {}
            },
        }
    }
}

/// The valid name closest to a misspelled one, if one is close enough to be a likely typo.
#[must_use]
pub(crate) fn closest<'a>(wrong: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|name| (distance(&wrong.to_lowercase(), &name.to_lowercase()), *name))
        .filter(|(distance, name)| *distance <= (name.len() / 3).max(2))
        .min()
        .map(|(_, name)| name)
}

/// Levenshtein distance, counting an adjacent swap as one edit.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0_usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best =
                (rows[i - 1][j] + 1).min(rows[i][j - 1] + 1).min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// The schema a local `$ref` (`#/components/schemas/Job`) points to in `root`.
pub(crate) fn resolve<'a>(root: &'a Value, target: &str) -> Option<&'a Value> {
    root.pointer(target.strip_prefix('#')?)
}

fn type_matches(types: &Value, value: &Value) -> bool {
    let one = |name: &str| match name {
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|n| n.fract() == 0.0),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        _ => true,
    };
    match types {
        Value::String(name) => one(name),
        Value::Array(names) => names.iter().filter_map(Value::as_str).any(one),
        _ => true,
    }
}

/// A `type` keyword for people: `string`, `string or null`.
pub(crate) fn describe_type(types: &Value) -> String {
    match types {
        Value::Array(names) => {
            names.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" or ")
        }
        other => other.as_str().unwrap_or("a value").to_owned(),
    }
}

fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{kind} ({})", short(value))
}

/// A value as JSON, cut to 60 characters.
pub(crate) fn short(value: &Value) -> String {
    crate::api::printable(&value.to_string(), 60)
}

fn problem(path: &str, message: String) -> Problem {
    Problem { path: if path.is_empty() { "(body)".into() } else { path.into() }, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flux() -> Value {
        json!({
            "type": "object",
            "properties": {
                "prompt": {"type": "string", "maxLength": 1800},
                "width": {"type": "number", "minimum": 512, "maximum": 2368},
                "steps": {"type": "integer", "minimum": 1, "maximum": 100},
                "image_url": {"type": ["string", "null"]},
                "styles": {"type": "array", "maxItems": 2, "items": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "strength": {"type": "number", "minimum": -2, "maximum": 2}},
                    "required": ["id", "strength"]
                }},
                "resolution": {"anyOf": [{"type": "string", "enum": ["1K", "2K"]}, {"type": "null"}]},
                "mode": {"$ref": "#/components/schemas/Mode"}
            },
            "required": ["prompt"],
            "additionalProperties": false
        })
    }

    fn root() -> Value {
        json!({"components": {"schemas": {"Mode": {"type": "string", "enum": ["std", "pro"]}}}})
    }

    fn problems(body: &Value) -> Vec<String> {
        validate(&flux(), body, &root()).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_valid_body_has_no_problems() {
        let body = json!({"prompt": "x", "width": 1024, "steps": 25, "image_url": null,
            "styles": [{"id": "s", "strength": 1.5}], "resolution": "2K", "mode": "pro"});
        assert!(problems(&body).is_empty(), "{:?}", problems(&body));
    }

    #[test]
    fn each_kind_of_mistake_is_named() {
        assert_eq!(
            problems(&json!({"prompt": "x", "widht": 1024})),
            ["widht: unknown field; did you mean width?"]
        );
        assert_eq!(problems(&json!({"width": 1024})), ["prompt: is required and missing"]);
        assert_eq!(
            problems(&json!({"prompt": "x", "width": 4000})),
            ["width: 4000 is above the maximum 2368"]
        );
        assert_eq!(
            problems(&json!({"prompt": "x", "steps": 2.5})),
            ["steps: expected integer, got a number (2.5)"]
        );
        assert_eq!(
            problems(&json!({"prompt": "x", "mode": "turbo"})),
            [r#"mode: "turbo" is not one of "std", "pro""#]
        );
        assert_eq!(
            problems(&json!({"prompt": "x", "resolution": "4K"})),
            [r#"resolution: "4K" is not one of "1K", "2K", null"#]
        );
        assert_eq!(
            problems(&json!({"prompt": "x", "styles": [{"id": "s", "strength": 3}]})),
            ["styles[0].strength: 3 is above the maximum 2"]
        );
        assert_eq!(problems(&json!({"prompt": 5})), ["prompt: expected string, got a number (5)"]);
        let long = "x".repeat(1801);
        assert_eq!(
            problems(&json!({"prompt": long})),
            ["prompt: 1801 characters, at most 1800 allowed"]
        );
    }

    #[test]
    fn a_far_off_name_lists_the_valid_ones() {
        let found = problems(&json!({"prompt": "x", "zzzzzz": 1}));
        assert!(found[0].contains("valid fields: image_url, mode, prompt"), "{found:?}");
    }

    #[test]
    fn closeness_of_names() {
        assert_eq!(closest("aspect_ration", &["aspect_ratio", "seed"]), Some("aspect_ratio"));
        assert_eq!(closest("sede", &["aspect_ratio", "seed"]), Some("seed"));
        assert_eq!(closest("guidance", &["steps", "seed"]), None);
    }

    /// `duration: 5` for a schema that says `5.0` (or the other way round) is the same number.
    #[test]
    fn numbers_compare_by_value() {
        let schema = json!({"properties": {
            "duration": {"anyOf": [{"const": 5.0}, {"const": 10.0}]},
            "fps": {"enum": [24, 30]},
            "seconds": {"const": 5},
        }});
        let body = json!({"duration": 5, "fps": 30.0, "seconds": 5.0});
        assert!(validate(&schema, &body, &json!({})).is_empty());
        let wrong = json!({"duration": 7, "fps": 25, "seconds": 6});
        let found: Vec<String> =
            validate(&schema, &wrong, &json!({})).iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            [
                "duration: 7 is not one of 5.0, 10.0",
                "fps: 25 is not one of 24, 30",
                "seconds: must be 5, got 6"
            ]
        );
        assert!(same(&json!([1, {"a": 2}]), &json!([1.0, {"a": 2.0}])));
        assert!(!same(&json!([1]), &json!([1, 1])));
        assert!(!same(&json!(u64::MAX), &json!(-1)));
    }

    /// An `anyOf` of constants names every allowed value, also through `$ref`s.
    #[test]
    fn an_any_of_constants_lists_every_value() {
        let root = json!({"components": {"schemas": {"Ten": {"const": 10}}}});
        let schema = json!({"anyOf": [{"const": 5}, {"$ref": "#/components/schemas/Ten"}, {"enum": [15, 20]}]});
        let found = validate(&schema, &json!(6), &root);
        assert_eq!(found[0].message, "6 is not one of 5, 10, 15, 20");
        assert!(validate(&schema, &json!(20.0), &root).is_empty());
    }

    /// `oneOf` means exactly one: a value fitting two alternatives is refused, one fitting none
    /// gets the closest alternative's problems.
    #[test]
    fn one_of_means_exactly_one() {
        let schema = json!({"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 10}]});
        let root = json!({});
        assert!(validate(&schema, &json!(2.5), &root).is_empty(), "only the number fits");
        assert!(validate(&schema, &json!(50), &root).is_empty(), "only the integer fits");
        let both = validate(&schema, &json!(5), &root);
        assert_eq!(both.len(), 1, "{both:?}");
        assert!(both[0].message.contains("fits 2 of the 2 alternatives"), "{both:?}");
        let neither = validate(&schema, &json!(12.5), &root);
        assert_eq!(neither.len(), 1, "the closest alternative's one problem: {neither:?}");
    }

    #[test]
    fn a_reference_cycle_ends() {
        let root = json!({"components": {"schemas": {"A": {"$ref": "#/components/schemas/A"}}}});
        let schema = json!({"$ref": "#/components/schemas/A"});
        assert!(validate(&schema, &json!(1), &root).is_empty());
    }
}
