//! The simulated models: one table ([`MODELS`]) that holds each model's closed request schema and
//! price. The same table validates request bodies (`validate.rs`) and is rendered into the
//! simulation's own `/openapi.json` (`openapi.rs`), so the two cannot drift apart. Prices are in
//! micro-USD so billing adds up exactly.

use serde_json::{Map, Value};

/// One micro-USD unit per millionth of a dollar.
pub(crate) const MICROS_PER_USD: f64 = 1_000_000.0;

/// USD to micro-USD, rounded to the nearest unit.
pub(crate) fn usd_to_micros(usd: f64) -> i64 {
    (usd * MICROS_PER_USD).round() as i64
}

/// Which family of generation a model belongs to: the first path segment after `/generate/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Image,
    Video,
    Enhance,
}

/// A simulated model: its path after `/generate/`, schema and price.
#[derive(Debug)]
pub(crate) struct ModelSpec {
    /// `image/bfl/flux-1-dev`: kind, provider, model (2–3 segments after the kind).
    pub path: &'static str,
    pub summary: &'static str,
    pub kind: Kind,
    /// The job object's `type`, which `GET /jobs?types=` filters on.
    pub job_type: &'static str,
    pub fields: &'static [Field],
    pub required: &'static [&'static str],
    pricing: Pricing,
}

/// A request property: its name, type and (for the OpenAPI document) default and description.
#[derive(Debug)]
pub(crate) struct Field {
    pub name: &'static str,
    pub ty: Ty,
    /// The default as JSON text, shown in the OpenAPI document only.
    pub default: Option<&'static str>,
    pub description: &'static str,
}

/// The small subset of JSON Schema the simulated models need.
#[derive(Debug)]
pub(crate) enum Ty {
    Str {
        min_len: usize,
        max_len: Option<usize>,
    },
    Enum(&'static [&'static str]),
    Number {
        min: Option<f64>,
        max: Option<f64>,
    },
    Integer {
        min: i64,
        max: i64,
    },
    /// A number that must be one of these values (`anyOf` of `const`s).
    NumberOneOf(&'static [f64]),
    Bool,
    Uri,
    NullableUri,
    UriArray,
    /// An array of closed objects.
    Objects {
        fields: &'static [Field],
        required: &'static [&'static str],
    },
}

#[derive(Debug)]
enum Pricing {
    Flat(i64),
    /// Krea 2: dearer with style references, dearer still with moodboards.
    Krea2 {
        base: i64,
        style_references: i64,
        moodboards: i64,
    },
    /// Nano Banana: by the `resolution` field (default first).
    ByResolution(&'static [(&'static str, i64)]),
    /// Video: per second of the `duration` field.
    PerSecond {
        micros: i64,
        default_seconds: i64,
    },
}

const fn field(name: &'static str, ty: Ty, description: &'static str) -> Field {
    Field { name, ty, default: None, description }
}

const fn with_default(
    name: &'static str,
    ty: Ty,
    default: &'static str,
    description: &'static str,
) -> Field {
    Field { name, ty, default: Some(default), description }
}

const NUMBER: Ty = Ty::Number { min: None, max: None };
const STRENGTH: Ty = Ty::Number { min: Some(-2.0), max: Some(2.0) };
const UNIT: Ty = Ty::Number { min: Some(0.0), max: Some(1.0) };

const STYLES: Ty = Ty::Objects {
    fields: &[
        field("id", Ty::Str { min_len: 1, max_len: None }, "Style id"),
        field("strength", STRENGTH, ""),
    ],
    required: &["id", "strength"],
};
const URL_REFERENCES: Ty = Ty::Objects {
    fields: &[field("url", Ty::Uri, "Image URL"), field("strength", STRENGTH, "")],
    required: &["strength"],
};
const MOODBOARDS: Ty = Ty::Objects {
    fields: &[
        field("id", Ty::Str { min_len: 1, max_len: None }, "Moodboard id"),
        field("strength", STRENGTH, ""),
    ],
    required: &["id"],
};

const KREA_2_FIELDS: &[Field] = &[
    field("prompt", Ty::Str { min_len: 1, max_len: None }, "What to generate"),
    with_default(
        "aspect_ratio",
        Ty::Enum(&["1:1", "4:3", "3:2", "16:9", "2.35:1", "4:5", "2:3", "9:16"]),
        "\"1:1\"",
        "Aspect ratio of the image",
    ),
    with_default("resolution", Ty::Enum(&["1K"]), "\"1K\"", "Output resolution"),
    with_default("creativity", Ty::Enum(&["raw", "low", "medium", "high"]), "\"medium\"", ""),
    field("image_style_references", URL_REFERENCES, "Style reference images"),
    field("moodboards", MOODBOARDS, "Moodboards to follow"),
    field("styles", STYLES, "Styles (LoRAs) to apply"),
];

/// The simulated models. Their schemas follow Krea's OpenAPI document and krea-api.md.
pub(crate) static MODELS: &[ModelSpec] = &[
    ModelSpec {
        path: "image/bfl/flux-1-dev",
        summary: "Flux",
        kind: Kind::Image,
        job_type: "flux",
        fields: &[
            field("prompt", Ty::Str { min_len: 1, max_len: Some(1800) }, "What to generate"),
            with_default("width", Ty::Number { min: Some(512.0), max: Some(2368.0) }, "1024", ""),
            with_default("height", Ty::Number { min: Some(512.0), max: Some(2368.0) }, "1024", ""),
            with_default("steps", Ty::Integer { min: 1, max: 100 }, "25", "Sampling steps"),
            field("seed", NUMBER, "Random seed"),
            with_default("guidance_scale", Ty::Number { min: Some(0.0), max: Some(24.0) }, "3", ""),
            with_default("strength", NUMBER, "1", "Strength of image_url"),
            field("image_url", Ty::NullableUri, "Image to start from"),
            field("styles", STYLES, "Styles (LoRAs) to apply"),
            field("image_style_references", URL_REFERENCES, "Style reference images"),
        ],
        required: &["prompt"],
        pricing: Pricing::Flat(7_000),
    },
    ModelSpec {
        path: "image/krea/krea-2/medium",
        summary: "Krea 2 Medium",
        kind: Kind::Image,
        job_type: "krea-2",
        fields: KREA_2_FIELDS,
        required: &["prompt"],
        pricing: Pricing::Krea2 { base: 30_000, style_references: 35_000, moodboards: 40_000 },
    },
    ModelSpec {
        path: "image/krea/krea-2/large",
        summary: "Krea 2 Large",
        kind: Kind::Image,
        job_type: "krea-2",
        fields: KREA_2_FIELDS,
        required: &["prompt"],
        pricing: Pricing::Krea2 { base: 60_000, style_references: 65_000, moodboards: 70_000 },
    },
    ModelSpec {
        path: "image/google/nano-banana-2",
        summary: "Nano Banana 2",
        kind: Kind::Image,
        job_type: "externalImage",
        fields: &[
            field("prompt", Ty::Str { min_len: 3, max_len: None }, "What to generate"),
            field("width", NUMBER, "Width of the generated image"),
            field("height", NUMBER, "Height of the generated image"),
            field("image_urls", Ty::UriArray, "Image prompts"),
            field(
                "aspect_ratio",
                Ty::Enum(&[
                    "4:1", "21:9", "1:1", "4:3", "3:2", "2:3", "5:4", "4:5", "3:4", "16:9", "9:16",
                    "1:4", "1:8",
                ]),
                "",
            ),
            with_default("resolution", Ty::Enum(&["1K", "2K", "4K"]), "\"1K\"", ""),
            field("style_images", URL_REFERENCES, "Style images"),
        ],
        required: &["prompt"],
        pricing: Pricing::ByResolution(&[("1K", 80_000), ("2K", 120_000), ("4K", 160_000)]),
    },
    ModelSpec {
        path: "video/kling/kling-2.5",
        summary: "Kling 2.5",
        kind: Kind::Video,
        job_type: "externalVideo",
        fields: &[
            field("prompt", Ty::Str { min_len: 1, max_len: None }, "What to generate"),
            field("start_image", Ty::Uri, "First frame"),
            field("start_video", Ty::NullableUri, "Video to continue"),
            field("end_image", Ty::Uri, "Last frame"),
            with_default("aspect_ratio", Ty::Enum(&["16:9", "9:16", "1:1"]), "\"16:9\"", ""),
            with_default("duration", Ty::NumberOneOf(&[5.0, 10.0]), "5", "Seconds"),
            with_default("mode", Ty::Enum(&["pro"]), "\"pro\"", ""),
        ],
        required: &["prompt"],
        pricing: Pricing::PerSecond { micros: 77_200, default_seconds: 5 },
    },
    ModelSpec {
        path: "enhance/topaz/standard-enhance",
        summary: "Topaz",
        kind: Kind::Enhance,
        job_type: "enhance",
        fields: &[
            with_default("prompt", Ty::Str { min_len: 0, max_len: None }, "\"\"", ""),
            field("width", Ty::Number { min: Some(1.0), max: Some(32000.0) }, "Output width"),
            field("height", Ty::Number { min: Some(1.0), max: Some(32000.0) }, "Output height"),
            with_default("seed", NUMBER, "1337", ""),
            field("image_url", Ty::Uri, "The image to enhance"),
            field(
                "model",
                Ty::Enum(&[
                    "Standard V2",
                    "Low Resolution V2",
                    "CGI",
                    "High Fidelity V2",
                    "Text Refine",
                ]),
                "Topaz model",
            ),
            with_default("output_format", Ty::Enum(&["png", "jpg", "webp"]), "\"jpg\"", ""),
            with_default(
                "subject_detection",
                Ty::Enum(&["All", "Foreground", "Background"]),
                "\"All\"",
                "",
            ),
            with_default("face_enhancement", Ty::Bool, "false", ""),
            with_default("face_enhancement_creativity", UNIT, "0.5", ""),
            with_default("face_enhancement_strength", UNIT, "0.5", ""),
            with_default("crop_to_fill", Ty::Bool, "false", ""),
            with_default("upscaling_activated", Ty::Bool, "false", ""),
            with_default(
                "image_scaling_factor",
                Ty::Number { min: Some(1.0), max: Some(32.0) },
                "1",
                "Scale factor",
            ),
            with_default("sharpen", UNIT, "0.5", ""),
            with_default("denoise", UNIT, "0.5", ""),
            with_default("fix_compression", UNIT, "0.5", ""),
            with_default("strength", Ty::Number { min: Some(0.01), max: Some(1.0) }, "0.5", ""),
        ],
        required: &["width", "height", "image_url", "model"],
        pricing: Pricing::Flat(25_000),
    },
];

/// The model at `path` (the part after `/generate/`), if the simulation knows it.
pub(crate) fn find(path: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|model| model.path == path)
}

impl ModelSpec {
    /// The price of a (valid) request, in micro-USD.
    pub(crate) fn price(&self, body: &Map<String, Value>) -> i64 {
        let non_empty = |name: &str| {
            body.get(name).and_then(Value::as_array).is_some_and(|items| !items.is_empty())
        };
        match self.pricing {
            Pricing::Flat(micros) => micros,
            Pricing::Krea2 { base, style_references, moodboards } => {
                if non_empty("moodboards") {
                    moodboards
                } else if non_empty("image_style_references") {
                    style_references
                } else {
                    base
                }
            }
            Pricing::ByResolution(table) => {
                let chosen = body.get("resolution").and_then(Value::as_str);
                let row = table.iter().find(|(name, _)| Some(*name) == chosen).or(table.first());
                row.map_or(0, |(_, micros)| *micros)
            }
            Pricing::PerSecond { micros, default_seconds } => {
                // Validation allowed only whole values (5 or 10), so the cast is exact.
                let seconds = body
                    .get("duration")
                    .and_then(Value::as_f64)
                    .map_or(default_seconds, |secs| secs as i64);
                micros * seconds
            }
        }
    }

    /// The base price in micro-USD with default parameters (for documentation).
    pub(crate) fn base_price(&self) -> i64 {
        self.price(&Map::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(path: &str) -> &'static ModelSpec {
        find(path).expect("model in the table")
    }

    #[test]
    fn valid_bodies_are_priced() {
        let flux = model("image/bfl/flux-1-dev");
        let accepted = flux
            .validate(&json!({"prompt": "a cat", "width": 1024, "steps": 30, "styles": [{"id": "s", "strength": 1.5}]}))
            .expect("valid");
        assert_eq!(accepted.prompt, "a cat");
        assert_eq!(accepted.price_micros, 7_000);
        let banana = model("image/google/nano-banana-2");
        let price = |body| banana.validate(&body).expect("valid").price_micros;
        assert_eq!(price(json!({"prompt": "a dog"})), 80_000);
        assert_eq!(price(json!({"prompt": "a dog", "resolution": "4K"})), 160_000);
        let kling = model("video/kling/kling-2.5");
        let price = |body| kling.validate(&body).expect("valid").price_micros;
        assert_eq!(price(json!({"prompt": "waves"})), 386_000);
        assert_eq!(price(json!({"prompt": "waves", "duration": 10})), 772_000);
        let medium = model("image/krea/krea-2/medium");
        let price = |body| medium.validate(&body).expect("valid").price_micros;
        assert_eq!(price(json!({"prompt": "p", "moodboards": [{"id": "m"}]})), 40_000);
        assert_eq!(
            price(json!({"prompt": "p", "image_style_references": [{"strength": 1}]})),
            35_000
        );
        assert_eq!(model("image/krea/krea-2/large").base_price(), 60_000);
    }
}
