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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::event::{EventId, Frame, SessionId};

/// What one history answers to "the events of a session after id X".
///
/// A history may vouch for "everything after X" only when it can prove
/// continuity from X: it holds the event X itself (everything after an
/// event it holds is held too, since it only ever drops its oldest events),
/// or X is `0-0` and it holds the session from its very beginning. Anything
/// else — an id it never issued, one from another instance, one from the
/// future — is not vouched for, and the stream answers `reset` instead of
/// silently skipping events.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Replay {
    /// Events after X, in id order.
    pub frames: Vec<Frame>,
    /// Whether this history proves X is a point of its own sequence.
    pub vouched: bool,
    /// Whether nothing after X was dropped from this history.
    pub gapless: bool,
    /// Whether the events after X exceed what one resume may replay.
    pub too_large: bool,
    /// The oldest id still held, if any (sent in the `reset` event).
    pub oldest: Option<EventId>,
    /// The newest id held, if any.
    pub newest: Option<EventId>,
    /// A shared history's (Redis's) answer: the newest event after X that
    /// this instance kept to itself (flag off here), which this instance's
    /// own history must hold for the merge to be complete.
    pub kept_here_through: Option<EventId>,
    /// A shared history's answer: events of this instance after X that
    /// reached it under another id than the one this instance's clients saw
    /// them under (an outbox event whose id was taken): `(id there, id
    /// here)`. Replayed once, under the id here when this instance's history
    /// holds it. (One whose first id is at or before X, and its new one
    /// after, makes the shared history not gapless: the client may have
    /// seen it or not.)
    pub renumbered: Vec<(EventId, EventId)>,
    /// The shared history (Redis) could not be read: the client's id may
    /// well be a point of it, so the `reset` keeps the client there.
    pub unreadable: bool,
}

impl Replay {
    /// The answer of a history that holds nothing of the session: it
    /// vouches for nothing and has dropped nothing.
    pub fn nothing() -> Self {
        Self {
            gapless: true,
            ..Self::default()
        }
    }

    /// Whether the frames are every event after X.
    pub fn complete(&self) -> bool {
        self.vouched && self.gapless && !self.too_large
    }

    /// Combines the answers of two histories that each hold part of one
    /// session's events — `self` the shared one (Redis), `other` this
    /// instance's: one of them must vouch for X, and neither may have
    /// dropped anything after it. An event is replayed once under one id:
    /// equal ids are one event, and an event this instance's history holds
    /// under its own id is not replayed again under the id Redis gave it.
    pub fn merge(mut self, other: Replay, max_bytes: usize) -> Replay {
        if let Some(through) = self.kept_here_through {
            if other.newest.is_none_or(|newest| newest < through) {
                self.gapless = false;
            }
        }
        if !self.renumbered.is_empty() {
            let here: HashSet<EventId> = other.frames.iter().map(|f| f.id).collect();
            let again: HashSet<EventId> = self
                .renumbered
                .iter()
                .filter(|(_, id)| here.contains(id))
                .map(|(shared, _)| *shared)
                .collect();
            self.frames.retain(|f| !again.contains(&f.id));
        }
        if !other.frames.is_empty() {
            self.frames.extend(other.frames);
            self.frames.sort_by_key(|f| f.id);
            self.frames.dedup_by_key(|f| f.id);
        }
        self.vouched |= other.vouched;
        self.gapless &= other.gapless;
        self.unreadable |= other.unreadable;
        self.too_large |= other.too_large || frames_bytes(&self.frames) > max_bytes;
        self.oldest = min_some(self.oldest, other.oldest);
        self.newest = self.newest.max(other.newest);
        self
    }
}

fn frames_bytes(frames: &[Frame]) -> usize {
    frames.iter().map(|f| f.bytes.len()).sum()
}

fn min_some(a: Option<EventId>, b: Option<EventId>) -> Option<EventId> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Limits of the in-process history of each session (the memory broker's,
/// and the Redis broker's fallback while Redis is away).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Events kept per session.
    pub maxlen: usize,
    /// A session's history is dropped this long after its last event.
    pub ttl: Duration,
    /// Bytes kept over all sessions (events plus bookkeeping); past it,
    /// the largest histories are dropped first.
    pub max_bytes: usize,
    /// Bytes one session may hold; past it its oldest events are dropped,
    /// so one busy session cannot push every other out of `max_bytes`.
    pub session_max_bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            maxlen: 1000,
            ttl: Duration::from_secs(3600),
            max_bytes: 256 << 20,
            session_max_bytes: 4 << 20,
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
    /// Sessions whose ring was dropped (expired, or evicted for memory),
    /// with the newest id it held: a ring made for one of them later holds
    /// nothing from before, and says so. At most [`FORGOTTEN_MAX`], the
    /// oldest forgotten first.
    forgotten: HashMap<SessionId, EventId>,
    forgotten_order: VecDeque<SessionId>,
}

#[derive(Debug)]
struct Ring {
    frames: VecDeque<Frame>,
    /// The newest event dropped from the front (MAXLEN), if any: the ring
    /// holds every event it recorded after it.
    trimmed_through: Option<EventId>,
    /// Set when the ring was opened for the session before it had any
    /// event here ([`History::anchor`]): it then holds the session from its
    /// beginning, and vouches for `0-0`.
    from_start: bool,
    bytes: usize,
    touched: Instant,
}

/// What a held frame costs besides its bytes (the frame, the ring slot, the
/// shared buffer's header), and what a session's ring costs with no frame
/// (the map entry, the ring, the session id): counted against the limits.
const FRAME_OVERHEAD: usize = 64;
const RING_OVERHEAD: usize = 192;

/// Dropped rings remembered (see `Inner::forgotten`): about 100 bytes each.
const FORGOTTEN_MAX: usize = 65_536;

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
        let size = cost(frame);
        let ring = inner.ring(session, now, false);
        ring.touched = now;
        ring.frames.push_back(frame.clone());
        ring.bytes += size;
        let mut freed = 0;
        while ring.frames.len() > self.limits.maxlen
            || (ring.bytes > self.limits.session_max_bytes && ring.frames.len() > 1)
        {
            if let Some(old) = ring.frames.pop_front() {
                let old_size = cost(&old);
                ring.trimmed_through = Some(old.id);
                ring.bytes -= old_size;
                freed += old_size;
            }
        }
        inner.bytes = inner.bytes + size - freed;
        if inner.bytes > self.limits.max_bytes {
            inner.evict(self.limits.max_bytes, session);
        }
    }

    /// The frames of `session` after `after`, at most `max_bytes` of them
    /// (see [`Replay`] for what the answer vouches for).
    pub fn after(&self, session: &SessionId, after: EventId, max_bytes: usize) -> Replay {
        let now = Instant::now();
        let inner = self.lock();
        let Some(ring) = inner
            .rings
            .get(session)
            .filter(|r| now.duration_since(r.touched) < self.limits.ttl)
        else {
            return Replay::nothing();
        };
        let holds = ring.frames.binary_search_by_key(&after, |f| f.id).is_ok();
        let untrimmed = ring.trimmed_through.is_none();
        let start = ring.frames.partition_point(|f| f.id <= after);
        let mut frames = Vec::new();
        let mut bytes = 0;
        let mut too_large = false;
        for f in ring.frames.range(start..) {
            bytes += f.bytes.len();
            if bytes > max_bytes {
                too_large = true;
                frames.clear();
                break;
            }
            frames.push(f.clone());
        }
        Replay {
            frames,
            vouched: holds || (after == EventId::ZERO && ring.from_start && untrimmed),
            gapless: ring.trimmed_through.is_none_or(|t| t <= after),
            too_large,
            oldest: ring.frames.front().map(|f| f.id),
            newest: ring.frames.back().map(|f| f.id),
            ..Replay::default()
        }
    }

    /// Where a new subscriber of `session` starts on this instance: the
    /// newest event held, or `0-0` if there is none. A session without
    /// history gets an empty ring that holds it from its beginning, so this
    /// instance can later vouch for `0-0` — an instance that never saw the
    /// session cannot.
    pub fn anchor(&self, session: &SessionId) -> EventId {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now, self.limits.ttl);
        let ring = inner.ring(session, now, true);
        ring.touched = now;
        ring.frames.back().map_or(EventId::ZERO, |f| f.id)
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

    /// The newest event of `session` held here under a sequence id (not a
    /// local one): with Redis, the newest the flag kept on this instance.
    pub fn newest_sequenced(&self, session: &SessionId) -> Option<EventId> {
        let inner = self.lock();
        inner
            .rings
            .get(session)?
            .frames
            .iter()
            .rev()
            .map(|f| f.id)
            .find(|id| !id.is_local())
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

impl Ring {
    /// The newest event this ring held, even if trimmed since.
    fn newest_held(&self) -> Option<EventId> {
        self.frames.back().map(|f| f.id).or(self.trimmed_through)
    }

    fn new(now: Instant, from_start: bool) -> Self {
        Self {
            frames: VecDeque::new(),
            trimmed_through: None,
            from_start,
            bytes: RING_OVERHEAD,
            touched: now,
        }
    }
}

/// What holding `frame` costs.
fn cost(frame: &Frame) -> usize {
    frame.bytes.len() + FRAME_OVERHEAD
}

impl Inner {
    /// The session's ring, made (and its overhead counted) if need be.
    fn ring(&mut self, session: &SessionId, now: Instant, from_start: bool) -> &mut Ring {
        if !self.rings.contains_key(session) {
            self.bytes += RING_OVERHEAD;
            let mut ring = Ring::new(now, from_start);
            if let Some(dropped) = self.forgotten.remove(session) {
                // Events up to `dropped` were here and are gone.
                ring.trimmed_through = Some(dropped);
                ring.from_start = false;
            }
            self.rings.insert(session.clone(), ring);
        }
        self.rings
            .get_mut(session)
            .expect("the ring was just made if it was missing")
    }

    /// Remembers that `session`'s ring, holding up to `newest`, was dropped.
    fn forget(&mut self, session: SessionId, newest: Option<EventId>) {
        let Some(newest) = newest else { return };
        if self.forgotten.insert(session.clone(), newest).is_none() {
            self.forgotten_order.push_back(session);
        }
        while self.forgotten.len() > FORGOTTEN_MAX {
            match self.forgotten_order.pop_front() {
                Some(old) => {
                    self.forgotten.remove(&old);
                }
                None => break,
            }
        }
        // Entries of sessions whose ring came back are skipped above; keep
        // the order from outgrowing the map by much.
        if self.forgotten_order.len() > 2 * FORGOTTEN_MAX {
            let forgotten = &self.forgotten;
            self.forgotten_order.retain(|s| forgotten.contains_key(s));
        }
    }

    fn sweep(&mut self, now: Instant, ttl: Duration) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        let mut freed = 0;
        let mut dropped = Vec::new();
        self.rings.retain(|session, r| {
            let keep = now.duration_since(r.touched) < ttl;
            if !keep {
                freed += r.bytes;
                dropped.push((session.clone(), r.newest_held()));
            }
            keep
        });
        self.bytes -= freed;
        for (session, newest) in dropped {
            self.forget(session, newest);
        }
    }

    /// The ring being written is kept.
    /// Drops whole rings, the largest first (of equal ones, the idle
    /// longest), until the sessions hold 90 % of `max`. Largest first, not
    /// least recently written: a client that fills memory with sessions of
    /// its own pushes out its own histories before a smaller one of anybody
    /// else, however long that one has been idle.
    fn evict(&mut self, max: usize, keep: &SessionId) {
        let mut by_size: Vec<(std::cmp::Reverse<usize>, Instant, SessionId)> = self
            .rings
            .iter()
            .filter(|(s, _)| *s != keep)
            .map(|(s, r)| (std::cmp::Reverse(r.bytes), r.touched, s.clone()))
            .collect();
        by_size.sort();
        // Evict down to 90 % so the sort is not repeated on every record.
        let target = max / 10 * 9;
        for (_, _, session) in by_size {
            if self.bytes <= target {
                break;
            }
            if let Some(ring) = self.rings.remove(&session) {
                self.bytes -= ring.bytes;
                self.forget(session.clone(), ring.newest_held());
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

    const ALL: usize = usize::MAX;

    #[test]
    fn replays_after_an_id_it_holds_and_knows_when_it_reaches_back() {
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
        let r = h.after(&s, f[2].id, ALL);
        assert!(r.complete());
        assert_eq!(
            r.frames.iter().map(|x| x.id).collect::<Vec<_>>(),
            [f[3].id, f[4].id]
        );
        let r = h.after(&s, f[0].id, ALL);
        assert!(!r.complete(), "f[1] was trimmed");
        assert!(!r.gapless);
        assert_eq!(r.oldest, Some(f[2].id));
        assert!(!h.after(&session("other"), f[0].id, ALL).complete());
    }

    #[test]
    fn vouches_only_for_ids_it_holds_or_a_start_it_saw() {
        let h = History::new(HistoryLimits::default());
        let ids = IdGenerator::new();
        let s = session("s");
        let e = frame(&ids, "mine");
        h.record(&s, &e);
        // An id this history never held (another instance's, the future,
        // or the start of a session it only joined later): no vouching.
        let elsewhere = EventId {
            ms: e.id.ms - 1,
            seq: 0,
        };
        for x in [
            elsewhere,
            EventId::ZERO,
            EventId {
                ms: u64::MAX,
                seq: u64::MAX,
            },
        ] {
            let r = h.after(&s, x, ALL);
            assert!(!r.complete(), "{x}");
            assert!(r.gapless);
        }
        assert!(h.after(&s, e.id, ALL).complete());
        // A session opened here before its first event is held from its
        // beginning: `0-0` is vouched for.
        let fresh = session("fresh");
        assert_eq!(h.anchor(&fresh), EventId::ZERO);
        let first = frame(&ids, "first");
        h.record(&fresh, &first);
        let r = h.after(&fresh, EventId::ZERO, ALL);
        assert!(r.complete());
        assert_eq!(r.frames.len(), 1);
        assert_eq!(h.anchor(&fresh), first.id);
    }

    #[test]
    fn a_replay_over_the_byte_cap_is_too_large() {
        let h = History::new(HistoryLimits::default());
        let ids = IdGenerator::new();
        let s = session("s");
        let f: Vec<Frame> = (0..10).map(|_| frame(&ids, &"x".repeat(1000))).collect();
        for x in &f {
            h.record(&s, x);
        }
        let r = h.after(&s, f[0].id, 5000);
        assert!(r.too_large && !r.complete());
        assert!(r.frames.is_empty());
        assert!(h.after(&s, f[6].id, 5000).complete());
    }

    #[test]
    fn one_session_cannot_take_the_others_history() {
        let h = History::new(HistoryLimits {
            maxlen: 1000,
            ttl: Duration::from_secs(60),
            max_bytes: 64 << 10,
            session_max_bytes: 16 << 10,
        });
        let ids = IdGenerator::new();
        let quiet = frame(&ids, "quiet");
        h.record(&session("quiet"), &quiet);
        let big = "x".repeat(1000);
        for _ in 0..500 {
            h.record(&session("busy"), &frame(&ids, &big));
        }
        let (sessions, bytes) = h.usage();
        assert_eq!(sessions, 2, "the quiet session kept its history");
        assert!(bytes <= 20 << 10, "{bytes}");
        assert_eq!(h.newest(&session("quiet")), Some(quiet.id));
        // The busy one lost only its own oldest events.
        assert!(!h.after(&session("busy"), EventId::ZERO, ALL).complete());
    }

    #[test]
    fn a_flood_of_large_histories_drops_them_before_a_small_idle_one() {
        let h = History::new(HistoryLimits {
            maxlen: 100,
            ttl: Duration::from_secs(60),
            max_bytes: 8192,
            session_max_bytes: 4096,
        });
        let ids = IdGenerator::new();
        let victim = frame(&ids, "a small history, written first");
        h.record(&session("victim"), &victim);
        let big = "x".repeat(1000);
        for n in 0..20 {
            for _ in 0..3 {
                h.record(&session(&format!("flood{n}")), &frame(&ids, &big));
            }
        }
        assert!(h.usage().1 <= 8192 + 3 * (1000 + 64) + 192);
        assert_eq!(h.newest(&session("victim")), Some(victim.id));
        assert!(h.after(&session("victim"), victim.id, ALL).complete());
    }

    #[test]
    fn memory_cap_drops_sessions_down_to_the_cap() {
        let h = History::new(HistoryLimits {
            maxlen: 100,
            ttl: Duration::from_secs(60),
            max_bytes: 4096,
            session_max_bytes: 4096,
        });
        let ids = IdGenerator::new();
        let big = "x".repeat(1000);
        let mut last = None;
        for n in 0..10 {
            let f = frame(&ids, &big);
            h.record(&session(&format!("s{n}")), &f);
            last = Some(f.id);
        }
        let (sessions, bytes) = h.usage();
        assert!(bytes <= 4096 + 1000 + 64 + 192, "{bytes}");
        assert!(sessions < 10);
        // The newest session survived.
        assert_eq!(h.newest(&session("s9")), last);
    }

    #[test]
    fn a_ring_made_again_after_its_session_was_dropped_says_it_lacks_the_old_events() {
        let h = History::new(HistoryLimits {
            maxlen: 100,
            ttl: Duration::from_secs(60),
            max_bytes: 4096,
            session_max_bytes: 4096,
        });
        let ids = IdGenerator::new();
        let s = session("s");
        let big = "x".repeat(1000);
        let (first, second) = (frame(&ids, &big), frame(&ids, &big));
        h.record(&s, &first);
        h.record(&s, &second);
        // Pushed out by other sessions' history: the largest goes first.
        for n in 0..8 {
            h.record(&session(&format!("o{n}")), &frame(&ids, &big));
        }
        assert_eq!(h.newest(&s), None, "evicted");
        let third = frame(&ids, "3");
        h.record(&s, &third);
        // From before what was dropped: the new ring cannot say.
        let r = h.after(&s, first.id, ALL);
        assert!(!r.gapless && !r.complete());
        assert!(!h.after(&s, EventId::ZERO, ALL).complete());
        // From the newest event it had dropped on, it holds everything.
        let r = h.after(&s, second.id, ALL);
        assert!(r.gapless);
        assert_eq!(r.frames.len(), 1);
    }

    #[test]
    fn merge_needs_one_voucher_and_no_gap_anywhere() {
        let ids = IdGenerator::new();
        let (a, b, c) = (frame(&ids, "a"), frame(&ids, "b"), frame(&ids, "c"));
        let held = Replay {
            frames: vec![a.clone(), c.clone()],
            vouched: true,
            gapless: true,
            oldest: Some(a.id),
            newest: Some(c.id),
            ..Replay::default()
        };
        let other = Replay {
            frames: vec![b.clone(), c.clone()],
            vouched: false,
            gapless: true,
            oldest: Some(b.id),
            newest: Some(c.id),
            ..Replay::default()
        };
        let m = held.clone().merge(other.clone(), ALL);
        assert!(m.complete());
        assert_eq!(
            m.frames.iter().map(|f| f.id).collect::<Vec<_>>(),
            [a.id, b.id, c.id]
        );
        assert_eq!(m.oldest, Some(a.id));
        // A trimmed history is a gap, whoever vouches.
        let trimmed = Replay {
            gapless: false,
            ..other.clone()
        };
        assert!(!held.clone().merge(trimmed, ALL).complete());
        // Two histories that each hold nothing of the id vouch for nothing.
        assert!(!other.clone().merge(Replay::nothing(), ALL).complete());
        // Redis knows of an event this instance kept to itself after X:
        // complete only if this history still holds it.
        let shared = Replay {
            kept_here_through: Some(c.id),
            ..other.clone()
        };
        assert!(shared.clone().merge(held.clone(), ALL).complete());
        let short = Replay {
            frames: vec![a.clone()],
            newest: Some(a.id),
            ..held.clone()
        };
        assert!(!shared.merge(short, ALL).complete());
        // An event held here as `b` that Redis renumbered `r`: replayed
        // once, as `b`, when this history has it after X; as `r` when it
        // does not.
        let r = frame(&ids, "b again");
        let renumbered = Replay {
            frames: vec![r.clone()],
            vouched: true,
            gapless: true,
            renumbered: vec![(r.id, b.id)],
            ..Replay::default()
        };
        let here = Replay {
            frames: vec![b.clone(), c.clone()],
            vouched: true,
            gapless: true,
            newest: Some(c.id),
            ..Replay::default()
        };
        let ids_of = |m: Replay| m.frames.iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids_of(renumbered.clone().merge(here, ALL)), [b.id, c.id]);
        let without = Replay {
            frames: vec![c.clone()],
            vouched: true,
            gapless: true,
            newest: Some(c.id),
            ..Replay::default()
        };
        assert_eq!(ids_of(renumbered.merge(without, ALL)), [c.id, r.id]);
        // The union counts against the byte cap.
        assert!(!held.merge(other, a.bytes.len() * 2).complete());
    }
}
