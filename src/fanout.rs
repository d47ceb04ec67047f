//! [`Fanout`]: the [`Broadcaster`] every server uses, made of a [`Hub`]
//! (who is connected here) and brokers (where ids, history and other
//! instances live).
//!
//! A publish takes one path, chosen per publish by the flag source: the
//! [`MemoryBroker`] (this instance only) or the cross-instance broker when
//! there is one and the flag is on for the session. Either way the broker
//! assigns the id and stores the event first, then delivers the frame —
//! encoded once — through the handler into the hub, once, in id order per
//! session. A resume reads both brokers' histories and is complete only if
//! one of them vouches for the client's id and neither has a gap after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use futures::future::{BoxFuture, FutureExt};

use crate::broadcaster::{BroadcastError, Broadcaster, BroadcasterStats, Subscription};
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, BrokerError, Handler, Target};
use crate::event::{EventId, OutgoingEvent, SessionId};
use crate::flags::{EnvFlags, FlagSource};
use crate::history::{HistoryLimits, Replay};
use crate::hub::{Hub, DEFAULT_QUEUE};

/// Settings of a [`Fanout`], with defaults for one instance.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FanoutSettings {
    /// Events a subscriber may fall behind before it is cut.
    pub queue: usize,
    /// The in-process history.
    pub history: HistoryLimits,
    /// Encoded bytes one resume may replay; beyond it the stream says
    /// `reset` instead of holding a huge replay in memory.
    pub replay_max_bytes: usize,
}

impl Default for FanoutSettings {
    fn default() -> Self {
        Self {
            queue: DEFAULT_QUEUE,
            history: HistoryLimits::default(),
            replay_max_bytes: 4 << 20,
        }
    }
}

/// See the module docs.
pub struct Fanout {
    hub: Hub,
    local: Arc<MemoryBroker>,
    remote: Option<Arc<dyn Broker>>,
    flags: Arc<dyn FlagSource>,
    replay_max_bytes: usize,
    published: AtomicU64,
    /// Flag evaluations of publishes with a Redis broker: [on, off].
    flag_evaluations: [AtomicU64; 2],
}

impl Fanout {
    /// One instance (or several behind sticky sessions): no cross-instance
    /// broker.
    pub fn memory(settings: FanoutSettings) -> Self {
        Self::build(settings, Arc::new(EnvFlags::fixed(false)), |_, _| None)
    }

    /// A fan-out whose cross-instance broker is made by `remote`, from the
    /// in-process broker (for what cannot leave the instance) and the
    /// handler that delivers into this instance's hub.
    pub fn with_remote<B: Broker>(
        settings: FanoutSettings,
        flags: Arc<dyn FlagSource>,
        remote: impl FnOnce(Arc<MemoryBroker>, Handler) -> B,
    ) -> Self {
        Self::build(settings, flags, |local, handler| {
            Some(Arc::new(remote(local, handler)) as Arc<dyn Broker>)
        })
    }

    fn build(
        settings: FanoutSettings,
        flags: Arc<dyn FlagSource>,
        remote: impl FnOnce(Arc<MemoryBroker>, Handler) -> Option<Arc<dyn Broker>>,
    ) -> Self {
        let hub = Hub::new(settings.queue);
        let into_hub = hub.clone();
        let handler: Handler = Arc::new(move |target, frame| match target {
            Target::Session(session) => {
                into_hub.deliver(session, frame);
            }
            Target::All => into_hub.deliver_all(&frame),
            Target::Gap(session) => {
                into_hub.reset_to(session, frame.id);
            }
        });
        let local = Arc::new(MemoryBroker::new(settings.history, handler.clone()));
        let remote = remote(local.clone(), handler);
        if let Some(remote) = &remote {
            // Weak: the broker's handler holds the hub, so a strong
            // reference back would keep both alive for ever.
            let remote: Weak<dyn Broker> = Arc::downgrade(remote);
            hub.on_vacated(Box::new(move |session, generation| {
                if let Some(remote) = remote.upgrade() {
                    remote.unsubscribe(session, generation);
                }
            }));
        }
        Self {
            hub,
            local,
            remote,
            flags,
            replay_max_bytes: settings.replay_max_bytes,
            published: AtomicU64::new(0),
            flag_evaluations: Default::default(),
        }
    }

    /// Whether a publish to `session` goes to other instances now.
    fn shared(&self, session: &SessionId) -> bool {
        if self.remote.is_none() {
            return false;
        }
        let on = self.flags.redis_broadcast(session);
        self.flag_evaluations[usize::from(!on)].fetch_add(1, Ordering::Relaxed);
        on
    }

    /// The connection map (for tests and embedding applications).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    async fn replay_now(&self, session: &SessionId, after: EventId) -> Replay {
        let max = self.replay_max_bytes;
        let local = self.local.history_now(session, after, max);
        let Some(remote) = &self.remote else {
            return local;
        };
        match remote.history(session, after, max).await {
            Ok(remote) => remote.merge(local, max),
            // Even with the flag off here, another instance may have
            // published the session through Redis (its flag already on, or
            // this one's not yet): what Redis holds is unknown, so the
            // local history alone proves nothing.
            Err(e) => {
                tracing::warn!(session = %session, error = %e, "history unreadable: the resume gets a reset");
                Replay {
                    gapless: false,
                    unreadable: true,
                    ..local
                }
            }
        }
    }

    async fn position_now(&self, session: &SessionId) -> EventId {
        let Some(remote) = &self.remote else {
            return self.local.anchor(session);
        };
        let here = self.local.newest(session).unwrap_or_default();
        match remote.position(session).await {
            Ok(top) => top.max(here),
            // Not a made-up "now": the stream's filter would drop live
            // events of instances whose clocks run behind. A later resume
            // from here is answered honestly (a reset unless a history
            // vouches for it).
            Err(_) => here,
        }
    }
}

fn refused(e: BrokerError) -> BroadcastError {
    match e {
        BrokerError::Unavailable(why) => BroadcastError::Unavailable(why),
        _ => BroadcastError::Closed,
    }
}

impl From<crate::hub::Closed> for BroadcastError {
    fn from(_: crate::hub::Closed) -> Self {
        BroadcastError::Closed
    }
}

impl Broadcaster for Fanout {
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BroadcastError>> {
        async move {
            let published = match &self.remote {
                Some(remote) if self.shared(session) => remote.publish(session, &event).await,
                // The flag keeps it here; the broker still takes its id
                // from the session's sequence.
                Some(remote) => remote.publish_local(session, &event).await,
                None => self.local.publish_now(session, &event),
            };
            let id = published.map_err(refused)?;
            self.published.fetch_add(1, Ordering::Relaxed);
            Ok(id)
        }
        .boxed()
    }

    fn publish_all(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<EventId, BroadcastError>> {
        async move {
            let broker: &dyn Broker = match &self.remote {
                Some(remote) if self.flags.state().enabled => remote.as_ref(),
                _ => self.local.as_ref(),
            };
            let id = broker.publish_all(&event).await.map_err(refused)?;
            self.published.fetch_add(1, Ordering::Relaxed);
            Ok(id)
        }
        .boxed()
    }

    fn subscribe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Subscription, BroadcastError>> {
        async move {
            let joined = self.hub.subscribe(session)?;
            if let Some(remote) = &self.remote {
                // Every open asks, not only the first (`joined.first`): a
                // stream that opens while the first one's channel is not
                // confirmed yet must wait for it too, or an event published
                // meanwhile reaches neither its replay nor its subscription.
                // Once the channel is live the call answers at once.
                // Wait (bounded) until events published elsewhere from now
                // on are sure to arrive. Not confirmed in time: the stream
                // still opens; the broker catches up once it can.
                if let Err(e) = remote.subscribe(session, joined.generation).await {
                    tracing::warn!(session = %session, error = %e, "subscribing the session's channel is late");
                }
            }
            Ok(joined.subscription)
        }
        .boxed()
    }

    fn replay<'a>(&'a self, session: &'a SessionId, after: EventId) -> BoxFuture<'a, Replay> {
        self.replay_now(session, after).boxed()
    }

    fn position<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, EventId> {
        self.position_now(session).boxed()
    }

    fn sessions(&self) -> Vec<SessionId> {
        self.hub.sessions()
    }

    fn holds(&self, session: &SessionId) -> bool {
        self.hub.contains(session)
    }

    fn crosses_instances(&self, session: &SessionId) -> bool {
        self.remote.is_some() && self.flags.redis_broadcast(session)
    }

    fn stop_holding(&self) {
        if let Some(remote) = &self.remote {
            remote.stop_holding();
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            if let Some(remote) = &self.remote {
                remote.shutdown().await;
            }
            self.local.close();
            self.hub.close();
        }
        .boxed()
    }

    fn stats(&self) -> BroadcasterStats {
        let (history_sessions, history_bytes) = self.local.usage();
        BroadcasterStats {
            mode: if self.remote.is_some() {
                "redis"
            } else {
                "local"
            },
            sessions: self.hub.session_count(),
            subscribers: self.hub.subscriber_count(),
            published: self.published.load(Ordering::Relaxed),
            order_resets: self.hub.order_resets(),
            covered_by_reset: self.hub.covered_by_reset(),
            deliveries: self.hub.deliveries(),
            flag_evaluations: [
                self.flag_evaluations[0].load(Ordering::Relaxed),
                self.flag_evaluations[1].load(Ordering::Relaxed),
            ],
            history_sessions,
            history_bytes,
            redis: self.remote.as_ref().map(|r| r.stats()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use futures::StreamExt;

    fn ev(n: u32) -> OutgoingEvent {
        OutgoingEvent::new(EventType::from_static("n"), n.to_string())
    }

    fn s(id: &str) -> SessionId {
        SessionId::parse(id).unwrap()
    }

    #[tokio::test]
    async fn one_delivery_per_publish_in_id_order_sharing_bytes() {
        let b = Fanout::memory(FanoutSettings::default());
        let mut x = b.subscribe(&s("a")).await.unwrap();
        let mut y = b.subscribe(&s("a")).await.unwrap();
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(b.publish(&s("a"), ev(n)).await.unwrap());
        }
        for id in ids {
            let fx = x.next().await.unwrap().unwrap();
            let fy = y.next().await.unwrap().unwrap();
            assert_eq!((fx.id, fy.id), (id, id));
            assert_eq!(fx.bytes.as_ptr(), fy.bytes.as_ptr(), "encoded once");
        }
        assert_eq!(b.stats().published, 5);
    }

    #[tokio::test]
    async fn resume_replays_what_it_holds_and_refuses_what_it_cannot_prove() {
        let b = Fanout::memory(FanoutSettings::default());
        let session = s("a");
        assert_eq!(b.position(&session).await, EventId::ZERO);
        let first = b.publish(&session, ev(1)).await.unwrap();
        let second = b.publish(&session, ev(2)).await.unwrap();
        let r = b.replay(&session, first).await;
        assert!(r.complete());
        assert_eq!(r.frames.iter().map(|f| f.id).collect::<Vec<_>>(), [second]);
        // From the start: held from its beginning here.
        assert_eq!(b.replay(&session, EventId::ZERO).await.frames.len(), 2);
        // An id this instance never issued.
        let forged = EventId {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        assert!(!b.replay(&session, forged).await.complete());
        // A session this instance never saw: nothing vouches for `0-0`.
        assert!(!b.replay(&s("other"), EventId::ZERO).await.complete());
    }

    #[tokio::test]
    async fn announcements_reach_every_session_without_an_id() {
        let b = Fanout::memory(FanoutSettings::default());
        let mut x = b.subscribe(&s("a")).await.unwrap();
        let mut y = b.subscribe(&s("b")).await.unwrap();
        b.publish_all(ev(7)).await.unwrap();
        for sub in [&mut x, &mut y] {
            let f = sub.next().await.unwrap().unwrap();
            assert_eq!(f.id, EventId::ZERO);
            assert!(!f.bytes.starts_with(b"id:"));
        }
    }

    #[tokio::test]
    async fn shutdown_ends_subscriptions_and_refuses_publishes() {
        let b = Fanout::memory(FanoutSettings::default());
        let mut x = b.subscribe(&s("a")).await.unwrap();
        b.shutdown().await;
        assert!(x.next().await.is_none());
        assert!(b.publish(&s("a"), ev(1)).await.is_err());
        assert!(b.subscribe(&s("a")).await.is_err());
    }
}
