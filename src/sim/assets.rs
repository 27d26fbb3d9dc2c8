//! Uploaded assets: `POST /assets` (multipart/form-data, field `file`, optional
//! `description`), `GET /assets` (newest first, paged by `cursor` as `GET /jobs` is), and the
//! uploaded bytes served on the file host at the URL the upload returned
//! (`<files>/assets/<id>.<ext>`) and nowhere else.
//!
//! Krea's documents say what an upload accepts (JPEG, PNG, `WebP`, HEIC, MP4, MOV, `WebM`, GLB,
//! WAV, MP3; at most 75 MB) but not how it tells the type: the simulation goes by the part's
//! declared `Content-Type`, as a form upload states it. The metadata of every asset is kept in
//! the world (and its file) like the jobs, so a restarted simulation still knows its asset URLs
//! as its own; the bytes are held in memory only (a world file rewritten after every change
//! cannot carry 75 MB files), so after a restart an asset's URL is still accepted as an input
//! but its bytes are no longer served.

use super::Shared;
use super::jobs::Millis;
use super::reply;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::UNIX_EPOCH;

/// The largest upload Krea accepts: 75 MB.
pub(crate) const MAX_ASSET_BYTES: usize = 75 * 1000 * 1000;

/// The types Krea accepts, by MIME type, with the extension of the served file.
const ACCEPTED: &[(&str, &str)] = &[
    ("image/jpeg", "jpg"),
    ("image/png", "png"),
    ("image/webp", "webp"),
    ("image/heic", "heic"),
    ("video/mp4", "mp4"),
    ("video/quicktime", "mov"),
    ("video/webm", "webm"),
    ("model/gltf-binary", "glb"),
    ("audio/wav", "wav"),
    ("audio/x-wav", "wav"),
    ("audio/wave", "wav"),
    ("audio/mpeg", "mp3"),
];

/// One uploaded asset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Asset {
    pub id: String,
    pub uploaded_ms: Millis,
    pub mime_type: String,
    pub extension: String,
    pub size_bytes: u64,
    pub description: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Held while this process runs; not kept in the world file.
    #[serde(skip)]
    pub bytes: Option<Bytes>,
}

impl Asset {
    /// The path of its file on the file host.
    pub(crate) fn path(&self) -> String {
        format!("/assets/{}.{}", self.id, self.extension)
    }

    /// The asset as the API shows it, its URL on the file host `files_base`.
    pub(crate) fn render(&self, files_base: &str) -> Value {
        json!({
            "id": self.id,
            "image_url": format!("{files_base}{}", self.path()),
            "uploaded_at": super::ids::rfc3339(self.uploaded_ms),
            "width": self.width,
            "height": self.height,
            "size_bytes": self.size_bytes,
            "mime_type": self.mime_type,
            "description": self.description,
            "metadata": {},
        })
    }
}

/// The assets of the account, oldest first (upload times strictly increase).
#[derive(Debug, Default)]
pub(crate) struct Assets {
    items: Vec<Asset>,
}

/// An upload as the form carried it.
#[derive(Debug)]
pub(crate) struct Upload {
    pub bytes: Bytes,
    pub content_type: String,
    pub description: String,
}

impl Assets {
    pub(crate) fn restore(items: Vec<Asset>) -> Self {
        Self { items }
    }

    pub(crate) fn save(&self) -> Vec<Asset> {
        self.items.clone()
    }

    /// Adds an accepted upload under `id`; the error is the 400's message.
    pub(crate) fn add(&mut self, now: Millis, id: String, upload: Upload) -> Result<Asset, String> {
        let mime = upload.content_type.split(';').next().unwrap_or_default().trim();
        let mime = mime.to_ascii_lowercase();
        let Some((_, extension)) = ACCEPTED.iter().find(|(accepted, _)| *accepted == mime) else {
            return Err(format!(
                "Invalid file type {mime:?}: accepted are JPEG, PNG, WebP, HEIC, MP4, MOV, WebM, \
                 GLB, WAV and MP3"
            ));
        };
        if upload.bytes.len() > MAX_ASSET_BYTES {
            return Err("File too large: the maximum size is 75MB".to_owned());
        }
        if upload.bytes.is_empty() {
            return Err("The file is empty".to_owned());
        }
        let (width, height) = png_size(&upload.bytes).unzip();
        let uploaded_ms = self.items.last().map_or(now, |last| now.max(last.uploaded_ms + 1));
        let asset = Asset {
            id,
            uploaded_ms,
            mime_type: mime.clone(),
            extension: (*extension).to_owned(),
            size_bytes: upload.bytes.len() as u64,
            description: upload.description,
            width,
            height,
            bytes: Some(upload.bytes),
        };
        self.items.push(asset.clone());
        Ok(asset)
    }

    /// Assets uploaded strictly before `before_ms`, newest first, at most `limit`, with the
    /// cursor of the next page when more match.
    pub(crate) fn list(
        &self,
        before_ms: Option<Millis>,
        limit: usize,
    ) -> (Vec<&Asset>, Option<Millis>) {
        let end = before_ms.map_or(self.items.len(), |before| {
            self.items.partition_point(|a| a.uploaded_ms < before)
        });
        let page: Vec<&Asset> = self.items[..end].iter().rev().take(limit).collect();
        let next = (end > limit).then(|| page.last().map(|last| last.uploaded_ms)).flatten();
        (page, next)
    }

    /// The asset whose file is at `path` on the file host.
    pub(crate) fn by_path(&self, path: &str) -> Option<&Asset> {
        let id = path.strip_prefix("/assets/")?.split('.').next()?;
        self.items.iter().find(|asset| asset.id == id && asset.path() == path)
    }
}

/// The width and height of a PNG, read from its header.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.get(12..16) != Some(b"IHDR") {
        return None;
    }
    let word = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    Some((word(16)?, word(20)?))
}

/// Reads the `file` and `description` fields of a multipart/form-data body; the error is the
/// 400's message.
pub(crate) fn parse_form(content_type: &str, body: &[u8]) -> Result<Upload, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|param| param.strip_prefix("boundary="))
        .map(|boundary| boundary.trim_matches('"'))
        .filter(|_| content_type.trim_start().starts_with("multipart/form-data"))
        .ok_or("Expected multipart/form-data with a boundary")?;
    let delimiter = format!("--{boundary}");
    let mut rest = body
        .strip_prefix(delimiter.as_bytes())
        .ok_or("The multipart body does not start with its boundary")?;
    let separator = format!("\r\n--{boundary}");
    let mut file = None;
    let mut description = String::new();
    while !rest.starts_with(b"--") {
        rest = rest.strip_prefix(b"\r\n").ok_or("Malformed multipart body")?;
        let end = find(rest, separator.as_bytes()).ok_or("The multipart body is cut short")?;
        let part = &rest[..end];
        rest = &rest[end + separator.len()..];
        let head_end = find(part, b"\r\n\r\n").ok_or("A multipart part has no headers")?;
        let head = String::from_utf8_lossy(&part[..head_end]);
        let content = &part[head_end + 4..];
        let header = |name: &str| {
            head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
            })
        };
        let disposition = header("content-disposition").unwrap_or_default();
        let name = disposition
            .split(';')
            .map(str::trim)
            .find_map(|param| param.strip_prefix("name="))
            .map(|name| name.trim_matches('"').to_owned());
        match name.as_deref() {
            Some("file") => {
                let content_type =
                    header("content-type").unwrap_or_else(|| "application/octet-stream".into());
                file = Some((Bytes::copy_from_slice(content), content_type));
            }
            Some("description") => description = String::from_utf8_lossy(content).into_owned(),
            _ => {}
        }
    }
    let (bytes, content_type) = file.ok_or("Missing required field 'file'")?;
    Ok(Upload { bytes, content_type, description })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

// The HTTP side: the routes of the API and of the file host that concern assets.

/// `POST /assets` and `GET /assets`.
pub(crate) async fn route(
    shared: &Shared,
    request: Request<Incoming>,
    method: &Method,
) -> Response<reply::Body> {
    match *method {
        Method::POST => upload(shared, request).await,
        Method::GET => match list_query(request.uri().query().unwrap_or_default()) {
            Ok((before_ms, limit)) => {
                let page = {
                    let state = shared.lock();
                    let (items, next) = state.world.assets.list(before_ms, limit);
                    let items: Vec<Value> =
                        items.iter().map(|asset| asset.render(&shared.files_base)).collect();
                    json!({
                        "items": items,
                        "next_cursor": next.map(super::ids::rfc3339),
                    })
                };
                reply::json(StatusCode::OK, &page)
            }
            Err(message) => reply::error(StatusCode::BAD_REQUEST, &message),
        },
        _ => reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
    }
}

async fn upload(shared: &Shared, request: Request<Incoming>) -> Response<reply::Body> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // Room for the form around the largest file.
    let limit = MAX_ASSET_BYTES + 64 * 1024;
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return reply::error(
                StatusCode::BAD_REQUEST,
                "File too large: the maximum size is 75MB",
            );
        }
    };
    let form = match parse_form(&content_type, &body) {
        Ok(form) => form,
        Err(message) => return reply::error(StatusCode::BAD_REQUEST, &message),
    };
    let now = shared.now_ms();
    let added = {
        let mut state = shared.lock();
        let added = state.world.assets.add(now, super::ids::random_uuid(), form);
        if added.is_ok() {
            state.generation += 1;
        }
        added
    };
    match added {
        Ok(asset) => {
            // Kept before it is answered, as a job is: a restarted simulation knows its URL.
            shared.persist();
            reply::json(StatusCode::OK, &asset.render(&shared.files_base))
        }
        Err(message) => reply::error(StatusCode::BAD_REQUEST, &message),
    }
}

/// `limit` (1 to 1000, default 100) and `cursor` (RFC 3339): assets uploaded strictly before.
fn list_query(query: &str) -> Result<(Option<Millis>, usize), String> {
    let mut limit = 100;
    let mut before = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = super::ids::percent_decode(value);
        match name {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=1000).contains(limit))
                    .ok_or("limit must be an integer between 1 and 1000")?;
            }
            "cursor" if !value.is_empty() => {
                let time = humantime::parse_rfc3339(&value)
                    .map_err(|_| format!("cursor must be an RFC 3339 timestamp, got {value:?}"))?;
                let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
                before =
                    Some(u64::try_from(since.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX));
            }
            _ => {}
        }
    }
    Ok((before, limit))
}

/// Serves an asset's bytes on the file host, at the URL its upload returned and nowhere else.
pub(crate) fn serve(shared: &Shared, request: &Request<Incoming>) -> Response<reply::Body> {
    if request.method() != Method::GET {
        return reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
    }
    let found = {
        let state = shared.lock();
        state
            .world
            .assets
            .by_path(request.uri().path())
            .map(|asset| (asset.bytes.clone(), asset.mime_type.clone()))
    };
    match found {
        Some((Some(bytes), mime)) => {
            let mut response = reply::bytes(StatusCode::OK, "application/octet-stream", bytes);
            if let Ok(value) = HeaderValue::from_str(&mime) {
                response.headers_mut().insert(CONTENT_TYPE, value);
            }
            response
        }
        // Known, but uploaded before a restart: its bytes were not kept.
        Some((None, _)) => reply::error(StatusCode::GONE, "This asset's file is no longer held"),
        None => reply::error(StatusCode::NOT_FOUND, "No such file"),
    }
}

/// The message of the 400 for a job whose input URLs include one Krea could not fetch: not a
/// `data:` URL, not an asset this account uploaded, not a result of one of its jobs. `inputs`
/// are (field, URL) pairs.
pub(crate) fn foreign_input(shared: &Shared, inputs: &[(String, String)]) -> Option<String> {
    let state = shared.lock();
    let (field, url) = inputs.iter().find(|(_, url)| {
        if url.starts_with("data:") {
            return false;
        }
        let Some(path) = url.strip_prefix(shared.files_base.as_str()) else { return true };
        if path.starts_with("/assets/") {
            return state.world.assets.by_path(path).is_none();
        }
        let job = path.strip_prefix("/results/").and_then(|rest| rest.split('/').next());
        job.is_none_or(|id| state.world.kind_of(id).is_none())
    })?;
    Some(format!(
        "Could not fetch '{field}' from {url}: input files must be reachable URLs; upload local \
         files with POST /assets and pass the returned image_url"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, content_type, content) in parts {
            body.extend_from_slice(b"--XyZ\r\n");
            let disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
            body.extend_from_slice(disposition.as_bytes());
            if let Some(content_type) = content_type {
                body.extend_from_slice(
                    format!("; filename=\"a\"\r\nContent-Type: {content_type}").as_bytes(),
                );
            }
            body.extend_from_slice(b"\r\n\r\n");
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body
    }

    #[test]
    fn a_form_is_read_and_its_type_decides() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x07\0\0\0\x05rest\r\n--Xy";
        let body = form(&[("description", None, b"sha256:ab"), ("file", Some("image/png"), png)]);
        let upload = parse_form("multipart/form-data; boundary=XyZ", &body).expect("valid form");
        assert_eq!(upload.description, "sha256:ab");
        assert_eq!(&upload.bytes[..], png, "bytes that look like a boundary are kept");
        let mut assets = Assets::default();
        let asset = assets.add(1_000, "a1".into(), upload).expect("a PNG is accepted");
        assert_eq!((asset.width, asset.height), (Some(7), Some(5)));
        assert_eq!(assets.by_path("/assets/a1.png").map(|a| a.id.as_str()), Some("a1"));
        assert!(assets.by_path("/assets/a1.jpg").is_none());

        let text = form(&[("file", Some("text/plain"), b"hello")]);
        let upload = parse_form("multipart/form-data; boundary=XyZ", &text).expect("valid form");
        assert!(assets.add(2_000, "a2".into(), upload).expect_err("refused").contains("type"));
        assert!(parse_form("application/json", b"{}").is_err());
        let no_file = form(&[("description", None, b"x")]);
        assert!(
            parse_form("multipart/form-data; boundary=XyZ", &no_file)
                .expect_err("no file")
                .contains("'file'")
        );
    }

    #[test]
    fn assets_list_newest_first_in_pages() {
        let mut assets = Assets::default();
        for (index, id) in ["a", "b", "c"].into_iter().enumerate() {
            let upload = Upload {
                bytes: Bytes::from_static(b"x"),
                content_type: "image/jpeg".into(),
                description: String::new(),
            };
            assets.add(1_000 + index as u64, id.into(), upload).expect("accepted");
        }
        let (page, next) = assets.list(None, 2);
        let ids: Vec<&str> = page.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["c", "b"]);
        let (page, next) = assets.list(next, 2);
        assert_eq!(page.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(next, None);
    }
}
