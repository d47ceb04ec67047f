//! Folds the wake-ups a connection gives itself into one more poll.
//!
//! Why: when a handler reads a request body, hyper's body signals the
//! connection that it wants more bytes, and that wakes the connection's
//! task while the task is running (the handler runs inside it). tokio
//! answers a task woken during its own poll by queueing it behind the
//! others and waking another worker thread to help, which finds nothing to
//! do: a futex wake, a futex wait and a few context switches on every
//! publish (see docs/benchmarks.md). Polling once
//! more in place does the same work without them.
//!
//! Wake-ups that come from elsewhere (the I/O driver, a timer, another
//! thread), or after the poll, wake the task as usual. A future that keeps
//! waking itself (hyper yields that way after many pipelined requests, to
//! be fair to other tasks) is polled again once, then yields as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// A future whose wake-ups during its own poll become another poll.
pub struct Folded<F> {
    fut: F,
    state: Arc<State>,
    /// The waker the inner future sees: `state` as a [`Waker`].
    waker: Waker,
}

/// Shared between the task and the wakers the inner future handed out.
#[derive(Default)]
struct State {
    /// The inner future is being polled.
    polling: AtomicBool,
    /// It was woken while being polled.
    again: AtomicBool,
    /// The task that polls it.
    task: AtomicWaker,
}

impl<F: Future + Unpin> Folded<F> {
    pub fn new(fut: F) -> Self {
        let state = Arc::new(State::default());
        let waker = Waker::from(state.clone());
        Self { fut, state, waker }
    }
}

impl<F: Future + Unpin> Future for Folded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let mut fut = Pin::new(&mut this.fut);
        this.state.task.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        // One poll, and one more if it woke itself.
        for _ in 0..2 {
            this.state.polling.store(true, SeqCst);
            let polled = fut.as_mut().poll(&mut inner);
            this.state.polling.store(false, SeqCst);
            if polled.is_ready() {
                return polled;
            }
            if !this.state.again.swap(false, SeqCst) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Wake for State {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.polling.load(SeqCst) {
            self.again.store(true, SeqCst);
            // The poll may have ended between the two loads, before it
            // looked at `again`: then this wake-up is the task's.
            if self.polling.load(SeqCst) {
                return;
            }
        }
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts how often the task around it is woken.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn a_wake_during_the_poll_is_one_more_poll() {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        // Wakes itself on its first poll, is ready on its second.
        let mut fut = std::pin::pin!(Folded::new(std::future::poll_fn(|cx| {
            polls += 1;
            if polls == 1 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(polls)
            }
        })));
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(2));
        assert_eq!(counter.0.load(SeqCst), 0, "the task was not woken");
    }

    #[test]
    fn later_wakes_reach_the_task_and_a_busy_future_still_yields() {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut kept = None;
        let mut polls = 0;
        // Keeps waking itself, and keeps its waker for later.
        {
            let mut fut = std::pin::pin!(Folded::new(std::future::poll_fn(|cx| {
                polls += 1;
                kept = Some(cx.waker().clone());
                cx.waker().wake_by_ref();
                Poll::<()>::Pending
            })));
            assert!(fut.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls, 2, "polled once more, not forever");
        assert_eq!(counter.0.load(SeqCst), 1, "then it yields");
        // The future's kept waker, used after the poll, wakes the task.
        kept.expect("a waker").wake();
        assert_eq!(counter.0.load(SeqCst), 2);
    }
}
