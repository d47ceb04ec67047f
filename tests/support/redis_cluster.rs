//! A real Redis Cluster per test: 3 primaries and 3 replicas, each a
//! `redis-server --cluster-enabled yes` process on free ports, joined with
//! `redis-cli --cluster create`. A test can kill a node (SIGKILL), wait for
//! its replica to take over, restart it, and move one slot (with its keys)
//! to another primary with the documented manual resharding procedure.
//!
//! Everything talks to single nodes over plain connections (no cluster
//! client): what a node says about the cluster is read from `CLUSTER INFO`,
//! `CLUSTER SLOTS`, `CLUSTER NODES` and `ROLE`. Waits poll with a deadline
//! and panic with what they last saw, plus the tail of each node's log.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u32 = 16384;

/// How long `start`, `restart` and `move_slot` wait for the cluster to settle.
const SETTLE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Milliseconds after which a silent node is failing (`cluster-node-timeout`).
const NODE_TIMEOUT_MS: u32 = 1000;

struct Node {
    port: u16,
    /// The cluster bus port (set explicitly: `port + 10000` may exceed 65535
    /// for ports from the ephemeral range).
    bus_port: u16,
    /// The node id (`CLUSTER MYID`); kept in its nodes.conf across restarts.
    id: String,
    child: Option<Child>,
}

/// A running 3-primary, 3-replica Redis Cluster on 127.0.0.1; every node is
/// killed and its temp dir removed when dropped.
pub struct RedisCluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// For each primary killed with [`RedisCluster::kill`]: its replica then.
    replica_at_kill: HashMap<u16, u16>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The id of its primary, for a replica.
    master: Option<String>,
    epoch: u64,
    /// Slot ranges it serves; `[slot->-id]` / `[slot-<-id]` markers are in
    /// `migrating`.
    slots: Vec<(u16, u16)>,
    migrating: Vec<String>,
}

impl NodeLine {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
    fn is_master(&self) -> bool {
        self.has("master")
    }
    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
    /// Flags that say the node is not (yet) a healthy member.
    fn troubled(&self) -> Vec<&str> {
        self.flags
            .iter()
            .map(|f| f.as_str())
            .filter(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"))
            .collect()
    }
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster (`--cluster-replicas 1`) and
    /// waits until every node reports `cluster_state:ok`, all nodes agree on
    /// a `CLUSTER SLOTS` map covering all 16384 slots, every primary has a
    /// replica and every replica's link to its primary is up.
    pub fn start() -> RedisCluster {
        let ports = free_ports(12);
        let dir = temp_dir("redis-cluster");
        // The struct exists before anything can panic, so Drop cleans up.
        let mut cluster = RedisCluster {
            dir,
            nodes: (0..6)
                .map(|i| Node {
                    port: ports[2 * i],
                    bus_port: ports[2 * i + 1],
                    id: String::new(),
                    child: None,
                })
                .collect(),
            replica_at_kill: HashMap::new(),
        };
        let ports = cluster.ports();
        for &p in &ports {
            cluster.spawn(p);
        }
        for &p in &ports {
            cluster.wait_answers(p);
            let id: String = query(p, redis::cmd("CLUSTER").arg("MYID"))
                .unwrap_or_else(|e| panic!("CLUSTER MYID on {p}: {e}"));
            cluster.node_mut(p).id = id;
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed (it comes with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        cluster.poll("cluster to converge after create", SETTLE, |c| {
            c.settled()?;
            let roles = c.live_roles()?;
            let primaries: Vec<u16> = roles
                .iter()
                .filter(|r| r.1.is_none())
                .map(|r| r.0)
                .collect();
            for &p in &primaries {
                if !roles.iter().any(|r| r.1 == Some(p)) {
                    return Err(format!("primary {p} has no replica yet; roles {roles:?}"));
                }
            }
            if primaries.len() != 3 {
                return Err(format!("expected 3 primaries; roles {roles:?}"));
            }
            Ok(())
        });
        cluster
    }

    /// `redis://127.0.0.1:P` of all six nodes, comma-separated (for an env var).
    pub fn seed_urls(&self) -> String {
        self.ports()
            .iter()
            .map(|&p| url(p))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of all six nodes, dead or alive, in a fixed order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The ports of the running nodes whose `ROLE` is `master`, sorted.
    pub fn primaries(&self) -> Vec<u16> {
        self.live_roles()
            .unwrap_or_else(|e| panic!("primaries: {e}"))
            .into_iter()
            .filter(|r| r.1.is_none())
            .map(|r| r.0)
            .collect()
    }

    /// The hash slot of a key or shard channel (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key_or_channel: &str) -> u16 {
        let p = self.any_live();
        query(p, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key_or_channel))
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key_or_channel:?} on {p}: {e}"))
    }

    /// The port of the running primary that serves `slot` now, by its own
    /// `CLUSTER NODES` (if two claim it, the one with the higher config
    /// epoch). Waits up to 10 s for one to claim it (during a failover none
    /// may), then panics with every node's claim.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        self.poll(
            &format!("a live primary to serve slot {slot}"),
            Duration::from_secs(10),
            |c| c.claimed_owner(slot),
        )
    }

    /// The running node that replicates `primary` now (by the replicas'
    /// own `ROLE`), if any; the lowest port if there are several.
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        self.live_roles()
            .unwrap_or_else(|e| panic!("replica_of({primary}): {e}"))
            .into_iter()
            .find(|r| r.1 == Some(primary))
            .map(|r| r.0)
    }

    /// Kills the node (SIGKILL: a crash, not a shutdown). If it was a
    /// primary, remembers its replica for [`RedisCluster::wait_promoted`].
    pub fn kill(&mut self, port: u16) {
        assert!(
            self.node(port).child.is_some(),
            "node {port} is not running"
        );
        if let Ok((None, _)) = role(port) {
            if let Some(r) = self.replica_of(port) {
                self.replica_at_kill.insert(port, r);
            }
        }
        let mut child = self.node_mut(port).child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts a killed node again with its old nodes.conf (same id, same
    /// ports), and waits until it rejoined: it answers, every node reports
    /// `cluster_state:ok`, no node flags it failing, all agree on its role,
    /// and, if it is a replica now (a failed-over primary comes back as the
    /// replica of its successor), its replication link is up.
    pub fn restart(&mut self, port: u16) {
        assert!(
            self.node(port).child.is_none(),
            "node {port} is still running"
        );
        self.spawn(port);
        self.wait_answers(port);
        self.poll(&format!("node {port} to rejoin"), SETTLE, |c| c.settled());
    }

    /// Waits until the replica `dead_primary` had when it was killed is a
    /// primary, serving slots, and the surviving nodes report
    /// `cluster_state:ok` with no slot left on the dead node. Returns the
    /// promoted node's port.
    pub fn wait_promoted(&self, dead_primary: u16, within: Duration) -> u16 {
        let replica = *self.replica_at_kill.get(&dead_primary).unwrap_or_else(|| {
            panic!("{dead_primary} was not a primary with a replica when kill() was called")
        });
        self.poll(
            &format!("replica {replica} to replace dead primary {dead_primary}"),
            within,
            |c| {
                match role(replica)? {
                    (None, _) => {}
                    (Some(m), state) => {
                        return Err(format!("{replica} is still a replica of {m} ({state})"))
                    }
                }
                c.settled()?;
                let slots = slots_view(replica)?;
                if !slots.iter().any(|r| r.2 == replica) {
                    return Err(format!("{replica} serves no slot: {}", show_slots(&slots)));
                }
                Ok(())
            },
        );
        replica
    }

    /// Moves one slot, with its keys, from its current owner to the primary
    /// `to_primary` (which must be running and a primary): `CLUSTER SETSLOT
    /// slot IMPORTING` on the target, `MIGRATING` on the source,
    /// `GETKEYSINSLOT` and `MIGRATE ... KEYS` until the slot is empty, then
    /// `SETSLOT slot NODE target` on the target, the source and every other
    /// primary. Does nothing if `to_primary` serves the slot already. Waits until
    /// every running node maps the slot to the target, neither end has an
    /// open migrating/importing state, and the cluster is settled.
    pub fn move_slot(&self, slot: u16, to_primary: u16) {
        let from = self.owner_of_slot(slot);
        if from == to_primary {
            return;
        }
        match role(to_primary) {
            Ok((None, _)) => {}
            other => panic!("move_slot: target {to_primary} is not a running primary: {other:?}"),
        }
        let from_id = self.node(from).id.clone();
        let to_id = self.node(to_primary).id.clone();
        let setslot = |port: u16, how: &str, id: &str| {
            let r: Result<String, String> = query(
                port,
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg(how)
                    .arg(id),
            );
            if let Err(e) = r {
                panic!("CLUSTER SETSLOT {slot} {how} {id} on {port}: {e}");
            }
        };
        setslot(to_primary, "IMPORTING", &from_id);
        setslot(from, "MIGRATING", &to_id);
        let mut moved = 0usize;
        loop {
            let keys: Vec<Vec<u8>> = query(
                from,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            )
            .unwrap_or_else(|e| panic!("CLUSTER GETKEYSINSLOT {slot} 100 on {from}: {e}"));
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to_primary)
                .arg("")
                .arg(0)
                .arg(5000)
                // The source owns the slot: a copy the target kept from an
                // earlier owner (a node restarted in the middle of a fault)
                // is older.
                .arg("REPLACE")
                .arg("KEYS");
            for k in &keys {
                migrate.arg(&k[..]);
            }
            let r: Result<String, String> = query(from, &migrate);
            if let Err(e) = r {
                panic!(
                    "MIGRATE of {} keys of slot {slot} from {from} to {to_primary}: {e}",
                    keys.len()
                );
            }
            moved += keys.len();
        }
        setslot(to_primary, "NODE", &to_id);
        setslot(from, "NODE", &to_id);
        for p in self.primaries() {
            if p != from && p != to_primary {
                setslot(p, "NODE", &to_id);
            }
        }
        self.poll(
            &format!(
                "all nodes to agree slot {slot} moved from {from} to {to_primary} ({moved} keys)"
            ),
            SETTLE,
            |c| {
                for p in c.live_ports() {
                    let slots = slots_view(p)?;
                    let owner = slots
                        .iter()
                        .find(|r| r.0 <= slot && slot <= r.1)
                        .map(|r| r.2);
                    if owner != Some(to_primary) {
                        return Err(format!("{p} maps slot {slot} to {owner:?}"));
                    }
                }
                // Only this slot: a node killed in the middle of an
                // earlier move (a fault under traffic) can leave another
                // slot's marker behind, which is not this move's business.
                let mark = format!("[{slot}-");
                for p in [from, to_primary] {
                    let me = myself(p)?;
                    if me.migrating.iter().any(|m| m.starts_with(&mark)) {
                        return Err(format!("{p} still has {:?}", me.migrating));
                    }
                }
                c.settled()
            },
        );
    }

    /// `PUBSUB SHARDNUMSUB` on one node: each channel with its number of
    /// shard-channel subscribers on that node only (the command is not
    /// redirected, so ask the node that serves the channel's slot).
    pub fn shard_numsub(&self, port: u16, channels: &[String]) -> Vec<(String, i64)> {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("SHARDNUMSUB");
        for c in channels {
            cmd.arg(c);
        }
        let flat: Vec<redis::Value> = query(port, &cmd)
            .unwrap_or_else(|e| panic!("PUBSUB SHARDNUMSUB {channels:?} on {port}: {e}"));
        flat.chunks(2)
            .map(|pair| {
                let parsed: redis::RedisResult<(String, i64)> = (|| {
                    Ok((
                        redis::from_redis_value(&pair[0])?,
                        redis::from_redis_value(&pair[1])?,
                    ))
                })();
                parsed.unwrap_or_else(|e| panic!("PUBSUB SHARDNUMSUB on {port}: {pair:?}: {e}"))
            })
            .collect()
    }

    /// A plain connection to one node (no timeouts set; no redirects).
    pub fn conn(&self, port: u16) -> redis::Connection {
        redis::Client::open(url(port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect to cluster node {port}: {e}"))
    }

    // ---- internals -------------------------------------------------------

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("{port} is not a node of this cluster ({:?})", self.ports()))
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        let ports = self.ports();
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("{port} is not a node of this cluster ({ports:?})"))
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    fn any_live(&self) -> u16 {
        *self.live_ports().first().expect("no node is running")
    }

    fn spawn(&mut self, port: u16) {
        let dir = self.dir.clone();
        let node = self.node_mut(port);
        let out =
            File::create(dir.join(format!("node-{port}.out"))).expect("create node output file");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-port", &node.bus_port.to_string()])
            .arg("--cluster-config-file")
            .arg(dir.join(format!("nodes-{port}.conf")))
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            // A replica may take over however stale its data (no waiting on
            // its last contact with the primary) ...
            .args(["--cluster-replica-validity-factor", "0"])
            // ... and replicas stay where they are put.
            .args(["--cluster-allow-replica-migration", "no"])
            .args(["--save", "", "--appendonly", "no"])
            // A replica's full sync starts at once (the default waits 5 s
            // for more replicas to share a diskless transfer).
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join(format!("node-{port}.log")))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone file"))
            .stderr(out)
            .spawn()
            .expect("redis-server must be installed (tests/run-all.sh installs it)");
        node.child = Some(child);
    }

    fn wait_answers(&self, port: u16) {
        self.poll(
            &format!("node {port} to answer PING"),
            Duration::from_secs(10),
            |_| query::<String>(port, &redis::cmd("PING")).map(|_| ()),
        );
    }

    /// Polls `f` every 50 ms until it returns Ok or `within` passes; then
    /// panics with its last error and the nodes' log tails.
    fn poll<T>(
        &self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&Self) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            match f(self) {
                Ok(v) => return v,
                Err(seen) if Instant::now() >= deadline => {
                    panic!(
                        "waited {within:?} for {what}; last seen: {seen}\n{}",
                        self.logs()
                    )
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// `(port, Some(primary port) for a replica / None for a primary)` of
    /// every running node.
    fn live_roles(&self) -> Result<Vec<(u16, Option<u16>)>, String> {
        self.live_ports()
            .into_iter()
            .map(|p| role(p).map(|(m, _)| (p, m)))
            .collect()
    }

    fn claimed_owner(&self, slot: u16) -> Result<u16, String> {
        let mut claims = Vec::new();
        let mut seen = Vec::new();
        for p in self.live_ports() {
            match myself(p) {
                Ok(me) => {
                    if me.is_master() && me.serves(slot) {
                        claims.push((me.epoch, p));
                    }
                    seen.push(format!(
                        "{p}: {:?} {:?} epoch {}",
                        me.flags, me.slots, me.epoch
                    ));
                }
                Err(e) => seen.push(e),
            }
        }
        claims.sort();
        claims
            .last()
            .map(|c| c.1)
            .ok_or_else(|| format!("no claim; nodes: {}", seen.join("; ")))
    }

    /// Ok when the running nodes form a healthy cluster: each reports
    /// `cluster_state:ok`; they all show the same `CLUSTER SLOTS` primaries,
    /// covering all slots, all of them running; they know all six nodes and
    /// flag no running one as failing; every view agrees with each running
    /// node's own role (and primary); every replica's link is up.
    fn settled(&self) -> Result<(), String> {
        let live = self.live_ports();
        let mut first: Option<(u16, Vec<SlotRange>)> = None;
        let mut roles = HashMap::new();
        for &p in &live {
            let (master, state) = role(p)?;
            if master.is_some() {
                let link = info_field(p, "replication", "master_link_status")?;
                if link.as_deref() != Some("up") || state != "connected" {
                    return Err(format!(
                        "replica {p} of {master:?}: ROLE {state}, master_link_status {link:?}"
                    ));
                }
            }
            roles.insert(p, master);
        }
        for &p in &live {
            let state = info_field(p, "cluster", "cluster_state")?;
            if state.as_deref() != Some("ok") {
                return Err(format!("{p}: cluster_state {state:?}"));
            }
            let slots = slots_view(p)?;
            let covered: u32 = slots.iter().map(|r| (r.1 - r.0) as u32 + 1).sum();
            if covered != SLOTS {
                return Err(format!(
                    "{p}: CLUSTER SLOTS covers {covered}: {}",
                    show_slots(&slots)
                ));
            }
            if let Some(r) = slots.iter().find(|r| !live.contains(&r.2)) {
                return Err(format!("{p}: slots {}-{} on dead node {}", r.0, r.1, r.2));
            }
            match &first {
                None => first = Some((p, slots)),
                Some((q, theirs)) if *theirs != slots => {
                    return Err(format!(
                        "{p} and {q} disagree: {} vs {}",
                        show_slots(&slots),
                        show_slots(theirs)
                    ))
                }
                Some(_) => {}
            }
            let view = nodes_view(p)?;
            if view.len() != self.nodes.len() {
                return Err(format!("{p} knows {} nodes: {view:?}", view.len()));
            }
            for line in &view {
                let Some(own) = roles.get(&line.port) else {
                    continue;
                };
                let t = line.troubled();
                if !t.is_empty() {
                    return Err(format!("{p} flags {} {t:?}", line.port));
                }
                let master_port = line
                    .master
                    .as_ref()
                    .map(|id| view.iter().find(|l| &l.id == id).map(|l| l.port));
                let agrees = match (own, master_port) {
                    (None, None) => line.is_master(),
                    (Some(m), Some(Some(mp))) => *m == mp && line.has("slave"),
                    _ => false,
                };
                if !agrees {
                    return Err(format!(
                        "{p} sees {} as {:?} of {master_port:?}, but its ROLE says replica of {own:?}",
                        line.port, line.flags
                    ));
                }
            }
        }
        Ok(())
    }

    /// The last lines of every node's log and output, for panic messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let state = if n.child.is_some() { "running" } else { "dead" };
            s.push_str(&format!("--- node {} ({state}, id {}):\n", n.port, n.id));
            for name in [
                format!("node-{}.out", n.port),
                format!("node-{}.log", n.port),
            ] {
                s.push_str(&tail(&self.dir.join(name), 8));
            }
        }
        s
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---- single-node helpers ---------------------------------------------------

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// Runs one command on one node over a fresh connection with timeouts.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let mut conn = redis::Client::open(url(port))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .map_err(|e| format!("{port}: connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|_| conn.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| format!("{port}: {e}"))?;
    cmd.query(&mut conn).map_err(|e| format!("{port}: {e}"))
}

/// `ROLE`: (None, "") for a primary; (Some(primary port), link state) for a
/// replica.
fn role(port: u16) -> Result<(Option<u16>, String), String> {
    let v: Vec<redis::Value> = query(port, &redis::cmd("ROLE"))?;
    let s = |i: usize| -> Result<String, String> {
        v.get(i)
            .ok_or_else(|| format!("{port}: short ROLE reply {v:?}"))
            .and_then(|x| {
                redis::from_redis_value(x).map_err(|e| format!("{port}: ROLE {v:?}: {e}"))
            })
    };
    match s(0)?.as_str() {
        "master" => Ok((None, String::new())),
        "slave" => {
            let mp: u16 = s(2)?
                .parse()
                .map_err(|e| format!("{port}: ROLE {v:?}: {e}"))?;
            Ok((Some(mp), s(3)?))
        }
        other => Err(format!("{port}: unexpected ROLE {other}")),
    }
}

/// One field of `INFO <section>`, or of `CLUSTER INFO` for section "cluster"
/// (`INFO cluster` only says `cluster_enabled`).
fn info_field(port: u16, section: &str, field: &str) -> Result<Option<String>, String> {
    let cmd = if section == "cluster" {
        redis::cmd("CLUSTER").arg("INFO").clone()
    } else {
        redis::cmd("INFO").arg(section).clone()
    };
    let info: String = query(port, &cmd)?;
    Ok(info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    }))
}

/// (first slot, last slot, primary port).
type SlotRange = (u16, u16, u16);

/// `CLUSTER SLOTS` as ranges, sorted.
fn slots_view(port: u16) -> Result<Vec<SlotRange>, String> {
    let ranges: Vec<Vec<redis::Value>> = query(port, redis::cmd("CLUSTER").arg("SLOTS"))?;
    let mut out = Vec::new();
    for r in &ranges {
        let parsed: redis::RedisResult<(u16, u16, u16)> = (|| {
            let primary: Vec<redis::Value> = redis::from_redis_value(&r[2])?;
            Ok((
                redis::from_redis_value(&r[0])?,
                redis::from_redis_value(&r[1])?,
                redis::from_redis_value(&primary[1])?,
            ))
        })();
        out.push(parsed.map_err(|e| format!("{port}: CLUSTER SLOTS entry {r:?}: {e}"))?);
    }
    out.sort();
    Ok(out)
}

fn show_slots(slots: &[SlotRange]) -> String {
    slots
        .iter()
        .map(|r| format!("{}-{}@{}", r.0, r.1, r.2))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `CLUSTER NODES`, parsed.
fn nodes_view(port: u16) -> Result<Vec<NodeLine>, String> {
    let text: String = query(port, redis::cmd("CLUSTER").arg("NODES"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_node_line(l).ok_or_else(|| format!("{port}: bad CLUSTER NODES line {l:?}")))
        .collect()
}

/// The node's own line of `CLUSTER NODES`.
fn myself(port: u16) -> Result<NodeLine, String> {
    nodes_view(port)?
        .into_iter()
        .find(|l| l.has("myself"))
        .ok_or_else(|| format!("{port}: no myself line in CLUSTER NODES"))
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_node_line(line: &str) -> Option<NodeLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    let addr = f[1].split('@').next()?;
    let port = addr.rsplit(':').next()?.parse().ok()?;
    let mut slots = Vec::new();
    let mut migrating = Vec::new();
    for s in &f[8..] {
        if s.starts_with('[') {
            migrating.push(s.to_string());
        } else if let Some((a, b)) = s.split_once('-') {
            slots.push((a.parse().ok()?, b.parse().ok()?));
        } else {
            let n = s.parse().ok()?;
            slots.push((n, n));
        }
    }
    Some(NodeLine {
        id: f[0].to_owned(),
        port,
        flags: f[2].split(',').map(str::to_owned).collect(),
        master: (f[3] != "-").then(|| f[3].to_owned()),
        epoch: f[6].parse().ok()?,
        slots,
        migrating,
    })
}

/// `n` distinct ports nothing listens on right now (all bound at once, so
/// they differ from each other).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A new empty directory under the system temp dir.
fn temp_dir(prefix: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
}

/// The last `n` lines of a file ("" if it does not exist).
fn tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    let mut s = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        s.push_str("    ");
        s.push_str(l);
        s.push('\n');
    }
    s
}
