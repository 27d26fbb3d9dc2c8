//! Request handling: every request on every listener enters [`handle`], which records it and
//! routes it. On the API listener: the control endpoints (`/_sim/...`), `/openapi.json`, file
//! paths (the API origin as a redirect target), then fault injection, authentication and the Krea
//! routes (`POST /generate/...`, `GET /jobs`, `GET`/`DELETE /jobs/{id}`, `POST`/`GET /assets`),
//! in that order. Every answer to `POST /generate` is held back by the configured POST latency.
//! On the file host, `/assets/...` goes to `assets.rs`, the rest to `files.rs`.

use super::faults::{self, Early, Garble};
use super::models;
use super::rate;
use super::reply::{self, Dropped, Reply};
use super::stats::{Listener, RequestRecord};
use super::world::{CancelError, ListQuery, Millis, NewJob, Refusal, parse_status, status_name};
use super::{Faults, RATE_LIMIT_MESSAGE, Shared, assets, files, openapi};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// Request bodies larger than this are refused.
const MAX_BODY: usize = 1024 * 1024;

/// The 402 message, from Krea's API Keys & Billing page.
const PAYMENT_MESSAGE: &str = "Your API balance is separate from your workspace compute balance. \
                               Please top up your API balance to continue using the API.";

/// The 402 of a model the account's plan does not include (`plan_required_models`). Krea's
/// exact wording is not documented; this one has the words its own helper script reads as a
/// plan refusal ("requires", "plan", "upgrade") and none of a balance.
pub(crate) const PLAN_REQUIRED_MESSAGE: &str =
    "This model requires a higher plan. Upgrade your plan to use it with the API.";

/// The concurrency 429 message, from Krea's Rate Limits page.
const CAPACITY_MESSAGE: &str = "You have reached the maximum number of concurrent jobs.";

/// Handles one request on `listener` and records it (control requests excepted).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    listener: Listener,
    request: Request<Incoming>,
) -> Reply {
    let arrival = shared.now_ms();
    if listener == Listener::Api && request.uri().path().starts_with("/_sim/") {
        return Ok(control(&shared, request).await);
    }
    let method = request.method().to_string();
    let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
    let authorization = request.headers().contains_key(AUTHORIZATION);
    let reply = match listener {
        Listener::Api => api(&shared, request, arrival).await,
        Listener::Files if request.uri().path().starts_with("/assets/") => {
            Ok(assets::serve(&shared, &request))
        }
        Listener::Files | Listener::Redirect => Ok(files::serve(&shared, listener, &request)),
    };
    let status = reply.as_ref().map_or(0, |response| response.status().as_u16());
    let at_ms = arrival.saturating_sub(shared.epoch_ms);
    let record = RequestRecord { method, path, listener, authorization, status, at_ms };
    shared.lock().recorder.request(record);
    reply
}

/// An API request answered, a `POST /generate` after the POST latency. The wait is this
/// connection's own: other requests are served meanwhile.
async fn api(shared: &Arc<Shared>, request: Request<Incoming>, now: Millis) -> Reply {
    let latency = shared.config.post_latency;
    let held = !latency.is_zero()
        && request.method() == Method::POST
        && request.uri().path().starts_with("/generate/");
    let reply = answer_api(shared, request, now).await;
    if held {
        tokio::time::sleep(latency).await;
    }
    reply
}

async fn answer_api(shared: &Arc<Shared>, request: Request<Incoming>, now: Millis) -> Reply {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if path == "/openapi.json" {
        return Ok(match method {
            Method::GET => reply::json(StatusCode::OK, &openapi::document(&shared.api_base)),
            _ => reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
        });
    }
    if path.starts_with("/results/") || path.starts_with("/previews/") {
        return Ok(files::serve(shared, Listener::Api, &request));
    }
    let is_generate = method == Method::POST && path.starts_with("/generate/");
    // An upload is a creation too: its answer can be lost after the asset exists.
    let is_upload = method == Method::POST && path == "/assets";
    let faults = {
        let mut state = shared.lock();
        if is_generate && state.after_402 {
            state.recorder.post_after_402();
        }
        faults::draw_api(&mut state, now, method == Method::POST, method == Method::GET)
    };
    match faults.early {
        Some(Early::Storm(retry_after)) => return Ok(too_many(retry_after)),
        Some(Early::ServerError(code)) => {
            return Ok(reply::error(code, code.canonical_reason().unwrap_or("Server error")));
        }
        Some(Early::Reset) => return Err(Dropped),
        None => {}
    }
    if !authorized(shared, &request) {
        return Ok(reply::error(StatusCode::UNAUTHORIZED, "Unauthorized"));
    }
    let response = route(shared, request, &method, &path, faults.garble).await;
    if faults.post_drop && (is_generate || is_upload) && response.status() == StatusCode::OK {
        return Err(Dropped);
    }
    if let Some(delay) = faults.slow {
        tokio::time::sleep(delay).await;
    }
    Ok(response)
}

async fn route(
    shared: &Shared,
    request: Request<Incoming>,
    method: &Method,
    path: &str,
    garble: Option<Garble>,
) -> Response<reply::Body> {
    let ok = |value: Value| match garble {
        Some(garble) => faults::garbled(&value, garble),
        None => reply::json(StatusCode::OK, &value),
    };
    if let Some(model) = path.strip_prefix("/generate/") {
        if *method != Method::POST {
            return reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
        }
        return generate(shared, model, request).await;
    }
    if path == "/assets" {
        return assets::route(shared, request, method).await;
    }
    let now = shared.now_ms();
    if path == "/jobs" {
        if *method != Method::GET {
            return reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
        }
        return match list_query(request.uri().query().unwrap_or_default()) {
            Ok(query) => {
                let (items, next, junk) = {
                    let mut state = shared.lock();
                    let (items, next) = state.world.list(now, &query);
                    (items, next, state.faults.unreadable_list_item)
                };
                let mut page = shared.renderer().page(&items, next);
                // The junk item is an hour older than the simulation: the last page holds it.
                if junk && next.is_none() {
                    let created = shared.epoch_ms.saturating_sub(3_600_000);
                    if let Some(listed) = page.get_mut("items").and_then(Value::as_array_mut) {
                        listed.push(json!({
                            "job_id": "x".repeat(300),
                            "status": "completed",
                            "created_at": super::ids::rfc3339(created),
                            "result": {"urls": []},
                        }));
                    }
                }
                ok(page)
            }
            Err(message) => reply::error(StatusCode::BAD_REQUEST, &message),
        };
    }
    let Some(id) = path.strip_prefix("/jobs/").filter(|id| !id.is_empty() && !id.contains('/'))
    else {
        return reply::error(StatusCode::NOT_FOUND, "Not found");
    };
    match *method {
        Method::GET => match shared.lock().world.get(now, id) {
            Some(view) => ok(shared.renderer().job(&view, false)),
            None => reply::error(StatusCode::NOT_FOUND, "Job not found"),
        },
        Method::DELETE => match cancel(shared, now, id) {
            Ok(()) => reply::empty(StatusCode::OK),
            Err(CancelError::NotFound) => reply::error(StatusCode::NOT_FOUND, "Job not found"),
            Err(CancelError::NotCancellable(status)) => {
                let undocumented = shared.config.quirks.undocumented_state.as_deref();
                let name = status_name(status, undocumented.unwrap_or("processing"));
                let message = format!("Job cannot be cancelled in state {name}");
                reply::error(StatusCode::NOT_FOUND, &message)
            }
        },
        _ => reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
    }
}

/// `POST /generate/<model>`, with the deprecation headers of a deprecated model.
async fn generate(
    shared: &Shared,
    model: &str,
    request: Request<Incoming>,
) -> Response<reply::Body> {
    let mut response = create(shared, model, request).await;
    if shared.config.echo_key {
        // Hostile: every deprecation header quotes the key.
        let quoted = format!("Bearer {}", shared.config.api_key);
        let headers = response.headers_mut();
        for (name, value) in [
            ("deprecation", format!("@1772323200 ({quoted})")),
            ("sunset", format!("Wed, 01 Jul 2026 00:00:00 GMT ({quoted})")),
            (
                "link",
                format!("<https://docs.krea.ai/deprecations?k={quoted}>; rel=\"deprecation\""),
            ),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    } else if shared.config.deprecated_models.iter().any(|deprecated| deprecated == model) {
        // RFC 9745 and RFC 8594: deprecated since 2026-03-01, retired on 2026-07-01.
        let headers = response.headers_mut();
        headers.insert("deprecation", HeaderValue::from_static("@1772323200"));
        headers.insert("sunset", HeaderValue::from_static("Wed, 01 Jul 2026 00:00:00 GMT"));
        headers.insert(
            "link",
            HeaderValue::from_static(
                "<https://docs.krea.ai/developers/deprecations>; rel=\"deprecation\"",
            ),
        );
    }
    response
}

async fn create(shared: &Shared, model: &str, request: Request<Incoming>) -> Response<reply::Body> {
    let config = &shared.config;
    if let Some(limit) = &config.post_rate_limit {
        let now = shared.now_ms();
        if let Err(wait_ms) = shared.lock().post_rate.admit(limit, now) {
            let seconds = rate::retry_after_secs(wait_ms);
            return limited(RATE_LIMIT_MESSAGE, Some(seconds));
        }
    }
    if let Some(notice) = config.sunset_models.get(model) {
        let body = json!({
            "error": "model_unavailable",
            "reason": notice.reason,
            "message": notice.message,
            "sunset_date": notice.sunset_date,
            "replacement": notice.replacement,
        });
        return reply::json(StatusCode::GONE, &body);
    }
    if config.forbidden_models.iter().any(|forbidden| forbidden == model) {
        return reply::error(StatusCode::FORBIDDEN, "You do not have access to this model.");
    }
    if config.plan_required_models.iter().any(|refused| refused == model) {
        return reply::error(StatusCode::PAYMENT_REQUIRED, PLAN_REQUIRED_MESSAGE);
    }
    let Some(spec) = models::find(model) else {
        return reply::error(StatusCode::NOT_FOUND, &format!("Model not found: {model}"));
    };
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(message) => return reply::error(StatusCode::BAD_REQUEST, &message),
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(err) => {
            return reply::error(StatusCode::BAD_REQUEST, &format!("Invalid JSON body: {err}"));
        }
    };
    let accepted = match spec.validate(&value) {
        Ok(accepted) => accepted,
        Err(message) if config.quirks.validation_details => {
            // The message names its field in quotes: `Field 'steps' must be …`.
            let path = message.split('\'').nth(1).unwrap_or_default();
            let body = json!({
                "error": "Invalid request body",
                "details": [{"path": path, "message": message}],
            });
            return reply::json(StatusCode::BAD_REQUEST, &body);
        }
        Err(message) => return reply::error(StatusCode::BAD_REQUEST, &message),
    };
    let chokes = shared.lock().faults.server_error_marker.clone();
    if chokes.is_some_and(|marker| accepted.prompt.contains(&marker)) {
        return reply::error(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
    }
    if config.zero_data_retention
        && accepted.input_urls.iter().any(|(_, url)| !url.starts_with("data:"))
    {
        return reply::error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Zero data retention is enabled: input images must be data: URLs",
        );
    }
    if let Some(message) = assets::foreign_input(shared, &accepted.input_urls) {
        return reply::error(StatusCode::BAD_REQUEST, &message);
    }
    let new = NewJob {
        model: model.to_owned(),
        prompt: accepted.prompt,
        kind: spec.kind,
        job_type: spec.job_type,
        price_micros: accepted.price_micros,
        input: accepted.input_urls.first().map(|(_, url)| url.clone()),
        // An enhancer answers with a larger picture than a generator, as Topaz's upscales do.
        picture: match spec.kind {
            models::Kind::Enhance => accepted.picture.enlarged(),
            _ => accepted.picture,
        },
    };
    let now = shared.now_ms();
    let created = {
        let mut state = shared.lock();
        let created = state.world.create(now, new);
        match &created {
            Ok(_) => state.generation += 1,
            Err(Refusal::InsufficientBalance) => state.after_402 = true,
            Err(Refusal::AtCapacity) => {}
        }
        created
    };
    match created {
        Ok(view) => {
            // Kept before it is answered: a restarted simulation knows every id it handed out.
            shared.persist();
            reply::json(StatusCode::OK, &shared.renderer().job(&view, true))
        }
        Err(Refusal::InsufficientBalance) => {
            let key = if config.quirks.payment_error_key { "error" } else { "message" };
            reply::json(StatusCode::PAYMENT_REQUIRED, &json!({ key: PAYMENT_MESSAGE }))
        }
        Err(Refusal::AtCapacity) => too_many(config.retry_after_secs),
    }
}

/// Cancels a job at Krea's request path, keeping the world file up to date.
fn cancel(shared: &Shared, now: Millis, id: &str) -> Result<(), CancelError> {
    {
        let mut state = shared.lock();
        state.world.cancel(now, id)?;
        state.generation += 1;
    }
    shared.persist();
    Ok(())
}

/// The concurrency 429 (also the storm's).
fn too_many(retry_after_secs: Option<u64>) -> Response<reply::Body> {
    limited(CAPACITY_MESSAGE, retry_after_secs)
}

/// A 429 saying `message`, with `Retry-After` seconds if any.
fn limited(message: &str, retry_after_secs: Option<u64>) -> Response<reply::Body> {
    let mut response = reply::error(StatusCode::TOO_MANY_REQUESTS, message);
    if let Some(seconds) = retry_after_secs {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn authorized(shared: &Shared, request: &Request<Incoming>) -> bool {
    let Some(value) = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let (scheme, token) = value.split_once(' ').unwrap_or_default();
    scheme.eq_ignore_ascii_case("bearer") && token.trim() == shared.config.api_key
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, String> {
    match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) => Err(format!("Could not read the request body: {err}")),
    }
}

/// Parses `limit`, `cursor`, `status` and `types`; other parameters are ignored.
fn list_query(query: &str) -> Result<ListQuery, String> {
    let mut list = ListQuery { limit: 100, ..ListQuery::default() };
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = super::ids::percent_decode(value);
        if value.is_empty() {
            continue; // `status=` and the like mean "no filter"
        }
        match name {
            "limit" => {
                list.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=1000).contains(limit))
                    .ok_or("limit must be an integer between 1 and 1000")?;
            }
            "cursor" => {
                let time = humantime::parse_rfc3339(&value)
                    .map_err(|_| format!("cursor must be an RFC 3339 timestamp, got {value:?}"))?;
                let nanos = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos();
                // "Strictly before" a sub-millisecond instant includes its whole millisecond.
                list.before_ms = Some(u64::try_from(nanos.div_ceil(1_000_000)).unwrap_or(u64::MAX));
            }
            "status" => {
                let status = parse_status(&value)
                    .ok_or_else(|| format!("status must be a job state, got {value:?}"))?;
                list.status = Some(status);
            }
            "types" => {
                let types = value.split(',').map(str::trim).filter(|t| !t.is_empty());
                list.types = Some(types.map(str::to_owned).collect());
            }
            _ => {}
        }
    }
    Ok(list)
}

/// The body of `POST /_sim/balance`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceBody {
    usd: f64,
}

/// The control endpoints; they need the API key, meet no faults and are not recorded.
async fn control(shared: &Shared, request: Request<Incoming>) -> Response<reply::Body> {
    if !authorized(shared, &request) {
        return reply::error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/_sim/stats") => match serde_json::to_value(shared.stats()) {
            Ok(stats) => reply::json(StatusCode::OK, &stats),
            Err(err) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        },
        (Method::GET, "/_sim/jobs") => match serde_json::to_value(shared.jobs()) {
            Ok(jobs) => reply::json(StatusCode::OK, &json!({ "jobs": jobs })),
            Err(err) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        },
        (Method::POST, "/_sim/balance") => match parse_body::<BalanceBody>(request).await {
            Ok(body) => {
                shared.set_balance(body.usd);
                reply::json(StatusCode::OK, &json!({ "balance_usd": body.usd }))
            }
            Err(message) => reply::error(StatusCode::BAD_REQUEST, &message),
        },
        (Method::POST, "/_sim/top-up") => match parse_body::<BalanceBody>(request).await {
            Ok(body) if body.usd.is_finite() && body.usd > 0.0 => {
                let balance = shared.top_up(body.usd);
                reply::json(StatusCode::OK, &json!({ "balance_usd": balance }))
            }
            Ok(_) => reply::error(StatusCode::BAD_REQUEST, "usd must be a positive amount"),
            Err(message) => reply::error(StatusCode::BAD_REQUEST, &message),
        },
        (Method::POST, "/_sim/faults") => match parse_body::<Faults>(request).await {
            Ok(faults) => {
                let echo = serde_json::to_value(&faults).unwrap_or(Value::Null);
                shared.set_faults(faults);
                reply::json(StatusCode::OK, &echo)
            }
            Err(message) => reply::error(StatusCode::BAD_REQUEST, &message),
        },
        _ => reply::error(StatusCode::NOT_FOUND, "Not found"),
    }
}

async fn parse_body<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, String> {
    let body = read_body(request).await?;
    serde_json::from_slice(&body).map_err(|err| format!("Invalid body: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::world::Status;

    #[test]
    fn list_queries_parse_and_reject_bad_values() {
        let query = list_query(
            "limit=5&cursor=2026-05-28T20%3A26%3A40.123Z&status=completed&types=flux,%20k1",
        )
        .expect("valid");
        assert_eq!(query.limit, 5);
        assert_eq!(query.before_ms, Some(1_780_000_000_123));
        assert_eq!(query.status, Some(Status::Completed));
        assert_eq!(query.types, Some(vec!["flux".to_owned(), "k1".to_owned()]));
        let offset = list_query("cursor=2026-05-28T20:26:40.1231+00:00").expect("valid");
        assert_eq!(offset.before_ms, Some(1_780_000_000_124));
        assert_eq!(list_query("").expect("valid").limit, 100);
        assert!(list_query("status=&cursor=&types=").expect("empty means unset").status.is_none());
        assert!(list_query("limit=0").is_err());
        assert!(list_query("limit=1001").is_err());
        assert!(list_query("cursor=yesterday").is_err());
        assert!(list_query("status=warming").is_err());
    }
}
