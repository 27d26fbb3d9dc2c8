//! Small, valid PNG images made by hand: signature, `IHDR`, `PLTE` (four colours), one `IDAT`
//! holding a zlib stream of stored (uncompressed) deflate blocks with its Adler-32, and `IEND`,
//! each chunk with its CRC-32. At 2 bits per pixel a 512×512 picture is 64 KiB, so no deflate
//! encoder is needed and the bytes are fully deterministic. What the pixels show is
//! `picture.rs`'s business. The padding that
//! makes result files large is a `tEXt` chunk streamed by `files.rs` with [`Crc32`] run
//! incrementally, so a file of any size never sits in memory.

/// The eight bytes every PNG starts with.
pub(crate) const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

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

/// Everything of a PNG before `IEND` for an indexed picture of four colours: signature,
/// header, palette and pixels (2 bits each). `pixels` holds one palette index (0–3) per pixel,
/// row by row, `width × height` of them.
pub(crate) fn indexed_head(
    width: u32,
    height: u32,
    palette: &[[u8; 3]; 4],
    pixels: &[u8],
) -> Vec<u8> {
    debug_assert_eq!(pixels.len(), (width * height) as usize);
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    // Bit depth 2, colour type 3 (indexed), deflate, adaptive filtering, no interlace.
    header.extend_from_slice(&[2, 3, 0, 0, 0]);

    let row_bytes = (width as usize).div_ceil(4);
    let mut packed = Vec::with_capacity(height as usize * (1 + row_bytes));
    for row in pixels.chunks(width as usize) {
        packed.push(0); // filter type None
        for four in row.chunks(4) {
            let byte = four
                .iter()
                .enumerate()
                .fold(0u8, |byte, (at, index)| byte | ((index & 3) << (6 - 2 * at)));
            packed.push(byte);
        }
    }

    let mut out = SIGNATURE.to_vec();
    out.extend(chunk(*b"IHDR", &header));
    out.extend(chunk(*b"PLTE", palette.as_flattened()));
    out.extend(chunk(*b"IDAT", &zlib_stored(&packed)));
    out
}

/// A zlib stream holding `data` in stored (uncompressed) deflate blocks of at most 64 KiB.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let blocks = data.len().div_ceil(usize::from(u16::MAX)).max(1);
    let mut out = Vec::with_capacity(data.len() + 6 + 5 * blocks);
    // CMF 0x78 (deflate, 32K window), FLG 0x01 (no dictionary; 0x7801 is a multiple of 31).
    out.extend_from_slice(&[0x78, 0x01]);
    let mut rest = data;
    loop {
        let (block, after) = rest.split_at(rest.len().min(usize::from(u16::MAX)));
        let length = u16::try_from(block.len()).expect("a stored block holds at most 65535 bytes");
        out.push(u8::from(after.is_empty())); // BFINAL on the last block, BTYPE = 00 (stored)
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(!length).to_le_bytes());
        out.extend_from_slice(block);
        if after.is_empty() {
            break;
        }
        rest = after;
    }
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

    /// The pixel bytes of an encoded picture: every stored block's data, joined.
    fn stored_data(zlib: &[u8]) -> Vec<u8> {
        assert_eq!(u16::from_be_bytes([zlib[0], zlib[1]]) % 31, 0);
        let mut at = 2;
        let mut data = Vec::new();
        loop {
            let last = zlib[at] == 0x01;
            assert!(zlib[at] <= 1, "stored blocks only");
            let length = u16::from_le_bytes([zlib[at + 1], zlib[at + 2]]);
            assert_eq!(!length, u16::from_le_bytes([zlib[at + 3], zlib[at + 4]]));
            data.extend_from_slice(&zlib[at + 5..at + 5 + usize::from(length)]);
            at += 5 + usize::from(length);
            if last {
                break;
            }
        }
        assert_eq!(zlib[at..], adler32(&data).to_be_bytes());
        data
    }

    #[test]
    fn indexed_pictures_are_valid_pngs() {
        const PALETTE: [[u8; 3]; 4] = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]];
        // 300×250 at 2 bits is more than one stored block holds.
        let (width, height) = (300u32, 250u32);
        let pixels: Vec<u8> = (0..width * height).map(|i| (i % 7 % 4) as u8).collect();
        let mut png = indexed_head(width, height, &PALETTE, &pixels);
        png.extend(end_chunk());
        let chunks = chunks(&png);
        let kinds: Vec<&[u8; 4]> = chunks.iter().map(|(kind, _)| kind).collect();
        assert_eq!(kinds, [b"IHDR", b"PLTE", b"IDAT", b"IEND"]);
        let header = &chunks[0].1;
        assert_eq!(header[..8], [0, 0, 1, 44, 0, 0, 0, 250]);
        assert_eq!(header[8..], [2, 3, 0, 0, 0]);
        assert_eq!(chunks[1].1, PALETTE.as_flattened());

        let data = stored_data(&chunks[2].1);
        let row_bytes = 1 + 300 / 4;
        assert_eq!(data.len(), 250 * row_bytes);
        assert!(data.chunks(row_bytes).all(|row| row[0] == 0), "every row has filter type 0");
        // The first row, unpacked, is the first 300 indices.
        let unpacked: Vec<u8> = data[1..row_bytes]
            .iter()
            .flat_map(|b| [b >> 6, (b >> 4) & 3, (b >> 2) & 3, b & 3])
            .collect();
        assert_eq!(unpacked, pixels[..300]);
    }
}
