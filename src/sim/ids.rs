//! Identities and timestamps as Krea writes them, shared by the world, its assets and the
//! HTTP layer: RFC 3339 times with milliseconds, version-4 UUIDs, and the `%XX` decoding of
//! query values. A leaf: it imports nothing of the simulation but its hex helper.

use super::jobs::Millis;
use std::time::{Duration, UNIX_EPOCH};

/// RFC 3339 in UTC with milliseconds, as Krea writes timestamps.
pub(crate) fn rfc3339(ms: Millis) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A version-4 UUID drawn from `rng`.
pub(crate) fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let mut bytes = rng.u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0F) | 0x40;
    bytes[8] = (bytes[8] & 0x3F) | 0x80;
    let hex = super::stats::hex(&bytes);
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// A version-4 UUID no other process draws.
pub(crate) fn random_uuid() -> String {
    uuid_v4(&mut fastrand::Rng::with_seed(random_seed()))
}

/// A seed no other process draws: the standard library's per-process random hash keys (from
/// the operating system), mixed with the time and the process id.
pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let since = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    hasher.write_u128(since.as_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Decodes `%XX` escapes. A `+` stays a `+`: timestamps contain no spaces, and an unescaped
/// `+00:00` offset must survive.
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if let Some(byte) = escaped {
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_plus_and_odd_escapes() {
        assert_eq!(percent_decode("a%3Ab+c%2"), "a:b+c%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
