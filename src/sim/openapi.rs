//! The simulation's own OpenAPI 3.1 document, served at `/openapi.json`: the job endpoints plus
//! one `POST /generate/...` per model of the table in `models.rs`, with request schemas closed by
//! `additionalProperties: false`. Built from that table, so what is documented is what is checked.

use super::models::{Field, MICROS_PER_USD, MODELS, ModelSpec, Ty};
use serde_json::{Map, Value, json};

/// Job states as Krea documents them.
pub(crate) const DOCUMENTED_STATES: [&str; 9] = [
    "backlogged",
    "queued",
    "scheduled",
    "processing",
    "sampling",
    "intermediate-complete",
    "completed",
    "failed",
    "cancelled",
];

/// The whole document; `server` is the API origin it is served from.
pub(crate) fn document(server: &str) -> Value {
    let mut paths = Map::new();
    paths.insert("/jobs".to_owned(), list_jobs());
    paths.insert("/jobs/{id}".to_owned(), one_job());
    for model in MODELS {
        paths.insert(format!("/generate/{}", model.path), generate(model));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Krea API (simulated by krea-batch)",
            "version": "v1",
            "description": "The subset of the Krea API that krea-batch's simulation serves.",
        },
        "servers": [{"url": server}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Job": job_schema(), "Error": error_schema()},
        },
    })
}

fn generate(model: &ModelSpec) -> Value {
    let price = model.base_price() as f64 / MICROS_PER_USD;
    let mut responses = Map::new();
    responses.insert("200".to_owned(), job_response("The job, pending until it completes."));
    for (code, what) in [
        ("400", "The request body is invalid."),
        ("401", "You are not authenticated."),
        ("402", "Your API balance cannot cover this job."),
        ("403", "You may not use this model."),
        ("410", "The model has been sunset."),
        ("422", "Zero-data-retention mode rejects non-data: input URLs."),
        ("429", "You have reached the maximum number of concurrent jobs."),
    ] {
        responses.insert(code.to_owned(), error_response(what));
    }
    json!({"post": {
        "summary": model.summary,
        "description": format!("Simulated. Base price ${price}."),
        "parameters": [{
            "name": "X-Webhook-URL", "in": "header", "required": false,
            "schema": {"type": "string", "format": "uri"},
        }],
        "requestBody": {"required": true, "content": {"application/json": {
            "schema": object_schema(model.fields, model.required),
        }}},
        "responses": responses,
    }})
}

fn object_schema(fields: &[Field], required: &[&str]) -> Value {
    let properties: Map<String, Value> =
        fields.iter().map(|field| (field.name.to_owned(), field_schema(field))).collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

fn field_schema(field: &Field) -> Value {
    let mut schema = type_schema(&field.ty);
    if let Value::Object(object) = &mut schema {
        if let Some(default) = field.default.and_then(|text| serde_json::from_str(text).ok()) {
            object.insert("default".to_owned(), default);
        }
        if !field.description.is_empty() {
            object.insert("description".to_owned(), json!(field.description));
        }
    }
    schema
}

fn type_schema(ty: &Ty) -> Value {
    match ty {
        Ty::Str { min_len, max_len } => {
            let mut schema = json!({"type": "string"});
            if *min_len > 0 {
                schema["minLength"] = json!(min_len);
            }
            if let Some(max) = max_len {
                schema["maxLength"] = json!(max);
            }
            schema
        }
        Ty::Enum(choices) => json!({"type": "string", "enum": choices}),
        Ty::Number { min, max } => {
            let mut schema = json!({"type": "number"});
            if let Some(min) = min {
                schema["minimum"] = json!(min);
            }
            if let Some(max) = max {
                schema["maximum"] = json!(max);
            }
            schema
        }
        Ty::Integer { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        Ty::NumberOneOf(choices) => {
            let options: Vec<Value> =
                choices.iter().map(|value| json!({"type": "number", "const": value})).collect();
            json!({"anyOf": options})
        }
        Ty::Bool => json!({"type": "boolean"}),
        Ty::Uri => json!({"type": "string", "format": "uri"}),
        Ty::NullableUri => json!({"type": ["string", "null"], "format": "uri"}),
        Ty::UriArray => json!({"type": "array", "items": {"type": "string", "format": "uri"}}),
        Ty::Objects { fields, required } => {
            json!({"type": "array", "items": object_schema(fields, required)})
        }
    }
}

fn list_jobs() -> Value {
    json!({"get": {
        "summary": "List jobs, newest first",
        "parameters": [
            {"in": "query", "name": "cursor", "description": "Only jobs created strictly before this time",
             "schema": {"type": "string", "format": "date-time"}},
            {"in": "query", "name": "limit",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
            {"in": "query", "name": "types", "description": "Comma-separated job types",
             "schema": {"type": "string"}},
            {"in": "query", "name": "status", "schema": {"type": "string", "enum": DOCUMENTED_STATES}},
        ],
        "responses": {
            "200": {"description": "A page of jobs", "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                    "next_cursor": {"type": ["string", "null"]},
                },
                "required": ["items", "next_cursor"],
            }}}},
            "400": error_response("Invalid query parameters"),
            "401": error_response("Unauthorized"),
        },
    }})
}

fn one_job() -> Value {
    json!({
        "get": {
            "summary": "Get a job by id",
            "parameters": [id_parameter()],
            "responses": {
                "200": job_response("The job as it is now"),
                "401": error_response("Unauthorized"),
                "404": error_response("No such job"),
            },
        },
        "delete": {
            "summary": "Cancel a job (only while queued or processing)",
            "parameters": [id_parameter()],
            "responses": {
                "200": {"description": "Cancelled; empty body"},
                "401": error_response("Unauthorized"),
                "404": error_response("No such job, or not in a cancellable state"),
            },
        },
    })
}

fn id_parameter() -> Value {
    json!({"in": "path", "name": "id", "required": true, "schema": {"type": "string"}})
}

fn job_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Job"},
    }}})
}

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"},
    }}})
}

fn job_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "job_id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": DOCUMENTED_STATES},
            "type": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "completed_at": {"type": ["string", "null"], "format": "date-time"},
            "result": {
                "type": ["object", "null"],
                "properties": {"urls": {"type": "array", "items": {"type": "string", "format": "uri"}}},
            },
            "error": {
                "type": "object",
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "required": ["job_id", "created_at"],
    })
}

fn error_schema() -> Value {
    json!({"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_has_a_closed_schema() {
        let document = document("http://127.0.0.1:1");
        assert_eq!(document["openapi"], "3.1.0");
        for model in MODELS {
            let path = format!("/generate/{}", model.path);
            let schema = &document["paths"][&path]["post"]["requestBody"]["content"]["application/json"]
                ["schema"];
            assert_eq!(schema["additionalProperties"], false, "{path}");
            assert_eq!(schema["properties"].as_object().map(Map::len), Some(model.fields.len()));
        }
        let flux = &document["paths"]["/generate/image/bfl/flux-1-dev"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"];
        assert_eq!(flux["properties"]["prompt"]["maxLength"], 1800);
        assert_eq!(flux["properties"]["steps"]["default"], 25);
        assert_eq!(flux["properties"]["styles"]["items"]["additionalProperties"], false);
    }
}
