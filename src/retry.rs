//! The `retry:` hint a stream sends: how long its client waits before it
//! reconnects once the stream ends.
//!
//! When an instance dies, every client it held comes back to the survivors,
//! each after the last hint it received. One fixed hint would bring them all
//! in the same instant, so each stream's hint is the base plus a random
//! extra. Half the base of spread is enough for a few thousand streams; it
//! is not for ten thousand, whose resumes (a stream open, a history read
//! and often a subscription each, ~300 µs of a survivor's CPU on the
//! benchmark machine, `docs/benchmarks.md`) would all arrive within one
//! second. So the spread grows with the herd: with a resume rate set, the
//! extra is drawn from up to `herd / rate` seconds, `herd` being the
//! streams open on this instance, and the herd comes back at about `rate`
//! resumes per second however large it is.
//!
//! A stream's hint is drawn when it opens, from the herd of that moment;
//! the streams of a ramp that opened first would keep a narrow spread, so
//! a heartbeat sends a fresh hint instead of its comment when the herd's
//! spread has moved by more than a quarter since the stream's last hint.
//! A steady instance sends comments only.

use std::num::NonZeroU32;
use std::time::Duration;

/// The widest spread, whatever the herd: beyond it clients would wait for
/// minutes, which no rate is worth.
pub const MAX_SPREAD: Duration = Duration::from_secs(60);

/// How a stream's `retry:` hint is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The least any hint is.
    pub base: Duration,
    /// Resumes per second an instance's herd is spread to, or `None`: then
    /// the random extra is at most half the base, whatever the herd.
    pub resume_rate: Option<NonZeroU32>,
}

impl RetryPolicy {
    /// The default: 2 s, and herds spread to 2,000 resumes per second.
    pub const DEFAULT: Self = Self {
        base: Duration::from_secs(2),
        resume_rate: NonZeroU32::new(2000),
    };

    /// The width of the random extra for a herd of `herd` streams.
    pub fn spread(&self, herd: usize) -> Duration {
        let least = self.base / 2;
        let Some(rate) = self.resume_rate else {
            return least;
        };
        let herd_wide = Duration::from_secs_f64(herd as f64 / f64::from(rate.get()));
        least.max(herd_wide.min(MAX_SPREAD))
    }

    /// One stream's hint under `spread`: the base plus a uniform random part
    /// of the spread.
    pub fn draw(&self, spread: Duration) -> Duration {
        self.base + spread.mul_f64(rand::random::<f64>())
    }

    /// Whether a stream whose last hint was drawn under `sent` should get a
    /// fresh one now that the spread is `now`.
    pub fn stale(sent: Duration, now: Duration) -> bool {
        now > sent + sent / 4 || now + now / 4 < sent
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rate: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(2),
            resume_rate: rate.and_then(NonZeroU32::new),
        }
    }

    #[test]
    fn a_small_herd_gets_half_the_base() {
        let p = policy(Some(2000));
        assert_eq!(p.spread(0), Duration::from_secs(1));
        assert_eq!(p.spread(1500), Duration::from_secs(1));
        assert_eq!(policy(None).spread(1_000_000), Duration::from_secs(1));
    }

    #[test]
    fn a_large_herd_is_spread_to_the_rate_up_to_the_cap() {
        let p = policy(Some(2000));
        assert_eq!(p.spread(10_000), Duration::from_secs(5));
        assert_eq!(p.spread(10_000_000), MAX_SPREAD);
    }

    #[test]
    fn hints_fall_within_base_and_base_plus_spread() {
        let p = policy(Some(2000));
        let spread = p.spread(10_000);
        let hints: Vec<Duration> = (0..2000).map(|_| p.draw(spread)).collect();
        assert!(hints.iter().all(|h| *h >= p.base && *h <= p.base + spread));
        // Spread out, not bunched: both halves of the spread are used.
        let late = hints.iter().filter(|h| **h > p.base + spread / 2).count();
        assert!(
            (600..=1400).contains(&late),
            "{late} of 2000 in the later half"
        );
    }

    #[test]
    fn only_a_change_of_more_than_a_quarter_is_stale() {
        let s = Duration::from_secs(4);
        assert!(!RetryPolicy::stale(s, Duration::from_secs(5)));
        assert!(RetryPolicy::stale(s, Duration::from_millis(5001)));
        assert!(!RetryPolicy::stale(s, Duration::from_millis(3200)));
        assert!(RetryPolicy::stale(s, Duration::from_secs(3)));
    }
}
