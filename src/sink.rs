//! [`Sink`]: one subscriber's end of the connection map. It holds a bounded
//! queue of frames for the subscriber's stream task and, once the stream's
//! writer has handed over a [`DirectWrite`] ([`DirectWriter::attach`]), a
//! direct path: the delivering task writes the frame itself, with one
//! write that does not wait.
//!
//! Why the direct path: a delivery through a queue wakes the stream's
//! task, which is scheduled, polls its body and then writes, several times
//! the user-space work of the write itself (docs/benchmarks.md). Written
//! from the delivering task, a delivery is one `write`, the least any server
//! can do. The library holds no socket: how bytes reach the connection is
//! the server's [`DirectWrite`] (the reference server's is its TCP socket).
//!
//! **Order** rests on one rule: a direct write is allowed only while the
//! stream's writer is *idle*, with nothing queued and nothing in flight. The
//! writer turns idle only when it asks for its next frame and finds none; a
//! writer asks only after its previous write finished, so nothing of its
//! own is in flight then. It stops being idle the moment anything is queued
//! for it. A direct write that does not go through whole (the socket is
//! full) queues the rest and wakes the writer. The writer finishes it with
//! its own awaited, stall-guarded writes, and later frames queue behind it.
//!
//! **Bounds.** The queue holds at most the hub's queue length of frames (the
//! writer's own heartbeat and closing hint aside). A subscriber that falls
//! further behind is cut ([`Ended::Lagged`]), its queue freed. A direct
//! write that fails (the peer reset the connection) ends the subscriber too
//! ([`Ended::Gone`]).

// A hidden module (see lib.rs): its docs are for maintainers and name the
// crate-private queue they describe.
#![allow(rustdoc::private_intra_doc_links)]

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::time::Instant;

use crate::event::{EventId, Frame};
use crate::sse;

/// Why a sink takes no more frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It fell more than its queue behind and missed `.0` events.
    Lagged(u64),
    /// A direct write failed: the connection is gone.
    Gone,
    /// The hub closed, or the writer sealed it after its closing hint.
    Closed,
}

/// What became of one offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Written whole into the socket.
    Written,
    /// Queued for the writer.
    Queued,
    /// Not for this subscriber (before its position, or it has ended).
    Dropped,
}

/// See the module docs.
#[derive(Default)]
pub(crate) struct Sink {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Frame>,
    waker: Option<Waker>,
    /// Where deliveries write directly, once the writer handed it over.
    direct: Option<Arc<dyn DirectWrite>>,
    /// The writer has nothing queued or in flight: see the module docs.
    idle: bool,
    /// Frames up to this id are not for this subscriber: the replay carried
    /// them, or they predate its connection.
    position: Option<EventId>,
    /// The client loaded its state at this id (a fresh stream's position, or
    /// the position a resume's `reset` gave it): an event at or before it
    /// that arrives late was already reflected in that load.
    loaded_at: EventId,
    /// The id the last order `reset` sent here carried: it stands for every
    /// late event up to it (one reset per episode, see [`crate::hub`]).
    reset_at: EventId,
    /// Resets (order and gap) queued before the stream had a position
    /// (while it subscribed and read its replay), by queue index, and the
    /// episode before the first: [`Sink::opened`] reconsiders them once
    /// the position is known, since the replay or the stream's own `reset`
    /// may stand for them, and none may move the client back. Nothing is
    /// taken from the queue before then: the stream is not read yet.
    early: Vec<(usize, Early)>,
    reset_before_early: EventId,
    ended: Option<Ended>,
    /// The end was reported to the writer.
    reported: bool,
    /// When a delivered frame last went out (written or queued): a stream
    /// that carries events needs no heartbeat comment to stay open.
    last_out: Option<Instant>,
}

/// A `reset` queued before its stream had a position.
#[derive(Clone, Copy)]
enum Early {
    /// An order reset: the session's newest id then, and the late event.
    Order { newest: EventId, late: EventId },
    /// A gap reset to `at`: what the stream lost is at or before it.
    Gap { at: EventId },
}

/// A queue this long, once empty, gives its memory back.
const KEEP_CAPACITY: usize = 16;

impl State {
    fn wants(&self, id: EventId) -> bool {
        // An announcement or a reset carries no id: never a repeat. Ids only
        // grow, so a position once passed stays passed.
        id == EventId::ZERO || self.position.is_none_or(|p| id > p)
    }

    /// Queues the writer's own bytes; false once the sink has ended.
    fn push_own(&mut self, bytes: Bytes) -> bool {
        if self.ended.is_some() {
            return false;
        }
        self.idle = false;
        self.queue.push_back(Frame {
            id: EventId::ZERO,
            bytes,
        });
        true
    }

    fn end(&mut self, why: Ended) -> Option<Waker> {
        self.ended.get_or_insert(why);
        self.idle = false;
        if why != Ended::Closed {
            // Cut: what is queued will never be written.
            self.queue = VecDeque::new();
        }
        self.waker.take()
    }
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent, so a poisoned
        // lock still guards a usable one.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a delivered frame: written straight into the socket when the
    /// writer is idle, else queued for it (or the subscriber is cut when its
    /// queue already holds `cap` frames). `now` is when the delivery began,
    /// read once for all of a session's subscribers.
    // Inlined into the hub's delivery loop, as it was before the direct
    // write became a trait: 20 instructions per delivery (docs/benchmarks.md).
    #[inline]
    pub(crate) fn offer(&self, frame: &Frame, cap: usize, now: Instant) -> Offered {
        let st = self.lock();
        if st.ended.is_some() || !st.wants(frame.id) {
            return Offered::Dropped;
        }
        Self::put(st, frame, cap, now)
    }

    /// Offers the order `reset` for an event `late` that arrived after the
    /// session's `newest` (`shared` is that reset, built once for the
    /// session). Nothing, when this subscriber's last reset or its client's
    /// load already stands for `late`; otherwise a reset that never moves
    /// the client back: to `newest`, or to this stream's own position when
    /// it is further (a stream that resumed past what this instance has
    /// delivered).
    pub(crate) fn offer_reset(
        &self,
        shared: &Frame,
        newest: EventId,
        late: EventId,
        cap: usize,
        now: Instant,
    ) -> Offered {
        let mut st = self.lock();
        if st.ended.is_some() || late <= st.reset_at.max(st.loaded_at) {
            return Offered::Dropped;
        }
        if st.position.is_none() && st.ended.is_none() {
            if st.early.is_empty() {
                st.reset_before_early = st.reset_at;
            }
            let at = st.queue.len();
            st.early.push((at, Early::Order { newest, late }));
        }
        let at = newest.max(st.position.unwrap_or_default());
        st.reset_at = at;
        if at == newest {
            Self::put(st, shared, cap, now)
        } else {
            Self::put(st, &sse::order_reset(at, late), cap, now)
        }
    }

    /// Offers the `reset` (`shared`, to `at`) for events this subscriber
    /// missed and no history holds any more: nothing when it is already
    /// past `at` (its position, its client's load or its last reset).
    pub(crate) fn offer_gap(
        &self,
        shared: &Frame,
        at: EventId,
        cap: usize,
        now: Instant,
    ) -> Offered {
        let mut st = self.lock();
        let past = st
            .position
            .unwrap_or_default()
            .max(st.loaded_at)
            .max(st.reset_at);
        if st.ended.is_some() || past >= at {
            return Offered::Dropped;
        }
        if st.position.is_none() {
            if st.early.is_empty() {
                st.reset_before_early = st.reset_at;
            }
            let index = st.queue.len();
            st.early.push((index, Early::Gap { at }));
        }
        st.reset_at = at;
        Self::put(st, shared, cap, now)
    }

    /// Writes or queues a frame this subscriber wants.
    fn put(mut st: MutexGuard<'_, State>, frame: &Frame, cap: usize, now: Instant) -> Offered {
        // Set before the outcome is known: a frame that is cut with its
        // subscriber ends the stream, and then no heartbeat is due anyway.
        st.last_out = Some(now);
        if st.idle {
            if let Some(direct) = &st.direct {
                match direct.write_now(&frame.bytes) {
                    Ok(n) if n == frame.bytes.len() => return Offered::Written,
                    Ok(n) => {
                        let rest = Frame {
                            id: frame.id,
                            bytes: frame.bytes.slice(n..),
                        };
                        st.idle = false;
                        st.queue.push_back(rest);
                        let waker = st.waker.take();
                        drop(st);
                        wake(waker);
                        return Offered::Queued;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        let waker = st.end(Ended::Gone);
                        drop(st);
                        wake(waker);
                        return Offered::Dropped;
                    }
                }
            }
        }
        if st.queue.len() >= cap {
            let missed = st.queue.len() as u64 + 1;
            let waker = st.end(Ended::Lagged(missed));
            drop(st);
            wake(waker);
            return Offered::Dropped;
        }
        st.idle = false;
        st.queue.push_back(frame.clone());
        let waker = st.waker.take();
        drop(st);
        wake(waker);
        Offered::Queued
    }

    /// When a delivered frame last went out to this subscriber.
    pub(crate) fn last_out(&self) -> Option<Instant> {
        self.lock().last_out
    }

    /// Queues the writer's own bytes (a heartbeat) behind what is queued.
    /// They are not counted against the queue's bound.
    pub(crate) fn push_own(&self, bytes: Bytes) {
        self.lock().push_own(bytes);
    }

    /// Queues the writer's last bytes and takes nothing after them: the
    /// writer ends once it has written them.
    pub(crate) fn seal(&self, last: Bytes) {
        let mut st = self.lock();
        if st.push_own(last) {
            st.ended = Some(Ended::Closed);
        }
    }

    /// Ends the subscriber (the hub closed).
    pub(crate) fn close(&self) {
        let waker = self.lock().end(Ended::Closed);
        wake(waker);
    }

    /// Frames up to `position` are not delivered.
    pub(crate) fn set_position(&self, position: EventId) {
        self.lock().position = Some(position);
    }

    /// The stream has opened at its position; `loaded`: its client loads
    /// its state there (see [`State::loaded_at`]). Resets queued before
    /// are reconsidered (see [`State::early`]).
    pub(crate) fn opened(&self, loaded: bool) {
        let mut st = self.lock();
        let position = st.position.unwrap_or_default();
        if loaded {
            st.loaded_at = position;
        }
        let early = std::mem::take(&mut st.early);
        if early.is_empty() {
            return;
        }
        let mut reset_at = st.reset_before_early;
        let mut gone = Vec::new();
        for (index, early) in early {
            if index >= st.queue.len() {
                break; // Cut meanwhile: the queue is gone.
            }
            match early {
                Early::Order { newest, late } => {
                    if late <= reset_at.max(st.loaded_at) {
                        gone.push(index);
                        continue;
                    }
                    reset_at = newest.max(position);
                    st.queue[index] = sse::order_reset(reset_at, late);
                }
                // The stream starts past the hole (its replay or its own
                // reset reached beyond it): nothing of it is missing here.
                Early::Gap { at } => {
                    if at <= reset_at.max(st.loaded_at).max(position) {
                        gone.push(index);
                        continue;
                    }
                    reset_at = at;
                }
            }
        }
        st.reset_at = reset_at;
        for index in gone.into_iter().rev() {
            st.queue.remove(index);
        }
    }

    /// Raises the position to `position` if it is further.
    pub(crate) fn raise_position(&self, position: EventId) {
        let mut st = self.lock();
        st.position = st.position.max(Some(position));
    }

    /// The writer's next frame. `Pending` makes the writer idle (direct
    /// writes may follow); anything else makes it busy until it asks again.
    /// After the queue, an end is reported once as an error (a lag, a gone
    /// connection) or as the end of the frames.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, Ended>>> {
        let mut st = self.lock();
        while let Some(frame) = st.queue.pop_front() {
            if st.queue.is_empty() && st.queue.capacity() > KEEP_CAPACITY {
                st.queue = VecDeque::new();
            }
            if st.wants(frame.id) {
                st.idle = false;
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        match st.ended {
            Some(why) => {
                st.idle = false;
                if std::mem::replace(&mut st.reported, true) || why == Ended::Closed {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(why)))
                }
            }
            None => {
                st.idle = st.direct.is_some();
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn attach(&self, direct: Arc<dyn DirectWrite>) {
        let mut st = self.lock();
        if st.ended.is_none() {
            // Not idle yet: the writer turns idle when it next finds
            // nothing to write, after what it already holds.
            st.direct = Some(direct);
        }
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// A stream's connection as its writer lends it to the connection map:
/// where a delivery writes a frame at once, from its own task.
pub trait DirectWrite: Send + Sync + 'static {
    /// Writes as much of `bytes` as goes without waiting: `Ok(n)` for the
    /// first `n` bytes taken (the rest is queued for the writer),
    /// `WouldBlock` for none; any other error means the connection is gone.
    /// Never waits.
    fn write_now(&self, bytes: &[u8]) -> io::Result<usize>;
}

/// The handle a stream's writer uses to lend its connection to the
/// connection map. A writer may attach only if it writes the stream's bytes
/// to the connection as they are (a close-delimited HTTP/1 response, no
/// chunked framing, no TLS), it has written the response head, and it
/// writes nothing but the frames its body yields from then on, each whole
/// before it polls the body again.
#[derive(Clone)]
pub struct DirectWriter(pub(crate) Arc<Sink>);

impl DirectWriter {
    /// From now on, deliveries write straight into `direct` whenever the
    /// writer is idle (see the module docs).
    pub fn attach(&self, direct: Arc<dyn DirectWrite>) {
        self.0.attach(direct);
    }
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::Notify;

    /// A connection with a small send buffer, in memory: takes what fits,
    /// says `WouldBlock` when full, and fails once the peer is gone.
    #[derive(Default)]
    struct Pipe {
        sent: Mutex<Vec<u8>>,
        /// Bytes taken and not yet read by the peer.
        in_flight: Mutex<usize>,
        drained: Notify,
        gone: AtomicBool,
    }

    /// Bytes the pipe holds before it is full.
    const ROOM: usize = 32 * 1024;

    impl DirectWrite for Pipe {
        fn write_now(&self, bytes: &[u8]) -> io::Result<usize> {
            if self.gone.load(Ordering::SeqCst) {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let mut in_flight = self.in_flight.lock().unwrap();
            let n = bytes.len().min(ROOM - *in_flight);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            *in_flight += n;
            self.sent.lock().unwrap().extend_from_slice(&bytes[..n]);
            Ok(n)
        }
    }

    impl Pipe {
        /// The peer reads up to `max` bytes.
        fn read(&self, max: usize) -> usize {
            let mut in_flight = self.in_flight.lock().unwrap();
            let n = (*in_flight).min(max);
            *in_flight -= n;
            drop(in_flight);
            self.drained.notify_waiters();
            n
        }

        /// What a writer does on a full connection: waits until the peer
        /// read, then tries again.
        async fn write_all(&self, mut rest: &[u8]) {
            while !rest.is_empty() {
                let drained = self.drained.notified();
                match self.write_now(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => drained.await,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    fn frame(n: u64, len: usize) -> Frame {
        let mut body = format!("{n:08}").into_bytes();
        body.resize(len, b'.');
        Frame {
            id: EventId { ms: n, seq: 0 },
            bytes: Bytes::from(body),
        }
    }

    /// What a stream's writer does: take the next frame, write it whole,
    /// only then ask again.
    async fn writer(sink: Arc<Sink>, pipe: Arc<Pipe>) -> u64 {
        let mut written = 0;
        while let Some(Ok(frame)) = std::future::poll_fn(|cx| sink.poll_next(cx)).await {
            pipe.write_all(&frame.bytes).await;
            written += 1;
        }
        written
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_and_queued_writes_keep_their_order_through_a_full_connection() {
        let pipe = Arc::new(Pipe::default());
        let sink = Arc::new(Sink::default());
        sink.attach(pipe.clone());
        let task = tokio::spawn(writer(sink.clone(), pipe.clone()));
        // Let the writer find nothing and turn idle.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        const N: u64 = 2000;
        const LEN: usize = 8 * 1024;
        // A slow reader: the connection fills and drains while frames
        // arrive, so deliveries meet an idle writer, a full connection and
        // a busy writer.
        let reader = tokio::spawn({
            let pipe = pipe.clone();
            async move {
                let mut read = 0;
                while read < N as usize * LEN {
                    read += pipe.read(64 * 1024);
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
        });
        let mut offered = [0usize; 3];
        for n in 1..=N {
            let o = sink.offer(&frame(n, LEN), N as usize, Instant::now());
            offered[o as usize] += 1;
            if n % 16 == 0 {
                tokio::time::sleep(std::time::Duration::from_micros(100)).await;
            }
        }
        reader.await.unwrap();
        assert!(
            offered[Offered::Written as usize] > 0,
            "some went straight into the connection"
        );
        assert!(
            offered[Offered::Queued as usize] > 0,
            "some queued behind a full connection"
        );
        assert_eq!(offered[Offered::Dropped as usize], 0);
        let got = pipe.sent.lock().unwrap().clone();
        assert_eq!(got.len(), N as usize * LEN);
        for (i, chunk) in got.chunks(LEN).enumerate() {
            assert_eq!(&chunk[..8], format!("{:08}", i + 1).as_bytes(), "frame {i}");
            assert!(chunk[8..].iter().all(|&b| b == b'.'), "frame {i} whole");
        }
        // Idle again: the next one is direct.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            sink.offer(&frame(N + 1, 10), 1, Instant::now()),
            Offered::Written
        );
        sink.close();
        assert!(task.await.unwrap() >= offered[1] as u64);
    }

    #[tokio::test]
    async fn nothing_is_written_directly_before_the_writer_asks() {
        let pipe = Arc::new(Pipe::default());
        let sink = Arc::new(Sink::default());
        sink.attach(pipe.clone());
        // The writer still holds its prelude: a delivery must wait behind it.
        assert_eq!(sink.offer(&frame(1, 4), 8, Instant::now()), Offered::Queued);
        assert!(pipe.sent.lock().unwrap().is_empty());
        sink.set_position(EventId { ms: 1, seq: 0 });
        let next = std::future::poll_fn(|cx| Poll::Ready(sink.poll_next(cx))).await;
        assert!(next.is_pending(), "frame 1 is before the position");
        // Now idle: the next is written straight, and one before the
        // position is dropped.
        assert_eq!(
            sink.offer(&frame(2, 4), 8, Instant::now()),
            Offered::Written
        );
        assert_eq!(
            sink.offer(&frame(1, 4), 8, Instant::now()),
            Offered::Dropped
        );
        assert_eq!(&pipe.sent.lock().unwrap()[..], b"0000");
    }

    #[tokio::test]
    async fn a_write_that_goes_through_in_part_queues_the_rest_first() {
        let pipe = Arc::new(Pipe::default());
        let sink = Arc::new(Sink::default());
        sink.attach(pipe.clone());
        let next = std::future::poll_fn(|cx| Poll::Ready(sink.poll_next(cx))).await;
        assert!(next.is_pending(), "idle");
        // Fills all but 4 bytes, then a frame of 10: 4 go out directly.
        assert_eq!(
            sink.offer(&frame(1, ROOM - 4), 8, Instant::now()),
            Offered::Written
        );
        assert_eq!(
            sink.offer(&frame(2, 10), 8, Instant::now()),
            Offered::Queued
        );
        // No longer idle: the next waits behind the rest.
        assert_eq!(
            sink.offer(&frame(3, 10), 8, Instant::now()),
            Offered::Queued
        );
        let rest = std::future::poll_fn(|cx| sink.poll_next(cx)).await;
        assert_eq!(&rest.unwrap().unwrap().bytes[..], b"0002..");
        let third = std::future::poll_fn(|cx| sink.poll_next(cx)).await;
        assert_eq!(&third.unwrap().unwrap().bytes[..8], b"00000003");
    }

    #[tokio::test]
    async fn a_subscriber_past_its_queue_is_cut_and_its_queue_freed() {
        let sink = Sink::default();
        for n in 1..=3 {
            assert_eq!(sink.offer(&frame(n, 4), 3, Instant::now()), Offered::Queued);
        }
        assert_eq!(
            sink.offer(&frame(4, 4), 3, Instant::now()),
            Offered::Dropped
        );
        assert!(sink.lock().queue.is_empty());
        let next = std::future::poll_fn(|cx| Poll::Ready(sink.poll_next(cx))).await;
        assert!(matches!(next, Poll::Ready(Some(Err(Ended::Lagged(4))))));
        let next = std::future::poll_fn(|cx| Poll::Ready(sink.poll_next(cx))).await;
        assert!(matches!(next, Poll::Ready(None)));
    }

    #[tokio::test]
    async fn a_failed_direct_write_ends_the_subscriber() {
        let pipe = Arc::new(Pipe::default());
        let sink = Sink::default();
        sink.attach(pipe.clone());
        let next = std::future::poll_fn(|cx| Poll::Ready(sink.poll_next(cx))).await;
        assert!(next.is_pending());
        pipe.gone.store(true, Ordering::SeqCst);
        assert_eq!(
            sink.offer(&frame(1, 4), 8, Instant::now()),
            Offered::Dropped
        );
        let next = std::future::poll_fn(|cx| Poll::Ready(sink.poll_next(cx))).await;
        assert!(matches!(next, Poll::Ready(Some(Err(Ended::Gone)))));
    }
}
