//! Local files as job inputs: in a field that takes a URL (`image_url`, `start_image`,
//! `image_style_references[0].url`, …), a value that is neither `https://` nor `data:` is a
//! file beside the job file, opened under the rules of `from:` (`beside.rs`: relative, no
//! `..`, no symbolic link), at most [`MAX_INPUT_BYTES`], of a type Krea takes (decided by the
//! extension and checked against the first bytes).
//!
//! Each such value is replaced in the request body by [`placeholder`]: the content's SHA-256.
//! A job's key is a hash of its body, so it depends on what the file holds, not on its name or
//! on the URL an upload returns later; renaming the file changes nothing, editing it makes a
//! new job. `uploads.rs` uploads each content once and puts its URL in place of the
//! placeholder in the body sent to Krea.
//!
//! Which fields take a URL is decided by name, without the model's schema (the job file is
//! read before it is fetched): names ending in `_url` or `_urls`, `url`, and Krea's image and
//! video inputs (`start_image`, `end_image`, `start_video`, `end_video`, `style_images`).

use crate::beside::open_beside;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// The largest local file that may be an input: Krea's limit for an upload, 75 MB.
pub(crate) const MAX_INPUT_BYTES: u64 = 75 * 1000 * 1000;

/// What stands in a request body for a local file until its upload's URL replaces it.
pub(crate) const PLACEHOLDER_PREFIX: &str = "krea-batch-file:sha256:";

/// The placeholder of the content with this SHA-256 (lowercase hex).
#[must_use]
pub(crate) fn placeholder(sha256: &str) -> String {
    format!("{PLACEHOLDER_PREFIX}{sha256}")
}

/// The contents (SHA-256) whose placeholders `body` holds, in the order they appear.
pub(crate) fn placeholders(body: &str) -> impl Iterator<Item = &str> {
    body.match_indices(PLACEHOLDER_PREFIX)
        .filter_map(|(at, prefix)| body.get(at + prefix.len()..at + prefix.len() + 64))
}

/// A local file a job file names as an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalFile {
    /// The path as written, relative to `base`.
    pub path: PathBuf,
    /// The job file's folder.
    pub base: PathBuf,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
    /// Its MIME type, from its extension and first bytes.
    pub mime_type: &'static str,
    /// Its width and height in pixels, when it is an image whose header says (`dimensions.rs`).
    pub size: Option<(u32, u32)>,
}

/// A type Krea takes: its extensions, its MIME type, and whether a file's first bytes fit it.
type FileType = (&'static [&'static str], &'static str, fn(&[u8]) -> bool);

/// The types Krea takes.
const TYPES: &[FileType] = &[
    (&["jpg", "jpeg"], "image/jpeg", |b| b.starts_with(&[0xFF, 0xD8, 0xFF])),
    (&["png"], "image/png", |b| b.starts_with(b"\x89PNG\r\n\x1a\n")),
    (&["webp"], "image/webp", |b| b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP")),
    (&["heic", "heif"], "image/heic", |b| {
        ftyp(b).is_some_and(|brand| {
            [b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"]
                .iter()
                .any(|known| brand == *known)
        })
    }),
    (&["mp4", "m4v"], "video/mp4", |b| ftyp(b).is_some()),
    (&["mov"], "video/quicktime", |b| {
        ftyp(b).is_some()
            || [b"moov", b"mdat", b"wide", b"free"].iter().any(|a| b.get(4..8) == Some(*a))
    }),
    (&["webm"], "video/webm", |b| b.starts_with(&[0x1A, 0x45, 0xDF, 0xA3])),
    (&["glb"], "model/gltf-binary", |b| b.starts_with(b"glTF")),
    (&["wav"], "audio/wav", |b| b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WAVE")),
    (&["mp3"], "audio/mpeg", |b| {
        b.starts_with(b"ID3") || (b.len() > 1 && b[0] == 0xFF && b[1] & 0xE0 == 0xE0)
    }),
];

/// The brand of an ISO media file (`....ftypBRND`).
fn ftyp(bytes: &[u8]) -> Option<&[u8]> {
    (bytes.get(4..8) == Some(b"ftyp")).then(|| bytes.get(8..12)).flatten()
}

/// Whether a request field named `name` takes a URL.
#[must_use]
pub(super) fn takes_url(name: &str) -> bool {
    name == "url"
        || name.ends_with("_url")
        || name.ends_with("_urls")
        || ["start_image", "end_image", "start_video", "end_video", "style_images"].contains(&name)
}

/// Whether `value`, in a field that takes a URL, names a local file.
#[must_use]
pub(super) fn is_local(value: &str) -> bool {
    !(value.starts_with("https://") || value.starts_with("data:"))
}

/// A local input that cannot be used: the field that names it (`image_url`,
/// `image_style_references[0].url`) and what is wrong.
#[derive(Debug)]
pub(super) struct Refused {
    pub field: Vec<super::Seg>,
    pub message: String,
}

/// The local files of a job file, each read once however many jobs name it.
#[derive(Debug, Default)]
pub(super) struct Resolver {
    /// By the path as written.
    seen: HashMap<String, Result<LocalFile, String>>,
}

impl Resolver {
    /// Replaces every local file in `body`'s URL fields by its placeholder, reading files
    /// beside `source`; the error names the first field whose file cannot be used.
    pub(super) fn localize(
        &mut self,
        body: &mut Map<String, Value>,
        source: &Path,
    ) -> Result<(), Refused> {
        // Most bodies are a prompt and a few numbers: spare them the walk (and its allocations),
        // a file may hold 100,000 jobs.
        let may_hold = |(name, value): (&String, &Value)| {
            takes_url(name) || value.is_array() || value.is_object()
        };
        if !body.iter().any(may_hold) {
            return Ok(());
        }
        let mut at = Vec::new();
        self.walk_object(body, source, &mut at)
    }

    /// The pixel size of the local file written `written`, if it was read and says.
    pub(super) fn size_of(&self, written: &str) -> Option<(u32, u32)> {
        self.seen.get(written)?.as_ref().ok()?.size
    }

    /// Every local file read so far, once per content (by SHA-256, in its order).
    pub(super) fn distinct_files(&self) -> Vec<LocalFile> {
        let mut files: Vec<LocalFile> =
            self.seen.values().filter_map(|found| found.as_ref().ok()).cloned().collect();
        files.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        files.dedup_by(|a, b| a.sha256 == b.sha256);
        files
    }

    fn walk_object(
        &mut self,
        object: &mut Map<String, Value>,
        source: &Path,
        at: &mut Vec<super::Seg>,
    ) -> Result<(), Refused> {
        for (name, value) in object.iter_mut() {
            at.push(super::Seg::key(name));
            let url_field = takes_url(name);
            self.walk_value(value, url_field, source, at)?;
            at.pop();
        }
        Ok(())
    }

    fn walk_value(
        &mut self,
        value: &mut Value,
        url_field: bool,
        source: &Path,
        at: &mut Vec<super::Seg>,
    ) -> Result<(), Refused> {
        match value {
            Value::String(text) if url_field && is_local(text) => {
                let file = self
                    .resolve(text, source)
                    .map_err(|message| Refused { field: at.clone(), message })?;
                *text = placeholder(&file.sha256);
            }
            Value::Array(items) => {
                for (index, item) in items.iter_mut().enumerate() {
                    at.push(super::Seg::Index(index));
                    self.walk_value(item, url_field, source, at)?;
                    at.pop();
                }
            }
            Value::Object(object) => self.walk_object(object, source, at)?,
            _ => {}
        }
        Ok(())
    }

    fn resolve(&mut self, written: &str, source: &Path) -> Result<LocalFile, String> {
        if let Some(found) = self.seen.get(written) {
            return found.clone();
        }
        let base = source.parent().unwrap_or_else(|| Path::new("")).to_owned();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let found = read(&base, written);
        self.seen.insert(written.to_owned(), found.clone());
        found
    }
}

/// Reads and checks the local file `written` inside `base`.
fn read(base: &Path, written: &str) -> Result<LocalFile, String> {
    let path = Path::new(written);
    // An escape is named as such whatever the extension.
    crate::beside::check_relative(path).map_err(|err| err.to_string())?;
    let hint = if written.contains("://") {
        "; only https:// and data: URLs are sent as they are, anything else is a file beside the \
         job file"
    } else {
        ""
    };
    let extension =
        path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let Some((_, mime_type, fits)) = TYPES.iter().find(|(exts, _, _)| exts.contains(&&*extension))
    else {
        return Err(format!(
            "{written}: a local input file must be JPEG, PNG, WebP, HEIC, MP4, MOV, WebM, GLB, \
             WAV or MP3 (by its extension), the types Krea takes{hint}"
        ));
    };
    let (file, meta) = open_beside(base, path).map_err(|err| format!("{err}{hint}"))?;
    if meta.len() > MAX_INPUT_BYTES {
        return Err(format!(
            "{written} is {} bytes, more than the 75 MB Krea takes as an input; make it smaller",
            meta.len()
        ));
    }
    let mut hasher = Sha256::new();
    // Enough of an image's start for its size; of other files, for their type.
    let head_len = if mime_type.starts_with("image/") { crate::dimensions::HEAD_BYTES } else { 16 };
    let mut head = Vec::with_capacity(16);
    let mut reader = file.take(MAX_INPUT_BYTES + 1);
    let mut buffer = vec![0; 64 * 1024];
    let mut total = 0_u64;
    loop {
        let read =
            reader.read(&mut buffer).map_err(|err| format!("cannot read {written}: {err}"))?;
        if read == 0 {
            break;
        }
        if head.len() < head_len {
            head.extend_from_slice(&buffer[..read.min(head_len - head.len())]);
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
    if total > MAX_INPUT_BYTES {
        return Err(format!("{written} grew past 75 MB while it was read"));
    }
    if !fits(&head) {
        return Err(format!(
            "{written} does not hold what its extension says ({mime_type}): its first bytes are \
             of another type; give it the right extension or convert it"
        ));
    }
    Ok(LocalFile {
        path: path.to_owned(),
        base: base.to_owned(),
        sha256: format!("{:x}", hasher.finalize()),
        bytes: total,
        mime_type,
        size: crate::dimensions::of(&head),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_values_are_told_apart() {
        for name in ["image_url", "image_urls", "url", "start_image", "style_images"] {
            assert!(takes_url(name), "{name}");
        }
        for name in ["prompt", "model", "urls_count", "image"] {
            assert!(!takes_url(name), "{name}");
        }
        assert!(is_local("./cat.png") && is_local("cat.png") && is_local("http://x/a.png"));
        assert!(!is_local("https://x/a.png") && !is_local("data:image/png;base64,AA"));
    }

    #[test]
    fn a_file_is_typed_by_extension_and_first_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("cat.png"), b"\x89PNG\r\n\x1a\nrest").expect("file");
        std::fs::write(dir.path().join("fake.png"), b"GIF89a").expect("file");
        std::fs::write(dir.path().join("clip.mov"), b"\0\0\0\x14ftypqt  ").expect("file");
        std::fs::write(dir.path().join("notes.txt"), b"hello").expect("file");
        let png = read(dir.path(), "cat.png").expect("a PNG");
        assert_eq!((png.mime_type, png.bytes), ("image/png", 12));
        assert_eq!(png.sha256.len(), 64);
        assert_eq!(read(dir.path(), "clip.mov").expect("a MOV").mime_type, "video/quicktime");
        assert!(read(dir.path(), "fake.png").expect_err("not a PNG").contains("first bytes"));
        assert!(read(dir.path(), "notes.txt").expect_err("not a type").contains("JPEG, PNG"));
        assert!(read(dir.path(), "gone.png").expect_err("missing").contains("gone.png"));
        assert!(read(dir.path(), "../cat.png").expect_err("outside").contains("not inside"));
    }
}
