//! The versioned JSON envelope events travel in between instances:
//! `{"v":1,"node":"…","id":"…","type":"…","data":"…"}`, plus `"held":true`
//! on an event that waited in its publisher's outbox (its publisher's own
//! subscribers already have it).
//!
//! `data` is the event's payload as a JSON string (the payload is JSON text
//! itself, carried verbatim so the receiving instance sends exactly the bytes
//! the publisher was given). `node` names the publishing process, so it can
//! recognise and drop its own copy. Messages of another version, or that do
//! not parse, are reported as such and dropped by the caller; nothing here
//! panics on input.

use serde::{Deserialize, Serialize};

use crate::event::{EventId, EventType};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

#[derive(Debug, Serialize)]
struct Outgoing<'a> {
    v: u32,
    node: &'a str,
    id: String,
    #[serde(rename = "type")]
    event_type: &'a str,
    data: &'a str,
}

/// Encodes an envelope. (Per-session publishes are encoded by the publish
/// script inside Redis, in the same shape; see `publish.rs`.)
pub fn encode(node: &str, id: EventId, event_type: &EventType, data: &str) -> String {
    let env = Outgoing {
        v: VERSION,
        node,
        id: id.to_string(),
        event_type: event_type.as_str(),
        data,
    };
    // Serialising strings and integers cannot fail.
    serde_json::to_string(&env).unwrap_or_default()
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub node: String,
    pub id: EventId,
    pub event_type: EventType,
    pub data: String,
    /// Delivered by its publisher from the outbox, not live.
    pub held: bool,
}

/// Why a message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("envelope version {0:?} is not {VERSION}")]
    ForeignVersion(Option<u64>),
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

#[derive(Deserialize)]
struct Incoming {
    v: Option<serde_json::Value>,
    node: Option<String>,
    id: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    data: Option<String>,
    #[serde(default)]
    held: bool,
}

pub fn decode(payload: &[u8]) -> Result<Envelope, DecodeError> {
    let raw: Incoming =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let version = raw.v.as_ref().and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(VERSION)) {
        return Err(DecodeError::ForeignVersion(version));
    }
    let missing = |f: &str| DecodeError::Malformed(format!("missing {f}"));
    let node = raw.node.ok_or_else(|| missing("node"))?;
    let id = raw
        .id
        .ok_or_else(|| missing("id"))?
        .parse()
        .map_err(|_| DecodeError::Malformed("bad id".into()))?;
    let event_type = EventType::parse(&raw.event_type.ok_or_else(|| missing("type"))?)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let data = raw.data.ok_or_else(|| missing("data"))?;
    Ok(Envelope {
        node,
        id,
        event_type,
        data,
        held: raw.held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = EventId { ms: 7, seq: 3 };
        let ty = EventType::parse("stage_start").unwrap();
        let s = encode("node-1", id, &ty, "{\"a\":\"x\\ny\"}");
        let env = decode(s.as_bytes()).unwrap();
        assert_eq!(env.node, "node-1");
        assert_eq!(env.id, id);
        assert_eq!(env.event_type, ty);
        assert_eq!(env.data, "{\"a\":\"x\\ny\"}");
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"\xff\xfe",
            b"{\"v\":1}",
            b"{\"v\":1,\"node\":\"n\",\"id\":\"x\",\"type\":\"t\",\"data\":\"1\"}",
            b"{\"v\":1,\"node\":\"n\",\"id\":\"1-1\",\"type\":\"a\\nb\",\"data\":\"1\"}",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            decode(b"{\"v\":2,\"node\":\"n\"}"),
            Err(DecodeError::ForeignVersion(Some(2)))
        );
        assert_eq!(
            decode(b"{\"v\":\"1\"}"),
            Err(DecodeError::ForeignVersion(None))
        );
    }
}
