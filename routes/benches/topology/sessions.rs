//! The sessions of a topology run. In a cluster each primary gets an equal
//! share of them, so the shards carry equal load and a per-node figure
//! compares like with like.

use std::sync::Arc;

use crate::backend::{channel, slot_map, Node};
use crate::support::server::BenchServer as Server;
use crate::support::sse_client::{create_session, Session};

/// Sessions created on `server`. In a cluster, each primary gets an equal
/// share (sessions landing on a primary that has its share are left
/// unused), so the shards carry equal load; returns each session's primary.
pub async fn sessions_for(
    http: &reqwest::Client,
    server: &Server,
    n: usize,
    nodes: &mut [Node],
    cluster: bool,
) -> (Vec<Arc<Session>>, Vec<u16>) {
    let mut sessions = Vec::new();
    let mut owners = Vec::new();
    if !cluster {
        for _ in 0..n {
            sessions.push(Arc::new(create_session(http, server.addr).await));
            owners.push(nodes[0].port);
        }
        return (sessions, owners);
    }
    let conn = &mut nodes[0].conn;
    let slots = slot_map(conn);
    let mut primaries: Vec<u16> = slots.iter().map(|r| r.2).collect();
    primaries.sort_unstable();
    primaries.dedup();
    let quota = |p: u16| {
        let i = primaries.iter().position(|&q| q == p).expect("a primary");
        n / primaries.len() + usize::from(i < n % primaries.len())
    };
    let mut tries = 0;
    while sessions.len() < n {
        tries += 1;
        assert!(
            tries < 20 * n + 100,
            "sessions did not spread over the primaries"
        );
        let s = create_session(http, server.addr).await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(channel(&s.id))
            .query(conn)
            .expect("CLUSTER KEYSLOT");
        let owner = slots
            .iter()
            .find(|r| r.0 <= slot && slot <= r.1)
            .map(|r| r.2)
            .expect("every slot is served");
        if owners.iter().filter(|&&o| o == owner).count() < quota(owner) {
            sessions.push(Arc::new(s));
            owners.push(owner);
        }
    }
    (sessions, owners)
}
