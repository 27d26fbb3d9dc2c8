//! Krea's assets on the wire: the multipart/form-data body of an upload (`POST /assets`, field
//! `file`, optional `description`), and the asset and list answers, read leniently.
//!
//! The form is built by hand rather than with reqwest's `multipart` feature: it is two fields,
//! and the feature would add dependencies for them. The file is held in memory while it is
//! sent (at most 75 MB, one upload at a time). `api.rs` sends it; `uploads.rs` decides when.

use serde_json::Value;

/// A file to upload.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AssetUpload<'a> {
    /// The file name sent with it (only letters, digits, `.`, `-` and `_` are kept).
    pub file_name: &'a str,
    /// Its MIME type, e.g. `image/png`.
    pub content_type: &'a str,
    /// Its bytes.
    pub bytes: &'a [u8],
    /// The `description` field: how krea-batch finds the asset again when the answer is lost.
    pub description: &'a str,
}

/// An asset as Krea answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Asset {
    /// Its id.
    pub id: String,
    /// Its URL, to pass as a job's input (`image_url` in Krea's answer, whatever the type).
    pub url: String,
    /// Its description ("" if none).
    pub description: String,
}

/// One page of `GET /assets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AssetPage {
    /// The assets, newest first; items without an id or URL are skipped.
    pub items: Vec<Asset>,
    /// The cursor of the next page (`next_cursor`, or `nextCursor`).
    pub next_cursor: Option<String>,
}

impl Asset {
    /// Reads an asset; `None` without an id or a URL.
    #[must_use]
    pub(crate) fn from_json(value: &Value) -> Option<Self> {
        let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        Some(Self {
            id: text("id")?,
            url: text("image_url").or_else(|| text("url"))?,
            description: text("description").unwrap_or_default(),
        })
    }
}

impl AssetPage {
    /// Reads a page; `None` without `items`.
    #[must_use]
    pub(crate) fn from_json(value: &Value) -> Option<Self> {
        let items = value.get("items")?.as_array()?.iter().filter_map(Asset::from_json).collect();
        let next_cursor = ["next_cursor", "nextCursor"]
            .iter()
            .find_map(|field| value.get(*field).and_then(Value::as_str))
            .map(str::to_owned);
        Some(Self { items, next_cursor })
    }
}

/// The form of `upload` with `boundary`: its `Content-Type` header value and its body.
#[must_use]
pub(crate) fn form(upload: &AssetUpload<'_>, boundary: &str) -> (String, Vec<u8>) {
    let file_name: String = upload
        .file_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' })
        .collect();
    // A MIME type is ASCII without line breaks; anything else would break the part's header.
    let content_type = if upload.content_type.chars().all(|c| c.is_ascii_graphic()) {
        upload.content_type
    } else {
        "application/octet-stream"
    };
    let mut body = Vec::with_capacity(upload.bytes.len() + 512);
    body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
    body.extend_from_slice(b"Content-Disposition: form-data; name=\"description\"\r\n\r\n");
    body.extend_from_slice(upload.description.as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
    body.extend_from_slice(
        format!(
            "Content-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n\
             Content-Type: {content_type}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(upload.bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_form_carries_both_fields_and_a_safe_file_name() {
        let upload = AssetUpload {
            file_name: "my \"cat\"\r\n.png",
            content_type: "image/png",
            bytes: b"PNGDATA",
            description: "krea-batch sha256:ab",
        };
        let (content_type, body) = form(&upload, "BOUND");
        assert_eq!(content_type, "multipart/form-data; boundary=BOUND");
        let text = String::from_utf8(body).expect("ASCII here");
        assert!(text.starts_with("--BOUND\r\n"), "{text}");
        assert!(text.contains("name=\"description\"\r\n\r\nkrea-batch sha256:ab\r\n"), "{text}");
        assert!(text.contains("filename=\"my__cat___.png\""), "{text}");
        assert!(text.contains("Content-Type: image/png\r\n\r\nPNGDATA\r\n--BOUND--\r\n"), "{text}");
    }

    #[test]
    fn answers_are_read_leniently() {
        let page = json!({"items": [
            {"id": "a", "image_url": "https://x/a.png", "description": "d"},
            {"id": "b"},
            {"id": "c", "image_url": "https://x/c.png"},
        ], "nextCursor": "2026-01-01T00:00:00Z"});
        let page = AssetPage::from_json(&page).expect("a page");
        assert_eq!(page.items.len(), 2, "the item without a URL is skipped");
        assert_eq!(page.items[1].description, "");
        assert_eq!(page.next_cursor.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert!(AssetPage::from_json(&json!({})).is_none());
    }
}
