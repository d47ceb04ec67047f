//! # sse-scale
//!
//! A toolkit for taking a Server-Sent Events (SSE) service from one instance
//! to many without losing events.
//!
//! Every route of an application publishes and subscribes through one
//! object-safe trait, [`Broadcaster`], held as `Arc<dyn Broadcaster>`. The
//! default implementation, [`LocalBroadcaster`], is the in-process connection
//! map: session id → live subscribers. Events are encoded to their SSE wire
//! bytes once per publish and the same [`bytes::Bytes`] is shared with every
//! subscriber, so fanning one event out to 10,000 streams costs 10,000
//! reference-count increments, not 10,000 JSON serialisations.
//!
//! ## Layout
//!
//! - [`broadcaster`] — the [`Broadcaster`] trait and [`Subscription`], the
//!   owned stream a subscriber reads (dropping it unsubscribes).
//! - [`local`] — [`LocalBroadcaster`], the in-process connection map.
//! - [`redis_broadcaster`] — [`RedisBroadcaster`], cross-instance fan-out
//!   on `sse:session:<id>` channels, gated per publish by the flag.
//! - [`redis_client`] — [`SharedRedis`], the one Redis client of the process,
//!   shared by the rate limiter and the broadcaster.
//! - [`ratelimit`] — per-session publish and per-IP stream-open limits,
//!   enforced in Redis with an in-process fallback.
//! - [`flags`] — [`flags::FlagSource`] and `FF_REDIS_SSE_BROADCAST`.
//! - [`envelope`] — the versioned JSON envelope on the Redis wire.
//! - [`history`] — per-session history for `Last-Event-ID` resume, and
//!   the `reset` answer when it no longer reaches back.
//! - [`event`] — event types, ids and validation shared by every
//!   broadcaster.
//! - [`sse`] — the SSE wire encoder (WHATWG `text/event-stream` framing).
//! - [`stream`] — [`SseStream`], the response body of one open stream:
//!   connect prelude, events, heartbeats, and an end on shutdown.
//! - [`token`] — session capability tokens (HMAC of the session id) that any
//!   instance can verify without shared state.
//! - [`config`] — the environment-driven configuration, validated at start-up.

pub mod broadcaster;
pub mod config;
pub mod envelope;
pub mod event;
pub mod flags;
pub mod history;
pub mod local;
pub mod ratelimit;
pub mod redis_broadcaster;
pub mod redis_client;
pub mod sse;
pub mod stream;
pub mod token;
pub mod unleash;

pub use broadcaster::{BroadcastError, Broadcaster, BroadcasterStats, Subscription};
pub use config::Config;
pub use event::{EventId, EventType, Frame, OutgoingEvent, SessionId};
pub use local::LocalBroadcaster;
pub use redis_broadcaster::RedisBroadcaster;
pub use redis_client::SharedRedis;
pub use stream::SseStream;
pub use token::TokenSigner;
