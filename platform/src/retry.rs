//! How long and how often something that failed is tried again: a message or a unit of work
//! in the consumer runtime, a gateway call in payment-svc. One backoff for all of them.

use std::time::Duration;

use tokio::time::Instant;

use backon::BackoffBuilder as _;

/// The retry rules of one consumer.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// How long one message's transient failures are retried before it is dead-lettered
    /// (None: forever).
    pub budget: Option<Duration>,
    /// The first pause between two attempts.
    pub first: Duration,
    /// The longest pause between two attempts.
    pub max: Duration,
}

impl RetryPolicy {
    /// The pauses between attempts: exponential from `first` up to `max`, each with a random
    /// part (so many partitions failing at once do not retry in step), never ending.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        backon::ExponentialBuilder::new()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Whether a message failing since `started` has spent its budget (tokio's clock, which
    /// tests may pause).
    pub fn exhausted(&self, started: Instant) -> bool {
        self.budget.is_some_and(|budget| started.elapsed() >= budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_maximum_and_never_end() {
        let policy = RetryPolicy {
            budget: None,
            first: Duration::from_millis(50),
            max: Duration::from_secs(5),
        };
        let pauses: Vec<Duration> = policy.backoff().take(20).collect();
        assert_eq!(pauses.len(), 20, "the backoff never runs out");
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] <= Duration::from_millis(100));
        // With its random part a pause is at most twice the cap.
        assert!(pauses.iter().all(|p| *p <= Duration::from_secs(10)), "{pauses:?}");
        assert!(pauses[19] >= Duration::from_secs(5), "{pauses:?}");
    }

    #[test]
    fn no_budget_is_never_exhausted() {
        let started = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        let forever = RetryPolicy {
            budget: None,
            first: Duration::from_millis(1),
            max: Duration::from_millis(1),
        };
        assert!(!forever.exhausted(started));
        let minute = RetryPolicy {
            budget: Some(Duration::from_secs(60)),
            ..forever
        };
        assert!(minute.exhausted(started));
        assert!(!minute.exhausted(Instant::now()));
    }
}
