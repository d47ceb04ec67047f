//! The SSE wire encoder: WHATWG `text/event-stream` framing.
//!
//! An event becomes `id:`, `event:` and one `data:` line per line of its
//! payload, then a blank line. Payload lines are split on CR LF, CR and LF,
//! exactly the line ends the browser's parser recognises, so no payload can
//! end a field early or start a new one.
//!
//! axum ships an `Event` type of its own, but it builds the bytes per
//! response; this encoder runs once per publish and the result is shared by
//! every subscriber.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::event::{EventId, EventType, Frame};

/// The frame every subscriber of a published event receives: its id and
/// its wire bytes, encoded once. Every broker builds frames here and nowhere
/// else.
pub fn frame(id: EventId, event_type: &EventType, data: &str) -> Frame {
    Frame {
        id,
        bytes: encode_event(Some(id), event_type, data),
    }
}

/// An announcement to every session: no `id:` line, so it never moves a
/// client's `Last-Event-ID`. Its frame carries the id `0-0`, which no event
/// has; streams never take it for a repeat.
pub fn announcement(event_type: &EventType, data: &str) -> Frame {
    Frame {
        id: EventId::ZERO,
        bytes: encode_event(None, event_type, data),
    }
}

/// The `reset` a hub sends when an event of a session arrives after a newer
/// one (see [`crate::hub`]): it moves the client to `newest`, and says which
/// id came late. Its frame id is `0-0` so no stream takes it for a repeat.
pub fn order_reset(newest: EventId, late: EventId) -> Frame {
    let data = format!(
        "{{\"last_event_id\":\"{newest}\",\"oldest_id\":null,\"late_id\":\"{late}\",\"reason\":\"out_of_order\"}}"
    );
    Frame {
        id: EventId::ZERO,
        bytes: encode_event(Some(newest), &EventType::from_static("reset"), &data),
    }
}

/// The `reset` a hub sends when the subscribers of a session missed events
/// no history holds any more (a catch-up found them trimmed or lost): it
/// moves the client to `newest`. Its frame id is `0-0`, as for
/// [`order_reset`].
pub fn gap_reset(newest: EventId) -> Frame {
    let data =
        format!("{{\"last_event_id\":\"{newest}\",\"oldest_id\":null,\"reason\":\"history_gap\"}}");
    Frame {
        id: EventId::ZERO,
        bytes: encode_event(Some(newest), &EventType::from_static("reset"), &data),
    }
}

/// The bytes of a payload's `data:` lines as sent: the payload plus
/// `data: ` and a line end per line.
pub fn data_len(data: &str) -> usize {
    split_lines(data).map(|l| 7 + l.len()).sum()
}

/// Encodes one event. `id` is omitted for per-connection control events that
/// must not move the client's `Last-Event-ID`.
pub fn encode_event(id: Option<EventId>, event_type: &EventType, data: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(data.len() + event_type.as_str().len() + 48);
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        id.write_to(&mut buf);
        buf.put_u8(b'\n');
    }
    buf.put_slice(b"event: ");
    buf.put_slice(event_type.as_str().as_bytes());
    buf.put_u8(b'\n');
    for line in split_lines(data) {
        buf.put_slice(b"data: ");
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
    buf.freeze()
}

/// The reconnection-delay hint sent when a stream opens.
pub fn encode_retry(delay: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", delay.as_millis()))
}

/// A comment line: ignored by clients, keeps proxies from timing the stream out.
pub const HEARTBEAT: Bytes = Bytes::from_static(b": heartbeat\n\n");

/// A heartbeat an `EventSource` can see: a `heartbeat` event with empty
/// data and no `id:` (the client's last id stays). A page that must notice
/// a silent, half-open connection asks for these
/// ([`SseStream::heartbeat_events`](crate::SseStream::heartbeat_events)).
pub const HEARTBEAT_EVENT: Bytes = Bytes::from_static(b"event: heartbeat\ndata:\n\n");

/// Splits on CR LF, CR and LF. An empty payload still yields one (empty)
/// `data:` line so the event is dispatched.
fn split_lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(s: &str) -> EventType {
        EventType::parse(s).unwrap()
    }

    #[test]
    fn encodes_id_event_and_data() {
        let b = encode_event(
            Some(EventId { ms: 5, seq: 1 }),
            &ty("stage_start"),
            "{\"a\":1}",
        );
        assert_eq!(&b[..], b"id: 5-1\nevent: stage_start\ndata: {\"a\":1}\n\n");
    }

    #[test]
    fn multiline_data_becomes_several_data_lines() {
        let b = encode_event(None, &ty("t"), "a\nb\r\nc\rd");
        assert_eq!(&b[..], b"event: t\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
    }

    #[test]
    fn empty_and_trailing_newline_data() {
        assert_eq!(
            &encode_event(None, &ty("t"), "")[..],
            b"event: t\ndata: \n\n"
        );
        assert_eq!(
            &encode_event(None, &ty("t"), "x\n")[..],
            b"event: t\ndata: x\ndata: \n\n"
        );
    }

    #[test]
    fn data_len_counts_the_data_lines_as_sent() {
        let t = ty("section_draft");
        for data in ["", "x", "a\nb\r\nc", "a\rb", &"0,\n".repeat(1000)] {
            let head = "event: section_draft\n".len();
            let sent = encode_event(None, &t, data).len();
            assert_eq!(head + data_len(data) + 1, sent, "{data:?}");
        }
    }

    #[test]
    fn retry_hint() {
        assert_eq!(
            &encode_retry(Duration::from_millis(2500))[..],
            b"retry: 2500\n\n"
        );
    }
}
