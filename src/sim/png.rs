//! Small, valid PNG images made by hand: signature, `IHDR`, one `IDAT` holding a zlib stream of
//! a single stored (uncompressed) deflate block with its Adler-32, and `IEND`, each chunk with
//! its CRC-32. No image crate is needed and the bytes are fully deterministic. The padding that
//! makes result files large is a `tEXt` chunk streamed by `files.rs` with [`Crc32`] run
//! incrementally, so a file of any size never sits in memory.

/// The eight bytes every PNG starts with.
pub(crate) const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// Side of the square images, in pixels.
pub(crate) const SIDE: u32 = 32;

/// The side of an enhancer's result: twice a generator's.
pub(crate) const ENHANCED_SIDE: u32 = 2 * SIDE;

/// The keyword that opens the padding `tEXt` chunk's data.
pub(crate) const PADDING_KEYWORD: &[u8] = b"Comment\0";

/// Bytes a `tEXt` padding chunk adds beyond its filler: length, type, keyword, CRC.
pub(crate) const PADDING_OVERHEAD: u64 = 12 + PADDING_KEYWORD.len() as u64;

/// The CRC-32 of PNG (and zlib, and Ethernet): reflected polynomial 0xEDB88320, slicing-by-8
/// so that GiB-sized padding streams at memory speed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Crc32(u32);

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut index = 0;
    while index < 256 {
        let mut crc = index as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            bit += 1;
        }
        tables[0][index] = crc;
        index += 1;
    }
    let mut slice = 1;
    while slice < 8 {
        let mut index = 0;
        while index < 256 {
            let previous = tables[slice - 1][index];
            tables[slice][index] = (previous >> 8) ^ tables[0][(previous & 0xFF) as usize];
            index += 1;
        }
        slice += 1;
    }
    tables
}

impl Crc32 {
    pub(crate) fn new() -> Self {
        Self(0xFFFF_FFFF)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        let t = &CRC_TABLES;
        let mut crc = self.0;
        let mut blocks = bytes.chunks_exact(8);
        for block in &mut blocks {
            let low = crc ^ u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            crc = t[7][(low & 0xFF) as usize]
                ^ t[6][((low >> 8) & 0xFF) as usize]
                ^ t[5][((low >> 16) & 0xFF) as usize]
                ^ t[4][(low >> 24) as usize]
                ^ t[3][block[4] as usize]
                ^ t[2][block[5] as usize]
                ^ t[1][block[6] as usize]
                ^ t[0][block[7] as usize];
        }
        for &byte in blocks.remainder() {
            crc = (crc >> 8) ^ t[0][((crc ^ u32::from(byte)) & 0xFF) as usize];
        }
        self.0 = crc;
    }

    pub(crate) fn finish(self) -> u32 {
        !self.0
    }
}

/// Adler-32, the checksum that closes a zlib stream.
pub(crate) fn adler32(bytes: &[u8]) -> u32 {
    const MODULUS: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before `b` could overflow a u32.
    for block in bytes.chunks(5552) {
        for &byte in block {
            a += u32::from(byte);
            b += a;
        }
        a %= MODULUS;
        b %= MODULUS;
    }
    (b << 16) | a
}

/// A complete chunk: length, type, data, CRC over type and data.
pub(crate) fn chunk(kind: [u8; 4], data: &[u8]) -> Vec<u8> {
    let length = u32::try_from(data.len()).expect("in-memory chunks are a few KB");
    let mut crc = Crc32::new();
    crc.update(&kind);
    crc.update(data);
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.finish().to_be_bytes());
    out
}

/// The `IEND` chunk that closes every PNG.
pub(crate) fn end_chunk() -> Vec<u8> {
    chunk(*b"IEND", &[])
}

/// Everything of a PNG before `IEND`: signature, header and pixels. The RGB picture is a
/// gradient whose colours come from `seed`, so different files look (and hash) different.
/// `side` is at most [`ENHANCED_SIDE`] (what one stored deflate block holds); generators answer
/// with [`SIDE`].
pub(crate) fn image_head_sized(seed: &[u8; 32], side: u32) -> Vec<u8> {
    let side = side.min(ENHANCED_SIDE);
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&side.to_be_bytes());
    header.extend_from_slice(&side.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    header.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut pixels = Vec::with_capacity((side * (1 + 3 * side)) as usize);
    for y in 0..side {
        pixels.push(0); // filter type None
        for x in 0..side {
            let (x, y) = (x as u8, y as u8);
            pixels.push(seed[0].wrapping_add(x.wrapping_mul(8)));
            pixels.push(seed[1].wrapping_add(y.wrapping_mul(8)));
            pixels.push(seed[2 + usize::from((x ^ y) % 30)]);
        }
    }

    let mut out = SIGNATURE.to_vec();
    out.extend(chunk(*b"IHDR", &header));
    out.extend(chunk(*b"IDAT", &zlib_stored(&pixels)));
    out
}

/// A zlib stream holding `data` in one stored (uncompressed) deflate block.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let length = u16::try_from(data.len()).expect("one stored block holds a 64×64 image");
    let mut out = Vec::with_capacity(data.len() + 11);
    // CMF 0x78 (deflate, 32K window), FLG 0x01 (no dictionary; 0x7801 is a multiple of 31).
    out.extend_from_slice(&[0x78, 0x01]);
    out.push(0x01); // BFINAL = 1, BTYPE = 00 (stored)
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&(!length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the chunks of `png`, checking every CRC; returns (type, data) pairs.
    fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
        assert_eq!(png[..8], SIGNATURE);
        let mut rest = &png[8..];
        let mut found = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let kind: [u8; 4] = rest[4..8].try_into().expect("4 bytes");
            let data = &rest[8..8 + length];
            let stored = u32::from_be_bytes(rest[8 + length..12 + length].try_into().expect("4"));
            let mut crc = Crc32::new();
            crc.update(&kind);
            crc.update(data);
            assert_eq!(crc.finish(), stored, "CRC of {}", String::from_utf8_lossy(&kind));
            found.push((kind, data.to_vec()));
            rest = &rest[12 + length..];
        }
        found
    }

    #[test]
    fn checksums_match_known_values() {
        let mut crc = Crc32::new();
        crc.update(b"123456789");
        assert_eq!(crc.finish(), 0xCBF4_3926);
        let mut split = Crc32::new();
        split.update(b"1234");
        split.update(b"56789");
        assert_eq!(split.finish(), 0xCBF4_3926);
        let long: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut bytewise = Crc32::new();
        for byte in &long {
            bytewise.update(&[*byte]);
        }
        let mut sliced = Crc32::new();
        sliced.update(&long);
        assert_eq!(bytewise.finish(), sliced.finish());
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(end_chunk(), [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]);
    }

    #[test]
    fn image_is_a_valid_png() {
        let mut png = image_head_sized(&[7; 32], SIDE);
        png.extend(end_chunk());
        let chunks = chunks(&png);
        let kinds: Vec<&[u8; 4]> = chunks.iter().map(|(kind, _)| kind).collect();
        assert_eq!(kinds, [b"IHDR", b"IDAT", b"IEND"]);
        let header = &chunks[0].1;
        assert_eq!(header[..8], [0, 0, 0, 32, 0, 0, 0, 32]);
        assert_eq!(header[8..], [8, 2, 0, 0, 0]);

        let zlib = &chunks[1].1;
        assert_eq!(u16::from_be_bytes([zlib[0], zlib[1]]) % 31, 0);
        assert_eq!(zlib[2], 0x01);
        let length = u16::from_le_bytes([zlib[3], zlib[4]]);
        assert_eq!(!length, u16::from_le_bytes([zlib[5], zlib[6]]));
        assert_eq!(usize::from(length), 32 * (1 + 3 * 32));
        let pixels = &zlib[7..7 + usize::from(length)];
        assert_eq!(zlib.len(), 7 + pixels.len() + 4);
        assert_eq!(zlib[zlib.len() - 4..], adler32(pixels).to_be_bytes());
        assert!(pixels.chunks(97).all(|row| row[0] == 0), "every row has filter type 0");
    }

    #[test]
    fn different_seeds_give_different_images() {
        assert_ne!(image_head_sized(&[1; 32], SIDE), image_head_sized(&[2; 32], SIDE));
        let large = image_head_sized(&[1; 32], ENHANCED_SIDE);
        assert_eq!(large[16..24], [0, 0, 0, 64, 0, 0, 0, 64], "the header says 64×64");
        assert_eq!(image_head_sized(&[1; 32], SIDE), image_head_sized(&[1; 32], SIDE));
    }
}
