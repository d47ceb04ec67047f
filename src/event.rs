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
}

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
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

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

/// Bits of a packed id that hold the sequence within one millisecond.
const SEQ_BITS: u32 = 22;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// Hands out increasing [`EventId`]s without a lock.
///
/// The id is the wall-clock millisecond and a sequence within it, packed in
/// one `u64` (42 bits of milliseconds last until the year 2109). If the clock
/// steps backwards, ids keep increasing from the last one handed out.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: AtomicU64,
}

impl IdGenerator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next_id(&self) -> EventId {
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
                Ok(_) => {
                    return EventId {
                        ms: next >> SEQ_BITS,
                        seq: next & SEQ_MASK,
                    }
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Makes every later id greater than `id` (an id this process has seen
    /// from elsewhere, such as Redis), so a client never sees ids go
    /// backwards when events from both sources reach it.
    pub fn observe(&self, id: EventId) {
        let packed = (id.ms << SEQ_BITS) | id.seq.min(SEQ_MASK);
        self.last.fetch_max(packed, Ordering::Relaxed);
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
    fn event_type_rejects_field_injection() {
        assert!(EventType::parse("stage_start").is_ok());
        assert_eq!(EventType::parse("a\nb"), Err(InvalidInput::EventType));
        assert_eq!(EventType::parse("a\rb"), Err(InvalidInput::EventType));
        assert_eq!(EventType::parse("data:x"), Err(InvalidInput::EventType));
        assert_eq!(EventType::parse(""), Err(InvalidInput::EventType));
        assert!(EventType::parse(&"x".repeat(MAX_EVENT_TYPE_LEN + 1)).is_err());
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
    fn observed_ids_raise_the_floor() {
        let g = IdGenerator::new();
        let ahead = EventId {
            ms: g.next_id().ms + 60_000,
            seq: 7,
        };
        g.observe(ahead);
        assert!(g.next_id() > ahead);
        // Observing an older id changes nothing.
        let before = g.next_id();
        g.observe(EventId { ms: 1, seq: 0 });
        assert!(g.next_id() > before);
    }
}
