//! Parsers for the small textual values of a job file: model paths, sizes and durations. Each
//! returns what is wrong as a sentence, so that the deserializers can attach it to the node it
//! came from (and other modules, such as the CLI, can reuse the same rules).

use std::time::Duration;

/// The first path segments Krea uses for its generation endpoints (`/generate/<kind>/...`).
const MODEL_KINDS: [&str; 3] = ["image", "video", "enhance"];

/// Longer model paths are certainly a mistake (Krea's are under 50 bytes).
const MAX_MODEL_PATH_LEN: usize = 200;

/// What a model path looks like, appended to every model-path error.
const MODEL_PATH_FORM: &str = "expected a path like image/bfl/flux-1-dev \
     (<kind>/<provider>/<model>, kind being image, video or enhance), \
     or bfl/flux-1-dev for an image model";

/// The request field that takes a model's main input, from its kind (the first segment of its
/// normalised path): `start_image` for video models, `image_url` for image and enhance models
/// (Krea's schemas name them so). A folder of images (`from: photos/`) puts each image there.
pub(crate) fn default_input_field(model: &str) -> &'static str {
    if model.starts_with("video/") { "start_image" } else { "image_url" }
}

/// Normalises and validates a Krea model path.
///
/// The path is opaque (Krea adds and retires models every few weeks, so no list is kept), but
/// it becomes part of a URL, so it is held to a safe form: segments of lowercase letters,
/// digits, `.`, `_` and `-`, no empty, `.` or `..` segment, no leading `/`. The short form
/// `bfl/flux-1-dev` means `image/bfl/flux-1-dev`: `image/` is prefixed when the first segment
/// is not `image`, `video` or `enhance`. The result has at least three segments.
pub(super) fn parse_model_path(text: &str) -> Result<String, ModelPathError> {
    if text.is_empty() {
        return Err(ModelPathError::Empty);
    }
    if text.len() > MAX_MODEL_PATH_LEN {
        return Err(ModelPathError::TooLong(text.len()));
    }
    if text.starts_with('/') {
        return Err(ModelPathError::LeadingSlash(text.to_owned()));
    }
    for segment in text.split('/') {
        if segment.is_empty() {
            return Err(ModelPathError::EmptySegment(text.to_owned()));
        }
        if segment == "." || segment == ".." {
            return Err(ModelPathError::DotSegment {
                path: text.to_owned(),
                segment: segment.to_owned(),
            });
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        if let Some(bad) = segment.chars().find(|c| !allowed(*c)) {
            return Err(ModelPathError::Character { path: text.to_owned(), bad });
        }
    }
    let first = text.split('/').next().unwrap_or_default();
    let full = if MODEL_KINDS.contains(&first) { text.to_owned() } else { format!("image/{text}") };
    if full.split('/').count() < 3 {
        return Err(ModelPathError::NoModel(text.to_owned()));
    }
    Ok(full)
}

/// What is wrong with a model path ([`parse_model_path`]); each says the form to use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ModelPathError {
    /// No path.
    #[error("the model path is empty; {MODEL_PATH_FORM}")]
    Empty,
    /// Longer than `MAX_MODEL_PATH_LEN` bytes.
    #[error("the model path is {0} bytes long (at most {MAX_MODEL_PATH_LEN}); {MODEL_PATH_FORM}")]
    TooLong(usize),
    /// Starting with `/`.
    #[error("the model path {0:?} starts with '/'; {MODEL_PATH_FORM}")]
    LeadingSlash(String),
    /// `//` or a trailing `/`.
    #[error(
        "the model path {0:?} has an empty segment ('//' or a trailing '/'); {MODEL_PATH_FORM}"
    )]
    EmptySegment(String),
    /// A `.` or `..` segment.
    #[error("the model path {path:?} contains a {segment:?} segment; {MODEL_PATH_FORM}")]
    DotSegment {
        /// The path.
        path: String,
        /// The segment.
        segment: String,
    },
    /// A character outside lowercase letters, digits, `.`, `_` and `-`.
    #[error(
        "the model path {path:?} contains {bad:?}; segments use only lowercase letters, \
         digits, '.', '_' and '-'; {MODEL_PATH_FORM}"
    )]
    Character {
        /// The path.
        path: String,
        /// The character.
        bad: char,
    },
    /// A provider without a model.
    #[error("the model path {0:?} names a provider but no model; {MODEL_PATH_FORM}")]
    NoModel(String),
}

/// How a size is written, for [`SizeError`].
const SIZE_FORM: &str = "expected a size like 512MiB, 2GiB or 1000000 (bytes)";

/// Parses a size in bytes: a whole number with an optional unit, e.g. `1000000`, `512MiB`,
/// `2GiB`, `10 MB`. Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024, decimal ones
/// (`kB`, `MB`, `GB`, `TB`) powers of 1000; `B` means bytes. Units are case-insensitive.
pub(super) fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotASize(text.to_owned()));
    }
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u64.pow(2),
        "g" | "gb" => 1000_u64.pow(3),
        "t" | "tb" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(SizeError::Unit { text: text.to_owned(), unit: unit.trim().to_owned() });
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

/// What is wrong with a size ([`parse_size`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum SizeError {
    /// No number in front.
    #[error("{0:?} is not a size; {SIZE_FORM}")]
    NotASize(String),
    /// A unit it does not know.
    #[error("{text:?} has an unknown unit {unit:?}; {SIZE_FORM}")]
    Unit {
        /// The size as written.
        text: String,
        /// The unit.
        unit: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("{0:?} is too large for a size in bytes")]
    TooLarge(String),
}

/// The longest duration accepted for any limit. Far above any sensible setting, and low enough
/// that adding it to an `Instant` cannot overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_hours(30 * 24);

/// Parses a duration limit in humantime syntax (`500ms`, `2s`, `1m30s`, `2h`): more than zero
/// and at most 30 days.
pub(crate) fn parse_limit_duration(text: &str) -> Result<Duration, DurationError> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|source| DurationError::NotADuration { text: text.to_owned(), source })?;
    if duration.is_zero() {
        return Err(DurationError::Zero(text.to_owned()));
    }
    if duration > MAX_DURATION {
        return Err(DurationError::TooLong(text.to_owned()));
    }
    Ok(duration)
}

/// What is wrong with a duration limit ([`parse_limit_duration`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum DurationError {
    /// Not humantime syntax.
    #[error("{text:?} is not a duration ({source}); write it like 500ms, 2s, 1m30s or 2h")]
    NotADuration {
        /// The duration as written.
        text: String,
        /// Why humantime refused it.
        #[source]
        source: humantime::DurationError,
    },
    /// Zero.
    #[error("{0:?} is zero; a duration limit must be longer than that")]
    Zero(String),
    /// More than [`MAX_DURATION`].
    #[error("{0:?} is longer than the 30 days allowed for a limit")]
    TooLong(String),
}

/// Levenshtein distance, small strings only: used to suggest the key a typo meant.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// "valid keys: a, b, c" plus "did you mean `b`?" when one of them is close to `found`.
pub(crate) fn valid_keys_hint(found: &str, valid: &[&str]) -> String {
    let mut hint = format!("valid keys here: {}", valid.join(", "));
    // Only suggest for short keys, and only a close match: a wrong guess is worse than none.
    if found.len() <= 64
        && let Some(best) = valid
            .iter()
            .map(|key| (edit_distance(found, key), key))
            .filter(|(distance, key)| *distance <= 2.min(key.len() / 2))
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, key)| key)
    {
        hint = format!("did you mean `{best}`? {hint}");
    }
    hint
}
