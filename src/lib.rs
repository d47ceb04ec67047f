//! # sse-scale
//!
//! A toolkit for taking a Server-Sent Events (SSE) service from one instance
//! to many without losing events.
//!
//! Every route of an application publishes and subscribes through one
//! object-safe trait, [`Broadcaster`], held as `Arc<dyn Broadcaster>`; its
//! implementation, [`Fanout`], is made of three parts:
//!
//! - the hub — the in-process connection map: session →
//!   subscribers connected here;
//! - [brokers](broker::Broker) — where an event gets its id, where history
//!   lives, and how events of other instances arrive: the
//!   [`MemoryBroker`](broker::memory::MemoryBroker) (one instance) and the
//!   `RedisBroker` (feature `redis`, `sse:session:<id>` channels), chosen per
//!   publish by the flag `FF_REDIS_SSE_BROADCAST`;
//! - the [control bus](control::ControlBus) — small messages to the
//!   instance that owns something (a pipeline run waiting at its gate).
//!
//! [`SseScale`] wires them from the environment ([`SseScale::from_env`]) or
//! a [`Builder`], and [`axum`] (feature `axum`) turns them into routes:
//! `docs/library.md` takes an existing axum app through the phases.
//!
//! Each event is encoded to its SSE wire bytes once and the same
//! [`bytes::Bytes`] is shared by every subscriber. [`open_stream`] is the
//! resume protocol (`Last-Event-ID`, `reset`) as one call.
//! `docs/architecture.md` follows an event through these parts.
//!
//! ## Features
//! - `redis` (default): the Redis broker, the Redis control bus, the shared
//!   Redis client and Redis-backed rate limits.
//! - `unleash` (default): `FF_REDIS_SSE_BROADCAST` from an Unleash server.
//! - `axum` (default): the `Last-Event-ID` extractor, the stream response,
//!   the drain on SIGTERM and the write-stall listener ([`axum`]).
//!
//! Without them the crate is the hub, the memory broker and the SSE stream.

// The modules a user names: each is documented in `docs/library.md`.
#[cfg(feature = "axum")]
pub mod axum;
pub mod broker;
pub mod control;
pub mod event;
pub mod flags;
pub mod metrics;
pub mod ratelimit;
#[cfg(feature = "redis")]
pub mod redis_client;
pub mod token;
#[cfg(feature = "unleash")]
pub mod unleash;

// Internals: what a user needs of them is re-exported below.
mod broadcaster;
mod budget;
mod fanout;
mod history;
mod hub;
mod resume;
mod retry;
mod scale;
mod sse;
mod stall;
mod stream;

// The reference server's lean stream writer (`routes/src/writer.rs`)
// attaches its socket to a stream's queue here. It is tied to owning the
// accept loop, so it is not offered to applications and may change in any
// release; it is public only because that server is a crate of its own.
#[doc(hidden)]
pub mod sink;

pub use broadcaster::{
    BroadcastError, Broadcaster, BroadcasterStats, Subscription, SubscriptionError,
};
#[cfg(feature = "redis")]
pub use broker::redis::{RedisBroker, RedisSettings};
pub use budget::{ReplayBudget, ReplayHold};
pub use control::{ControlBus, LoopbackBus};
pub use event::{EventId, EventType, Frame, OutgoingEvent, SessionId};
pub use fanout::{Fanout, FanoutSettings};
pub use history::HistoryLimits;
#[cfg(feature = "redis")]
pub use redis_client::SharedRedis;
pub use resume::{open_stream, ResumeOutcome, StreamOptions};
pub use scale::{BuildError, Builder, SseScale};
pub use stall::StallGuard;
pub use stream::{CloseSignal, SseStream, StreamEnd};
pub use token::TokenSigner;
/// Re-exported: the shutdown signal and task tracker some signatures take.
pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;
