//! Reading a session's Redis stream: resumes, positions, and the entries a
//! reconnected subscriber missed.
//!
//! Client ids are never put into a query as they came: every range starts
//! at the id's successor (so `<u64::MAX>-<u64::MAX>` is an empty range, not
//! a Redis error), and replies are read in pages, at most the resume's byte
//! cap in all.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use redis::streams::{StreamId, StreamRangeReply};

use super::Inner;
use crate::broker::Replay;
use crate::event::{EventId, EventType, Frame, SessionId};
use crate::redis_client::CallError;
use crate::sse;

/// Entries read per round trip.
pub(super) const PAGE: usize = 200;

/// A resume's first page, before the size of its entries is known: 16
/// events of the largest size are 1 MiB.
const FIRST_PAGE: usize = 16;

/// About the bytes of one of a resume's later pages: no reply holds the
/// shared connection for long (`replays.rs`).
const PAGE_BYTES: usize = 1 << 20;

/// KEYS[1] the session's lost marker, KEYS[2] its sequence's last
/// reservation; ARGV: an id, ttl secs, a floor. Keeps the greater of the
/// stored marker and ARGV[1], and moves the sequence past the floor: the
/// ids this instance delivered before the loss are never handed out again.
pub(super) const MARK_LOST_SCRIPT: &str = r#"
local function parse(s)
  local ms, seq = string.match(s or '', '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function newer(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am and (not bm or am > bm or (am == bm and as > bs))
end
if newer(ARGV[3], redis.call('GET', KEYS[2])) then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
end
if newer(ARGV[1], redis.call('GET', KEYS[1])) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 1
"#;

/// What one resume reads in its first round trip: the entry at the
/// client's id, the oldest and newest entries, the first and lost markers,
/// the instances' flag-off notes, and the first page after the id.
type ResumeReads = (
    StreamRangeReply,
    StreamRangeReply,
    StreamRangeReply,
    Option<String>,
    Option<String>,
    HashMap<String, String>,
    Option<(StreamRangeReply, StreamRangeReply)>,
);

/// Whether a session's stream still reaches back to a subscriber's cursor.
pub(super) enum Continuity {
    /// The stream reaches back to the cursor; `oldest` is its oldest entry
    /// then, for the catch-up's own check between pages (`reaches_back`).
    Whole { oldest: Option<EventId> },
    /// Events after the cursor are gone: the session's streams here get a
    /// `reset` to `top`, the stream's newest entry, and live delivery goes
    /// on past it.
    Gap { top: EventId },
}

/// One stream entry, decoded.
pub(super) struct Entry {
    pub node: String,
    /// Published from its publisher's outbox: its publisher's subscribers
    /// already have it.
    pub held: bool,
    /// For an outbox event that did not keep its id: the id its publisher's
    /// subscribers saw it under.
    pub alias: Option<EventId>,
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
        // The subscriber lost its connection and has not caught up since:
        // if Redis lost data meanwhile (restarted, failed over), no
        // instance may have marked it yet, and the stream would vouch for a
        // history with a hole in it. Answered as unreadable (a `reset`)
        // until the subscriber is back, which it tries as soon as Redis
        // answers.
        if self.counters.connects.load(Ordering::Relaxed) > 0
            && !self.counters.connected.load(Ordering::Relaxed)
        {
            return Err(CallError::NotConnected);
        }
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
            .arg(self.keys.first(session))
            .cmd("GET")
            .arg(self.keys.lost(session))
            .cmd("HGETALL")
            .arg(self.keys.kept_local(session));
        if let Some(start) = start {
            page_reaching_back(&mut pipe, &key, start, FIRST_PAGE);
        }
        let pipe = &pipe;
        let (held, head, top, first, lost, kept, page): ResumeReads = if start.is_some() {
            let (a, b, c, d, e, f, g, h) = self
                .redis
                .call(|mut conn| async move { pipe.query_async(&mut conn).await })
                .await?;
            (a, b, c, d, e, f, Some((g, h)))
        } else {
            let (a, b, c, d, e, f) = self
                .redis
                .call(|mut conn| async move { pipe.query_async(&mut conn).await })
                .await?;
            (a, b, c, d, e, f, None)
        };
        // Events after `after` that instances kept to themselves (flag off
        // there): another instance's are missing from every history here;
        // this one's must be in its own.
        let mut kept_elsewhere = false;
        let mut kept_here_through = None;
        for (node, id) in &kept {
            let Ok(id) = id.parse::<EventId>() else {
                continue;
            };
            if id <= after {
                continue;
            }
            if *node == self.settings.node_id {
                kept_here_through = kept_here_through.max(Some(id));
            } else {
                kept_elsewhere = true;
            }
        }
        let oldest = first_id(&head);
        let newest = first_id(&top);
        let first: Option<EventId> = first.and_then(|f| f.parse().ok());
        let untrimmed = oldest.is_none() || oldest == first;
        let holds = !held.ids.is_empty();
        // Events up to the marker were lost (see `check_lost`): past an id
        // before it the stream has a hole, so it vouches for nothing; the
        // marker itself is where a subscriber had delivered everything, so
        // it vouches for that id although the stream lost it.
        let lost = lost.and_then(|l| l.parse::<EventId>().ok());
        let lost_after = lost.is_some_and(|l| after < l);
        let holds = holds || lost == Some(after);

        let mut frames = Vec::new();
        let mut renumbered = Vec::new();
        let mut straddled = false;
        let mut bytes = 0;
        let mut too_large = false;
        let mut page = page;
        let mut asked = FIRST_PAGE;
        // Where the page just read starts from: `after`, then the last id of
        // the page before.
        let mut anchor = after;
        let mut trimmed_while_read = false;
        while let Some((reply, oldest_after)) = page.take() {
            if !reaches_back(first_id(&oldest_after), oldest, anchor) {
                trimmed_while_read = true;
                break;
            }
            let full = reply.ids.len() >= asked;
            let mut last = None;
            for entry in &reply.ids {
                last = entry.id.parse::<EventId>().ok().or(last);
                let Some(e) = self.entry(entry) else { continue };
                match e.alias {
                    // Seen under its first id (by a client of its publisher)
                    // or not at all (by one elsewhere): which, the id cannot
                    // tell, so neither a replay nor a skip is right.
                    Some(first) if first <= after => straddled = true,
                    Some(first) if e.node == self.settings.node_id => {
                        renumbered.push((e.frame.id, first));
                    }
                    _ => {}
                }
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
            if let (true, Some(last), Some(next)) = (full, last, last.and_then(EventId::successor))
            {
                let each = bytes / frames.len().max(1);
                asked = (PAGE_BYTES / each.max(1)).clamp(1, PAGE);
                anchor = last;
                page = Some(self.range_reaching_back(session, next, asked).await?);
            }
        }
        // Events this instance delivered here while Redis was away and still
        // holds for it: their local ids can sort at or before `after`, and a
        // client whose id comes from elsewhere never saw them (they were
        // nowhere else); published later, they are dropped here as
        // delivered. A client of this instance (`after` one of its local
        // ids) saw them in order.
        let held_unseen = !self.local.issued(after) && self.outbox.holds_through(session, after);
        // A local id was given while Redis was away, by a clock of its own:
        // events other instances published meanwhile can have lower ids and
        // reach the stream (and the client's instance) only after the
        // client went past that id. Nothing shows which of them it saw.
        let from_outage = after.is_local();
        Ok(Replay {
            frames,
            vouched: !lost_after && (holds || (after == EventId::ZERO && untrimmed)),
            // A hole past `after` also stops the in-process history from
            // vouching for the merge.
            gapless: !lost_after
                && !trimmed_while_read
                && !kept_elsewhere
                && !straddled
                && !held_unseen
                && !from_outage
                && (untrimmed || oldest.is_some_and(|o| o <= after)),
            too_large,
            oldest,
            newest,
            kept_here_through,
            renumbered,
            unreadable: false,
        })
    }

    /// Before a reconnected subscriber catches a session up from `cursor`
    /// (the newest id it delivered, or — `estimated` — where the stream
    /// stood about when the session was wanted): does the stream still
    /// reach back to it?
    ///
    /// - Trimmed past it: MAXLEN dropped entries after the cursor before
    ///   this instance could read them (a long outage with traffic
    ///   elsewhere, or an outbox backlog flushed into a stream Redis
    ///   restarted empty): a stream that began at or before the cursor and
    ///   no longer holds it, or one that began after it and, Redis 7 says
    ///   (`XINFO STREAM`: more entries added than held), dropped any. What this
    ///   instance's streams missed is gone: they get a `reset` (`Gap`)
    ///   instead of a catch-up with a hole in it.
    /// - Lost (an exact cursor only): the stream no longer holds the cursor
    ///   though nothing after it was trimmed — it began after it (Redis
    ///   restarted empty, keys deleted) or lost its tail (a failover
    ///   promoted a replica that had not received it), or nothing is left
    ///   while the cursor is younger than the history's TTL. What was lost
    ///   may include events this instance never saw (its connection may
    ///   have been cut while Redis went on), so its streams get a `reset`
    ///   (`Gap`) too. The session is marked, so a resume from
    ///   before the loss gets `reset` instead of a replay with a hole in it,
    ///   and its sequence is moved past every id this instance issued or
    ///   saw: after Redis restarted empty a publisher that never saw the
    ///   lost ids (a new instance, a slow clock) would otherwise hand them
    ///   out again, and this subscriber would drop those new events as
    ///   repeats.
    pub(super) async fn check_lost(
        &self,
        session: &SessionId,
        cursor: EventId,
        estimated: bool,
    ) -> Result<Continuity, CallError> {
        let key = self.keys.history(session);
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(&key)
            .arg(cursor.to_string())
            .arg(cursor.to_string())
            .cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("GET")
            .arg(self.keys.first(session))
            .cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let pipe = &pipe;
        let (held, head, first, top): (
            StreamRangeReply,
            StreamRangeReply,
            Option<String>,
            StreamRangeReply,
        ) = self
            .redis
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let oldest = first_id(&head);
        if !held.ids.is_empty() && cursor != EventId::ZERO {
            // Trimming drops the oldest first: all after it is there too.
            return Ok(Continuity::Whole { oldest });
        }
        let first: Option<EventId> = first.and_then(|f| f.parse().ok());
        let top = first_id(&top).unwrap_or_default();
        let trimmed = match oldest {
            Some(oldest) if oldest > cursor => {
                // Began at or before the cursor: what went is the cursor
                // and maybe more. Began after it (restarted empty): any
                // entry it dropped came after the cursor.
                first.is_some_and(|f| f <= cursor) || self.trimmed_any(session).await?
            }
            _ => false,
        };
        if trimmed {
            tracing::warn!(backend = "redis", session = %session, cursor = %cursor,
                "the session's stream was trimmed past what this instance delivered; its streams here get reset");
            return Ok(Continuity::Gap { top });
        }
        if estimated || cursor == EventId::ZERO {
            // Nothing this instance delivered can be missing: an estimate
            // or the empty start is no id the stream held.
            return Ok(Continuity::Whole { oldest });
        }
        if oldest.is_none() && first.is_none() {
            // Nothing left, bookkeeping included: the session's history
            // expired (HISTORY_TTL_SECS after its last event) — unless the
            // cursor is younger than that, when Redis lost it.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let ttl = self.settings.history.ttl.as_millis() as u64;
            if now.saturating_sub(cursor.ms) >= ttl {
                return Ok(Continuity::Whole { oldest });
            }
        }
        let mut call = self.mark_lost.key(self.keys.lost(session));
        call.key(self.keys.reserved(session));
        call.arg(cursor.to_string())
            .arg(self.settings.history.ttl.as_secs())
            .arg(self.local.floor().to_string());
        let call = &call;
        let _: i64 = self
            .redis
            .call(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await?;
        self.counters.history_lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(backend = "redis", session = %session, cursor = %cursor,
            "the session's stream lost events this instance delivered; its streams here and resumes from before them get reset");
        // Whatever else Redis lost may include events published after this
        // instance's last delivery: its connection may have been cut while
        // Redis went on (a `CLIENT KILL`, a full buffer, a moved slot) and
        // Redis lost data before it came back. Nothing read here can tell
        // that from a connection that ended with Redis itself, so the
        // streams here get a reset rather than a catch-up that may skip.
        Ok(Continuity::Gap { top })
    }

    /// Whether the session's stream ever dropped an entry: `XINFO
    /// STREAM`'s `entries-added` beyond its `length` (Redis 7 and later;
    /// false before, or when the stream is gone).
    async fn trimmed_any(&self, session: &SessionId) -> Result<bool, CallError> {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("STREAM").arg(self.keys.history(session));
        let cmd = &cmd;
        let info: redis::Value = match self
            .redis
            .call(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
        {
            Ok(info) => info,
            // The stream went between the reads (expired): nothing dropped.
            Err(e) if !e.is_outage() => return Ok(false),
            Err(e) => return Err(e),
        };
        let pairs: Vec<(redis::Value, redis::Value)> = match info {
            redis::Value::Map(pairs) => pairs,
            redis::Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let field = |name: &str| {
            pairs.iter().find_map(|(k, v)| {
                (redis::from_redis_value::<String>(k).ok()? == name)
                    .then(|| redis::from_redis_value::<u64>(v).ok())
                    .flatten()
            })
        };
        Ok(match (field("entries-added"), field("length")) {
            (Some(added), Some(length)) => added > length,
            _ => false,
        })
    }

    /// Up to `count` entries from `from` (inclusive), and the stream's
    /// oldest entry read right after them (see `reaches_back`).
    pub(super) async fn range_reaching_back(
        &self,
        session: &SessionId,
        from: EventId,
        count: usize,
    ) -> Result<(StreamRangeReply, StreamRangeReply), CallError> {
        let mut pipe = redis::pipe();
        page_reaching_back(&mut pipe, &self.keys.history(session), from, count);
        let pipe = &pipe;
        self.redis
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// The newest id in the session's stream, `0-0` if it has none.
    pub(super) async fn stream_top(&self, session: &SessionId) -> Result<EventId, CallError> {
        self.newest_up_to(session, None).await
    }

    /// The newest id of the session's stream at or before `at` (all of it
    /// with `None`); `0-0` when there is none.
    pub(super) async fn newest_up_to(
        &self,
        session: &SessionId,
        at: Option<EventId>,
    ) -> Result<EventId, CallError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.keys.history(session))
            .arg(at.map_or_else(|| "+".to_owned(), |at| at.to_string()))
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
                alias: entry.get::<String>("a").and_then(|a| a.parse().ok()),
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

/// Whether entries after `anchor` can have been trimmed while a resume
/// read its pages: the history's oldest entry, read right after a page, is
/// still the one it was when the read began (nothing was trimmed), or at
/// or before `anchor` (what was trimmed came before it). Pages are separate
/// round trips, and a publish in between may trim many entries at once (a
/// large event under the byte cap): a page that starts after a trimmed
/// stretch would otherwise look continuous.
/// Adds to `pipe` up to `count` entries of `key` from `from`, then the
/// stream's oldest entry read right after them (see `reaches_back`).
fn page_reaching_back(pipe: &mut redis::Pipeline, key: &str, from: EventId, count: usize) {
    pipe.cmd("XRANGE")
        .arg(key)
        .arg(from.to_string())
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1);
}

pub(super) fn reaches_back(
    oldest_now: Option<EventId>,
    oldest_then: Option<EventId>,
    anchor: EventId,
) -> bool {
    match oldest_now {
        Some(now) => Some(now) == oldest_then || now <= anchor,
        // Emptied meanwhile (expired, deleted): nothing vouches for the page.
        None => oldest_then.is_none(),
    }
}

pub(super) fn first_id(reply: &StreamRangeReply) -> Option<EventId> {
    reply.ids.first().and_then(|e| e.id.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::reaches_back;
    use crate::event::EventId;

    fn id(ms: u64) -> EventId {
        EventId { ms, seq: 0 }
    }

    #[test]
    fn a_page_reaches_back_unless_a_trim_passed_its_anchor_meanwhile() {
        // Nothing trimmed while reading.
        assert!(reaches_back(Some(id(5)), Some(id(5)), id(9)));
        // Trimmed, but not past the anchor.
        assert!(reaches_back(Some(id(9)), Some(id(5)), id(9)));
        // Trimmed past it: the page may start after a hole.
        assert!(!reaches_back(Some(id(10)), Some(id(5)), id(9)));
        // A stream that began after the anchor and lost nothing meanwhile.
        assert!(reaches_back(Some(id(20)), Some(id(20)), id(9)));
        // Emptied while reading.
        assert!(!reaches_back(None, Some(id(5)), id(9)));
        assert!(reaches_back(None, None, id(9)));
    }
}
