//! Placeholder until the proxy's public API lands (see BENCHMARKS.md).
fn main() {}
