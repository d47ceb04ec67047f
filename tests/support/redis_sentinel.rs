//! A real Redis Sentinel setup per test: one primary, one replica and three
//! sentinels (quorum 2), each its own process on a free port. A test can
//! kill the primary (SIGKILL), wait for the sentinels to promote the
//! replica, and restart the old primary, which the sentinels then turn into
//! a replica of the new one.
//!
//! Sentinels run from generated `sentinel-P.conf` files in a temp dir (they
//! rewrite them, so they must be writable); the dir is removed on Drop.
//! Waits poll with a deadline and panic with what they last saw, plus the
//! tail of each process's log.

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long `start` and `restart` wait for everything to settle.
const SETTLE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

struct Proc {
    port: u16,
    child: Option<Child>,
}

/// A running primary + replica watched by three sentinels on 127.0.0.1;
/// every process is killed and the temp dir removed when dropped.
pub struct RedisSentinel {
    dir: PathBuf,
    master_name: String,
    /// The two data nodes: the first primary, then its replica.
    data: Vec<Proc>,
    sentinels: Vec<Proc>,
}

impl RedisSentinel {
    /// Starts the primary, its replica (`--replicaof`) and three sentinels
    /// monitoring it as `master_name` (quorum 2, down-after 1000 ms,
    /// failover-timeout 5000 ms). Waits until the replica's link is up and
    /// every sentinel sees the master healthy with at least one replica and
    /// the two other sentinels.
    pub fn start(master_name: &str) -> RedisSentinel {
        let ports = free_ports(5);
        let mut s = RedisSentinel {
            dir: temp_dir("redis-sentinel"),
            master_name: master_name.to_owned(),
            data: ports[..2]
                .iter()
                .map(|&port| Proc { port, child: None })
                .collect(),
            sentinels: ports[2..]
                .iter()
                .map(|&port| Proc { port, child: None })
                .collect(),
        };
        let (primary, replica) = (ports[0], ports[1]);
        s.spawn_data(primary, None);
        s.spawn_data(replica, Some(primary));
        s.wait_answers(primary);
        s.wait_answers(replica);
        s.poll(
            &format!("replica {replica} to sync from {primary}"),
            SETTLE,
            |_| replica_link(replica, primary),
        );
        for i in 0..s.sentinels.len() {
            let port = s.sentinels[i].port;
            let conf = s.dir.join(format!("sentinel-{port}.conf"));
            let text = format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 dir {dir}\n\
                 logfile {log}\n\
                 sentinel monitor {m} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {m} 1000\n\
                 sentinel failover-timeout {m} 5000\n\
                 sentinel parallel-syncs {m} 1\n",
                dir = s.dir.display(),
                log = s.dir.join(format!("sentinel-{port}.log")).display(),
                m = master_name,
            );
            fs::write(&conf, text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
            let out = s.out_file(port);
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone file"))
                .stderr(out)
                .spawn()
                .expect("redis-server must be installed (tests/run-all.sh installs it)");
            s.sentinels[i].child = Some(child);
        }
        for p in s.sentinel_ports() {
            s.wait_answers(p);
        }
        s.poll(
            "every sentinel to know the master, its replica and the other sentinels",
            SETTLE,
            |s| {
                for p in s.sentinel_ports() {
                    let m = s.master_info(p)?;
                    let get = |k: &str| {
                        m.iter()
                            .find(|(f, _)| f == k)
                            .map(|(_, v)| v.as_str())
                            .unwrap_or("")
                    };
                    let num = |k: &str| get(k).parse::<i64>().unwrap_or(-1);
                    if get("flags") != "master"
                        || get("port") != primary.to_string()
                        || num("num-slaves") < 1
                        || num("num-other-sentinels") < 2
                    {
                        return Err(format!(
                            "sentinel {p}: flags {} port {} num-slaves {} num-other-sentinels {}",
                            get("flags"),
                            get("port"),
                            get("num-slaves"),
                            get("num-other-sentinels")
                        ));
                    }
                }
                Ok(())
            },
        );
        s
    }

    /// `redis://127.0.0.1:P` of the three sentinels, comma-separated.
    pub fn sentinel_urls(&self) -> String {
        self.sentinel_ports()
            .iter()
            .map(|&p| url(p))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of the three sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|p| p.port).collect()
    }

    /// The ports of the two data nodes (first primary, first replica).
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(|p| p.port).collect()
    }

    /// The name the sentinels monitor the primary under.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The primary's port according to the first sentinel that answers
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME`.
    pub fn primary_port(&self) -> u16 {
        let mut seen = Vec::new();
        for p in self.sentinel_ports() {
            match self.master_addr(p) {
                Ok(port) => return port,
                Err(e) => seen.push(e),
            }
        }
        panic!("no sentinel named the primary: {}", seen.join("; "))
    }

    /// Kills the current primary (SIGKILL: a crash); returns its port.
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port();
        let proc = self
            .data
            .iter_mut()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("the sentinels name {port}, not one of our data nodes"));
        let mut child = proc
            .child
            .take()
            .unwrap_or_else(|| panic!("the sentinels name {port} as primary, but it is dead"));
        let _ = child.kill();
        let _ = child.wait();
        port
    }

    /// Waits until every sentinel names the same primary other than `old`
    /// and that node answers `ROLE` master; returns its port.
    pub fn wait_failover(&self, old: u16, within: Duration) -> u16 {
        self.poll(&format!("sentinels to fail over from {old}"), within, |s| {
            let mut named = Vec::new();
            for p in s.sentinel_ports() {
                named.push(s.master_addr(p)?);
            }
            let new = named[0];
            if new == old || named.iter().any(|&n| n != new) {
                return Err(format!("sentinels name {named:?}"));
            }
            let r = role(new)?;
            if r != "master" {
                return Err(format!("sentinels name {new}, whose ROLE is {r}"));
            }
            Ok(new)
        })
    }

    /// Starts a killed data node again, as a bare server (no `--replicaof`:
    /// like a rebooted primary, it claims to be a primary). Waits until it
    /// answers and then until it has its place: if the sentinels name it
    /// the primary, it answers ROLE master; otherwise the sentinels have
    /// made it a replica of the named primary (this takes Sentinel ~10 s
    /// after the node comes back), its link is up and no sentinel considers
    /// it down.
    pub fn restart(&mut self, port: u16) {
        let proc = self
            .data
            .iter()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("{port} is not a data node ({:?})", self.data_ports()));
        assert!(proc.child.is_none(), "data node {port} is still running");
        self.spawn_data(port, None);
        self.wait_answers(port);
        self.poll(&format!("restarted {port} to rejoin"), SETTLE, |s| {
            let primary = s.master_addr_any()?;
            if primary == port {
                let r = role(port)?;
                return if r == "master" {
                    Ok(())
                } else {
                    Err(format!("named primary {port} has ROLE {r}"))
                };
            }
            replica_link(port, primary)?;
            for p in s.sentinel_ports() {
                let replicas = s.replicas_info(p)?;
                let me = replicas
                    .iter()
                    .find(|r| r.iter().any(|(k, v)| k == "port" && *v == port.to_string()));
                let flags = me
                    .and_then(|r| r.iter().find(|(k, _)| k == "flags"))
                    .map(|(_, v)| v.as_str());
                if flags != Some("slave") {
                    return Err(format!(
                        "sentinel {p} lists replica {port} with flags {flags:?}"
                    ));
                }
            }
            Ok(())
        });
    }

    /// A plain connection to a data node or sentinel (no timeouts set).
    pub fn conn(&self, port: u16) -> redis::Connection {
        redis::Client::open(url(port))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("connect to {port}: {e}"))
    }

    // ---- internals -------------------------------------------------------

    fn out_file(&self, port: u16) -> File {
        File::create(self.dir.join(format!("{port}.out"))).expect("create output file")
    }

    fn spawn_data(&mut self, port: u16, replica_of: Option<u16>) {
        let out = self.out_file(port);
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // A replica's full sync starts at once (the default waits 5 s
            // for more replicas to share a diskless transfer).
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join(format!("redis-{port}.log")));
        if let Some(primary) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone file"))
            .stderr(out)
            .spawn()
            .expect("redis-server must be installed (tests/run-all.sh installs it)");
        self.data
            .iter_mut()
            .find(|p| p.port == port)
            .expect("data node")
            .child = Some(child);
    }

    fn wait_answers(&self, port: u16) {
        self.poll(
            &format!("{port} to answer PING"),
            Duration::from_secs(10),
            |_| query::<String>(port, &redis::cmd("PING")).map(|_| ()),
        );
    }

    /// Polls `f` every 50 ms until it returns Ok or `within` passes; then
    /// panics with its last error and the log tails.
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

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on one sentinel: the port.
    fn master_addr(&self, sentinel: u16) -> Result<u16, String> {
        let addr: Option<(String, u16)> = query(
            sentinel,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&self.master_name),
        )?;
        addr.map(|a| a.1)
            .ok_or_else(|| format!("sentinel {sentinel} does not know {:?}", self.master_name))
    }

    fn master_addr_any(&self) -> Result<u16, String> {
        let mut seen = Vec::new();
        for p in self.sentinel_ports() {
            match self.master_addr(p) {
                Ok(port) => return Ok(port),
                Err(e) => seen.push(e),
            }
        }
        Err(seen.join("; "))
    }

    /// `SENTINEL MASTER <name>` as field/value pairs.
    fn master_info(&self, sentinel: u16) -> Result<Vec<(String, String)>, String> {
        let flat: Vec<String> = query(
            sentinel,
            redis::cmd("SENTINEL").arg("MASTER").arg(&self.master_name),
        )?;
        Ok(pairs(flat))
    }

    /// `SENTINEL REPLICAS <name>`, each as field/value pairs.
    fn replicas_info(&self, sentinel: u16) -> Result<Vec<Vec<(String, String)>>, String> {
        let all: Vec<Vec<String>> = query(
            sentinel,
            redis::cmd("SENTINEL")
                .arg("REPLICAS")
                .arg(&self.master_name),
        )?;
        Ok(all.into_iter().map(pairs).collect())
    }

    /// The last lines of every process's log and output, for panic messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for (kind, procs, log) in [
            ("data node", &self.data, "redis"),
            ("sentinel", &self.sentinels, "sentinel"),
        ] {
            for p in procs {
                let state = if p.child.is_some() { "running" } else { "dead" };
                s.push_str(&format!("--- {kind} {} ({state}):\n", p.port));
                s.push_str(&tail(&self.dir.join(format!("{}.out", p.port)), 8));
                s.push_str(&tail(&self.dir.join(format!("{log}-{}.log", p.port)), 12));
            }
        }
        s
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for p in self.sentinels.iter_mut().chain(self.data.iter_mut()) {
            if let Some(mut child) = p.child.take() {
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

/// Runs one command on one process over a fresh connection with timeouts.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let mut conn = redis::Client::open(url(port))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .map_err(|e| format!("{port}: connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|_| conn.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| format!("{port}: {e}"))?;
    cmd.query(&mut conn).map_err(|e| format!("{port}: {e}"))
}

/// The first element of `ROLE` (`master` / `slave`).
fn role(port: u16) -> Result<String, String> {
    let v: Vec<redis::Value> = query(port, &redis::cmd("ROLE"))?;
    v.first()
        .ok_or_else(|| format!("{port}: empty ROLE"))
        .and_then(|r| redis::from_redis_value(r).map_err(|e| format!("{port}: ROLE {v:?}: {e}")))
}

/// Ok when `port` is a replica of `primary` with its link up.
fn replica_link(port: u16, primary: u16) -> Result<(), String> {
    let info: String = query(port, redis::cmd("INFO").arg("replication"))?;
    let field = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .unwrap_or("")
    };
    let (r, mp, link) = (
        field("role"),
        field("master_port"),
        field("master_link_status"),
    );
    if r == "slave" && mp == primary.to_string() && link == "up" {
        Ok(())
    } else {
        Err(format!("{port}: role {r} master_port {mp:?} master_link_status {link:?} (want replica of {primary}, up)"))
    }
}

fn pairs(flat: Vec<String>) -> Vec<(String, String)> {
    flat.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
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
