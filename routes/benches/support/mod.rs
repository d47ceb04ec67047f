//! Bench support: what the bench targets share, included whole by each
//! (`#[path = "../support/mod.rs"] mod support;`) and used in part. Redis,
//! the Redis Cluster and the balancers are started by the tests' own
//! support (`tests/support`), included here rather than copied.

/// The fan-out bench's baseline servers.
#[allow(dead_code)]
pub mod baselines;
pub mod knobs;
pub mod output;
pub mod procs;
pub mod server;
pub mod sse_client;
pub mod streams;

#[path = "../../../tests/support/balancer.rs"]
pub mod balancer;
#[path = "../../../tests/support/redis_cluster.rs"]
pub mod redis_cluster;
#[path = "../../../tests/support/redis_server.rs"]
pub mod redis_server;
