//! The padding of large simulated bodies (results grown to a size, the huge-JSON fault): one
//! static chunk of printable filler that both the file host and the fault injection stream.
//! A leaf.

/// Size of the chunks large bodies are streamed in.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Padding bytes: printable ASCII without quotes or backslashes, so the same filler also pads
/// the huge-JSON fault as the contents of a JSON string.
pub(crate) static FILLER: [u8; CHUNK] = filler();

// Evaluated at compile time only, into a static: no stack is involved.
#[allow(clippy::large_stack_arrays)]
const fn filler() -> [u8; CHUNK] {
    let pattern = b"krea-batch simulated padding. ";
    let mut out = [0u8; CHUNK];
    let mut index = 0;
    while index < CHUNK {
        out[index] = pattern[index % pattern.len()];
        index += 1;
    }
    out
}
