//! The Redis side of a topology run: one `redis-server` or a Redis Cluster
//! (started by tests/support), a connection of the bench's own to every
//! node, and what is read from each node around the measured window — its
//! CPU and the publish commands it ran (`INFO commandstats`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::procs::proc_cpu;
use crate::support::redis_cluster::RedisCluster;
use crate::support::redis_server::RedisServer;

/// Commands counted per Redis node: the publish script (`EVALSHA`, or
/// `EVAL` when the node did not have it cached yet) and the send on the
/// channel it runs (`PUBLISH` on one server, `SPUBLISH` in a cluster).
const COUNTED: [&str; 4] = ["evalsha", "eval", "spublish", "publish"];

/// The Redis processes of one run.
pub enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
}

/// One Redis process, with a connection of its own for `INFO`.
pub struct Node {
    pub port: u16,
    /// The primary's port, for a replica.
    pub replica_of: Option<u16>,
    pub pid: u32,
    pub conn: redis::Connection,
}

/// A node's CPU and command counters at one moment.
pub struct NodeSample {
    pub cpu: Duration,
    /// Command name → (successful calls, µs inside Redis).
    pub calls: BTreeMap<&'static str, (u64, u64)>,
}

impl Backend {
    pub fn start(topology: &str) -> Backend {
        match topology {
            "single" => Backend::Single(RedisServer::start()),
            "cluster" => Backend::Cluster(RedisCluster::start()),
            other => panic!("unknown topology {other}"),
        }
    }

    /// The variable that points an instance at this topology.
    pub fn env(&self) -> (&'static str, String) {
        match self {
            Backend::Single(r) => ("REDIS_URL", r.url()),
            Backend::Cluster(c) => ("REDIS_CLUSTER_NODES", c.seed_urls()),
        }
    }

    pub fn nodes(&self) -> Vec<Node> {
        let ports = match self {
            Backend::Single(r) => vec![r.port],
            Backend::Cluster(c) => c.ports(),
        };
        ports
            .into_iter()
            .map(|port| {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
                    .unwrap_or_else(|e| panic!("connect to Redis {port}: {e}"));
                let pid = info_field(&info(&mut conn, "server"), "process_id")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("INFO server of {port} has no process_id"));
                let replication = info(&mut conn, "replication");
                let replica_of = match info_field(&replication, "role") {
                    Some("slave") => {
                        info_field(&replication, "master_port").and_then(|p| p.parse().ok())
                    }
                    _ => None,
                };
                Node {
                    port,
                    replica_of,
                    pid,
                    conn,
                }
            })
            .collect()
    }
}

fn info(conn: &mut redis::Connection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query(conn)
        .unwrap_or_else(|e| panic!("INFO {section}: {e}"))
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

impl Node {
    pub fn sample(&mut self) -> NodeSample {
        let cpu = proc_cpu(self.pid);
        let stats = info(&mut self.conn, "commandstats");
        let mut calls = BTreeMap::new();
        for name in COUNTED {
            // cmdstat_evalsha:calls=12,usec=345,usec_per_call=28.75,...
            let line = info_field(&stats, &format!("cmdstat_{name}")).unwrap_or("");
            let num = |key: &str| {
                line.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            // A failed call is counted too: the client's first `EVALSHA` on
            // a node that has not cached the script yet gets NOSCRIPT, and
            // the `EVAL` that follows is the publish.
            calls.insert(name, (num("calls") - num("failed_calls"), num("usec")));
        }
        NodeSample { cpu, calls }
    }
}

/// `sse:session:{id}`: the session's channel (and keys), the id its hash tag.
pub fn channel(session: &str) -> String {
    format!("sse:session:{{{session}}}")
}

/// Which primary serves each hash slot, from `CLUSTER SLOTS` (one node's
/// view; the cluster has settled when `RedisCluster::start` returns).
pub fn slot_map(conn: &mut redis::Connection) -> Vec<(u16, u16, u16)> {
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(conn)
        .expect("CLUSTER SLOTS");
    ranges
        .iter()
        .map(|r| {
            let primary: Vec<redis::Value> = redis::from_redis_value(&r[2]).expect("slot owner");
            (
                redis::from_redis_value(&r[0]).expect("first slot"),
                redis::from_redis_value(&r[1]).expect("last slot"),
                redis::from_redis_value(&primary[1]).expect("owner port"),
            )
        })
        .collect()
}
