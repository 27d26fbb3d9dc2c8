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

/// Normalises and validates a Krea model path.
///
/// The path is opaque (Krea adds and retires models every few weeks, so no list is kept), but
/// it becomes part of a URL, so it is held to a safe form: segments of lowercase letters,
/// digits, `.`, `_` and `-`, no empty, `.` or `..` segment, no leading `/`. The short form
/// `bfl/flux-1-dev` means `image/bfl/flux-1-dev`: `image/` is prefixed when the first segment
/// is not `image`, `video` or `enhance`. The result has at least three segments.
pub fn parse_model_path(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err(format!("the model path is empty; {MODEL_PATH_FORM}"));
    }
    if text.len() > MAX_MODEL_PATH_LEN {
        return Err(format!(
            "the model path is {} bytes long (at most {MAX_MODEL_PATH_LEN}); {MODEL_PATH_FORM}",
            text.len()
        ));
    }
    if text.starts_with('/') {
        return Err(format!("the model path {text:?} starts with '/'; {MODEL_PATH_FORM}"));
    }
    for segment in text.split('/') {
        if segment.is_empty() {
            return Err(format!(
                "the model path {text:?} has an empty segment ('//' or a trailing '/'); \
                 {MODEL_PATH_FORM}"
            ));
        }
        if segment == "." || segment == ".." {
            return Err(format!(
                "the model path {text:?} contains a {segment:?} segment; {MODEL_PATH_FORM}"
            ));
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        if let Some(bad) = segment.chars().find(|c| !allowed(*c)) {
            return Err(format!(
                "the model path {text:?} contains {bad:?}; segments use only lowercase letters, \
                 digits, '.', '_' and '-'; {MODEL_PATH_FORM}"
            ));
        }
    }
    let first = text.split('/').next().unwrap_or_default();
    let full = if MODEL_KINDS.contains(&first) { text.to_owned() } else { format!("image/{text}") };
    if full.split('/').count() < 3 {
        return Err(format!(
            "the model path {text:?} names a provider but no model; {MODEL_PATH_FORM}"
        ));
    }
    Ok(full)
}

/// Parses a size in bytes: a whole number with an optional unit, e.g. `1000000`, `512MiB`,
/// `2GiB`, `10 MB`. Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024, decimal ones
/// (`kB`, `MB`, `GB`, `TB`) powers of 1000; `B` means bytes. Units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const FORM: &str = "expected a size like 512MiB, 2GiB or 1000000 (bytes)";
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a size; {FORM}"));
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
        _ => return Err(format!("{text:?} has an unknown unit {:?}; {FORM}", unit.trim())),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is too large for a size in bytes"))
}

/// The longest duration accepted for any limit. Far above any sensible setting, and low enough
/// that adding it to an `Instant` cannot overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_hours(30 * 24);

/// Parses a duration limit in humantime syntax (`500ms`, `2s`, `1m30s`, `2h`): more than zero
/// and at most 30 days.
pub(crate) fn parse_limit_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|error| {
        format!("{text:?} is not a duration ({error}); write it like 500ms, 2s, 1m30s or 2h")
    })?;
    if duration.is_zero() {
        return Err(format!("{text:?} is zero; a duration limit must be longer than that"));
    }
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is longer than the 30 days allowed for a limit"));
    }
    Ok(duration)
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
