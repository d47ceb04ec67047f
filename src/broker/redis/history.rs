//! Reading a session's Redis stream: resumes, positions, and the entries a
//! reconnected subscriber missed.
//!
//! Client ids are never put into a query as they came: every range starts
//! at the id's successor (so `<u64::MAX>-<u64::MAX>` is an empty range, not
//! a Redis error), and replies are read in pages, at most the resume's byte
//! cap in all.

use std::sync::atomic::Ordering;

use redis::streams::{StreamId, StreamRangeReply};

use super::Inner;
use crate::broker::Replay;
use crate::event::{EventId, EventType, Frame, SessionId};
use crate::redis_client::CallError;
use crate::sse;

/// Entries read per round trip.
pub(super) const PAGE: usize = 200;

/// One stream entry, decoded.
pub(super) struct Entry {
    pub node: String,
    /// Published from its publisher's outbox: its publisher's subscribers
    /// already have it.
    pub held: bool,
    pub frame: Frame,
}

impl Inner {
    /// The session's events after `after` in its stream, at most
    /// `max_bytes` of them, with what the stream can vouch for: an id it
    /// holds, or `0-0` while it still holds the session's first event.
    pub(super) async fn read_history(
        &self,
        session: &SessionId,
        after: EventId,
        max_bytes: usize,
    ) -> Result<Replay, CallError> {
        let key = self.keys.history(session);
        let start = after.successor();
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(&key)
            .arg(after.to_string())
            .arg(after.to_string())
            .cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("GET")
            .arg(self.keys.first(session));
        if let Some(start) = start {
            pipe.cmd("XRANGE")
                .arg(&key)
                .arg(start.to_string())
                .arg("+")
                .arg("COUNT")
                .arg(PAGE);
        }
        let pipe = &pipe;
        let (held, head, top, first, page): (
            StreamRangeReply,
            StreamRangeReply,
            StreamRangeReply,
            Option<String>,
            Option<StreamRangeReply>,
        ) = if start.is_some() {
            self.redis
                .call(|mut conn| async move { pipe.query_async(&mut conn).await })
                .await?
        } else {
            let (a, b, c, d) = self
                .redis
                .call(|mut conn| async move { pipe.query_async(&mut conn).await })
                .await?;
            (a, b, c, d, None)
        };
        let oldest = first_id(&head);
        let newest = first_id(&top);
        let first: Option<EventId> = first.and_then(|f| f.parse().ok());
        let untrimmed = oldest.is_none() || oldest == first;
        let holds = !held.ids.is_empty();

        let mut frames = Vec::new();
        let mut bytes = 0;
        let mut too_large = false;
        let mut page = page;
        while let Some(reply) = page.take() {
            let full = reply.ids.len() >= PAGE;
            let mut last = None;
            for entry in &reply.ids {
                last = entry.id.parse::<EventId>().ok().or(last);
                let Some(e) = self.entry(entry) else { continue };
                bytes += e.frame.bytes.len();
                if bytes > max_bytes {
                    too_large = true;
                    break;
                }
                frames.push(e.frame);
            }
            if too_large {
                frames.clear();
                break;
            }
            if let (true, Some(next)) = (full, last.and_then(EventId::successor)) {
                page = Some(self.range(session, next, PAGE).await?);
            }
        }
        Ok(Replay {
            frames,
            vouched: holds || (after == EventId::ZERO && untrimmed),
            gapless: untrimmed || oldest.is_some_and(|o| o <= after),
            too_large,
            oldest,
            newest,
        })
    }

    /// Up to `count` entries from `from` (inclusive).
    pub(super) async fn range(
        &self,
        session: &SessionId,
        from: EventId,
        count: usize,
    ) -> Result<StreamRangeReply, CallError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.history(session))
            .arg(from.to_string())
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let cmd = &cmd;
        self.redis
            .call(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// The newest id in the session's stream, `0-0` if it has none.
    pub(super) async fn stream_top(&self, session: &SessionId) -> Result<EventId, CallError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.keys.history(session))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let cmd = &cmd;
        let reply: StreamRangeReply = self
            .redis
            .call(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await?;
        Ok(first_id(&reply).unwrap_or_default())
    }

    /// A stream entry as a frame. Malformed entries are counted and
    /// skipped.
    pub(super) fn entry(&self, entry: &StreamId) -> Option<Entry> {
        let parsed = (|| {
            let id: EventId = entry.id.parse().ok()?;
            let event_type = EventType::parse(&entry.get::<String>("t")?).ok()?;
            let data: String = entry.get("d")?;
            Some(Entry {
                node: entry.get("n").unwrap_or_default(),
                held: entry.get::<String>("h").as_deref() == Some("1"),
                frame: sse::frame(id, &event_type, &data),
            })
        })();
        if parsed.is_none() {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backend = "redis", entry = %entry.id, "malformed history entry skipped");
        }
        parsed
    }
}

fn first_id(reply: &StreamRangeReply) -> Option<EventId> {
    reply.ids.first().and_then(|e| e.id.parse().ok())
}
