//! [`ReplayBudget`]: how many bytes of replayed history streams may hold
//! before their client has read them.
//!
//! Why: a resume's replay is queued on its stream whole (up to
//! `REPLAY_MAX_BYTES`) and freed only as the client reads it. A client
//! that resumes many streams from an old id and never reads held that much
//! per stream until the write-stall cut: 40 such streams held ~150 MB. A
//! budget bounds the sum; a resume whose replay does not fit is answered
//! `reset`, as one larger than `REPLAY_MAX_BYTES` is — the client is told,
//! nothing is lost silently.
//!
//! Budgets nest: a budget made [`within`](ReplayBudget::within) another
//! (one client address's within the instance's) charges both, so neither
//! one address nor all of them together can exceed theirs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A byte budget shared by the streams given it. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ReplayBudget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    held: AtomicUsize,
    max: usize,
    parent: Option<ReplayBudget>,
}

/// Bytes taken from a budget (and its parents) until dropped.
#[derive(Debug)]
pub struct ReplayHold {
    budget: ReplayBudget,
    bytes: usize,
    /// The same bytes, taken from the budget this one is within.
    _parent: Option<Box<ReplayHold>>,
}

impl ReplayBudget {
    pub fn new(max_bytes: usize) -> Self {
        Self(Arc::new(Inner {
            held: AtomicUsize::new(0),
            max: max_bytes,
            parent: None,
        }))
    }

    /// A budget of `max_bytes` that also charges this one.
    pub fn within(&self, max_bytes: usize) -> Self {
        Self(Arc::new(Inner {
            held: AtomicUsize::new(0),
            max: max_bytes,
            parent: Some(self.clone()),
        }))
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    /// Takes `bytes` from this budget and every one it is within, or
    /// nothing if any of them would go over.
    pub fn take(&self, bytes: usize) -> Option<ReplayHold> {
        // A refusal here drops the parent's hold: its share goes back.
        let parent = match &self.0.parent {
            Some(parent) => Some(Box::new(parent.take(bytes)?)),
            None => None,
        };
        self.0
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&sum| sum <= self.0.max)
            })
            .ok()?;
        Some(ReplayHold {
            budget: self.clone(),
            bytes,
            _parent: parent,
        })
    }
}

impl Drop for ReplayHold {
    fn drop(&mut self) {
        self.budget.0.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_within_another_charges_both_and_gives_both_back() {
        let instance = ReplayBudget::new(100);
        let a = instance.within(60);
        let b = instance.within(60);
        let ha = a.take(50).unwrap();
        // a's own limit.
        assert!(a.take(20).is_none());
        // The instance's: b fits its own 60 but not the instance's 100.
        assert!(b.take(60).is_none());
        assert_eq!(instance.held(), 50, "a refusal takes nothing");
        let hb = b.take(50).unwrap();
        assert_eq!((instance.held(), a.held(), b.held()), (100, 50, 50));
        drop(ha);
        assert_eq!((instance.held(), a.held()), (50, 0));
        drop(hb);
        assert_eq!(instance.held(), 0);
    }

    #[test]
    fn a_refusal_by_the_child_gives_the_parent_s_share_back() {
        let instance = ReplayBudget::new(100);
        let a = instance.within(10);
        assert!(a.take(20).is_none());
        assert_eq!(instance.held(), 0);
        assert!(instance.take(100).is_some());
    }
}
