//! Fan-out benchmark (see docs/benchmarks.md).

fn main() {}
