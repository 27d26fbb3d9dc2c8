//! The result-file host: `GET /results/<job_id>/<i>.png` (`.mp4` for video) and
//! `GET /previews/<job_id>/<i>.png`. Each file's bytes are a pure function of (job id, index,
//! `result_bytes`), streamed in 64 KiB chunks with `Content-Length`, hashed on the way out, and
//! recorded (URL → SHA-256, length) once the last byte has been handed to the connection. Download faults (503, a body cut
//! short, redirects to other origins, to plain http, in a loop) are applied here on the file
//! host's own listener; the other origins that redirects lead to serve the file plainly.

use super::models::Kind;
use super::png::{self, Crc32, PADDING_KEYWORD, PADDING_OVERHEAD};
use super::reply::{self, Body};
use super::stats::{Listener, hex};
use super::{Shared, faults};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::Arc;

use super::padding::{CHUNK, FILLER};

/// The simulated video: a two-second 256×144 H.264 (constrained baseline, `yuv420p`, 10 fps,
/// `moov` first) clip of the `testsrc` test pattern of `FFmpeg`, which browsers play. It was
/// made for this project, and is under the project's licence, with `FFmpeg` 5.1 by
/// `ffmpeg -f lavfi -i testsrc=size=256x144:rate=10:duration=2 -c:v libx264 -profile:v baseline
/// -level 3.0 -pix_fmt yuv420p -preset veryslow -crf 32 -g 20 -movflags +faststart -an
/// -map_metadata -1 -fflags +bitexact -flags:v +bitexact clip.mp4`.
const CLIP: &[u8] = include_bytes!("clip.mp4");

/// Largest filler one `tEXt` chunk carries (a chunk length must stay below 2^31).
const MAX_TEXT_FILLER: u64 = 1 << 30;

/// One step of a file's bytes.
#[derive(Debug)]
enum Step {
    Literal(Bytes),
    /// `remaining` filler bytes; with a CRC, the chunk's CRC follows them.
    Filler {
        remaining: u64,
        crc: Option<Crc32>,
    },
}

/// The bytes of one file, as steps to stream, and their total length.
#[derive(Debug)]
pub(crate) struct FileLayout {
    steps: VecDeque<Step>,
    pub len: u64,
}

impl FileLayout {
    /// A PNG of the natural size, or padded with `tEXt` chunks to exactly `target` bytes when
    /// `target` leaves room for at least one padding chunk. `head` is the picture, all of the
    /// PNG but its `IEND`.
    pub(crate) fn png(head: Vec<u8>, target: u64) -> Self {
        let natural = head.len() as u64 + 12;
        let mut steps = VecDeque::from([Step::Literal(Bytes::from(head))]);
        let mut padding = if target >= natural + PADDING_OVERHEAD { target - natural } else { 0 };
        while padding > 0 {
            let mut filler = (padding - PADDING_OVERHEAD).min(MAX_TEXT_FILLER);
            let left = padding - PADDING_OVERHEAD - filler;
            if left > 0 && left < PADDING_OVERHEAD {
                filler -= PADDING_OVERHEAD; // leave room for a whole chunk after this one
            }
            let data_len = u32::try_from(PADDING_KEYWORD.len() as u64 + filler)
                .expect("filler is capped at 1 GiB per chunk");
            let mut header = data_len.to_be_bytes().to_vec();
            header.extend_from_slice(b"tEXt");
            header.extend_from_slice(PADDING_KEYWORD);
            let mut crc = Crc32::new();
            crc.update(&header[4..]);
            steps.push_back(Step::Literal(Bytes::from(header)));
            steps.push_back(Step::Filler { remaining: filler, crc: Some(crc) });
            padding -= filler + PADDING_OVERHEAD;
        }
        steps.push_back(Step::Literal(Bytes::from(png::end_chunk())));
        Self { steps, len: target.max(natural) }
    }

    /// A playable MP4: the checked-in clip ([`CLIP`]) followed by a top-level `free` box, which
    /// players skip, holding `seed` (so files differ) and filler up to `target` bytes.
    pub(crate) fn mp4(seed: &[u8; 32], target: u64) -> Self {
        let natural = (CLIP.len() + 8 + seed.len()) as u64;
        let len = target.max(natural);
        let free = len - CLIP.len() as u64;
        // Past 4 GiB a box gives its size in 64 bits after the type (size field 1).
        let mut head = Vec::with_capacity(16 + seed.len());
        if let Ok(size) = u32::try_from(free) {
            head.extend_from_slice(&size.to_be_bytes());
            head.extend_from_slice(b"free");
        } else {
            head.extend_from_slice(&1u32.to_be_bytes());
            head.extend_from_slice(b"free");
            head.extend_from_slice(&free.to_be_bytes());
        }
        head.extend_from_slice(seed);
        let filler = len - CLIP.len() as u64 - head.len() as u64;
        let steps = VecDeque::from([
            Step::Literal(Bytes::from_static(CLIP)),
            Step::Literal(Bytes::from(head)),
            Step::Filler { remaining: filler, crc: None },
        ]);
        Self { steps, len }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.steps.front_mut()? {
                Step::Literal(bytes) => {
                    let bytes = std::mem::take(bytes);
                    self.steps.pop_front();
                    return Some(bytes);
                }
                Step::Filler { remaining: 0, crc } => {
                    let crc = crc.take();
                    self.steps.pop_front();
                    if let Some(crc) = crc {
                        return Some(Bytes::copy_from_slice(&crc.finish().to_be_bytes()));
                    }
                }
                Step::Filler { remaining, crc } => {
                    let take = (*remaining).min(CHUNK as u64) as usize;
                    *remaining -= take as u64;
                    let chunk = Bytes::from_static(&FILLER[..take]);
                    if let Some(crc) = crc {
                        crc.update(&chunk);
                    }
                    return Some(chunk);
                }
            }
        }
    }

    /// Every byte, in memory (tests and small files only).
    #[cfg(test)]
    pub(crate) fn collect(mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk() {
            out.extend_from_slice(&chunk);
        }
        out
    }
}

/// Called with (SHA-256 hex, length) once a file has been streamed whole.
type OnComplete = Box<dyn FnOnce(String, u64) + Send>;

/// Streams a layout, hashing as it goes; optionally stops after `cut_at` bytes. Completion is
/// recorded when the last byte is handed to hyper: with a `Content-Length`, hyper stops polling
/// the body once that many bytes have gone, so the end of the iterator is never reached.
struct FileStream {
    layout: FileLayout,
    hasher: Sha256,
    sent: u64,
    cut_at: Option<u64>,
    on_complete: Option<OnComplete>,
    finished: bool,
}

impl Iterator for FileStream {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.finished || self.cut_at.is_some_and(|cut| self.sent >= cut) {
            self.finished = true;
            return None;
        }
        let mut chunk = self.layout.next_chunk()?;
        if let Some(cut) = self.cut_at {
            chunk.truncate((cut - self.sent).min(chunk.len() as u64) as usize);
        }
        self.hasher.update(&chunk);
        self.sent += chunk.len() as u64;
        if self.sent == self.layout.len {
            self.finished = true;
            let digest = hex(&std::mem::take(&mut self.hasher).finalize());
            if let Some(done) = self.on_complete.take() {
                done(digest, self.sent);
            }
        }
        Some(chunk)
    }
}

/// A parsed file path.
struct FilePath<'a> {
    job_id: &'a str,
    index: u32,
    preview: bool,
    extension: &'a str,
}

fn parse(path: &str) -> Option<FilePath<'_>> {
    let (preview, rest) = if let Some(rest) = path.strip_prefix("/results/") {
        (false, rest)
    } else {
        (true, path.strip_prefix("/previews/")?)
    };
    let (job_id, file) = rest.split_once('/')?;
    let (index, extension) = file.split_once('.')?;
    Some(FilePath { job_id, index: index.parse().ok()?, preview, extension })
}

/// The content seed of one file.
fn seed(job_id: &str, index: u32, preview: bool) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(if preview { b"krea-batch sim preview\0" } else { b"krea-batch sim result\0\0" });
    hasher.update(job_id.as_bytes());
    hasher.update(index.to_be_bytes());
    hasher.finalize().into()
}

/// Serves a file request on `listener`; only the file host's own listener injects faults.
pub(crate) fn serve(
    shared: &Arc<Shared>,
    listener: Listener,
    request: &Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path();
    let query = request.uri().query().unwrap_or_default();
    let Some(file) = parse(path) else {
        return reply::error(StatusCode::NOT_FOUND, "Not found");
    };
    if request.method() != Method::GET {
        return reply::error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
    }
    let (looks, fault) = {
        let mut state = shared.lock();
        if request.headers().contains_key(hyper::header::AUTHORIZATION) {
            state.recorder.auth_header_on_file_host();
        }
        let looks = state.world.looks_of(file.job_id);
        let fault =
            if listener == Listener::Files { faults::draw_download(&mut state) } else { None };
        (looks, fault)
    };
    let Some((kind, prompt, picture)) = looks else {
        return reply::error(StatusCode::NOT_FOUND, "No such file");
    };
    let extension = if kind == Kind::Video && !file.preview { "mp4" } else { "png" };
    if file.extension != extension || file.index >= shared.config.outputs_per_job {
        return reply::error(StatusCode::NOT_FOUND, "No such file");
    }
    // Once in a redirect loop, always in it.
    if let Some(round) = query.strip_prefix("loop=").and_then(|n| n.parse::<u64>().ok())
        && listener == Listener::Files
    {
        return reply::redirect(&format!("{}{path}?loop={}", shared.files_base, round + 1));
    }
    let mut truncate = false;
    let mut drip = false;
    match fault {
        Some(faults::DownloadFault::Error) => {
            return reply::error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
        }
        Some(faults::DownloadFault::Redirect(target)) => {
            return reply::redirect(&target.location(shared, path));
        }
        Some(faults::DownloadFault::Truncate) => truncate = true,
        Some(faults::DownloadFault::Drip) => drip = true,
        None => {}
    }
    let seed = seed(file.job_id, file.index, file.preview);
    let head = || picture.png_head(&prompt, file.job_id, file.index, file.preview, &seed);
    let (layout, content_type) = match (file.preview, kind) {
        (false, Kind::Video) => (FileLayout::mp4(&seed, shared.config.result_bytes), "video/mp4"),
        (false, _) => (FileLayout::png(head(), shared.config.result_bytes), "image/png"),
        (true, _) => (FileLayout::png(head(), 0), "image/png"),
    };
    let len = layout.len;
    let url = format!("{}{path}", shared.files_base);
    let recorder = Arc::clone(shared);
    let preview = file.preview;
    let stream = FileStream {
        layout,
        hasher: Sha256::new(),
        sent: 0,
        // Cut somewhere in the middle, never at 0 (that would be an empty answer, not a cut).
        cut_at: truncate.then_some((len / 2).max(1)),
        on_complete: Some(Box::new(move |sha256, sent| {
            recorder.lock().recorder.file_served(url, sha256, sent, preview);
        })),
        finished: false,
    };
    let body = if truncate {
        reply::cut_short(stream)
    } else if drip {
        reply::dripped(stream, std::time::Duration::from_secs(1))
    } else {
        reply::streamed(stream.map(Ok))
    };
    file_response(body, content_type, len)
}

fn file_response(body: Body, content_type: &'static str, len: u64) -> Response<Body> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::picture::Picture;

    /// Checks every chunk's CRC and returns the chunk types.
    fn chunk_types(png_bytes: &[u8]) -> Vec<String> {
        assert_eq!(png_bytes[..8], png::SIGNATURE);
        let mut rest = &png_bytes[8..];
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let mut crc = Crc32::new();
            crc.update(&rest[4..8 + length]);
            let stored = u32::from_be_bytes(rest[8 + length..12 + length].try_into().expect("4"));
            assert_eq!(crc.finish(), stored);
            kinds.push(String::from_utf8_lossy(&rest[4..8]).into_owned());
            rest = &rest[12 + length..];
        }
        kinds
    }

    /// A small picture's PNG head, as the file host draws them.
    fn head(seed: u8) -> Vec<u8> {
        Picture::default().png_head("a fox", "job-1", 0, false, &[seed; 32])
    }

    #[test]
    fn padded_pngs_have_the_exact_size_and_valid_chunks() {
        let natural = FileLayout::png(head(3), 0).collect();
        assert_eq!(chunk_types(&natural), ["IHDR", "PLTE", "IDAT", "IEND"]);
        for target in [natural.len() as u64 + 20, 200_000, 3 * CHUNK as u64 + 17] {
            let layout = FileLayout::png(head(3), target);
            assert_eq!(layout.len, target);
            let bytes = layout.collect();
            assert_eq!(bytes.len() as u64, target);
            assert_eq!(chunk_types(&bytes), ["IHDR", "PLTE", "IDAT", "tEXt", "IEND"]);
            assert_eq!(bytes[..natural.len() - 12], natural[..natural.len() - 12]);
        }
        // Too little room for a padding chunk: the natural size.
        assert_eq!(FileLayout::png(head(3), natural.len() as u64 + 5).collect(), natural);
    }

    /// Top-level MP4 boxes as (type, size); each box's size must lead exactly to the next.
    fn boxes(mut bytes: &[u8]) -> Vec<(String, u64)> {
        let mut found = Vec::new();
        while !bytes.is_empty() {
            let mut size = u64::from(u32::from_be_bytes(bytes[..4].try_into().expect("4")));
            if size == 1 {
                size = u64::from_be_bytes(bytes[8..16].try_into().expect("8"));
            }
            found.push((String::from_utf8_lossy(&bytes[4..8]).into_owned(), size));
            bytes = &bytes[usize::try_from(size).expect("small")..];
        }
        found
    }

    /// The video is the checked-in H.264 clip, whole and first (a browser plays it), padded
    /// with a `free` box that players skip.
    #[test]
    fn mp4_files_are_the_clip_padded_to_the_requested_size() {
        let kinds =
            |bytes: &[u8]| boxes(bytes).into_iter().map(|(kind, _)| kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(CLIP),
            ["ftyp", "moov", "free", "mdat"],
            "moov first: plays while loading"
        );
        assert!(CLIP.windows(4).any(|w| w == b"avc1"), "H.264");
        for target in [0, 10_000, 300_000] {
            let bytes = FileLayout::mp4(&[1; 32], target).collect();
            assert_eq!(bytes.len() as u64, target.max(CLIP.len() as u64 + 40));
            assert_eq!(bytes[..CLIP.len()], *CLIP);
            assert_eq!(kinds(&bytes), ["ftyp", "moov", "free", "mdat", "free"]);
        }
        assert_ne!(FileLayout::mp4(&[1; 32], 0).collect(), FileLayout::mp4(&[2; 32], 0).collect());
    }

    #[test]
    fn streams_hash_what_they_send_and_can_be_cut() {
        let expected = FileLayout::png(head(5), 150_000).collect();
        let (sender, receiver) = std::sync::mpsc::channel();
        let stream = FileStream {
            layout: FileLayout::png(head(5), 150_000),
            hasher: Sha256::new(),
            sent: 0,
            cut_at: None,
            on_complete: Some(Box::new(move |sha, len| sender.send((sha, len)).expect("open"))),
            finished: false,
        };
        let sent: Vec<u8> = stream.flat_map(|chunk| chunk.to_vec()).collect();
        assert_eq!(sent, expected);
        assert_eq!(receiver.recv().expect("recorded"), (hex(&Sha256::digest(&expected)), 150_000));

        let (sender, receiver) = std::sync::mpsc::channel::<()>();
        let cut = FileStream {
            layout: FileLayout::png(head(5), 150_000),
            hasher: Sha256::new(),
            sent: 0,
            cut_at: Some(75_000),
            on_complete: Some(Box::new(move |_, _| sender.send(()).expect("open"))),
            finished: false,
        };
        assert_eq!(cut.map(|chunk| chunk.len()).sum::<usize>(), 75_000);
        assert!(receiver.recv().is_err(), "a cut file is not recorded as served");
    }

    #[test]
    fn paths_parse_and_seeds_differ() {
        let file = parse("/results/abc/1.png").expect("parses");
        assert_eq!(
            (file.job_id, file.index, file.preview, file.extension),
            ("abc", 1, false, "png")
        );
        assert!(parse("/previews/abc/0.png").is_some_and(|file| file.preview));
        assert!(parse("/results/abc").is_none());
        assert_ne!(seed("abc", 0, false), seed("abc", 1, false));
        assert_ne!(seed("abc", 0, false), seed("abc", 0, true));
    }
}
