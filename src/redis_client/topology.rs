//! Where the shared client connects — one server, a Redis Cluster, or the
//! primary that Sentinel names — and [`Conn`], the one connection type the
//! rest of the toolkit uses for all three.
//!
//! Everything above this file sends commands through [`Conn`] and never
//! asks which topology it is on, with two exceptions that are about the
//! wire, not about routing: a cluster's keys carry a hash tag per session
//! and its session channels are sharded (`SPUBLISH`/`SSUBSCRIBE`), see
//! `broker/redis`.

use std::str::FromStr;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};

use super::{redact_url, InvalidRedisUrl, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

/// Where Redis is, as configured (`REDIS_URL`, `REDIS_CLUSTER_NODES`, or
/// `REDIS_SENTINEL_NODES` with `REDIS_SENTINEL_MASTER`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Topology {
    /// One server.
    Single(String),
    /// A Redis Cluster, found from these seed nodes.
    Cluster(Vec<String>),
    /// The primary that these sentinels name for `master`, followed across
    /// failovers. Credentials, database and TLS in the sentinel URLs also
    /// apply to the primary.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// Which kind of [`Topology`], for `/stats` and the few wire differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TopologyKind {
    Single,
    Cluster,
    Sentinel,
}

/// The Redis settings do not make one topology.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{variable}: {message}")]
#[non_exhaustive]
pub struct TopologyError {
    /// The environment variable to fix.
    pub variable: &'static str,
    pub message: String,
}

impl Topology {
    /// The topology the settings name, as the environment variables
    /// `REDIS_URL`, `REDIS_CLUSTER_NODES`, `REDIS_SENTINEL_NODES` and
    /// `REDIS_SENTINEL_MASTER` carry them (empty counts as unset). At most
    /// one of the first three; `None` when none is set.
    pub fn from_settings(
        url: Option<&str>,
        cluster: Option<&str>,
        sentinels: Option<&str>,
        master: Option<&str>,
    ) -> Result<Option<Topology>, TopologyError> {
        fn set(v: Option<&str>) -> Option<&str> {
            v.map(str::trim).filter(|v| !v.is_empty())
        }
        let (url, cluster, sentinels, master) =
            (set(url), set(cluster), set(sentinels), set(master));
        let named: Vec<&str> = [
            ("REDIS_URL", url),
            ("REDIS_CLUSTER_NODES", cluster),
            ("REDIS_SENTINEL_NODES", sentinels),
        ]
        .iter()
        .filter_map(|(name, v)| v.map(|_| *name))
        .collect();
        if named.len() > 1 {
            return Err(TopologyError {
                variable: named[1],
                message: format!(
                    "set only one of REDIS_URL, REDIS_CLUSTER_NODES and REDIS_SENTINEL_NODES (found {})",
                    named.join(" and ")
                ),
            });
        }
        let error = |variable, e: InvalidRedisUrl| TopologyError {
            variable,
            message: e.to_string(),
        };
        if master.is_some() && sentinels.is_none() {
            return Err(TopologyError {
                variable: "REDIS_SENTINEL_MASTER",
                message: "only means something with REDIS_SENTINEL_NODES".into(),
            });
        }
        if let Some(url) = url {
            ConnectionInfo::from_str(url)
                .map_err(|e| error("REDIS_URL", InvalidRedisUrl(e.to_string())))?;
            return Ok(Some(Topology::Single(url.to_owned())));
        }
        if let Some(list) = cluster {
            let nodes = Self::parse_nodes(list).map_err(|e| error("REDIS_CLUSTER_NODES", e))?;
            return Ok(Some(Topology::Cluster(nodes)));
        }
        if let Some(list) = sentinels {
            let sentinels =
                Self::parse_nodes(list).map_err(|e| error("REDIS_SENTINEL_NODES", e))?;
            let master = master.ok_or(TopologyError {
                variable: "REDIS_SENTINEL_MASTER",
                message: "the name the sentinels monitor the primary under is needed with REDIS_SENTINEL_NODES".into(),
            })?;
            return Ok(Some(Topology::Sentinel {
                sentinels,
                master: master.to_owned(),
            }));
        }
        Ok(None)
    }

    /// The environment variable this topology came from.
    pub fn variable(&self) -> &'static str {
        match self {
            Topology::Single(_) => "REDIS_URL",
            Topology::Cluster(_) => "REDIS_CLUSTER_NODES",
            Topology::Sentinel { .. } => "REDIS_SENTINEL_NODES",
        }
    }

    /// A comma-separated list of node URLs, as `REDIS_CLUSTER_NODES` and
    /// `REDIS_SENTINEL_NODES` take them; each must parse.
    pub fn parse_nodes(list: &str) -> Result<Vec<String>, InvalidRedisUrl> {
        let nodes: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(InvalidRedisUrl("no node URL in the list".into()));
        }
        for node in &nodes {
            ConnectionInfo::from_str(node)
                .map_err(|e| InvalidRedisUrl(format!("{}: {e}", redact_url(node))))?;
        }
        Ok(nodes)
    }

    pub fn kind(&self) -> TopologyKind {
        match self {
            Topology::Single(_) => TopologyKind::Single,
            Topology::Cluster(_) => TopologyKind::Cluster,
            Topology::Sentinel { .. } => TopologyKind::Sentinel,
        }
    }

    /// For logs: the URLs with passwords masked.
    pub fn display(&self) -> String {
        let list = |nodes: &[String]| {
            nodes
                .iter()
                .map(|n| redact_url(n))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Topology::Single(url) => redact_url(url),
            Topology::Cluster(nodes) => format!("cluster {}", list(nodes)),
            Topology::Sentinel { sentinels, master } => {
                format!("sentinel {} master {master}", list(sentinels))
            }
        }
    }
}

/// One connection to whichever topology; cheap to clone (every clone shares
/// the same sockets). In a cluster each command goes to the node that owns
/// its key's slot, following `MOVED` and failovers.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The configured clients of one topology.
pub(super) enum Backend {
    Single(redis::Client),
    Cluster {
        client: ClusterClient,
        nodes: Vec<String>,
    },
    /// Asking the sentinels takes `&mut`; one question at a time.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
        // Reconnect quickly after an outage: 50 ms doubling, at most 2 s.
        .set_exponent_base(2)
        .set_factor(50)
        .set_max_delay(2000)
        .set_number_of_retries(3)
}

fn invalid(e: redis::RedisError) -> InvalidRedisUrl {
    InvalidRedisUrl(e.to_string())
}

impl Backend {
    pub(super) fn open(topology: &Topology) -> Result<Self, InvalidRedisUrl> {
        Ok(match topology {
            Topology::Single(url) => {
                Backend::Single(redis::Client::open(url.as_str()).map_err(invalid)?)
            }
            Topology::Cluster(nodes) if nodes.is_empty() => {
                return Err(InvalidRedisUrl("no cluster node URL".into()))
            }
            Topology::Cluster(nodes) => Backend::Cluster {
                client: ClusterClient::builder(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(3)
                    .build()
                    .map_err(invalid)?,
                nodes: nodes.clone(),
            },
            Topology::Sentinel { sentinels, master } => {
                let Some(first) = sentinels.first() else {
                    return Err(InvalidRedisUrl("no sentinel URL".into()));
                };
                let first = ConnectionInfo::from_str(first).map_err(invalid)?;
                let tls_mode = match first.addr {
                    ConnectionAddr::TcpTls { insecure, .. } => Some(if insecure {
                        redis::TlsMode::Insecure
                    } else {
                        redis::TlsMode::Secure
                    }),
                    _ => None,
                };
                let node = SentinelNodeConnectionInfo {
                    tls_mode,
                    redis_connection_info: Some(first.redis),
                };
                let client = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )
                .map_err(invalid)?;
                Backend::Sentinel(tokio::sync::Mutex::new(client))
            }
        })
    }

    /// Opens the command connection; with Sentinel, to the primary it names
    /// now. Also returns that primary's address, to notice a failover.
    pub(super) async fn connect(&self) -> RedisResult<(Conn, Option<String>)> {
        match self {
            Backend::Single(client) => Ok((
                Conn::Single(
                    ConnectionManager::new_with_config(client.clone(), manager_config()).await?,
                ),
                None,
            )),
            Backend::Cluster { client, .. } => {
                Ok((Conn::Cluster(client.get_async_connection().await?), None))
            }
            Backend::Sentinel(_) => {
                let client = self.primary().await?;
                let addr = client.get_connection_info().addr.to_string();
                let conn = ConnectionManager::new_with_config(client, manager_config()).await?;
                Ok((Conn::Single(conn), Some(addr)))
            }
        }
    }

    /// With Sentinel: a client for the primary the sentinels name now.
    async fn primary(&self) -> RedisResult<redis::Client> {
        let Backend::Sentinel(sentinel) = self else {
            unreachable!("primary() is asked of a Sentinel backend only");
        };
        let mut sentinel = sentinel.lock().await;
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, sentinel.async_get_client()).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "no sentinel answered in time",
            ))),
        }
    }

    /// With Sentinel, the address of the primary it names now; `None` for
    /// the other topologies (nothing to follow).
    pub(super) async fn primary_addr(&self) -> Option<RedisResult<String>> {
        match self {
            Backend::Sentinel(_) => Some(
                self.primary()
                    .await
                    .map(|c| c.get_connection_info().addr.to_string()),
            ),
            _ => None,
        }
    }

    /// A dedicated connection for classic (not sharded) Pub/Sub. A
    /// cluster forwards a `PUBLISH` to every node, so any node will do.
    pub(super) async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match self {
            Backend::Single(client) => client.get_async_pubsub().await,
            Backend::Sentinel(_) => self.primary().await?.get_async_pubsub().await,
            Backend::Cluster { nodes, .. } => {
                let mut last = None;
                for node in nodes {
                    let attempt =
                        async { redis::Client::open(node.as_str())?.get_async_pubsub().await };
                    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                        Ok(Ok(pubsub)) => return Ok(pubsub),
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => {}
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::IoError, "no cluster node answered"))
                }))
            }
        }
    }

    /// A cluster connection in RESP3 whose pushes (messages of sharded
    /// channels, subscription changes, disconnections) go to `pushes`.
    /// `None` outside a cluster.
    pub(super) async fn sharded_pubsub(
        &self,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Option<RedisResult<ClusterConnection>> {
        let Backend::Cluster { nodes, .. } = self else {
            return None;
        };
        let connect = async {
            ClusterClient::builder(nodes.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(3)
                .build()?
                .get_async_connection()
                .await
        };
        Some(connect.await)
    }
}
