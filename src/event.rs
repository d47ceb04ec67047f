//! Event values shared by every broadcaster: session ids, event types, event
//! ids, and the encoded [`Frame`] that subscribers receive.
//!
//! Everything that arrives from outside (a path segment, a JSON body) is
//! validated here once, so the broadcasters and the SSE encoder can trust
//! what they are handed.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The bytes a payload's `data:` lines take on the wire: what a size limit
/// on events should count (a payload of many short lines grows by a `data: `
/// prefix per line).
pub use crate::sse::data_len;

/// Longest session id accepted. Ids end up in Redis channel names and log
/// lines, so they are kept short and printable.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// Longest event type accepted.
pub const MAX_EVENT_TYPE_LEN: usize = 64;

/// Why a value from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    #[error("session id must be 1-{MAX_SESSION_ID_LEN} characters of [A-Za-z0-9_-]")]
    SessionId,
    #[error(
        "event type must be 1-{MAX_EVENT_TYPE_LEN} printable characters without ':', CR or LF"
    )]
    EventType,
    #[error("event id must look like <milliseconds>-<sequence>")]
    EventId,
    #[error(
        "event types connected, reset and heartbeat are the stream's own, open and error are \
         EventSource's, and * is a client's wildcard; publish under another name"
    )]
    ReservedEventType,
}

/// Event types nothing from outside may publish ([`EventType::is_reserved`]):
///
/// - the stream's own: the `connected` that opens it, the `reset` that
///   replaces a replay, and the `heartbeat` an `EventSource` can see (see
///   [`SseStream::heartbeat_events`](crate::SseStream::heartbeat_events)).
///   A client takes them for the protocol's;
/// - `open` and `error`, the names of `EventSource`'s own events: a server
///   event under either reaches the page's `onopen`/`onerror` and passes for
///   a connection that opened or failed (an `error` event made the browser
///   client reconnect before it, and replay it, forever);
/// - `*`, which the browser client's `on('*')` takes as "every event".
///
/// `message`, the type of an event sent without `event:`, stays allowed:
/// `event: message` is exactly what an unnamed event is.
pub const RESERVED_EVENT_TYPES: [&str; 6] =
    ["connected", "reset", "heartbeat", "open", "error", "*"];

/// The id of one SSE session: the unit of subscription and of publishing.
///
/// Cheap to clone (a shared `str`), because every subscriber and every
/// in-flight publish holds one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(Arc<str>);

impl SessionId {
    /// Validates `raw` and wraps it.
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_SESSION_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(InvalidInput::SessionId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

/// An SSE event type (`event:` line). Rejects CR, LF and `:` so a caller can
/// never inject extra fields into the stream.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventType(Arc<str>);

impl EventType {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_EVENT_TYPE_LEN
            && raw.chars().all(|c| !c.is_control() && c != ':');
        if ok {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(InvalidInput::EventType)
        }
    }

    /// For the fixed event types of the reference routes; panics on a bad
    /// literal, which is a programming error caught by the first test run.
    pub fn from_static(raw: &'static str) -> Self {
        match Self::parse(raw) {
            Ok(t) => t,
            Err(_) => panic!("invalid static event type {raw:?}"),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// One of [`RESERVED_EVENT_TYPES`]: a publish from outside under it
    /// would pass for the stream's own event.
    pub fn is_reserved(&self) -> bool {
        RESERVED_EVENT_TYPES.contains(&self.as_str())
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventType({})", self.0)
    }
}

/// The id of one published event: `<milliseconds>-<sequence>`, the same shape
/// as a Redis Stream entry id.
///
/// Ids increase in publish order. Clients treat them as opaque strings (they
/// come back in `Last-Event-ID`); the server parses them to compare.
///
/// **One id names one event.** Ids come from two places that never hand
/// out the same id:
/// - the session's **sequence** in Redis (the publish script, and the
///   reservation a flag-off publish makes while Redis answers): a sequence
///   number below [`LOCAL_SEQ_BASE`], one counter per session;
/// - this process's [`IdGenerator`], when there is no Redis to ask (local
///   mode, an outage): a sequence number at or above [`LOCAL_SEQ_BASE`] that
///   carries a tag drawn at random when the process starts, so two
///   processes' local ids differ even in the same millisecond.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

/// Sequence numbers from here up are local ids ([`IdGenerator`]); below it,
/// ids from a session's sequence in Redis. `2^46`: far above any count of
/// events in one millisecond, and every id stays exact in the 53 bits of a
/// Lua number, which the publish script computes with.
pub const LOCAL_SEQ_BASE: u64 = 1 << 46;

/// How far ahead of this instance's clock an id may be and still have come
/// from an instance (clocks differ a little; floors run ahead by a few ms).
pub const FUTURE_MARGIN_MS: u64 = 60_000;

/// Bits of a local id's sequence that hold its process's tag.
const TAG_BITS: u32 = 24;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(itoa::Buffer::new().format(self.ms))?;
        f.write_str("-")?;
        f.write_str(itoa::Buffer::new().format(self.seq))
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

impl EventId {
    /// The start of every session: a position before any event.
    pub const ZERO: EventId = EventId { ms: 0, seq: 0 };

    /// Appends `<ms>-<seq>` to `out`: what every event's `id:` line and
    /// every publish's response hold, without a formatter.
    pub fn write_to(self, out: &mut impl bytes::BufMut) {
        out.put_slice(itoa::Buffer::new().format(self.ms).as_bytes());
        out.put_u8(b'-');
        out.put_slice(itoa::Buffer::new().format(self.seq).as_bytes());
    }

    /// The smallest id greater than this one, if there is one. Used for
    /// inclusive range starts, so a client-supplied id at the very top of
    /// the range (`<u64::MAX>-<u64::MAX>`) never becomes an invalid query.
    pub fn successor(self) -> Option<EventId> {
        match (self.ms, self.seq) {
            (ms, seq) if seq < u64::MAX => Some(EventId { ms, seq: seq + 1 }),
            (ms, _) if ms < u64::MAX => Some(EventId { ms: ms + 1, seq: 0 }),
            _ => None,
        }
    }

    /// The id just before this one (`None` for `0-0`): a `reset` to it
    /// stands for everything before this event and not for the event.
    pub fn predecessor(self) -> Option<EventId> {
        match (self.ms, self.seq) {
            (ms, seq) if seq > 0 => Some(EventId { ms, seq: seq - 1 }),
            (ms, _) if ms > 0 => Some(EventId {
                ms: ms - 1,
                seq: u64::MAX,
            }),
            _ => None,
        }
    }

    /// Whether an id could have been given out by now: its time is not
    /// more than [`FUTURE_MARGIN_MS`] ahead of this clock. A client's id
    /// that is not was made up (or came from a clock far off), and nothing
    /// may be positioned there: every real event would sort below it.
    pub fn is_plausible(self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.ms <= now.saturating_add(FUTURE_MARGIN_MS)
    }

    /// Whether this id came from a process's [`IdGenerator`] rather than a
    /// session's sequence in Redis.
    pub fn is_local(self) -> bool {
        self.seq >= LOCAL_SEQ_BASE
    }

    /// The smallest sequence id (not a local one) greater than this one:
    /// what the publish script computes, in Rust for its tests.
    pub fn next_sequenced(self) -> EventId {
        if self.seq + 1 < LOCAL_SEQ_BASE {
            EventId {
                ms: self.ms,
                seq: self.seq + 1,
            }
        } else {
            EventId {
                ms: self.ms.saturating_add(1),
                seq: 0,
            }
        }
    }
}

impl FromStr for EventId {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(InvalidInput::EventId)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| InvalidInput::EventId)?,
            seq: seq.parse().map_err(|_| InvalidInput::EventId)?,
        })
    }
}

/// Bits of a packed clock reading that hold the count within one
/// millisecond.
const SEQ_BITS: u32 = 22;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// Hands out increasing [`EventId`]s without a lock: this process's local
/// ids, and the floor its publishes ask a session's sequence for.
///
/// Both come from one clock reading: the wall-clock millisecond and a count
/// within it, packed in one `u64` (42 bits of milliseconds last until the
/// year 2109). If the clock steps backwards, readings keep increasing from
/// the last one. A local id is `<ms>-<LOCAL_SEQ_BASE + count · 2^24 + tag>`;
/// a floor is `<ms>-<count · 2^24 + tag>`, above every id this process issued
/// or saw. Floors carry the tag too: a session's sequence hands a floor out
/// as the event's id when it is past the sequence, and a sequence that Redis
/// lost (restarted empty, keys deleted) would otherwise give two processes'
/// publishes of one millisecond the same id.
#[derive(Debug)]
pub struct IdGenerator {
    last: AtomicU64,
    /// The newest millisecond in which a local id was issued or seen: a
    /// floor must pass every local id of it, which sort after the sequence
    /// ids of their millisecond.
    local_ms: AtomicU64,
    tag: u64,
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::with_tag(rand::random::<u64>())
    }
}

impl IdGenerator {
    /// A generator with a random tag.
    pub fn new() -> Self {
        Self::default()
    }

    /// A generator whose local ids carry `tag` (its low 24 bits).
    pub fn with_tag(tag: u64) -> Self {
        Self {
            last: AtomicU64::new(0),
            local_ms: AtomicU64::new(0),
            tag: tag & TAG_MASK,
        }
    }

    /// The next clock reading, packed.
    fn advance(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let floor = now << SEQ_BITS;
        let mut cur = self.last.load(Ordering::Relaxed);
        loop {
            let next = floor.max(cur + 1);
            match self
                .last
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    /// A local id: greater than every id this process issued or saw, and
    /// different from any id of another process or of a session's sequence.
    pub fn next_id(&self) -> EventId {
        let packed = self.advance();
        let ms = packed >> SEQ_BITS;
        self.local_ms.fetch_max(ms, Ordering::Relaxed);
        EventId {
            ms,
            seq: LOCAL_SEQ_BASE + ((packed & SEQ_MASK) << TAG_BITS) + self.tag,
        }
    }

    /// Whether `id` is a local id of this process (its tag; another
    /// process's local ids carry the same tag about once in sixteen
    /// million).
    pub fn issued(&self, id: EventId) -> bool {
        id.is_local() && (id.seq - LOCAL_SEQ_BASE) & TAG_MASK == self.tag
    }

    /// A sequence id greater than every id this process issued or saw: what
    /// a publish asks a session's sequence for, so this instance's clients
    /// never see ids go backwards.
    pub fn floor(&self) -> EventId {
        let packed = self.advance();
        let ms = packed >> SEQ_BITS;
        let local_ms = self.local_ms.load(Ordering::Relaxed);
        if ms <= local_ms {
            // A local id of this millisecond sorts after its sequence ids:
            // the floor is the next millisecond, and later readings pass it.
            self.last
                .fetch_max((local_ms + 1) << SEQ_BITS, Ordering::Relaxed);
            return EventId {
                ms: local_ms + 1,
                seq: self.tag,
            };
        }
        EventId {
            ms,
            seq: ((packed & SEQ_MASK) << TAG_BITS) + self.tag,
        }
    }

    /// Makes every later id and floor greater than `id` (an id this process
    /// has seen from elsewhere, such as Redis), so a client never sees ids
    /// go backwards when events from both sources reach it.
    pub fn observe(&self, id: EventId) {
        let count = if id.is_local() {
            self.local_ms.fetch_max(id.ms, Ordering::Relaxed);
            (id.seq - LOCAL_SEQ_BASE) >> TAG_BITS
        } else {
            id.seq >> TAG_BITS
        };
        let count = count.min(SEQ_MASK);
        self.last
            .fetch_max((id.ms << SEQ_BITS) | count, Ordering::Relaxed);
    }
}

/// An event on its way to subscribers, before it has an id.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutgoingEvent {
    pub event_type: EventType,
    /// The `data:` payload: JSON text, sent as given.
    pub data: String,
}

impl OutgoingEvent {
    pub fn new(event_type: EventType, data: impl Into<String>) -> Self {
        Self {
            event_type,
            data: data.into(),
        }
    }

    /// Serialises `data` as JSON. Serialising a `serde_json::Value` or a
    /// plain struct cannot fail, so the error case is not surfaced.
    pub fn json(event_type: EventType, data: &impl serde::Serialize) -> Self {
        let data = serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned());
        Self::new(event_type, data)
    }
}

/// One event as every subscriber receives it: its id and its SSE wire bytes,
/// encoded once and shared.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: EventId,
    pub bytes: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_predecessor_is_the_id_just_before() {
        let id = |ms, seq| EventId { ms, seq };
        assert_eq!(id(5, 3).predecessor(), Some(id(5, 2)));
        assert_eq!(id(5, 0).predecessor(), Some(id(4, u64::MAX)));
        assert_eq!(EventId::ZERO.predecessor(), None);
        for x in [id(5, 3), id(5, 0), id(1, u64::MAX)] {
            let p = x.predecessor().unwrap();
            assert!(p < x && p.successor() == Some(x));
        }
    }

    #[test]
    fn event_type_rejects_field_injection() {
        assert!(EventType::parse("stage_start").is_ok());
        assert_eq!(EventType::parse("a\nb"), Err(InvalidInput::EventType));
        assert_eq!(EventType::parse("a\rb"), Err(InvalidInput::EventType));
        assert_eq!(EventType::parse("data:x"), Err(InvalidInput::EventType));
        assert_eq!(EventType::parse(""), Err(InvalidInput::EventType));
        assert!(EventType::parse(&"x".repeat(MAX_EVENT_TYPE_LEN + 1)).is_err());
    }

    #[test]
    fn reserved_event_types_are_refused_by_name_and_named_in_the_error() {
        for name in RESERVED_EVENT_TYPES {
            let ty = EventType::parse(name).expect("a valid type, refused as reserved");
            assert!(ty.is_reserved(), "{name}");
            assert!(
                InvalidInput::ReservedEventType.to_string().contains(name),
                "the error names {name}"
            );
        }
        for name in ["message", "Error", "open_x", "**", "chat_message"] {
            assert!(!EventType::parse(name).unwrap().is_reserved(), "{name}");
        }
    }

    #[test]
    fn session_id_is_restricted() {
        assert!(SessionId::parse("abc-DEF_123").is_ok());
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse("a b").is_err());
        assert!(SessionId::parse("a*").is_err());
        assert!(SessionId::parse(&"a".repeat(MAX_SESSION_ID_LEN + 1)).is_err());
    }

    #[test]
    fn ids_increase_and_round_trip() {
        let g = IdGenerator::new();
        let mut prev = g.next_id();
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > prev, "{id} after {prev}");
            assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
            prev = id;
        }
        assert!("12".parse::<EventId>().is_err());
        let top = EventId {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        assert_eq!(top.successor(), None);
        assert_eq!(
            EventId {
                ms: 3,
                seq: u64::MAX
            }
            .successor(),
            Some(EventId { ms: 4, seq: 0 })
        );
        assert!("a-1".parse::<EventId>().is_err());
    }

    #[test]
    fn an_id_is_written_as_it_is_displayed() {
        for id in [
            EventId::ZERO,
            EventId {
                ms: 1_733_000_000_123,
                seq: 7,
            },
            EventId {
                ms: u64::MAX,
                seq: u64::MAX,
            },
        ] {
            let mut out = Vec::new();
            id.write_to(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), id.to_string());
            assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        }
        assert_eq!(EventId { ms: 5, seq: 1 }.to_string(), "5-1");
    }

    #[test]
    fn a_process_knows_its_own_local_ids_and_no_other_id() {
        let (a, b) = (IdGenerator::with_tag(1), IdGenerator::with_tag(2));
        let (x, y) = (a.next_id(), b.next_id());
        assert!(a.issued(x) && !a.issued(y) && b.issued(y) && !b.issued(x));
        // Floors carry the tag too, but are sequence ids: anyone's.
        assert!(!a.issued(a.floor()));
        assert!(!a.issued(EventId { ms: 5, seq: 1 }));
    }

    #[test]
    fn local_ids_of_two_processes_and_sequence_ids_never_meet() {
        let (a, b) = (IdGenerator::with_tag(1), IdGenerator::with_tag(2));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (x, y) = (a.next_id(), b.next_id());
            let (f, g) = (a.floor(), b.floor());
            assert!(x.is_local() && y.is_local() && !f.is_local() && !g.is_local());
            for id in [x, y, f, g] {
                assert!(seen.insert(id), "{id} twice");
            }
        }
        // A floor passes the local ids issued before it, even in the same
        // millisecond, and a later local id passes the floor.
        let local = a.next_id();
        let floor = a.floor();
        assert!(floor > local, "{floor} after {local}");
        assert!(a.next_id() > floor);
        // What the publish script computes past a local id.
        assert_eq!(
            local.next_sequenced(),
            EventId {
                ms: local.ms + 1,
                seq: 0
            }
        );
        assert_eq!(
            EventId { ms: 5, seq: 7 }.next_sequenced(),
            EventId { ms: 5, seq: 8 }
        );
        // An observed local id of another process raises both.
        let ahead = EventId {
            ms: local.ms + 60_000,
            seq: LOCAL_SEQ_BASE + (3 << TAG_BITS) + 9,
        };
        b.observe(ahead);
        assert!(b.next_id() > ahead);
        assert!(b.floor() > ahead);
    }

    #[test]
    fn observed_ids_raise_the_floor() {
        let g = IdGenerator::new();
        let ahead = EventId {
            ms: g.next_id().ms + 60_000,
            seq: 7,
        };
        g.observe(ahead);
        assert!(g.next_id() > ahead);
        assert!(g.floor() > ahead);
        // Observing an older id changes nothing.
        let before = g.next_id();
        g.observe(EventId { ms: 1, seq: 0 });
        assert!(g.next_id() > before);
    }
}
