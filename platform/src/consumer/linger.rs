//! The scheduler's one timing rule: whether the next unit of work starts now or waits a few
//! milliseconds for more messages to join it.
//!
//! A unit costs one transaction and one commit whatever its size, so under load it pays to
//! let a small unit grow; an idle consumer must not pay any latency for that. The rule:
//! start now when `enough` messages are ready, when the oldest has waited `max_wait`, or
//! when messages arrive too rarely for another to be expected within `max_wait` (the stream
//! is idle or has stopped); otherwise wait until the oldest has waited `max_wait` (sooner if
//! `enough` arrive). Pure: the caller hands in the clock.

use std::time::{Duration, Instant};

/// How long a small unit may wait to grow.
#[derive(Debug, Clone, Copy)]
pub struct Linger {
    /// The longest a ready message waits for others to join its unit (zero: never).
    pub max_wait: Duration,
    /// A unit of this many messages starts at once.
    pub enough: usize,
}

/// When the next unit starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Now.
    Now,
    /// At this instant, unless `enough` messages are ready before.
    At(Instant),
}

/// How often messages arrive: a moving average of the gaps between arrivals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Arrivals {
    mean_gap: Option<Duration>,
    last: Option<Instant>,
}

impl Arrivals {
    /// Counts a message arriving at `at`.
    pub fn record(&mut self, at: Instant) {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last);
            // One fifth of the newest gap: follows a change of rate within tens of messages.
            self.mean_gap = Some(match self.mean_gap {
                Some(mean) => mean.mul_f64(0.8) + gap.mul_f64(0.2),
                None => gap,
            });
        }
        self.last = Some(at);
    }

    /// Whether another message is expected within `window` of `now`: messages arrive at
    /// least that often, and the last one is not older than that.
    fn more_expected(&self, window: Duration, now: Instant) -> bool {
        match (self.mean_gap, self.last) {
            (Some(mean), Some(last)) => mean < window && now.saturating_duration_since(last) < window,
            _ => false,
        }
    }
}

impl Linger {
    /// When a unit of the `ready` messages, the oldest of which arrived at `oldest`, starts.
    pub fn start(&self, ready: usize, oldest: Instant, arrivals: &Arrivals, now: Instant) -> Start {
        let deadline = oldest + self.max_wait;
        if ready >= self.enough || now >= deadline || !arrivals.more_expected(self.max_wait, now) {
            Start::Now
        } else {
            Start::At(deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn linger() -> Linger {
        Linger {
            max_wait: 5 * MS,
            enough: 100,
        }
    }

    /// Arrivals every `gap`, the last at `last`.
    fn steady(gap: Duration, last: Instant) -> Arrivals {
        let mut arrivals = Arrivals::default();
        for n in (0..20).rev() {
            arrivals.record(last.checked_sub(gap * n).unwrap_or(last));
        }
        arrivals
    }

    #[test]
    fn an_idle_consumer_starts_at_once() {
        let now = Instant::now() + Duration::from_secs(10);
        // One message a second: none other is expected within 5 ms.
        let arrivals = steady(Duration::from_secs(1), now);
        assert_eq!(linger().start(1, now, &arrivals, now), Start::Now);
        // The very first message.
        assert_eq!(linger().start(1, now, &Arrivals::default(), now), Start::Now);
    }

    #[test]
    fn under_load_a_small_unit_waits_for_its_oldest_to_be_max_wait_old() {
        let now = Instant::now() + Duration::from_secs(10);
        let arrivals = steady(MS / 2, now);
        let oldest = now - 2 * MS;
        assert_eq!(linger().start(4, oldest, &arrivals, now), Start::At(oldest + 5 * MS));
        // Once it has waited, it starts.
        assert_eq!(linger().start(4, oldest, &arrivals, oldest + 5 * MS), Start::Now);
    }

    #[test]
    fn a_unit_that_is_big_enough_never_waits() {
        let now = Instant::now() + Duration::from_secs(10);
        let arrivals = steady(MS / 2, now);
        assert_eq!(linger().start(100, now, &arrivals, now), Start::Now);
    }

    #[test]
    fn a_stream_that_stopped_is_not_waited_for() {
        let now = Instant::now() + Duration::from_secs(10);
        // Fast arrivals, but the last one 50 ms ago.
        let arrivals = steady(MS / 2, now - 50 * MS);
        assert_eq!(linger().start(3, now - MS, &arrivals, now), Start::Now);
    }

    #[test]
    fn no_linger_configured_means_never_waiting() {
        let now = Instant::now() + Duration::from_secs(10);
        let arrivals = steady(MS / 2, now);
        let off = Linger {
            max_wait: Duration::ZERO,
            enough: 100,
        };
        assert_eq!(off.start(1, now, &arrivals, now), Start::Now);
    }
}
