//! The `krea-batch` binary (being written).
fn main() {}
