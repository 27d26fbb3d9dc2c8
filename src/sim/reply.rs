//! Building responses: the one body type every handler returns (small bodies whole, large ones
//! streamed from an iterator of chunks), JSON and empty replies, and [`Dropped`], the "answer"
//! that makes hyper close the connection without writing a response.

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;

/// The body of every simulated response.
pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What a handler produces: a response, or a connection closed without one.
pub(crate) type Reply = Result<Response<Body>, Dropped>;

/// Returned to hyper to close the connection without answering (a simulated reset).
#[derive(Debug, thiserror::Error)]
#[error("simulated connection drop")]
pub(crate) struct Dropped;

/// A body streamed from `chunks`; an `Err` item aborts the connection mid-body.
pub(crate) fn streamed<I>(chunks: I) -> Body
where
    I: Iterator<Item = Result<Bytes, std::io::Error>> + Send + 'static,
{
    let frames = futures_util::stream::iter(chunks.map(|chunk| chunk.map(Frame::data)));
    StreamBody::new(frames).boxed_unsync()
}

/// A body that streams `chunks`, pauses (so hyper flushes what it has), then fails: the
/// connection closes short of the announced `Content-Length`.
pub(crate) fn cut_short<I>(chunks: I) -> Body
where
    I: Iterator<Item = Bytes> + Send + 'static,
{
    let frames = futures_util::stream::iter(chunks.map(|chunk| Ok(Frame::data(chunk))));
    let failure = futures_util::stream::once(async {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        Err(std::io::Error::other("simulated truncated download"))
    });
    StreamBody::new(frames.chain(failure)).boxed_unsync()
}

/// A body that sends the bytes of `chunks` one at a time, one every `every`: a stalled host
/// that keeps the connection alive.
pub(crate) fn dripped<I>(chunks: I, every: std::time::Duration) -> Body
where
    I: Iterator<Item = Bytes> + Send + 'static,
{
    let bytes = chunks.flat_map(|chunk| (0..chunk.len()).map(move |at| chunk.slice(at..=at)));
    let frames = futures_util::stream::iter(bytes).then(move |byte| async move {
        tokio::time::sleep(every).await;
        Ok(Frame::data(byte))
    });
    StreamBody::new(frames).boxed_unsync()
}

/// A response with `body`, typed `content_type`, with its `Content-Length`.
pub(crate) fn bytes(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let length = body.len();
    let mut response =
        Response::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &Value) -> Response<Body> {
    bytes(status, "application/json", Bytes::from(value.to_string()))
}

/// `{"error": message}`, the shape of Krea's error bodies.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

/// A response with an empty body (`Content-Length: 0`).
pub(crate) fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
    response
}

/// A redirect to `location`.
pub(crate) fn redirect(location: &str) -> Response<Body> {
    let mut response = empty(StatusCode::FOUND);
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(hyper::header::LOCATION, value);
    }
    response
}
