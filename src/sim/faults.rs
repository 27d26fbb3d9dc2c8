//! Fault injection: drawing, per request and from the seeded RNG, which configured fault (if
//! any) a request meets, and building the broken answers (garbled or huge JSON, redirects to
//! where a client should not follow). Deciding is here; `http.rs` and `files.rs` act on it.

use super::jobs::Millis;
use super::padding::FILLER;
use super::reply::{self, Body};
use super::{Shared, State};
use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::Value;
use std::time::Duration;

/// A fault that answers an API request before it is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Early {
    /// A 429 from the storm, with its `Retry-After` seconds if any.
    Storm(Option<u64>),
    ServerError(StatusCode),
    Reset,
}

/// How a successful GET's JSON gets broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Garble {
    Truncated,
    NotJson,
    Huge(u64),
}

/// The faults one API request meets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ApiFaults {
    pub early: Option<Early>,
    /// Answer only after this long (the request is handled first).
    pub slow: Option<Duration>,
    /// A POST that creates its job and then closes without answering.
    pub post_drop: bool,
    pub garble: Option<Garble>,
}

/// Where a redirected download is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RedirectTarget {
    OtherOrigin,
    ApiOrigin,
    Insecure,
    Loop,
}

impl RedirectTarget {
    /// The `Location` for a download of `path`.
    pub(crate) fn location(self, shared: &Shared, path: &str) -> String {
        match self {
            Self::OtherOrigin => format!("{}{path}", shared.redirect_base),
            Self::ApiOrigin => format!("{}{path}", shared.api_base),
            // TEST-NET-1 (RFC 5737): routable-looking, never answered.
            Self::Insecure => format!("http://192.0.2.1{path}"),
            Self::Loop => format!("{}{path}?loop=1", shared.files_base),
        }
    }
}

/// A fault on a download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DownloadFault {
    Error,
    Truncate,
    Drip,
    Redirect(RedirectTarget),
}

fn hit(rng: &mut fastrand::Rng, rate: f64) -> bool {
    rate > 0.0 && rng.f64() < rate
}

/// Draws the faults of an API request arriving at `now`.
pub(crate) fn draw_api(state: &mut State, now: Millis, is_post: bool, is_get: bool) -> ApiFaults {
    if is_post && state.posts_failed < state.faults.server_error_first_posts {
        state.posts_failed += 1;
        let early = Some(Early::ServerError(StatusCode::INTERNAL_SERVER_ERROR));
        return ApiFaults { early, ..ApiFaults::default() };
    }
    let faults = &state.faults;
    let rng = &mut state.rng;
    let storm = faults
        .storm
        .as_ref()
        .filter(|storm| now < state.faults_set_ms.saturating_add(storm.duration.as_millis() as u64))
        .filter(|storm| hit(rng, storm.rate));
    let early = if let Some(storm) = storm {
        Some(Early::Storm(storm.retry_after_secs))
    } else if hit(rng, faults.server_error_rate) {
        let codes = [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ];
        Some(Early::ServerError(codes[rng.usize(..codes.len())]))
    } else if hit(rng, faults.reset_rate) {
        Some(Early::Reset)
    } else {
        None
    };
    if early.is_some() {
        return ApiFaults { early, ..ApiFaults::default() };
    }
    let slow = hit(rng, faults.slow_rate).then_some(faults.slow_delay);
    let post_drop = is_post && hit(rng, faults.post_drop_rate);
    let garble = if !is_get {
        None
    } else if hit(rng, faults.malformed_json_rate) {
        Some(if rng.bool() { Garble::Truncated } else { Garble::NotJson })
    } else if hit(rng, faults.huge_body_rate) {
        Some(Garble::Huge(faults.huge_body_bytes))
    } else {
        None
    };
    ApiFaults { early: None, slow, post_drop, garble }
}

/// Draws the fault of a download on the file host.
pub(crate) fn draw_download(state: &mut State) -> Option<DownloadFault> {
    let faults = &state.faults;
    let rng = &mut state.rng;
    let candidates = [
        (faults.download_error_rate, DownloadFault::Error),
        (faults.download_truncate_rate, DownloadFault::Truncate),
        (faults.download_drip_rate, DownloadFault::Drip),
        (faults.redirect_other_origin_rate, DownloadFault::Redirect(RedirectTarget::OtherOrigin)),
        (faults.redirect_api_origin_rate, DownloadFault::Redirect(RedirectTarget::ApiOrigin)),
        (faults.redirect_insecure_rate, DownloadFault::Redirect(RedirectTarget::Insecure)),
        (faults.redirect_loop_rate, DownloadFault::Redirect(RedirectTarget::Loop)),
    ];
    candidates.into_iter().find(|(rate, _)| hit(rng, *rate)).map(|(_, fault)| fault)
}

/// The 200 answer a garbled GET gets instead of `json`.
pub(crate) fn garbled(json: &Value, garble: Garble) -> Response<Body> {
    match garble {
        Garble::Truncated => {
            let text = json.to_string();
            let half = text.len() / 2;
            reply::bytes(StatusCode::OK, "application/json", Bytes::from(text).slice(..half))
        }
        Garble::NotJson => reply::bytes(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(b"<html><head><title>502 Bad Gateway</title></head></html>"),
        ),
        Garble::Huge(size) => {
            let mut response = Response::new(huge_json(size));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
    }
}

/// A valid JSON object of about `size` bytes, streamed (chunked, no `Content-Length`), never
/// held in memory: `{"padding": "krea-batch simulated padding. ..."}`.
fn huge_json(size: u64) -> Body {
    let head = Bytes::from_static(b"{\"padding\": \"");
    let tail = Bytes::from_static(b"\"}");
    let filler = size.saturating_sub((head.len() + tail.len()) as u64);
    let chunk = FILLER.len() as u64;
    let middle = (0..filler)
        .step_by(FILLER.len())
        .map(move |offset| Bytes::from_static(&FILLER[..(filler - offset).min(chunk) as usize]));
    let chunks = std::iter::once(head).chain(middle).chain(std::iter::once(tail));
    reply::streamed(chunks.map(Ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn huge_json_is_valid_and_the_requested_size() {
        let body = huge_json(200_000).collect().await.expect("streams").to_bytes();
        assert_eq!(body.len(), 200_000);
        let value: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert!(value["padding"].as_str().is_some_and(|text| text.starts_with("krea-batch")));
    }

    #[tokio::test]
    async fn truncated_json_does_not_parse() {
        let json = serde_json::json!({"job_id": "x", "status": "completed"});
        let response = garbled(&json, Garble::Truncated);
        let body = response.into_body().collect().await.expect("whole").to_bytes();
        assert!(serde_json::from_slice::<Value>(&body).is_err());
        assert!(!body.is_empty());
    }
}
