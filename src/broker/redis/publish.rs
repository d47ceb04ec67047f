//! Publishing through Redis: the script that gives an event its id, keeps
//! it in the session's stream and sends it on the session's channel, in one
//! round trip.

use std::sync::atomic::Ordering;

use super::{envelope, Inner};
use crate::broker::BrokerError;
use crate::event::{EventId, OutgoingEvent, SessionId};
use crate::redis_client::CallError;
use crate::sse;

/// KEYS[1] history stream, KEYS[2] the id of the session's first event
/// (a stream that still holds it was never trimmed), KEYS[3] the lost
/// marker (its life follows the stream's, so it outlives no hole);
/// ARGV: channel, node, type, data, maxlen, ttl secs, wanted id, held,
/// and the command that sends on the channel: `PUBLISH`, or `SPUBLISH` in a
/// cluster (where the channel shares the keys' slot).
///
/// The wanted id is the publisher's floor (an id past everything it has
/// issued or seen), or, for an outbox event, the id its local subscribers
/// already saw it under. It is taken when the stream accepts it (greater
/// than the stream's last id); otherwise Redis assigns the next one. Either
/// way ids never go below what the publisher's own clients have seen.
pub(super) const PUBLISH_SCRIPT: &str = r#"
local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], ARGV[7],
  't', ARGV[3], 'd', ARGV[4], 'n', ARGV[2], 'h', ARGV[8])
local id = false
if type(r) ~= 'table' then id = r end
if not id then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
    't', ARGV[3], 'd', ARGV[4], 'n', ARGV[2], 'h', ARGV[8])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[2], id, 'NX')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
local held = ''
if ARGV[8] == '1' then held = ',"held":true' end
local env = '{"v":1,"node":' .. cjson.encode(ARGV[2]) .. ',"id":"' .. id ..
  '","type":' .. cjson.encode(ARGV[3]) .. ',"data":' .. cjson.encode(ARGV[4]) .. held .. '}'
redis.call(ARGV[9], ARGV[1], env)
return id
"#;

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
            return self.hold(session, event);
        }
        let floor = self.local.next_id();
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
                self.hold(session, event)
            }
        }
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
            });
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
