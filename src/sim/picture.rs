//! What a simulated result picture shows, so that a person looking at a gallery of simulated
//! results can tell them apart: the prompt's words, and below them the request's seed (or, for a
//! request without one, the start of the job's id), drawn in the public-domain 8×8 bitmap font
//! of the `font8x8` crate, on a background colour that differs from file to file. The picture
//! has the aspect ratio the request asked for (`width`/`height`, or `aspect_ratio`), with its
//! longer side 512 pixels whatever size was asked: a stand-in needs no more, and at four colours
//! (`png.rs`) a file stays under 64 KiB.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// The longer side of every picture, in pixels.
const LONG_SIDE: u32 = 512;

/// The narrowest picture side, so that a 1:8 request still has room for a letter.
const SHORT_SIDE_MIN: u32 = 32;

/// Palette indices.
const BACKGROUND: u8 = 0;
const INK: u8 = 1;
const BAND: u8 = 2;
const BAND_INK: u8 = 3;

/// The facts of a request that its pictures show besides the prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Picture {
    /// Width and height of the picture drawn (the requested ratio, 512 on the longer side).
    pub width: u32,
    pub height: u32,
    /// The request's `seed`, as written.
    pub seed: Option<String>,
}

impl Default for Picture {
    /// A square picture without a seed (jobs in world files from before pictures).
    fn default() -> Self {
        Self { width: LONG_SIDE, height: LONG_SIDE, seed: None }
    }
}

impl Picture {
    /// The same picture at twice the size: an enhancer's result.
    #[must_use]
    pub(crate) fn enlarged(self) -> Self {
        Self { width: 2 * self.width, height: 2 * self.height, ..self }
    }

    /// The picture a (valid) request body asks for: the ratio of its `width` and `height`, or
    /// of its `aspect_ratio` (`16:9`, `2.35:1`), else square.
    pub(crate) fn of_request(body: &Map<String, Value>) -> Self {
        let number = |field: &str| body.get(field).and_then(Value::as_f64).filter(|n| *n > 0.0);
        let ratio = match (number("width"), number("height")) {
            (Some(width), Some(height)) => width / height,
            _ => body
                .get("aspect_ratio")
                .and_then(Value::as_str)
                .and_then(|ratio| ratio.split_once(':'))
                .and_then(|(w, h)| {
                    Some(w.trim().parse::<f64>().ok()? / h.trim().parse::<f64>().ok()?)
                })
                .filter(|ratio| ratio.is_finite() && *ratio > 0.0)
                .unwrap_or(1.0),
        };
        let short = |ratio: f64| {
            ((f64::from(LONG_SIDE) * ratio).round() as u32).clamp(SHORT_SIDE_MIN, LONG_SIDE)
        };
        let (width, height) =
            if ratio >= 1.0 { (LONG_SIDE, short(1.0 / ratio)) } else { (short(ratio), LONG_SIDE) };
        let seed = body.get("seed").and_then(|seed| match seed {
            Value::Number(number) => Some(number.to_string()),
            Value::String(text) => Some(text.clone()),
            _ => None,
        });
        Self { width, height, seed }
    }

    /// The label under the prompt: `seed 42`, or `job 1b4e28ba` without a seed; ` #2` for a
    /// job's second file, ` preview` for a preview.
    fn label(&self, job_id: &str, index: u32, preview: bool) -> String {
        let mut label = match &self.seed {
            Some(seed) => format!("seed {seed}"),
            None => format!("job {}", job_id.chars().take(8).collect::<String>()),
        };
        if index > 0 {
            let _ = write!(label, " #{}", index + 1);
        }
        if preview {
            label.push_str(" preview");
        }
        label
    }

    /// The PNG (all but its `IEND`) of this picture for one file: `prompt` in the upper part, the
    /// label in a band at the bottom, colours from `colour_seed`.
    pub(crate) fn png_head(
        &self,
        prompt: &str,
        job_id: &str,
        index: u32,
        preview: bool,
        colour_seed: &[u8; 32],
    ) -> Vec<u8> {
        let canvas = self.draw(prompt, &self.label(job_id, index, preview));
        super::png::indexed_head(self.width, self.height, &palette(colour_seed), &canvas.pixels)
    }

    fn draw(&self, prompt: &str, label: &str) -> Canvas {
        let mut canvas = Canvas::new(self.width, self.height);
        let layout = Layout::of(self.width, self.height, prompt);
        canvas.fill(0, layout.band_top, self.width, self.height - layout.band_top, BAND);
        for (row, line) in layout.lines.iter().enumerate() {
            let y = layout.margin + row as u32 * layout.line_height();
            canvas.text(layout.margin, y, layout.scale, line, INK);
        }
        let label_scale = layout.label_scale;
        let fits = ((self.width - 2 * layout.margin) / (8 * label_scale)) as usize;
        let label: String = label.chars().take(fits).collect();
        canvas.text(
            layout.margin,
            layout.band_top + layout.margin / 2,
            label_scale,
            &label,
            BAND_INK,
        );
        canvas
    }
}

/// Where the text goes: the prompt wrapped at the largest scale that fits above the band.
#[derive(Debug)]
struct Layout {
    margin: u32,
    /// Each glyph is `8 × scale` pixels square.
    scale: u32,
    lines: Vec<String>,
    label_scale: u32,
    band_top: u32,
}

impl Layout {
    fn of(width: u32, height: u32, prompt: &str) -> Self {
        let short = width.min(height);
        let margin = (short / 32).max(4);
        let label_scale = (short / 128).clamp(1, 3);
        let band_top = height - (8 * label_scale + margin);
        let text = if prompt.trim().is_empty() { "(no prompt)" } else { prompt };
        let room_w = width - 2 * margin;
        let room_h = band_top.saturating_sub(2 * margin);
        for scale in (1..=6).rev() {
            let columns = (room_w / (8 * scale)) as usize;
            let rows = (room_h / (10 * scale)) as usize;
            let lines = wrap(text, columns.max(1));
            if lines.len() <= rows || scale == 1 {
                let mut lines = lines;
                if lines.len() > rows.max(1) {
                    lines.truncate(rows.max(1));
                    let last = lines.last_mut().expect("at least one line");
                    let kept: String = last.chars().take(columns.saturating_sub(3)).collect();
                    *last = format!("{kept}...");
                }
                return Self { margin, scale, lines, label_scale, band_top };
            }
        }
        unreachable!("scale 1 always returns")
    }

    fn line_height(&self) -> u32 {
        10 * self.scale
    }
}

/// `text`'s words in lines of at most `columns` characters; a longer word is cut.
fn wrap(text: &str, columns: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = line.chars().count();
            let gap = usize::from(used > 0);
            if used + gap + word.len() <= columns {
                if gap == 1 {
                    line.push(' ');
                }
                line.extend(word.iter());
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            let rest = word.split_off(columns);
            lines.push(word.into_iter().collect());
            word = rest;
            if word.is_empty() {
                break;
            }
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// The four colours of one file: a light background from its seed, dark ink, a darker band of
/// the same hue, white ink on the band.
fn palette(seed: &[u8; 32]) -> [[u8; 3]; 4] {
    let background = [0, 1, 2].map(|i| 160 + seed[i] % 88);
    let band = background.map(|c| c / 3);
    [background, [24, 24, 32], band, [255, 255, 255]]
}

/// The 8×8 glyph of `c`: ASCII and Latin-1 from `font8x8`, `?` for the rest. Row by row, bit 0
/// the leftmost pixel.
fn glyph(c: char) -> [u8; 8] {
    use font8x8::legacy::{BASIC_LEGACY, LATIN_LEGACY};
    let code = u32::from(c);
    match code {
        0x20..=0x7E => BASIC_LEGACY[code as usize],
        0xA0..=0xFF => LATIN_LEGACY[(code - 0xA0) as usize],
        _ => BASIC_LEGACY[usize::from(b'?')],
    }
}

/// Palette indices, one per pixel.
struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Self { width, height, pixels: vec![BACKGROUND; (width * height) as usize] }
    }

    fn fill(&mut self, x: u32, y: u32, width: u32, height: u32, colour: u8) {
        for row in y..(y + height).min(self.height) {
            for column in x..(x + width).min(self.width) {
                self.pixels[(row * self.width + column) as usize] = colour;
            }
        }
    }

    /// Draws `text` from (x, y), each glyph pixel a `scale × scale` square; what falls outside
    /// the canvas is clipped.
    fn text(&mut self, x: u32, y: u32, scale: u32, text: &str, colour: u8) {
        for (at, c) in text.chars().enumerate() {
            let left = x + at as u32 * 8 * scale;
            for (row, bits) in glyph(c).iter().enumerate() {
                for column in 0..8u32 {
                    if bits & (1 << column) != 0 {
                        let (gx, gy) = (left + column * scale, y + row as u32 * scale);
                        self.fill(gx, gy, scale, scale, colour);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn picture(body: &Value) -> Picture {
        Picture::of_request(body.as_object().expect("object"))
    }

    #[test]
    fn pictures_have_the_requested_aspect_ratio() {
        let size = |body: Value| {
            let picture = picture(&body);
            (picture.width, picture.height)
        };
        assert_eq!(size(json!({"prompt": "x"})), (512, 512));
        assert_eq!(size(json!({"width": 1024, "height": 576})), (512, 288));
        assert_eq!(size(json!({"width": 600, "height": 1200})), (256, 512));
        assert_eq!(size(json!({"aspect_ratio": "16:9"})), (512, 288));
        assert_eq!(size(json!({"aspect_ratio": "9:16"})), (288, 512));
        assert_eq!(size(json!({"aspect_ratio": "2.35:1"})), (512, 218));
        assert_eq!(size(json!({"aspect_ratio": "1:8"})), (64, 512));
        // width and height win over a ratio; nonsense falls back to square.
        assert_eq!(size(json!({"width": 500, "height": 500, "aspect_ratio": "16:9"})), (512, 512));
        assert_eq!(size(json!({"aspect_ratio": "wide"})), (512, 512));
        assert_eq!(picture(&json!({"seed": 42})).seed.as_deref(), Some("42"));
        assert_eq!(picture(&json!({})).seed, None);
    }

    #[test]
    fn labels_name_the_seed_or_the_job() {
        let seeded = picture(&json!({"seed": 7}));
        assert_eq!(seeded.label("1b4e28ba-2fa1-11d2", 0, false), "seed 7");
        assert_eq!(seeded.label("1b4e28ba-2fa1-11d2", 1, true), "seed 7 #2 preview");
        assert_eq!(Picture::default().label("1b4e28ba-2fa1-11d2", 0, false), "job 1b4e28ba");
    }

    #[test]
    fn words_wrap_and_long_words_are_cut() {
        assert_eq!(wrap("a fox in the snow", 8), ["a fox in", "the snow"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("  ", 4), [""]);
    }

    /// The prompt's first letter is drawn at the top left, in ink, at the layout's scale: the
    /// picture shows the words, not noise.
    #[test]
    fn the_prompt_is_drawn_in_the_font() {
        let picture = picture(&json!({"aspect_ratio": "16:9", "seed": 3}));
        let canvas = picture.draw("Fox in the snow", "seed 3");
        let layout = Layout::of(picture.width, picture.height, "Fox in the snow");
        assert_eq!(layout.lines.join(" "), "Fox in the snow", "{layout:?}");
        let s = layout.scale;
        let at = |x: u32, y: u32| canvas.pixels[(y * canvas.width + x) as usize];
        for (row, bits) in glyph('F').iter().enumerate() {
            for column in 0..8 {
                let (x, y) = (layout.margin + column * s, layout.margin + row as u32 * s);
                let expected = if bits & (1 << column) != 0 { INK } else { BACKGROUND };
                assert_eq!(at(x, y), expected, "F at row {row}, column {column}");
            }
        }
        assert_eq!(at(0, picture.height - 1), BAND, "the label band at the bottom");
        assert!(canvas.pixels.contains(&BAND_INK), "the label is written in the band");
        assert_ne!(canvas.pixels, picture.draw("Owl at night", "seed 3").pixels);
        assert_ne!(canvas.pixels, picture.draw("Fox in the snow", "seed 4").pixels);
    }

    #[test]
    fn long_prompts_shrink_then_end_in_an_ellipsis() {
        let short = Layout::of(512, 512, "a fox");
        let long = Layout::of(512, 512, &"word ".repeat(60));
        assert!(long.scale < short.scale, "{} < {}", long.scale, short.scale);
        let endless = Layout::of(512, 64, &"word ".repeat(2000));
        assert_eq!(endless.scale, 1);
        assert!(endless.lines.last().expect("a line").ends_with("..."), "{endless:?}");
        assert_eq!(Layout::of(512, 512, " ").lines.join(" "), "(no prompt)");
    }

    #[test]
    fn every_character_has_a_glyph() {
        assert_eq!(glyph('?'), glyph('\u{1F98A}'), "outside Latin-1: a question mark");
        assert_ne!(glyph('é'), glyph('?'));
        assert_ne!(glyph('A'), [0; 8]);
    }
}
