//! The pixel size of an image, read from the first bytes of its file: PNG (`IHDR`), JPEG (the
//! first start-of-frame marker) and WebP (`VP8 `, `VP8L`, `VP8X`). Enhance models such as
//! Topaz's require the input's `width` and `height`; a folder of images (`jobfile/folder.rs`)
//! fills them from each image. Other types (HEIC) and headers it cannot read give `None`: the
//! user writes the size, and the schema check says so if they do not.
//!
//! No I/O and no decoding: the caller hands the first [`HEAD_BYTES`] of the file.

/// How much of a file's start is enough: a JPEG's frame header comes after its metadata
/// segments (EXIF, ICC profiles), each at most 64 KiB; a few of them fit.
pub(crate) const HEAD_BYTES: usize = 512 * 1024;

/// Width and height in pixels of the image whose file starts with `head`.
#[must_use]
pub(crate) fn of(head: &[u8]) -> Option<(u32, u32)> {
    let size = if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(head)
    } else if head.starts_with(&[0xFF, 0xD8]) {
        jpeg(head)
    } else if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        webp(head)
    } else {
        None
    };
    size.filter(|(width, height)| *width > 0 && *height > 0)
}

fn be16(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?)))
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le16(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?)))
}

fn le24(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 3)?;
    Some(u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16)
}

/// The `IHDR` chunk, always first.
fn png(head: &[u8]) -> Option<(u32, u32)> {
    (head.get(12..16) == Some(b"IHDR")).then_some(())?;
    Some((be32(head, 16)?, be32(head, 20)?))
}

/// Walks the marker segments to the first start-of-frame (SOF0–SOF15 but DHT, JPG and DAC).
fn jpeg(head: &[u8]) -> Option<(u32, u32)> {
    let mut at = 2;
    loop {
        // Fill bytes (0xFF) may precede a marker.
        while head.get(at) == Some(&0xFF) && head.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        if head.get(at) != Some(&0xFF) {
            return None;
        }
        let marker = *head.get(at + 1)?;
        // Markers without a length: TEM, RSTn.
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            at += 2;
            continue;
        }
        let length = usize::try_from(be16(head, at + 2)?).ok()?;
        let frame = (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker);
        if frame {
            return Some((be16(head, at + 7)?, be16(head, at + 5)?));
        }
        if marker == 0xDA || length < 2 {
            // Image data began without a frame header, or the file is broken.
            return None;
        }
        at += 2 + length;
    }
}

/// The first chunk of a WebP: lossy (`VP8 `), lossless (`VP8L`) or extended (`VP8X`).
fn webp(head: &[u8]) -> Option<(u32, u32)> {
    match head.get(12..16)? {
        b"VP8 " => {
            (head.get(23..26) == Some(&[0x9D, 0x01, 0x2A])).then_some(())?;
            Some((le16(head, 26)? & 0x3FFF, le16(head, 28)? & 0x3FFF))
        }
        b"VP8L" => {
            (head.get(20) == Some(&0x2F)).then_some(())?;
            let bits = u32::from_le_bytes(head.get(21..25)?.try_into().ok()?);
            Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        b"VP8X" => Some((le24(head, 24)? + 1, le24(head, 27)? + 1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_jpeg_and_webp_sizes_are_read() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\x04\0\0\0\x03\0";
        assert_eq!(of(png), Some((1024, 768)));
        // SOI, an APP0 segment of 16 bytes, then SOF0 (precision 8, height 480, width 640).
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
        jpeg.extend_from_slice(&[0; 14]);
        jpeg.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08, 0x01, 0xE0, 0x02, 0x80]);
        assert_eq!(of(&jpeg), Some((640, 480)));
        let mut lossy = b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x9d\x01\x2a".to_vec();
        lossy.extend_from_slice(&[0x20, 0x03, 0x58, 0x02]);
        assert_eq!(of(&lossy), Some((800, 600)));
        let mut extended = b"RIFF\0\0\0\0WEBPVP8X\0\0\0\0\0\0\0\0".to_vec();
        extended.extend_from_slice(&[0xFF, 0x0F, 0x00, 0x37, 0x08, 0x00]);
        assert_eq!(of(&extended), Some((4096, 2104)));
        // 2 x 3, lossless: (w-1) | (h-1) << 14.
        let bits: u32 = 1 | 2 << 14;
        let mut lossless = b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0\x2f".to_vec();
        lossless.extend_from_slice(&bits.to_le_bytes());
        assert_eq!(of(&lossless), Some((2, 3)));
    }

    #[test]
    fn unknown_or_broken_headers_give_none() {
        for head in [
            &b"\x89PNG\r\n\x1a\n"[..],
            &[0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02],
            &[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x00],
            b"RIFF\0\0\0\0WEBPVP8 ",
            b"\0\0\0\x18ftypheic",
            b"GIF89a",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\0\0\0\0\x03",
        ] {
            assert_eq!(of(head), None, "{head:?}");
        }
    }
}
