//! Cross-instance delivery over one Redis and over a Redis Cluster (see
//! docs/benchmarks.md). Filled in by the topology benchmark.

fn main() {}
