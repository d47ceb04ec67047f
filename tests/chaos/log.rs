//! What a chaos run records, and nothing else: the clients' own logs (one
//! entry per connection, with what it sent and what arrived), the
//! publishers' answers, and when each fault was injected and undone. The
//! checker judges the run from these alone; it never asks a server.

use std::sync::Arc;
use std::time::Instant;

pub use crate::support::judge::{parse_id, show, Id};

/// Milliseconds since the run began; every record uses this one clock.
#[derive(Clone)]
pub struct Clock(Arc<Instant>);

impl Clock {
    pub fn new() -> Clock {
        Clock(Arc::new(Instant::now()))
    }

    pub fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// A sequence part at or above this marks an id the publishing process
/// made up itself because Redis did not answer (docs/delivery.md, "Ids and
/// positions"): the event went to that instance's outbox.
pub const LOCAL_SEQ: u64 = 1 << 46;

pub fn is_local(id: Id) -> bool {
    id.1 >= LOCAL_SEQ
}

/// One block that moves a client's position.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemKind {
    /// An event the client received: its id and the publisher's label.
    Event { id: Id, label: String },
    /// A `reset`: the id it carries (where the client stands after it) and
    /// its data as sent.
    Reset {
        id: Id,
        reason: Option<String>,
        late_id: Option<Id>,
        data: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub t: u64,
    pub kind: ItemKind,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The server (or the balancer) closed it.
    Eof,
    /// A read failed (reset by peer, ...).
    Error(String),
    /// Nothing, not even a heartbeat, arrived for this long.
    Idle,
    /// The run was over.
    Stopped,
}

/// One attempt to open the stream, and what it delivered.
#[derive(Debug, Clone)]
pub struct Conn {
    pub opened: u64,
    /// The `Last-Event-ID` header sent, if any.
    pub last_event_id: Option<Id>,
    /// The HTTP status, or the error when no answer came.
    pub status: Result<u16, String>,
    /// From `connected`: the instance and the position it named.
    pub instance: Option<String>,
    pub connected_at: Option<u64>,
    pub connected_id: Option<Id>,
    pub items: Vec<Item>,
    pub closed: Option<u64>,
    pub end: Option<End>,
    /// The client had stopped reading (a nemesis fault) while this
    /// connection was open.
    pub stalled: bool,
}

impl Conn {
    pub fn ok(&self) -> bool {
        self.connected_id.is_some()
    }
}

/// Everything one client saw, connection by connection.
#[derive(Debug, Clone, Default)]
pub struct ClientLog {
    pub session: usize,
    pub client: usize,
    pub conns: Vec<Conn>,
}

impl ClientLog {
    pub fn name(&self) -> String {
        format!("s{}c{}", self.session, self.client)
    }
}

/// One publish request and its answer.
#[derive(Debug, Clone)]
pub struct Publish {
    pub session: usize,
    /// Who published: `p<n>` for the steady publishers, `burst` for the
    /// large events of a stall fault, `marker` for the end of the run.
    pub publisher: String,
    pub label: String,
    /// `lb` or the instance name it was sent to directly.
    pub target: String,
    pub sent: u64,
    pub done: u64,
    /// The status, or the error when no answer came.
    pub status: Result<u16, String>,
    /// From a 202: the id and the instance that answered (`X-Instance-Id`).
    pub id: Option<Id>,
    pub instance: Option<String>,
    /// Encoded bytes of the event as a stream carries it (for the replay
    /// cap).
    pub bytes: usize,
}

impl Publish {
    pub fn accepted(&self) -> bool {
        self.status == Ok(202) && self.id.is_some()
    }
}

/// A fault as it was carried out (times on the run's clock).
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// Index in the printed schedule.
    pub index: usize,
    pub kind: crate::nemesis::Kind,
    /// `app2`, `redis`, `s1c0`.
    pub target: String,
    /// The fault was injected.
    pub start: u64,
    /// The repair was done: the instance listens again, Redis answers,
    /// the client reads again (equal to `start` for instant faults).
    pub repaired: u64,
}

/// Everything the checker reads.
#[derive(Debug, Clone, Default)]
pub struct RunLog {
    pub seed: u64,
    pub schedule: String,
    pub clients: Vec<ClientLog>,
    pub publishes: Vec<Publish>,
    pub faults: Vec<FaultRecord>,
    /// `REPLAY_MAX_BYTES` the instances run with.
    pub replay_max_bytes: usize,
    pub sessions: usize,
}
