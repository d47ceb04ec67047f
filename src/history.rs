//! Per-session event history: what lets a reconnecting client resume with
//! `Last-Event-ID` instead of losing the events published while it was away.
//!
//! [`History`] is the in-process store: a bounded ring of recent frames per
//! session (`HISTORY_MAXLEN` events, kept `HISTORY_TTL_SECS` after the last
//! one, and at most `HISTORY_MEMORY_MB` over all sessions). In local mode it
//! holds every event; in Redis mode it holds only the events that did not
//! reach Redis (flag off, or Redis unreachable), since Redis keeps the rest
//! in a stream per session.
//!
//! [`Replay`] is the answer to "what came after id X": the frames to send,
//! or, when the history no longer reaches back to X, the fact that events
//! were lost, so the stream starts with a `reset` event instead of silently
//! skipping them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::event::{EventId, Frame, SessionId};

/// What a resume from an id finds in history.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Replay {
    /// Events after the requested id, in id order.
    pub frames: Vec<Frame>,
    /// Whether history reaches back to the requested id: false means events
    /// after it may have been dropped (trimmed, or published where this
    /// history cannot see), and the client must reload its state.
    pub complete: bool,
    /// The oldest id still held, if any (sent in the `reset` event).
    pub oldest: Option<EventId>,
    /// The newest id held, if any.
    pub newest: Option<EventId>,
}

impl Replay {
    /// Merges two answers for the same request (Redis and in-process):
    /// frames by id without duplicates; complete if either reaches back.
    pub fn merge(mut self, other: Replay) -> Replay {
        self.frames.extend(other.frames);
        self.frames.sort_by_key(|f| f.id);
        self.frames.dedup_by_key(|f| f.id);
        self.complete |= other.complete;
        self.oldest = min_some(self.oldest, other.oldest);
        self.newest = self.newest.max(other.newest);
        self
    }
}

fn min_some(a: Option<EventId>, b: Option<EventId>) -> Option<EventId> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Limits of a [`History`].
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Events kept per session.
    pub maxlen: usize,
    /// A session's history is dropped this long after its last event.
    pub ttl: Duration,
    /// Bytes of event data kept over all sessions; past it, the histories
    /// of the sessions idle the longest are dropped.
    pub max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            maxlen: 1000,
            ttl: Duration::from_secs(3600),
            max_bytes: 256 << 20,
        }
    }
}

/// The in-process history. See the module docs.
#[derive(Debug)]
pub struct History {
    limits: HistoryLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rings: HashMap<SessionId, Ring>,
    bytes: usize,
    last_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Ring {
    frames: VecDeque<Frame>,
    /// Whether events were ever dropped from the front (MAXLEN).
    trimmed: bool,
    bytes: usize,
    touched: Instant,
}

/// Expired rings are looked for at most this often (on record).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl History {
    pub fn new(limits: HistoryLimits) -> Self {
        Self {
            limits: HistoryLimits {
                maxlen: limits.maxlen.max(1),
                ..limits
            },
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Appends a frame to the session's ring. Frames share their bytes with
    /// the live subscribers, so this costs no copy of the event.
    pub fn record(&self, session: &SessionId, frame: &Frame) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now, self.limits.ttl);
        let size = frame.bytes.len();
        let ring = inner.rings.entry(session.clone()).or_insert_with(|| Ring {
            frames: VecDeque::new(),
            trimmed: false,
            bytes: 0,
            touched: now,
        });
        ring.touched = now;
        ring.frames.push_back(frame.clone());
        ring.bytes += size;
        let mut freed = 0;
        while ring.frames.len() > self.limits.maxlen {
            if let Some(old) = ring.frames.pop_front() {
                ring.trimmed = true;
                ring.bytes -= old.bytes.len();
                freed += old.bytes.len();
            }
        }
        inner.bytes = inner.bytes + size - freed;
        if inner.bytes > self.limits.max_bytes {
            inner.evict(self.limits.max_bytes, session);
        }
    }

    /// The frames of `session` after `after`. `EventId::default()` (`0-0`)
    /// means "from the start": the position of a client that connected
    /// before the session had any event.
    pub fn after(&self, session: &SessionId, after: EventId) -> Replay {
        let now = Instant::now();
        let inner = self.lock();
        let Some(ring) = inner
            .rings
            .get(session)
            .filter(|r| now.duration_since(r.touched) < self.limits.ttl)
        else {
            // No history: complete only for a client that has seen nothing
            // (an expired or evicted history may have held its events).
            return Replay {
                complete: after == EventId::default(),
                ..Replay::default()
            };
        };
        let oldest = ring.frames.front().map(|f| f.id);
        Replay {
            frames: ring
                .frames
                .iter()
                .filter(|f| f.id > after)
                .cloned()
                .collect(),
            complete: !ring.trimmed || oldest.is_some_and(|o| o <= after),
            oldest,
            newest: ring.frames.back().map(|f| f.id),
        }
    }

    /// The newest id held for `session`.
    pub fn newest(&self, session: &SessionId) -> Option<EventId> {
        let inner = self.lock();
        inner
            .rings
            .get(session)
            .and_then(|r| r.frames.back())
            .map(|f| f.id)
    }

    /// Sessions with history, and the bytes held (for `/stats`).
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.rings.len(), inner.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the map consistent, so a poisoned
        // lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant, ttl: Duration) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        let mut freed = 0;
        self.rings.retain(|_, r| {
            let keep = now.duration_since(r.touched) < ttl;
            if !keep {
                freed += r.bytes;
            }
            keep
        });
        self.bytes -= freed;
    }

    /// Drops whole rings, least recently written first, until under `max`.
    /// The ring being written is kept.
    fn evict(&mut self, max: usize, keep: &SessionId) {
        let mut by_age: Vec<(Instant, SessionId)> = self
            .rings
            .iter()
            .filter(|(s, _)| *s != keep)
            .map(|(s, r)| (r.touched, s.clone()))
            .collect();
        by_age.sort();
        // Evict down to 90 % so the sort is not repeated on every record.
        let target = max / 10 * 9;
        for (_, session) in by_age {
            if self.bytes <= target {
                break;
            }
            if let Some(ring) = self.rings.remove(&session) {
                self.bytes -= ring.bytes;
                tracing::warn!(
                    session = %session,
                    "history dropped: HISTORY_MEMORY_MB reached; a resume will get a reset"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, IdGenerator};
    use crate::sse::encode_event;

    fn frame(ids: &IdGenerator, data: &str) -> Frame {
        let id = ids.next_id();
        Frame {
            id,
            bytes: encode_event(Some(id), &EventType::from_static("n"), data),
        }
    }

    fn session(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    #[test]
    fn replays_after_an_id_and_knows_when_it_reaches_back() {
        let h = History::new(HistoryLimits {
            maxlen: 3,
            ..Default::default()
        });
        let ids = IdGenerator::new();
        let s = session("s");
        let f: Vec<Frame> = (0..5).map(|n| frame(&ids, &n.to_string())).collect();
        for x in &f {
            h.record(&s, x);
        }
        // Only the last three are held.
        let r = h.after(&s, f[2].id);
        assert!(r.complete);
        assert_eq!(
            r.frames.iter().map(|x| x.id).collect::<Vec<_>>(),
            [f[3].id, f[4].id]
        );
        let r = h.after(&s, f[0].id);
        assert!(!r.complete, "f[1] was trimmed");
        assert_eq!(r.oldest, Some(f[2].id));
        assert!(!h.after(&session("other"), f[0].id).complete);
    }

    #[test]
    fn memory_cap_drops_the_oldest_sessions() {
        let h = History::new(HistoryLimits {
            maxlen: 100,
            ttl: Duration::from_secs(60),
            max_bytes: 4096,
        });
        let ids = IdGenerator::new();
        let big = "x".repeat(1000);
        for n in 0..10 {
            h.record(&session(&format!("s{n}")), &frame(&ids, &big));
        }
        let (sessions, bytes) = h.usage();
        assert!(bytes <= 4096, "{bytes}");
        assert!(sessions < 10);
        // The newest session survived.
        let first = EventId::default();
        assert_eq!(h.after(&session("s9"), first).frames.len(), 1);
    }

    #[test]
    fn merge_dedups_by_id() {
        let ids = IdGenerator::new();
        let (a, b, c) = (frame(&ids, "a"), frame(&ids, "b"), frame(&ids, "c"));
        let x = Replay {
            frames: vec![a.clone(), c.clone()],
            complete: false,
            oldest: Some(a.id),
            newest: Some(c.id),
        };
        let y = Replay {
            frames: vec![b.clone(), c.clone()],
            complete: true,
            oldest: Some(b.id),
            newest: Some(c.id),
        };
        let m = x.merge(y);
        assert!(m.complete);
        assert_eq!(
            m.frames.iter().map(|f| f.id).collect::<Vec<_>>(),
            [a.id, b.id, c.id]
        );
        assert_eq!(m.oldest, Some(a.id));
    }
}
