//! The driver: real processes (Redis: one server, Sentinel or a cluster;
//! three `sse-scale` instances in Redis mode, the flag from Unleash where
//! the run flips it; the shipped HAProxy or nginx file in front), clients
//! that stream through the balancer and resume like `EventSource`,
//! publishers that post through the balancer and directly to instances,
//! and the nemesis carrying out the seed's schedule. It returns the logs
//! the checker reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::balancer::Balancer;
use crate::link::Link;
use crate::log::*;
use crate::nemesis::{self, Fault, Kind};
use crate::redis_cluster::RedisCluster;
use crate::redis_sentinel::RedisSentinel;
use crate::redis_server::RedisServer;
use crate::support::{parse_block, Server};
use crate::unleash::{self, Unleash};

pub const INSTANCES: [&str; 3] = ["app1", "app2", "app3"];
/// `REPLAY_MAX_BYTES` of every instance (the default, said explicitly so
/// the checker knows which resumes are past it).
pub const REPLAY_MAX_BYTES: usize = 4 << 20;
/// A stream that brings nothing, not even a heartbeat (every second), for
/// this long is taken for dead and reopened.
const IDLE: Duration = Duration::from_secs(10);
/// What a stall fault sends to the stalled client's session: events of
/// [`BURST_PAD`] bytes, one every [`BURST_PACE`], at most [`BURST_BYTES`].
/// Between the server and a client that does not read sit the server's
/// send buffer, HAProxy's buffers and its send buffer to the client, and
/// the client's receive buffer: up to about 8.5 MB on this kernel (4 MB
/// send buffers, grown as the stream carries more). Only past that does the
/// server's write block, and only a write blocked for
/// `SSE_WRITE_TIMEOUT_SECS` gets the stream cut. Flooding that much costs
/// the debug-built fleet more than the rest of the run together, so the
/// flood is kept at this size: the stalled client comes back far behind
/// the others and reads its backlog, and whether the server cut it is
/// reported (`stalled clients cut by the server`).
const BURST_PAD: usize = 32_000;
const BURST_PACE: Duration = Duration::from_millis(100);
const BURST_BYTES: usize = 3_000_000;

/// The skews a seed draws from: none, and a clock behind or ahead by about
/// the catch-up's margin (2 s) and past it.
const SKEWS: [i64; 5] = [0, -1_500, 1_500, -3_000, 3_000];

#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub secs: u64,
    pub sessions: usize,
    pub clients_per_session: usize,
    pub publishers_per_session: usize,
    /// Mean pause between two publishes of one publisher.
    pub pace_ms: u64,
    /// The fault kinds the schedule draws from.
    pub kinds: Vec<Kind>,
    /// The balancer in front, with its shipped cookie-affinity file.
    pub front: Front,
    /// What the instances use as Redis.
    pub store: Store,
    /// How far the last instance's wall clock is off, in ms (it runs
    /// under libfaketime); the others run on the machine's clock.
    pub skew_ms: i64,
}

/// The Redis of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// One `redis-server` with an append-only file.
    Single,
    /// A primary and a replica behind three sentinels.
    Sentinel,
    /// Three primaries with a replica each.
    Cluster,
}

impl Store {
    pub fn parse(name: &str) -> Option<Store> {
        match name.trim() {
            "single" => Some(Store::Single),
            "sentinel" => Some(Store::Sentinel),
            "cluster" => Some(Store::Cluster),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Store::Single => "single",
            Store::Sentinel => "sentinel",
            Store::Cluster => "cluster",
        }
    }

    /// The fault kinds a run over this store draws from.
    pub fn kinds(self) -> Vec<Kind> {
        match self {
            Store::Single => nemesis::SINGLE_KINDS.to_vec(),
            Store::Sentinel => nemesis::SENTINEL_KINDS.to_vec(),
            Store::Cluster => nemesis::CLUSTER_KINDS.to_vec(),
        }
    }
}

/// The balancer of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// `lb-config/haproxy/haproxy.cfg`.
    Haproxy,
    /// `lb-config/nginx/cookie-map.conf.template`.
    Nginx,
}

impl Front {
    pub fn parse(name: &str) -> Option<Front> {
        match name.trim() {
            "haproxy" => Some(Front::Haproxy),
            "nginx" => Some(Front::Nginx),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Front::Haproxy => "haproxy",
            Front::Nginx => "nginx",
        }
    }
}

impl Config {
    pub fn new(seed: u64, secs: u64) -> Config {
        let store = match (seed / 2) % 3 {
            0 => Store::Sentinel,
            1 => Store::Single,
            _ => Store::Cluster,
        };
        Config {
            seed,
            secs,
            sessions: 4,
            clients_per_session: 3,
            publishers_per_session: 2,
            // 4 sessions x 2 publishers at ~8/s: ~65 publishes/s in all.
            pace_ms: 120,
            kinds: store.kinds(),
            // Each seed runs behind one balancer and over one store, so a
            // fixed and a random seed together cover all of them over time.
            front: if seed % 2 == 0 {
                Front::Haproxy
            } else {
                Front::Nginx
            },
            store,
            skew_ms: SKEWS[((seed / 6) % SKEWS.len() as u64) as usize],
        }
    }

    pub fn clients(&self) -> usize {
        self.sessions * self.clients_per_session
    }

    pub fn client_name(&self, c: usize) -> String {
        format!(
            "s{}c{}",
            c / self.clients_per_session,
            c % self.clients_per_session
        )
    }
}

/// The environment of instance `name` on `port` (0: any), with `services`,
/// the variables that name its Redis (and Unleash).
fn instance_env(services: &[(String, String)], name: &str, port: u16) -> Vec<(String, String)> {
    let replay = REPLAY_MAX_BYTES.to_string();
    let mut env: Vec<(String, String)> = services.to_vec();
    env.extend(
        [
            ("INSTANCE_ID", name),
            ("FF_REDIS_SSE_BROADCAST", "true"),
            ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
            ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
            ("RATE_LIMIT_SESSIONS_PER_MIN", "0"),
            ("SSE_RETRY_MS", "300"),
            ("SSE_HEARTBEAT_SECS", "1"),
            ("SSE_WRITE_TIMEOUT_SECS", "2"),
            ("SHUTDOWN_UNREADY_SECS", "2"),
            ("SHUTDOWN_DRAIN_SECS", "1"),
            ("SHUTDOWN_GRACE_SECS", "10"),
            ("REPLAY_MAX_BYTES", &replay),
            ("PORT", &port.to_string()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    env
}

/// `services` for instance `i`: with links, its `REDIS_URL` is its link;
/// the last instance's wall clock is `skew_ms` off (libfaketime; its
/// monotonic clock is left alone).
fn instance_services(
    services: &[(String, String)],
    links: &[Link],
    skew_ms: i64,
    i: usize,
) -> Vec<(String, String)> {
    let mut env = services.to_vec();
    if let Some(link) = links.get(i) {
        for (k, v) in &mut env {
            if k == "REDIS_URL" {
                *v = format!("redis://127.0.0.1:{}/", link.port);
            }
        }
    }
    if skew_ms != 0 && i == INSTANCES.len() - 1 {
        env.extend([
            ("LD_PRELOAD".to_owned(), faketime_lib()),
            (
                "FAKETIME".to_owned(),
                format!("{:+.3}s", skew_ms as f64 / 1000.0),
            ),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ]);
    }
    env
}

/// libfaketime's multithreaded library (Debian's `faketime` package,
/// which `tests/run-all.sh` installs).
fn faketime_lib() -> String {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .chain([std::path::PathBuf::from(
            "/usr/lib/faketime/libfaketimeMT.so.1",
        )])
        .find(|p| p.exists());
    found
        .unwrap_or_else(|| panic!("libfaketimeMT.so.1 not found: install the faketime package"))
        .display()
        .to_string()
}

/// Starts an instance, retrying while its port is still held by the
/// process it replaces (or the start otherwise fails).
fn start_instance(services: &[(String, String)], name: &str, port: u16) -> Server {
    let env = instance_env(services, name, port);
    let mut last = String::new();
    for _ in 0..20 {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        match std::panic::catch_unwind(|| Server::start(&env)) {
            Ok(s) => return s,
            Err(e) => {
                last = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    panic!("{name} did not start on port {port}: {last}");
}

/// The Redis processes of a run.
enum Redis {
    Single(RedisServer),
    Sentinel(RedisSentinel),
    Cluster(RedisCluster),
}

impl Redis {
    /// URLs of the servers that take writes now.
    fn primary_urls(&self) -> Vec<String> {
        match self {
            Redis::Single(r) => vec![r.url()],
            Redis::Sentinel(s) => vec![format!("redis://127.0.0.1:{}/", s.primary_port())],
            Redis::Cluster(c) => c
                .primaries()
                .into_iter()
                .map(|p| format!("redis://127.0.0.1:{p}/"))
                .collect(),
        }
    }

    fn single(&mut self) -> &mut RedisServer {
        match self {
            Redis::Single(r) => r,
            _ => panic!("a fault of one redis-server planned over another store"),
        }
    }

    fn cluster(&mut self) -> &mut RedisCluster {
        match self {
            Redis::Cluster(c) => c,
            _ => panic!("a cluster fault planned over another store"),
        }
    }

    /// Kills a primary (in a cluster, the `pick`th by port), waits until
    /// its replica took over, and returns the dead one's port.
    fn fail_over(&mut self, pick: usize) -> u16 {
        match self {
            Redis::Sentinel(s) => {
                let old = s.kill_primary();
                s.wait_failover(old, Duration::from_secs(30));
                old
            }
            Redis::Cluster(c) => {
                let primaries = c.primaries();
                let old = primaries[pick % primaries.len()];
                c.kill(old);
                c.wait_promoted(old, Duration::from_secs(30));
                old
            }
            Redis::Single(_) => panic!("a failover planned over one redis-server"),
        }
    }

    /// Kills a cluster primary and its replica: the cluster is down.
    /// Returns their ports.
    fn shard_down(&mut self, pick: usize) -> (u16, u16) {
        let c = self.cluster();
        let primaries = c.primaries();
        let primary = primaries[pick % primaries.len()];
        let replica = c.replica_of(primary).expect("every primary has a replica");
        c.kill(replica);
        c.kill(primary);
        (primary, replica)
    }

    /// Starts the nodes [`Redis::shard_down`] killed, primary first.
    fn shard_up(&mut self, (primary, replica): (u16, u16)) {
        let c = self.cluster();
        c.restart(primary);
        c.restart(replica);
    }

    /// Starts a node [`Redis::fail_over`] killed; it rejoins as a replica.
    fn rejoin(&mut self, port: u16) {
        match self {
            Redis::Sentinel(s) => s.restart(port),
            Redis::Cluster(c) => c.restart(port),
            Redis::Single(_) => panic!("a failover planned over one redis-server"),
        }
    }
}

/// The processes of one run.
struct Fleet {
    clock: Clock,
    redis: Arc<Mutex<Redis>>,
    /// The variables that name Redis (and Unleash) to an instance.
    services: Vec<(String, String)>,
    /// The flag's source, for runs that flip it.
    unleash: Option<Unleash>,
    /// Each instance's link to a single Redis (none otherwise).
    links: Vec<Link>,
    /// See [`Config::skew_ms`].
    skew_ms: i64,
    /// The balancer's link to each instance.
    lb_links: Vec<Link>,
    instances: Vec<Arc<Mutex<Option<Server>>>>,
    ports: Vec<u16>,
    addrs: Vec<String>,
    lb: Balancer,
    /// Where the instances' logs go, each process's appended when it
    /// stops.
    dir: PathBuf,
}

impl Fleet {
    async fn start(cfg: &Config, flips: bool, clock: Clock) -> Fleet {
        let (seed, front, store, skew_ms) = (cfg.seed, cfg.front, cfg.store, cfg.skew_ms);
        let dir = std::env::temp_dir().join(format!("sse-chaos-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let redis = tokio::task::spawn_blocking(move || match store {
            Store::Single => Redis::Single(RedisServer::start_persistent()),
            Store::Sentinel => Redis::Sentinel(RedisSentinel::start("chaos")),
            Store::Cluster => Redis::Cluster(RedisCluster::start()),
        })
        .await
        .unwrap();
        let mut services: Vec<(String, String)> = match &redis {
            Redis::Single(r) => vec![("REDIS_URL".into(), r.url())],
            Redis::Sentinel(s) => vec![
                ("REDIS_SENTINEL_NODES".into(), s.sentinel_urls()),
                ("REDIS_SENTINEL_MASTER".into(), s.master_name().to_owned()),
            ],
            Redis::Cluster(c) => vec![("REDIS_CLUSTER_NODES".into(), c.seed_urls())],
        };
        // The flag follows Unleash, polled every second, as operators run
        // a flip; `FF_REDIS_SSE_BROADCAST=true` is only its value until
        // Unleash first answers.
        let unleash = if flips {
            let u = Unleash::start().await;
            u.flags(&["create"]).await;
            u.flags(&["rollout", "100"]).await;
            u.flags(&["on"]).await;
            services.extend([
                ("UNLEASH_URL".to_owned(), u.api_url()),
                (
                    "UNLEASH_API_TOKEN".to_owned(),
                    unleash::CLIENT_TOKEN.to_owned(),
                ),
                ("UNLEASH_REFRESH_SECS".to_owned(), "1".to_owned()),
            ]);
            Some(u)
        } else {
            None
        };
        // Over one server, each instance reaches Redis through a link of
        // its own, which a partition cuts.
        let mut links = Vec::new();
        if let Redis::Single(r) = &redis {
            for _ in INSTANCES {
                links.push(Link::start(r.port).await);
            }
        }
        let mut instances = Vec::new();
        let mut ports = Vec::new();
        let mut addrs = Vec::new();
        for (i, name) in INSTANCES.into_iter().enumerate() {
            let env = instance_services(&services, &links, skew_ms, i);
            let s = tokio::task::spawn_blocking(move || start_instance(&env, name, 0))
                .await
                .unwrap();
            ports.push(s.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
            addrs.push(s.addr.clone());
            instances.push(Arc::new(Mutex::new(Some(s))));
        }
        if unleash.is_some() {
            for addr in &addrs {
                let follows = crate::support::eventually(Duration::from_secs(15), || async {
                    flag_state(addr).await == json!({ "enabled": true, "source": "unleash" })
                })
                .await;
                assert!(
                    follows,
                    "{addr} does not follow Unleash: {}",
                    flag_state(addr).await
                );
            }
        }
        // The balancer reaches each instance through a link of its own,
        // which an `lb-partition` cuts.
        let mut lb_links = Vec::new();
        for port in &ports {
            lb_links.push(Link::start(*port).await);
        }
        let fronted: Vec<String> = lb_links
            .iter()
            .map(|l| format!("127.0.0.1:{}", l.port))
            .collect();
        let apps = [
            fronted[0].as_str(),
            fronted[1].as_str(),
            fronted[2].as_str(),
        ];
        let lb = match front {
            Front::Haproxy => Balancer::haproxy("haproxy/haproxy.cfg", &apps, &[]).await,
            Front::Nginx => Balancer::nginx("nginx/cookie-map.conf.template", &apps).await,
        };
        Fleet {
            clock,
            redis: Arc::new(Mutex::new(redis)),
            services,
            unleash,
            links,
            skew_ms,
            lb_links,
            instances,
            ports,
            addrs,
            lb,
            dir,
        }
    }

    fn save_log(dir: &Path, name: &str, server: &Server, clock: &Clock) {
        use std::io::Write;
        let text = server.log.lock().unwrap().clone();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
        {
            let _ = writeln!(
                f,
                "=== process {} stopped at run +{} ms",
                server.pid(),
                clock.now()
            );
            let _ = f.write_all(text.as_bytes());
        }
    }

    /// SIGKILL (Kill) or SIGTERM-and-wait (Term) instance `i`.
    async fn stop_instance(&self, i: usize, kind: Kind) {
        let slot = self.instances[i].clone();
        let dir = self.dir.clone();
        let clock = self.clock.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = slot.lock().unwrap();
            let Some(mut server) = guard.take() else {
                return;
            };
            if kind == Kind::Term {
                server.signal("TERM");
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = server.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Fleet::save_log(&dir, INSTANCES[i], &server, &clock);
            // Dropping kills (SIGKILL) whatever still runs.
            drop(server);
        })
        .await
        .unwrap();
    }

    async fn start_instance(&self, i: usize) {
        let slot = self.instances[i].clone();
        let env = instance_services(&self.services, &self.links, self.skew_ms, i);
        let port = self.ports[i];
        tokio::task::spawn_blocking(move || {
            let server = start_instance(&env, INSTANCES[i], port);
            *slot.lock().unwrap() = Some(server);
        })
        .await
        .unwrap();
    }

    /// Runs `f` on the Redis processes (blocking calls, off the runtime).
    async fn redis<T: Send + 'static, F: FnOnce(&mut Redis) -> T + Send + 'static>(
        &self,
        f: F,
    ) -> T {
        let redis = self.redis.clone();
        tokio::task::spawn_blocking(move || f(&mut redis.lock().unwrap()))
            .await
            .unwrap()
    }

    fn save_all_logs(&self) {
        for (i, slot) in self.instances.iter().enumerate() {
            if let Some(s) = slot.lock().unwrap().as_ref() {
                Fleet::save_log(&self.dir, INSTANCES[i], s, &self.clock);
            }
        }
        let _ = std::fs::write(self.dir.join("balancer.log"), self.lb.log());
    }
}

/// The flag as instance `addr` reports it (`/stats`).
async fn flag_state(addr: &str) -> Value {
    match crate::support::client()
        .get(format!("http://{addr}/stats"))
        .bearer_auth(crate::support::ADMIN)
        .send()
        .await
    {
        Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null)["flag"]["state"].clone(),
        Err(_) => Value::Null,
    }
}

/// One client: its log, and the switch the nemesis uses to stall it.
struct Client {
    log: Arc<Mutex<ClientLog>>,
    /// While set, the client does not read its stream until this time.
    stall_until: Arc<Mutex<Option<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Session {
    id: String,
    token: String,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Reads a stream like `EventSource`: sends `Last-Event-ID` (the last
/// `id:` of any block, so a `connected` or a `reset` moves it too),
/// reconnects after the `retry:` hint, keeps the balancer's cookies as a
/// browser does. Unlike `EventSource` it also reconnects after a non-200
/// answer (as the browser module does once `EventSource` gives up), and it
/// takes a stream silent for [`IDLE`] for dead.
#[allow(clippy::too_many_arguments)] // one client's identity, spelt out
async fn run_client(
    base: String,
    session: usize,
    client: usize,
    sid: String,
    token: String,
    clock: Clock,
    log: Arc<Mutex<ClientLog>>,
    stall_until: Arc<Mutex<Option<u64>>>,
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = format!("{base}/sessions/{sid}/events?token={token}");
    let mut last_id: Option<Id> = None;
    let mut retry = Duration::from_millis(300);
    let mut cookies: BTreeMap<String, String> = BTreeMap::new();
    {
        let mut l = log.lock().unwrap();
        l.session = session;
        l.client = client;
    }
    while !stop.is_cancelled() {
        let mut req = http.get(&url).header("accept", "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("last-event-id", show(id));
        }
        if !cookies.is_empty() {
            let jar: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header(COOKIE, jar.join("; "));
        }
        let opened = clock.now();
        let idx = {
            let mut l = log.lock().unwrap();
            l.conns.push(Conn {
                opened,
                last_event_id: last_id,
                status: Err("pending".into()),
                instance: None,
                connected_at: None,
                connected_id: None,
                items: Vec::new(),
                closed: None,
                end: None,
                stalled: false,
            });
            l.conns.len() - 1
        };
        let set = |f: &mut dyn FnMut(&mut Conn)| f(&mut log.lock().unwrap().conns[idx]);
        let res = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), req.send()) => r,
            () = stop.cancelled() => {
                set(&mut |c| { c.status = Err("stopped".into()); c.closed = Some(clock.now()); c.end = Some(End::Stopped); });
                return;
            }
        };
        let res = match res {
            Ok(Ok(res)) => res,
            Ok(Err(e)) => {
                let e = error_kind(&e);
                set(&mut |c| {
                    c.status = Err(e.clone());
                    c.closed = Some(clock.now());
                });
                tokio::time::sleep(retry).await;
                continue;
            }
            Err(_) => {
                set(&mut |c| {
                    c.status = Err("no answer within 10 s".into());
                    c.closed = Some(clock.now());
                });
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        let status = res.status().as_u16();
        set(&mut |c| c.status = Ok(status));
        for v in res.headers().get_all(SET_COOKIE) {
            if let Some((k, v)) = v
                .to_str()
                .ok()
                .and_then(|c| c.split(';').next())
                .and_then(|kv| kv.split_once('='))
            {
                cookies.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        if status != 200 {
            let _ = tokio::time::timeout(Duration::from_secs(2), res.bytes()).await;
            set(&mut |c| c.closed = Some(clock.now()));
            tokio::time::sleep(retry.max(Duration::from_millis(500))).await;
            continue;
        }
        let mut body = res.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let end = loop {
            // A stalled client does not read: what the server sends piles
            // up in the socket buffers until the server gives up on it.
            let until = *stall_until.lock().unwrap();
            if let Some(until) = until {
                let now = clock.now();
                if now < until {
                    set(&mut |c| c.stalled = true);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(until - now)) => {}
                        () = stop.cancelled() => break End::Stopped,
                    }
                    continue;
                }
            }
            let chunk = tokio::select! {
                c = tokio::time::timeout(IDLE, body.next()) => c,
                () = stop.cancelled() => break End::Stopped,
            };
            let chunk = match chunk {
                Err(_) => break End::Idle,
                Ok(None) => break End::Eof,
                Ok(Some(Err(e))) => break End::Error(format!("{e}")),
                Ok(Some(Ok(chunk))) => chunk,
            };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = find_block_end(&buf) {
                let raw: Vec<u8> = buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&raw);
                let block = parse_block(text.trim_end_matches('\n'));
                let t = clock.now();
                if let Some(ms) = block.retry {
                    retry = Duration::from_millis(ms);
                }
                if let Some(id) = &block.id {
                    last_id = if id.is_empty() {
                        None
                    } else {
                        Some(parse_id(id))
                    };
                }
                let data: Value = block
                    .data
                    .as_deref()
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or(Value::Null);
                let id = block.id.as_deref().filter(|i| !i.is_empty()).map(parse_id);
                match block.event.as_deref() {
                    None => {}
                    Some("connected") => set(&mut |c| {
                        c.connected_at = Some(t);
                        c.connected_id = id;
                        c.instance = data["instance_id"].as_str().map(str::to_owned);
                    }),
                    Some("reset") => {
                        let item = Item {
                            t,
                            kind: ItemKind::Reset {
                                id: id.unwrap_or((0, 0)),
                                reason: data["reason"].as_str().map(str::to_owned),
                                late_id: data["late_id"].as_str().map(parse_id),
                                data: block.data.clone().unwrap_or_default(),
                            },
                        };
                        set(&mut |c| c.items.push(item.clone()));
                    }
                    Some(_) => {
                        let label = data["l"].as_str().unwrap_or("?").to_owned();
                        let item = Item {
                            t,
                            kind: ItemKind::Event {
                                id: id.unwrap_or((0, 0)),
                                label,
                            },
                        };
                        set(&mut |c| c.items.push(item.clone()));
                    }
                }
            }
        };
        let stopped = end == End::Stopped;
        set(&mut |c| {
            c.closed = Some(clock.now());
            c.end = Some(end.clone());
        });
        if stopped {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}

/// A request that got no answer, by why: the report counts them.
fn error_kind(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connect error".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else {
        "no answer".into()
    }
}

fn find_block_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

/// Publishes one event and records the answer.
#[allow(clippy::too_many_arguments)]
async fn publish_one(
    http: &reqwest::Client,
    clock: &Clock,
    base: &str,
    target: &str,
    session: usize,
    s: &Session,
    publisher: &str,
    label: String,
    pad: usize,
) -> Publish {
    let data = if pad > 0 {
        json!({ "l": label, "pad": "x".repeat(pad) })
    } else {
        json!({ "l": label })
    };
    let body = json!({ "type": "c", "data": data });
    // What a stream carries: `id: <ms>-<seq>`, `event: c`, the data line.
    let bytes = data.to_string().len() + 48;
    let sent = clock.now();
    let res = http
        .post(format!("{base}/sessions/{}/events", s.id))
        .bearer_auth(&s.token)
        .json(&body)
        .send()
        .await;
    let (status, id, instance) = match res {
        Err(e) => (Err(error_kind(&e)), None, None),
        Ok(res) => {
            let status = res.status().as_u16();
            let instance = res
                .headers()
                .get("x-instance-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body: Value = res.json().await.unwrap_or(Value::Null);
            let id = if status == 202 {
                body["id"].as_str().map(parse_id)
            } else {
                None
            };
            (Ok(status), id, instance)
        }
    };
    Publish {
        session,
        publisher: publisher.to_owned(),
        label,
        target: target.to_owned(),
        sent,
        done: clock.now(),
        status,
        id,
        instance,
        bytes,
    }
}

/// Everything a run recorded, plus where the instances' logs are.
pub struct Outcome {
    pub log: RunLog,
    pub dir: PathBuf,
    pub wall: Duration,
}

pub async fn run(cfg: &Config) -> Outcome {
    let began = std::time::Instant::now();
    let flips = cfg.kinds.iter().any(|k| k.changes_flag());
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let faults = nemesis::schedule(
        &mut rng,
        cfg.secs,
        INSTANCES.len(),
        cfg.clients(),
        &cfg.kinds,
    );
    let instance_names: Vec<String> = INSTANCES.iter().map(|s| s.to_string()).collect();
    let client_names: Vec<String> = (0..cfg.clients()).map(|c| cfg.client_name(c)).collect();
    let schedule = nemesis::describe(&faults, &instance_names, &client_names);
    println!(
        "chaos seed {}: {} s behind {} over Redis {}, flag {}, {}'s clock {:+} ms, {} sessions x {} clients, {} publishers per session; schedule:\n{schedule}",
        cfg.seed, cfg.secs, cfg.front.name(), cfg.store.name(),
        if flips { "from Unleash" } else { "on" },
        INSTANCES[INSTANCES.len() - 1], cfg.skew_ms,
        cfg.sessions, cfg.clients_per_session, cfg.publishers_per_session
    );

    let clock = Clock::new();
    let fleet = Arc::new(Fleet::start(cfg, flips, clock.clone()).await);
    let base = format!("http://{}", fleet.lb.addr);
    let setup = http();
    let mut sessions = Vec::new();
    for _ in 0..cfg.sessions {
        let res = setup.post(format!("{base}/sessions")).send().await.unwrap();
        assert_eq!(res.status(), 201, "create a session");
        let body: Value = res.json().await.unwrap();
        sessions.push(Session {
            id: body["id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        });
    }
    let sessions = Arc::new(sessions);

    // Clients first, so each is connected before the first publish.
    let stop_clients = CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..cfg.clients() {
        let (s, k) = (c / cfg.clients_per_session, c % cfg.clients_per_session);
        let log = Arc::new(Mutex::new(ClientLog::default()));
        let stall_until = Arc::new(Mutex::new(None));
        let task = tokio::spawn(run_client(
            base.clone(),
            s,
            k,
            sessions[s].id.clone(),
            sessions[s].token.clone(),
            clock.clone(),
            log.clone(),
            stall_until.clone(),
            stop_clients.clone(),
        ));
        clients.push(Client {
            log,
            stall_until,
            task,
        });
    }
    let connected = crate::support::eventually(Duration::from_secs(20), || {
        let all = clients
            .iter()
            .all(|c| c.log.lock().unwrap().conns.iter().any(Conn::ok));
        async move { all }
    })
    .await;
    assert!(connected, "not every client connected");

    let publishes: Arc<Mutex<Vec<Publish>>> = Arc::new(Mutex::new(Vec::new()));
    let stop_publishers = CancellationToken::new();
    let mut publisher_tasks = Vec::new();
    let targets: Vec<(String, String)> = std::iter::once(("lb".to_owned(), base.clone()))
        .chain(
            fleet
                .addrs
                .iter()
                .enumerate()
                .map(|(i, a)| (INSTANCES[i].to_owned(), format!("http://{a}"))),
        )
        .collect();
    for s in 0..cfg.sessions {
        for p in 0..cfg.publishers_per_session {
            // Each publisher draws from a generator of its own, so its
            // choices do not depend on how the tasks interleave.
            let mut prng =
                StdRng::seed_from_u64(cfg.seed ^ (0x9e37_79b9 * (1 + s * 16 + p) as u64));
            let (clock, sessions, publishes, stop) = (
                clock.clone(),
                sessions.clone(),
                publishes.clone(),
                stop_publishers.clone(),
            );
            let targets = targets.clone();
            let pace = cfg.pace_ms;
            publisher_tasks.push(tokio::spawn(async move {
                let http = http();
                let name = format!("p{p}");
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    // Half through the balancer, half to one instance.
                    let (target, url) = if prng.gen_bool(0.5) {
                        &targets[0]
                    } else {
                        &targets[prng.gen_range(1..targets.len())]
                    };
                    let label = format!("s{s}{name}-{n}");
                    n += 1;
                    let rec =
                        publish_one(&http, &clock, url, target, s, &sessions[s], &name, label, 0)
                            .await;
                    publishes.lock().unwrap().push(rec);
                    let pause = prng.gen_range(pace / 2..=pace * 3 / 2);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(pause)) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }));
        }
    }

    // The nemesis: each fault waits for its moment and for its target.
    let records: Arc<Mutex<Vec<FaultRecord>>> = Arc::new(Mutex::new(Vec::new()));
    let instance_locks: Vec<Arc<tokio::sync::Mutex<()>>> = (0..INSTANCES.len())
        .map(|_| Arc::new(tokio::sync::Mutex::new(())))
        .collect();
    let redis_lock = Arc::new(tokio::sync::Mutex::new(()));
    let flag_lock = Arc::new(tokio::sync::Mutex::new(()));
    let down = Arc::new(Semaphore::new(nemesis::MAX_INSTANCES_DOWN));
    let stall_switches: Vec<Arc<Mutex<Option<u64>>>> =
        clients.iter().map(|c| c.stall_until.clone()).collect();
    let mut fault_tasks = Vec::new();
    for fault in faults.clone() {
        let fleet = fleet.clone();
        let records = records.clone();
        let clock = clock.clone();
        let lock = match fault.kind {
            Kind::Kill | Kind::Term | Kind::Partition | Kind::Latency | Kind::LbPartition => {
                instance_locks[fault.target].clone()
            }
            Kind::Stall => Arc::new(tokio::sync::Mutex::new(())),
            Kind::FlagFlip | Kind::FlagRollout => flag_lock.clone(),
            _ => redis_lock.clone(),
        };
        let down = down.clone();
        let stall = stall_switches.get(fault.target).cloned();
        let sessions = sessions.clone();
        let publishes = publishes.clone();
        let base = base.clone();
        let cpp = cfg.clients_per_session;
        let name = match fault.kind {
            Kind::Kill | Kind::Term | Kind::Partition | Kind::Latency | Kind::LbPartition => {
                INSTANCES[fault.target].to_owned()
            }
            Kind::Stall => client_names[fault.target].clone(),
            Kind::FlagFlip | Kind::FlagRollout => "unleash".to_owned(),
            _ => "redis".to_owned(),
        };
        fault_tasks.push(tokio::spawn(async move {
            let wait = fault.at.saturating_sub(clock.now());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let _target = lock.lock().await;
            let _permit = if fault.kind.stops_instance() {
                Some(down.acquire().await.unwrap())
            } else {
                None
            };
            let (start, repaired, target) = inject(
                &fleet, &fault, stall, &sessions, &publishes, &base, cpp, name,
            )
            .await;
            records.lock().unwrap().push(FaultRecord {
                index: fault.index,
                kind: fault.kind,
                target,
                start,
                repaired,
            });
        }));
    }

    tokio::time::sleep(Duration::from_millis(
        (cfg.secs * 1000).saturating_sub(clock.now()),
    ))
    .await;
    stop_publishers.cancel();
    for t in publisher_tasks {
        t.await.unwrap();
    }
    for t in fault_tasks {
        t.await.expect("a fault task failed");
    }

    // Quiet end: every process is back; one marker per session from each
    // instance, which every client is owed; then wait until every client
    // has it (or a reset past it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let http_m = http();
    let mut markers: Vec<(usize, Id)> = Vec::new();
    for (s, session) in sessions.iter().enumerate() {
        for (i, (target, url)) in targets.iter().enumerate().skip(1) {
            let mut tries = 0;
            loop {
                let label = format!("s{s}marker-{i}-{tries}");
                let rec =
                    publish_one(&http_m, &clock, url, target, s, session, "marker", label, 0).await;
                let id = rec.id;
                publishes.lock().unwrap().push(rec);
                if let Some(id) = id {
                    markers.push((s, id));
                    break;
                }
                tries += 1;
                assert!(
                    tries < 40,
                    "instance {target} refuses publishes after the run"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let settled = {
        let logs: Vec<Arc<Mutex<ClientLog>>> = clients.iter().map(|c| c.log.clone()).collect();
        let accepted: Vec<Publish> = publishes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.publisher == "marker" && p.accepted())
            .cloned()
            .collect();
        crate::support::eventually(Duration::from_secs(30), || {
            let done = logs.iter().all(|l| {
                let l = l.lock().unwrap();
                accepted.iter().filter(|m| m.session == l.session).all(|m| {
                    l.conns
                        .iter()
                        .flat_map(|c| &c.items)
                        .any(|it| match &it.kind {
                            ItemKind::Event { label, .. } => *label == m.label,
                            ItemKind::Reset { id, .. } => Some(*id) >= m.id,
                        })
                })
            });
            async move { done }
        })
        .await
    };
    if !settled {
        println!(
            "chaos seed {}: not every client had the markers after 30 s",
            cfg.seed
        );
    }
    // A repeat would arrive right behind.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_clients.cancel();
    for c in &mut clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut c.task).await;
    }
    // Context for whoever reads a failure; the checker never sees these.
    let mut counters = Vec::new();
    for (i, addr) in fleet.addrs.iter().enumerate() {
        let stats: Value = match crate::support::client()
            .get(format!("http://{addr}/stats"))
            .bearer_auth(crate::support::ADMIN)
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let r = &stats["redis"];
        counters.push(format!(
            "{}: stalled_writes_cut {} slow_consumers_cut {} resets {} order_resets {} \
             covered_by_reset {} outbox_reassigned {} outbox_dropped {} history_lost {}",
            INSTANCES[i],
            stats["stalled_writes_cut"],
            stats["slow_consumers_cut"],
            stats["resets"],
            stats["order_resets"],
            stats["covered_by_reset"],
            r["outbox_reassigned"],
            r["outbox_dropped"],
            r["history_lost"]
        ));
    }
    println!(
        "chaos seed {}: server counters since each instance's last start (context only):\n  {}",
        cfg.seed,
        counters.join("\n  ")
    );
    fleet.save_all_logs();

    let mut faults_done = records.lock().unwrap().clone();
    faults_done.sort_by_key(|f| f.index);
    let log = RunLog {
        seed: cfg.seed,
        schedule,
        clients: clients
            .iter()
            .map(|c| c.log.lock().unwrap().clone())
            .collect(),
        publishes: publishes.lock().unwrap().clone(),
        faults: faults_done,
        replay_max_bytes: REPLAY_MAX_BYTES,
        sessions: cfg.sessions,
    };
    let dir = fleet.dir.clone();
    drop(clients);
    // The fleet's processes stop here (every Arc is gone once the tasks
    // are).
    drop(fleet);
    Outcome {
        log,
        dir,
        wall: began.elapsed(),
    }
}

/// Carries out one fault; returns when it was injected, when it was
/// repaired, and the target as the report names it.
#[allow(clippy::too_many_arguments)]
async fn inject(
    fleet: &Fleet,
    fault: &Fault,
    stall: Option<Arc<Mutex<Option<u64>>>>,
    sessions: &Arc<Vec<Session>>,
    publishes: &Arc<Mutex<Vec<Publish>>>,
    base: &str,
    clients_per_session: usize,
    name: String,
) -> (u64, u64, String) {
    let clock = &fleet.clock;
    let dur = Duration::from_millis(fault.dur);
    match fault.kind {
        Kind::Kill | Kind::Term => {
            let start = clock.now();
            fleet.stop_instance(fault.target, fault.kind).await;
            tokio::time::sleep(dur).await;
            fleet.start_instance(fault.target).await;
            (start, clock.now(), name)
        }
        Kind::Latency => {
            let link = &fleet.links[fault.target];
            let ms = nemesis::latency_ms(fault.index);
            let start = clock.now();
            link.set_delay(Duration::from_millis(ms));
            tokio::time::sleep(dur).await;
            link.set_delay(Duration::ZERO);
            (start, clock.now(), format!("{name} (+{ms} ms)"))
        }
        Kind::Partition | Kind::LbPartition => {
            let link = if fault.kind == Kind::Partition {
                &fleet.links[fault.target]
            } else {
                &fleet.lb_links[fault.target]
            };
            let start = clock.now();
            link.cut();
            tokio::time::sleep(dur).await;
            link.restore();
            (start, clock.now(), name)
        }
        Kind::RedisLose => {
            let start = clock.now();
            fleet
                .redis(|r| {
                    let r = r.single();
                    r.stop();
                    r.wipe();
                })
                .await;
            tokio::time::sleep(dur).await;
            fleet.redis(|r| r.single().restart()).await;
            (start, clock.now(), name)
        }
        Kind::RedisKeep => {
            let start = clock.now();
            fleet.redis(|r| r.single().shutdown()).await;
            tokio::time::sleep(dur).await;
            fleet.redis(|r| r.single().restart()).await;
            (start, clock.now(), name)
        }
        Kind::RedisHang => {
            let start = clock.now();
            fleet.redis(|r| r.single().pause()).await;
            tokio::time::sleep(dur).await;
            fleet.redis(|r| r.single().resume()).await;
            (start, clock.now(), name)
        }
        Kind::Failover => {
            let start = clock.now();
            let pick = fault.index;
            let old = fleet.redis(move |r| r.fail_over(pick)).await;
            // Repaired for the clients once a primary takes writes again;
            // the old one rejoins (as a replica) after the duration.
            let promoted = clock.now();
            tokio::time::sleep(dur).await;
            fleet.redis(move |r| r.rejoin(old)).await;
            (start, promoted, format!("{name} (port {old})"))
        }
        Kind::ShardDown => {
            let start = clock.now();
            let pick = fault.index;
            let shard = fleet.redis(move |r| r.shard_down(pick)).await;
            tokio::time::sleep(dur).await;
            fleet.redis(move |r| r.shard_up(shard)).await;
            (
                start,
                clock.now(),
                format!("{name} (ports {} and {})", shard.0, shard.1),
            )
        }
        Kind::SlotMove => {
            let session = sessions[fault.target % sessions.len()].id.clone();
            let start = clock.now();
            let moved = fleet
                .redis(move |r| {
                    let c = r.cluster();
                    let slot = c.slot_of(&format!("sse:session:{{{session}}}:history"));
                    let from = c.owner_of_slot(slot);
                    let primaries = c.primaries();
                    let to = primaries
                        .iter()
                        .copied()
                        .find(|&p| p != from)
                        .expect("another primary");
                    c.move_slot(slot, to);
                    format!("slot {slot} {from} -> {to}")
                })
                .await;
            (start, clock.now(), format!("{name} ({moved})"))
        }
        Kind::PubsubKill => {
            let urls = fleet.redis(|r| r.primary_urls()).await;
            let start = clock.now();
            let killed = tokio::task::spawn_blocking(move || -> Result<i64, String> {
                let mut killed = 0;
                for url in urls {
                    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
                    let mut c = client
                        .get_connection_with_timeout(Duration::from_secs(2))
                        .map_err(|e| e.to_string())?;
                    c.set_read_timeout(Some(Duration::from_secs(2)))
                        .map_err(|e| e.to_string())?;
                    killed += redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("pubsub")
                        .query::<i64>(&mut c)
                        .map_err(|e| e.to_string())?;
                }
                Ok(killed)
            })
            .await
            .unwrap();
            let what = match killed {
                Ok(n) => format!("{name} ({n} conns)"),
                Err(e) => format!("{name} (failed: {e})"),
            };
            (start, start, what)
        }
        Kind::FlagFlip | Kind::FlagRollout => {
            let unleash = fleet.unleash.as_ref().expect("a flag change needs Unleash");
            let (change, back): (&[&str], &[&str]) = if fault.kind == Kind::FlagFlip {
                (&["off"], &["on"])
            } else {
                (&["rollout", "50"], &["rollout", "100"])
            };
            let start = clock.now();
            unleash.flags(change).await;
            tokio::time::sleep(dur).await;
            unleash.flags(back).await;
            (start, clock.now(), name)
        }
        Kind::Stall => {
            let stall = stall.expect("a stall names a client");
            let start = clock.now();
            let until = start + fault.dur;
            *stall.lock().unwrap() = Some(until);
            // Large events to the stalled client's session through the
            // balancer, so its socket buffers fill and the server cuts it.
            let s = fault.target / clients_per_session;
            let http = http();
            let mut sent = 0;
            let mut n = 0;
            while sent < BURST_BYTES && clock.now() + 150 < until {
                let label = format!("s{s}burst{}-{n}", fault.index);
                n += 1;
                let rec = publish_one(
                    &http,
                    clock,
                    base,
                    "lb",
                    s,
                    &sessions[s],
                    "burst",
                    label,
                    BURST_PAD,
                )
                .await;
                if rec.accepted() {
                    sent += rec.bytes;
                }
                publishes.lock().unwrap().push(rec);
                tokio::time::sleep(BURST_PACE).await;
            }
            let left = until.saturating_sub(clock.now());
            tokio::time::sleep(Duration::from_millis(left)).await;
            *stall.lock().unwrap() = None;
            (start, clock.now(), name)
        }
    }
}
