//! Publishing through Redis: the script that gives an event its id, keeps
//! it in the session's stream and sends it on the session's channel, in one
//! round trip.

use std::sync::atomic::Ordering;

use super::{envelope, Inner};
use crate::broker::BrokerError;
use crate::event::{EventId, OutgoingEvent, SessionId};
use crate::redis_client::CallError;
use crate::sse;

/// Lua shared by the scripts that take an id from a session's sequence.
///
/// A session's sequence stands at the newer of its stream's last entry and
/// its last reservation (`KEYS[seq]`: an id handed to an event that stays
/// on its instance). `take` gives the wanted id when it is past that,
/// otherwise the next sequence id after it: the same millisecond with the
/// next count, or — past a local id (`seq` at or above 2^46, see
/// `EventId::next_sequenced`) — the next millisecond. Ids stay below 2^53,
/// exact in a Lua number.
const SEQUENCE_LUA: &str = r#"
local LOCAL = 70368744177664
local function parse(s)
  local ms, seq = string.match(s or '', '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function newer(ams, aseq, bms, bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end
local function take(wanted, stream, seqkey)
  local ms, seq = 0, 0
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if last then ms, seq = parse(last[1]) end
  local rms, rseq = parse(redis.call('GET', seqkey))
  if rms and newer(rms, rseq, ms, seq) then ms, seq = rms, rseq end
  local wms, wseq = parse(wanted)
  if wms and newer(wms, wseq, ms, seq) then return wms, wseq end
  if seq + 1 < LOCAL then return ms, seq + 1 end
  return ms + 1, 0
end
local function fmt(ms, seq)
  return string.format('%.0f-%.0f', ms, seq)
end
"#;

/// KEYS[1] history stream, KEYS[2] the id of the session's first event
/// (a stream that still holds it was never trimmed), KEYS[3] the lost
/// marker (its life follows the stream's, so it outlives no hole), KEYS[4]
/// the sequence's last reservation, KEYS[5] the newest event each instance
/// kept to itself (flag off), KEYS[6] the bytes the history holds;
/// ARGV: channel, node, type, data, maxlen, ttl secs, wanted id, held,
/// the command that sends on the channel: `PUBLISH`, or `SPUBLISH` in a
/// cluster (where the channel shares the keys' slot), and the bytes one
/// session's history may hold.
///
/// The history is trimmed here, oldest entries first, to `maxlen` entries
/// and to the byte cap (what `XADD MAXLEN` cannot do: a count bounds
/// nothing when events are large). The bytes are counted as entries come
/// and go; a count that no longer matches the stream (its keys lost apart)
/// starts again from the event just added, which is never trimmed.
///
/// The wanted id is the publisher's floor (a sequence id past everything it
/// has issued or seen), or, for an outbox event, the local id its
/// subscribers here already saw it under. It is taken when it is past the
/// session's sequence; otherwise the event gets the sequence's next id, and
/// an outbox event records its local id as `a` (its publisher's history
/// holds it under that one). Either way ids never go below what the
/// publisher's own clients have seen, and never repeat one of the session.
pub(super) fn publish_script() -> String {
    format!("{SEQUENCE_LUA}{PUBLISH_LUA}")
}

const PUBLISH_LUA: &str = r#"
local ms, seq = take(ARGV[7], KEYS[1], KEYS[4])
local id = fmt(ms, seq)
local fields = {'t', ARGV[3], 'd', ARGV[4], 'n', ARGV[2], 'h', ARGV[8]}
if ARGV[8] == '1' and id ~= ARGV[7] then
  table.insert(fields, 'a')
  table.insert(fields, ARGV[7])
end
local r = redis.pcall('XADD', KEYS[1], id, unpack(fields))
if type(r) == 'table' then
  -- Only if the stream's own counter is past its last entry (entries
  -- deleted by hand): Redis picks the id.
  id = redis.call('XADD', KEYS[1], '*', unpack(fields))
end
local function cost(f)
  local bytes = 64
  for i = 1, #f do bytes = bytes + #f[i] end
  return bytes
end
local total = redis.call('INCRBY', KEYS[6], cost(fields))
local len = redis.call('XLEN', KEYS[1])
while len > tonumber(ARGV[5]) or total > tonumber(ARGV[10]) do
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  if oldest == nil or oldest[1] == id then
    total = cost(fields)
    redis.call('SET', KEYS[6], total)
    break
  end
  redis.call('XDEL', KEYS[1], oldest[1])
  total = redis.call('DECRBY', KEYS[6], cost(oldest[2]))
  len = len - 1
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[6], ARGV[6])
redis.call('SET', KEYS[2], id, 'NX')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('EXPIRE', KEYS[5], ARGV[6])
local held = ''
if ARGV[8] == '1' then held = ',"held":true' end
local env = '{"v":1,"node":' .. cjson.encode(ARGV[2]) .. ',"id":"' .. id ..
  '","type":' .. cjson.encode(ARGV[3]) .. ',"data":' .. cjson.encode(ARGV[4]) .. held .. '}'
redis.call(ARGV[9], ARGV[1], env)
return id
"#;

/// KEYS[1] the newest event each instance kept to itself; ARGV: node, id,
/// ttl secs. Notes `id` as the node's newest kept event unless a newer one
/// is noted: after Redis lost data, the instance notes again what it
/// still holds (see `Inner::renote_kept`).
pub(super) fn note_kept_script() -> String {
    format!("{SEQUENCE_LUA}{NOTE_KEPT_LUA}")
}

const NOTE_KEPT_LUA: &str = r#"
local ms, seq = parse(ARGV[2])
local cms, cseq = parse(redis.call('HGET', KEYS[1], ARGV[1]))
if ms and (not cms or newer(ms, seq, cms, cseq)) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// KEYS[1] history stream, KEYS[2] the sequence's last reservation,
/// KEYS[3] the newest event each instance kept to itself; ARGV: wanted id,
/// ttl secs, node, follow-shared ms, most entries to look at. Reserves the
/// next id of the session's sequence for an event that stays on its
/// instance (flag off), and notes it as that instance's newest such event:
/// a resume on another instance from before it then knows its history
/// lacks one. Answers `shared` instead, reserving nothing, when another
/// instance published the session through Redis within the follow-shared
/// time: its streams are elsewhere and follow Redis (see
/// [`FOLLOW_SHARED`]).
pub(super) fn reserve_script() -> String {
    format!("{SEQUENCE_LUA}{RESERVE_LUA}")
}

const RESERVE_LUA: &str = r#"
local now = redis.call('TIME')
local since = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[4])
-- Every entry of the window, newest first: this instance's own can be
-- the newest many (an outbox just flushed).
local recent = redis.call('XREVRANGE', KEYS[1], '+', string.format('%.0f', since), 'COUNT', ARGV[5])
for _, entry in ipairs(recent) do
  local f = entry[2]
  for i = 1, #f - 1, 2 do
    if f[i] == 'n' and f[i + 1] ~= ARGV[3] then return 'shared' end
  end
end
local ms, seq = take(ARGV[1], KEYS[1], KEYS[2])
local id = fmt(ms, seq)
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], id)
redis.call('EXPIRE', KEYS[3], ARGV[2])
return id
"#;

/// How long after the last event of a session that arrived here from
/// another instance through Redis this instance publishes the session
/// through Redis too, whatever its flag says: longer than a flag source's
/// refresh, so while instances disagree on the flag (an Unleash change
/// reaches each at its next poll) a session keeps one order.
pub(super) const FOLLOW_SHARED: std::time::Duration = std::time::Duration::from_secs(60);

/// What the reserve script answered.
enum Reserved {
    /// The id reserved for an event kept on this instance.
    Id(EventId),
    /// Another instance published the session through Redis lately.
    Shared,
}

impl Inner {
    pub(super) async fn publish(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
    ) -> Result<EventId, BrokerError> {
        self.check_open()?;
        // Behind an outbox that is still draining, a new event waits its
        // turn: events of a session reach Redis in the order they were
        // published.
        if !self.outbox.is_empty() || !self.redis.is_healthy() {
            self.note_outage(&"Redis unreachable");
            return self.hold(session, event, false);
        }
        let floor = self.local.floor();
        match self.run_script(session, event, floor, false).await {
            Ok(id) => {
                self.publish_recovered();
                self.local.observe(id);
                self.note_sent(session, id, || {
                    sse::frame(id, &event.event_type, &event.data)
                });
                self.counters
                    .published_redis
                    .fetch_add(1, Ordering::Relaxed);
                Ok(id)
            }
            Err(e) => {
                self.note_outage(&e);
                // Sent and not answered: Redis may still run it (a timeout
                // withdraws nothing). Refused or never sent: it did not.
                let unconfirmed = matches!(e, CallError::Timeout(_) | CallError::Connection(_));
                self.hold(session, event, unconfirmed)
            }
        }
    }

    /// An event the flag keeps on this instance. While Redis answers, its
    /// id is reserved from the session's sequence (so it names no other
    /// instance's event, and a resume elsewhere learns it is missing);
    /// otherwise it takes a local id. A session whose events arrive here
    /// from other instances through Redis is published through Redis
    /// instead (see [`FOLLOW_SHARED`]): two paths without a common order
    /// would make this instance's clients reset at every crossing.
    pub(super) async fn publish_local(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
    ) -> Result<EventId, BrokerError> {
        self.check_open()?;
        // Events of the session still wait in the outbox (published with
        // the flag on, during an outage): this one goes behind them, so the
        // session keeps one order and stays where its streams follow it.
        if self.follows_shared(session) || self.outbox.holds_session(session) {
            return self.publish(session, event).await;
        }
        // A session's reservations and deliveries here in one order.
        let order = self.local_order(session).lock().await;
        let mut reserved = None;
        if self.redis.is_healthy() {
            match self.reserve(session).await {
                Ok(Reserved::Id(id)) => {
                    self.publish_recovered();
                    self.local.observe(id);
                    reserved = Some(id);
                }
                // Shared, though not with this instance's subscriber (no
                // stream of it here): its streams elsewhere follow Redis.
                Ok(Reserved::Shared) => {
                    self.note_shared(session);
                    drop(order);
                    return self.publish(session, event).await;
                }
                Err(e) => self.note_outage(&e),
            }
        }
        self.local.publish_as(session, event, reserved)
    }

    /// Notes again, for a session this instance follows, the newest event
    /// the flag kept here under a sequence id: a Redis that restarted (or
    /// failed over) may have lost the note, and a resume elsewhere from
    /// before that event would then replay without it and without a
    /// `reset`. Run after every reconnect of the subscriber.
    pub(super) async fn renote_kept(&self, session: &SessionId) -> Result<(), CallError> {
        let Some(id) = self.local.newest_sequenced(session) else {
            return Ok(());
        };
        let mut call = self.note_kept.key(self.keys.kept_local(session));
        call.arg(&self.settings.node_id)
            .arg(id.to_string())
            .arg(self.settings.history.ttl.as_secs());
        let call = &call;
        self.redis
            .call(|mut conn| async move { call.invoke_async::<i64>(&mut conn).await })
            .await
            .map(drop)
    }

    async fn reserve(&self, session: &SessionId) -> Result<Reserved, CallError> {
        let mut call = self.reserve.key(self.keys.history(session));
        call.key(self.keys.reserved(session));
        call.key(self.keys.kept_local(session));
        call.arg(self.local.floor().to_string())
            .arg(self.settings.history.ttl.as_secs())
            .arg(&self.settings.node_id)
            .arg(FOLLOW_SHARED.as_millis() as u64)
            // The stream holds about this many entries at most.
            .arg(self.settings.history.maxlen.max(1));
        let call = &call;
        let id: String = self
            .redis
            .call(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await?;
        if id == "shared" {
            return Ok(Reserved::Shared);
        }
        id.parse()
            .map(Reserved::Id)
            .map_err(|_| CallError::Server(format!("unexpected stream id {id:?}")))
    }

    /// Runs the publish script. The subscriber connection delivers the
    /// event here, as it does on every other instance.
    pub(super) async fn run_script(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
        wanted: EventId,
        held: bool,
    ) -> Result<EventId, CallError> {
        let mut call = self.script.key(self.keys.history(session));
        call.key(self.keys.first(session));
        call.key(self.keys.lost(session));
        call.key(self.keys.reserved(session));
        call.key(self.keys.kept_local(session));
        call.key(self.keys.history_bytes(session));
        call.arg(self.keys.channel(session))
            .arg(&self.settings.node_id)
            .arg(event.event_type.as_str())
            .arg(&event.data)
            .arg(self.settings.history.maxlen)
            .arg(self.settings.history.ttl.as_secs())
            .arg(wanted.to_string())
            .arg(if held { "1" } else { "0" })
            .arg(if self.keys.tagged {
                "SPUBLISH"
            } else {
                "PUBLISH"
            })
            .arg(self.settings.history.session_max_bytes);
        let call = &call;
        let id: String = self
            .redis
            .call(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await?;
        id.parse()
            .map_err(|_| CallError::Server(format!("unexpected stream id {id:?}")))
    }

    /// An announcement to every session on every instance: not in history,
    /// and without an `id:` line. While Redis is away it reaches this
    /// instance only.
    pub(super) async fn publish_all(&self, event: &OutgoingEvent) -> Result<EventId, BrokerError> {
        self.check_open()?;
        let env = envelope::encode(
            &self.settings.node_id,
            EventId::ZERO,
            &event.event_type,
            &event.data,
        );
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.keys.broadcast).arg(env);
        let cmd = &cmd;
        match self
            .redis
            .call(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
            .await
        {
            Ok(_) => Ok(EventId::ZERO),
            Err(e) => {
                self.note_outage(&e);
                self.counters.fallback_local.fetch_add(1, Ordering::Relaxed);
                self.local.publish_all_now(event)
            }
        }
    }
}
