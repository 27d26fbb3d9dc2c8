//! `krea-batch models`: the models Krea's OpenAPI document lists, each with its kind, required
//! fields, compute units and average time (where the document gives them) and the price
//! krea-batch knows; or one model's fields with their types, ranges and defaults (command).
//!
//! The document is the one `check` and `run` use (`openapi.rs`: fetched, cached for a day per
//! user; `--offline` reads the cache only). Krea states compute units and average completion
//! times only in each operation's description, as a Markdown table (`| Compute Units | Average
//! Completion Time |`, or one row per resolution or duration); they are read from there, and a
//! model whose table has several rows shows the range. Prices come from krea-batch's own table
//! (`pricing.rs`) for a body with every default: a model priced by its parameters costs more
//! with some of them, as `check` shows for a job file.

use crate::error::InputError;
use crate::openapi::{ApiDocument, DocumentError, SchemaChoice, Source, cache_path};
use crate::pricing::{PriceTable, usd};
use crate::schema::{allowed_values, closest, describe_type, resolve, short};
use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;
use std::path::Path;

/// One model of the document, as `models` lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSummary {
    /// `image/bfl/flux-1-dev`: what a job file's `model:` names.
    pub path: String,
    /// `image`, `video` or `enhance`: the first part of the path.
    pub kind: String,
    /// The document's name for it (`Flux`).
    pub title: String,
    /// The fields a request must have.
    pub required: Vec<String>,
    /// Compute units per generation, as the document states them (`3`, `200–401`).
    pub compute_units: Option<String>,
    /// Average completion time in seconds, as the document states it (`7`, `57–133`).
    pub average_seconds: Option<String>,
    /// The price of one generation with the defaults, USD, when krea-batch knows it.
    pub price_usd: Option<f64>,
}

/// The answer of `krea-batch models`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelList {
    /// Where the document came from.
    pub origin: String,
    /// Every model, by path.
    pub models: Vec<ModelSummary>,
}

/// One field of a model's request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldInfo {
    /// Its name.
    pub name: String,
    /// Its type, or the values it allows (`number`, `one of "16:9", "9:16"`).
    #[serde(rename = "type")]
    pub ty: String,
    /// Whether a request must have it.
    pub required: bool,
    /// The values it takes (`512 to 2368`, `at most 1800 characters`), when limited.
    pub range: Option<String>,
    /// Its default, as JSON.
    pub default: Option<String>,
    /// What the document says of it.
    pub description: Option<String>,
}

/// The answer of `krea-batch models PATH`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelDetail {
    /// Where the document came from.
    pub origin: String,
    /// The model, as the list shows it.
    #[serde(flatten)]
    pub summary: ModelSummary,
    /// Its request fields: the required ones first, then by name.
    pub fields: Vec<FieldInfo>,
}

/// The answer of `krea-batch models`: every model, or one.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Models {
    /// `krea-batch models`.
    List(ModelList),
    /// `krea-batch models PATH`.
    One(Box<ModelDetail>),
}

impl fmt::Display for Models {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::List(list) => list.fmt(f),
            Self::One(detail) => detail.fmt(f),
        }
    }
}

/// `krea-batch models [PATH]`: from the OpenAPI document of `base` (cached per user, as for
/// `check`) or the one `choice` names. `label` names the document instead of where it was read
/// (a simulation gone by the time the answer is read).
pub async fn models(
    path: Option<&str>,
    base: &reqwest::Url,
    choice: &SchemaChoice,
    label: Option<&str>,
) -> anyhow::Result<Models> {
    let source = match &choice.openapi {
        Some(file) => Source::File(file.clone()),
        None => Source::Api {
            base: base.clone(),
            // No state file here: without a user cache folder, the current folder keeps it.
            cache: cache_path(base, Path::new(crate::setup::STATE_FILE)),
            offline: choice.offline,
        },
    };
    let mut document = match crate::openapi::obtain(&source).await {
        Ok(document) => document,
        Err(err @ DocumentError::NoCache(_)) => return Err(InputError::new(NoDocument(err)).into()),
        Err(err) => return Err(NoDocument(err).into()),
    };
    if let Some(label) = label {
        label.clone_into(&mut document.origin);
    }
    Ok(match path {
        Some(path) => Models::One(Box::new(detail(&document, path)?)),
        None => Models::List(list(&document)),
    })
}

/// Why `models` has nothing to show: no document could be had.
#[derive(Debug, thiserror::Error)]
#[error(
    "no OpenAPI document of the API is available ({0}); connect once to fetch it (it is then \
     cached for --offline use), or name a copy with --openapi FILE"
)]
struct NoDocument(#[source] DocumentError);

/// Every model `document` lists, by path.
#[must_use]
fn list(document: &ApiDocument) -> ModelList {
    let mut paths: Vec<&str> = document.models().collect();
    paths.sort_unstable();
    let models = paths.into_iter().map(|path| summary(document, path)).collect();
    ModelList { origin: document.origin.clone(), models }
}

/// The fields of the model at `path` (a leading `/generate/` is allowed); a path the document
/// does not list is refused with the closest one it does (exit 2).
fn detail(document: &ApiDocument, path: &str) -> Result<ModelDetail, InputError> {
    let path = path.trim().trim_start_matches('/').trim_start_matches("generate/");
    let Some(schema) = document.request_schema(path) else {
        let known: Vec<&str> = document.models().collect();
        let hint = closest(path, &known).map_or_else(
            || "`krea-batch models` lists them".to_owned(),
            |near| format!("did you mean {near}?"),
        );
        return Err(InputError::msg(format!("{} lists no model {path}; {hint}", document.origin)));
    };
    let root = document.root();
    let schema = follow(schema, root);
    let required = required_of(schema);
    let mut fields: Vec<FieldInfo> = schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(name, field)| field_info(name, follow(field, root), root, required.contains(name)))
        .collect();
    fields.sort_by(|a, b| (!a.required, &a.name).cmp(&(!b.required, &b.name)));
    Ok(ModelDetail { origin: document.origin.clone(), summary: summary(document, path), fields })
}

fn summary(document: &ApiDocument, path: &str) -> ModelSummary {
    let operation = document.operation(path);
    let text = |key: &str| operation.and_then(|op| op.get(key)).and_then(Value::as_str);
    let schema = document.request_schema(path).map(|schema| follow(schema, document.root()));
    let table = text("description").map(CostTable::parse).unwrap_or_default();
    ModelSummary {
        path: path.to_owned(),
        kind: path.split('/').next().unwrap_or_default().to_owned(),
        title: text("summary").unwrap_or_default().to_owned(),
        required: schema.map(required_of).unwrap_or_default(),
        compute_units: table.compute_units,
        average_seconds: table.average_seconds,
        price_usd: PriceTable::default().price(path, &Map::new()),
    }
}

/// `schema`, or what its `$ref` points to.
fn follow<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(target) => resolve(root, target).unwrap_or(schema),
        None => schema,
    }
}

fn required_of(schema: &Value) -> Vec<String> {
    let names = schema.get("required").and_then(Value::as_array).into_iter().flatten();
    names.filter_map(Value::as_str).map(str::to_owned).collect()
}

fn field_info(name: &str, schema: &Value, root: &Value, required: bool) -> FieldInfo {
    let text = |key: &str| schema.get(key).and_then(Value::as_str).map(str::to_owned);
    FieldInfo {
        name: name.to_owned(),
        ty: type_of(schema, root),
        required,
        range: range_of(schema),
        default: schema.get("default").map(short),
        description: text("description").filter(|text| !text.is_empty()),
    }
}

/// A field's type for people: the values it allows when it is a set of them, else its type
/// (`array of object`, `string (uri)`, `number or null`).
fn type_of(schema: &Value, root: &Value) -> String {
    let values = |list: Vec<&Value>| {
        let shown: Vec<String> = list.into_iter().map(short).collect();
        format!("one of {}", shown.join(", "))
    };
    if let Some(list) = schema.get("enum").and_then(Value::as_array) {
        return values(list.iter().collect());
    }
    if let Some(constant) = schema.get("const") {
        return format!("only {}", short(constant));
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = schema.get(key).and_then(Value::as_array) {
            if let Some(allowed) = allowed_values(branches, root).filter(|list| !list.is_empty()) {
                return values(allowed);
            }
            let types: Vec<String> =
                branches.iter().map(|branch| type_of(follow(branch, root), root)).collect();
            return types.join(" or ");
        }
    }
    let mut ty = schema.get("type").map_or_else(|| "any".to_owned(), describe_type);
    if let Some(items) = schema.get("items") {
        ty = format!("{ty} of {}", type_of(follow(items, root), root));
    }
    match schema.get("format").and_then(Value::as_str) {
        Some(format) => format!("{ty} ({format})"),
        None => ty,
    }
}

/// The limits of a field's values, when the schema sets any.
fn range_of(schema: &Value) -> Option<String> {
    let number = |key: &str| schema.get(key).filter(|value| value.is_number()).map(short);
    let bounds = |min: Option<String>, max: Option<String>, unit: &str| {
        // "at least 1 character", not "1 characters".
        let unit = |n: &str| if n == "1" { unit.trim_end_matches('s') } else { unit };
        match (min, max) {
            (Some(min), Some(max)) => Some(format!("{min} to {max}{}", unit(&max))),
            (Some(min), None) => Some(format!("at least {min}{}", unit(&min))),
            (None, Some(max)) => Some(format!("at most {max}{}", unit(&max))),
            (None, None) => None,
        }
    };
    let mut parts: Vec<String> = [
        bounds(number("minimum"), number("maximum"), ""),
        number("exclusiveMinimum").map(|min| format!("above {min}")),
        number("exclusiveMaximum").map(|max| format!("below {max}")),
        bounds(number("minLength"), number("maxLength"), " characters"),
        bounds(number("minItems"), number("maxItems"), " items"),
    ]
    .into_iter()
    .flatten()
    .collect();
    parts.dedup();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Compute units and average time, read from the Markdown table in an operation's
/// description.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct CostTable {
    compute_units: Option<String>,
    average_seconds: Option<String>,
}

impl CostTable {
    fn parse(description: &str) -> Self {
        let rows: Vec<Vec<&str>> = description
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with('|'))
            .map(|line| line.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        let Some((header, body)) = rows.split_first() else { return Self::default() };
        // The line under the header is `|---|---|`.
        let body: Vec<&Vec<&str>> =
            body.iter().filter(|row| !row.iter().all(|cell| cell.starts_with('-'))).collect();
        let column = |name: &str| {
            let index = header.iter().position(|cell| cell.eq_ignore_ascii_case(name))?;
            span(body.iter().filter_map(|row| row.get(index).copied()))
        };
        Self {
            compute_units: column("Compute Units"),
            average_seconds: column("Average Completion Time"),
        }
    }
}

/// The numbers of a column (`~7 seconds`, `60.1`) as one value or a range; cells without a
/// number (`-`) are skipped.
fn span<'a>(cells: impl Iterator<Item = &'a str>) -> Option<String> {
    let numbers: Vec<f64> = cells
        .filter_map(|cell| {
            let cell = cell.trim_start_matches('~').trim();
            let end = cell.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(cell.len());
            cell[..end].parse().ok()
        })
        .collect();
    let min = numbers.iter().copied().reduce(f64::min)?;
    let max = numbers.iter().copied().reduce(f64::max)?;
    #[allow(clippy::float_cmp, reason = "the same number read twice")]
    let one = min == max;
    Some(if one { format!("{min}") } else { format!("{min}–{max}") })
}

impl fmt::Display for ModelList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<[String; 6]> = self
            .models
            .iter()
            .map(|model| {
                [
                    model.path.clone(),
                    model.kind.clone(),
                    or_dash(Some(model.required.join(", ")).filter(|text| !text.is_empty())),
                    or_dash(model.average_seconds.as_ref().map(|s| format!("{s} s"))),
                    or_dash(model.compute_units.clone()),
                    or_dash(model.price_usd.map(usd)),
                ]
            })
            .collect();
        let header = ["MODEL", "KIND", "REQUIRED", "AVG TIME", "COMPUTE UNITS", "PRICE"];
        let mut widths = header.map(|title| title.chars().count());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[&str]| {
            let padded: Vec<String> =
                cells.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            writeln!(f, "{}", padded.join("  ").trim_end())
        };
        writeln!(f, "{} in {}", crate::report::count(self.models.len(), "model"), self.origin)?;
        line(f, &header)?;
        for row in &rows {
            line(f, &row.each_ref().map(String::as_str))?;
        }
        writeln!(
            f,
            "Times and compute units are Krea's, where its document gives them; prices are \
             krea-batch's estimates with the defaults (— : unknown).\n\
             `krea-batch models MODEL` shows a model's fields."
        )
    }
}

fn or_dash(text: Option<String>) -> String {
    text.unwrap_or_else(|| "—".to_owned())
}

impl fmt::Display for ModelDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = &self.summary;
        writeln!(f, "{} ({}, {}) in {}", model.path, model.title, model.kind, self.origin)?;
        if let Some(seconds) = &model.average_seconds {
            writeln!(f, "average time: {seconds} s")?;
        }
        if let Some(units) = &model.compute_units {
            writeln!(f, "compute units: {units}")?;
        }
        match model.price_usd {
            Some(price) => writeln!(f, "price with the defaults: {} (estimate)", usd(price))?,
            None => {
                writeln!(f, "price: not known to krea-batch (a job file's prices: can set it)")?;
            }
        }
        writeln!(f, "fields:")?;
        for field in &self.fields {
            let need = if field.required { "required" } else { "optional" };
            write!(f, "  {}: {} ({need})", field.name, field.ty)?;
            if let Some(range) = &field.range {
                write!(f, ", {range}")?;
            }
            if let Some(default) = &field.default {
                write!(f, ", default {default}")?;
            }
            if let Some(description) = &field.description {
                write!(f, " — {description}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn document() -> ApiDocument {
        let doc = json!({"paths": {
            "/jobs": {"get": {}},
            "/generate/image/bfl/flux-1-dev": {"post": {
                "summary": "Flux",
                "description": "Fast model.\n| Compute Units | Average Completion Time |\n|---|---|\n| ~3 | ~7 seconds |\n",
                "requestBody": {"content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {
                        "prompt": {"type": "string", "maxLength": 1800, "description": "What to generate"},
                        "width": {"type": "number", "minimum": 512, "maximum": 2368, "default": 1024},
                        "image_url": {"type": ["string", "null"], "format": "uri"},
                        "styles": {"type": "array", "items": {"$ref": "#/components/schemas/Style"}},
                    },
                    "required": ["prompt"],
                }}}},
            }},
            "/generate/video/kling/kling-2.5": {"post": {
                "summary": "Kling 2.5",
                "description": "| Duration | Compute Units |\n|---|---|\n| 5s | 200 |\n| 10s | 401 |\n",
                "requestBody": {"content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {"duration": {"anyOf": [
                        {"type": "number", "const": 5}, {"type": "number", "const": 10}
                    ], "default": 5}},
                }}}},
            }},
        }, "components": {"schemas": {"Style": {"type": "object"}}}});
        ApiDocument::parse(doc.to_string().as_bytes(), "test.json").expect("document")
    }

    #[test]
    fn the_list_has_every_model_with_kind_required_fields_time_units_and_price() {
        let list = list(&document());
        let paths: Vec<&str> = list.models.iter().map(|model| model.path.as_str()).collect();
        assert_eq!(paths, ["image/bfl/flux-1-dev", "video/kling/kling-2.5"], "no /jobs");
        let flux = &list.models[0];
        assert_eq!(flux.kind, "image");
        assert_eq!(flux.required, ["prompt"]);
        assert_eq!(flux.compute_units.as_deref(), Some("3"));
        assert_eq!(flux.average_seconds.as_deref(), Some("7"));
        assert_eq!(flux.price_usd, Some(0.007));
        let kling = &list.models[1];
        assert_eq!(kling.compute_units.as_deref(), Some("200–401"), "a range over the rows");
        assert_eq!(kling.average_seconds, None, "not given");
        let text = list.to_string();
        assert!(text.starts_with("2 models in test.json\n"), "{text}");
        assert!(text.contains("image/bfl/flux-1-dev"), "{text}");
    }

    #[test]
    fn a_model_shows_its_fields_with_types_ranges_and_defaults() {
        let flux = detail(&document(), "/generate/image/bfl/flux-1-dev").expect("known");
        let names: Vec<&str> = flux.fields.iter().map(|field| field.name.as_str()).collect();
        assert_eq!(names, ["prompt", "image_url", "styles", "width"], "required first");
        let field = |name: &str| flux.fields.iter().find(|f| f.name == name).expect("field");
        assert_eq!(field("prompt").range.as_deref(), Some("at most 1800 characters"));
        assert_eq!(field("width").range.as_deref(), Some("512 to 2368"));
        assert_eq!(field("width").default.as_deref(), Some("1024"));
        assert_eq!(field("image_url").ty, "string or null (uri)");
        assert_eq!(field("styles").ty, "array of object", "the $ref is followed");
        let kling = detail(&document(), "video/kling/kling-2.5").expect("known");
        assert_eq!(kling.fields[0].ty, "one of 5, 10");
    }

    #[test]
    fn an_unknown_model_is_refused_with_the_closest_one() {
        let err = detail(&document(), "image/bfl/flux-dev").expect_err("unknown").to_string();
        assert!(err.contains("did you mean image/bfl/flux-1-dev?"), "{err}");
        let far = detail(&document(), "audio/x/y").expect_err("unknown").to_string();
        assert!(far.contains("`krea-batch models` lists them"), "{far}");
    }

    #[test]
    fn cost_tables_are_read_from_descriptions() {
        let table = CostTable::parse(
            "| Resolution | Duration | Compute Units | Average Completion Time |\n|--|--|--|--|\n\
             | 1080p | 5s | ~487 | ~78 seconds |\n| 720p | 5s | ~207 | ~57 seconds |",
        );
        assert_eq!(table.compute_units.as_deref(), Some("207–487"));
        assert_eq!(table.average_seconds.as_deref(), Some("57–78"));
        assert_eq!(CostTable::parse("No table here."), CostTable::default());
        let dash = CostTable::parse("| Duration | Compute Units |\n|--|--|\n| - | ~270 |");
        assert_eq!(dash.compute_units.as_deref(), Some("270"));
    }
}
