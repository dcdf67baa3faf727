//! The source: a thread of its own polls Kafka and hands each message to the buffer. It never
//! waits on a handler, so `max.poll.interval.ms` is never exceeded because work is slow; a
//! partition whose queue fills is paused at the broker and resumed once drained. Rebalance
//! callbacks run here too: a revoke completes only once the work in flight on the revoked
//! partitions has stored its offsets or has been abandoned. And the watchdog: a consumer
//! that holds no partition, or stalls, gives up ([`GaveUp`]) for a new client.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::buffer::{Buffer, PartitionKey};
use super::in_flight::InFlight;
use super::{GaveUp, Incoming};
use crate::telemetry;

/// The last sign of progress (a message arrived, an attempt started), as milliseconds since
/// the consumer started: the stall watchdog's clock.
pub struct Progress {
    started: Instant,
    last: AtomicU64,
}

impl Progress {
    /// Progress as of now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Something happened.
    pub fn mark(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(buffer: &Mutex<Buffer>) -> MutexGuard<'_, Buffer> {
    buffer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's callbacks: lag statistics, and the revoke that waits for work in flight.
pub struct RuntimeContext {
    /// The consumer group (metrics, logs).
    pub group: String,
    /// What the poll thread fetched.
    pub buffer: Arc<Mutex<Buffer>>,
    /// The work in flight.
    pub in_flight: Arc<InFlight>,
    /// How long a revoke waits for work in flight, twice (before and after abandoning it).
    pub revoke_grace: Duration,
    /// Records not yet handled in the partitions this member holds, as of the last
    /// statistics.
    pub unhandled: Arc<AtomicI64>,
}

impl ClientContext for RuntimeContext {
    /// Publishes, per partition, the records not yet handled (from the offset stored after
    /// the last effect committed, not the committed offset, which trails it by the
    /// auto-commit interval) as the lag gauge, 0 for a partition this member no longer holds
    /// (its last value would otherwise stay, stale); their sum is the stall watchdog's input.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut unhandled = 0;
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                if *partition < 0 {
                    continue;
                }
                let lag = if partition_stats.desired {
                    records_unhandled(partition_stats)
                } else {
                    0
                };
                metrics::gauge!(telemetry::CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic.clone(),
                    "partition" => partition.to_string())
                .set(lag as f64);
                unhandled += lag;
            }
        }
        self.unhandled.store(unhandled, Ordering::Relaxed);
    }
}

impl ConsumerContext for RuntimeContext {
    /// Runs on the poll thread, inside `poll`, before librdkafka gives the partitions up (and
    /// commits the stored offsets, with auto-commit). Blocking here is the point: the revoke
    /// completes only once the work in flight on each revoked partition has finished (its
    /// offsets stored) or has been abandoned (its offsets not stored, so redelivered to the
    /// new owner, whose inbox absorbs it if its effect did commit after all).
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                metrics::counter!(telemetry::CONSUMER_REBALANCES, "group" => self.group.clone(), "kind" => "revoke")
                    .increment(1);
                let keys: Vec<PartitionKey> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                lock(&self.buffer).revoke(&keys);
                if !self.in_flight.wait_idle(&keys, self.revoke_grace) {
                    tracing::warn!(group = %self.group, "work on a revoked partition is still in flight; abandoning it (it will be redelivered)");
                    self.in_flight.abandon(&keys);
                    // The work stops at its next backoff; its offsets are never stored,
                    // whatever it does after this.
                    let _ = self.in_flight.wait_idle(&keys, self.revoke_grace);
                }
                tracing::info!(group = %self.group, partitions = list.count(), "partitions revoked");
            }
            Rebalance::Assign(list) => {
                metrics::counter!(telemetry::CONSUMER_REBALANCES, "group" => self.group.clone(), "kind" => "assign")
                    .increment(1);
                tracing::info!(group = %self.group, partitions = list.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(group = %self.group, %error, "rebalance error"),
        }
    }

    /// A partition paused while this member last held it (its queue was full when it was
    /// revoked) starts fresh: resumed.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance
            && let Err(error) = consumer.resume(list)
        {
            tracing::debug!(%error, "cannot resume newly assigned partitions");
        }
    }
}

/// Records of a partition that this member has not finished with: from the offset stored
/// after its last handled message (or the committed one, or the log start) to the high
/// watermark. Records fetched but still buffered count too: a handler that never returns
/// leaves them all unhandled.
/// (Under Kafka transactions a trailing commit marker would count as one record for ever;
/// this system's producers are idempotent, not transactional.)
fn records_unhandled(stats: &rdkafka::statistics::Partition) -> i64 {
    unhandled_between(
        [stats.stored_offset, stats.committed_offset, stats.lo_offset],
        stats.hi_offset,
    )
}

/// Records from the first known of `positions` (stored, committed, log start: -1 when unknown)
/// to the high watermark `high`.
fn unhandled_between(positions: [i64; 3], high: i64) -> i64 {
    match positions.into_iter().find(|offset| *offset >= 0) {
        Some(position) if high >= 0 => (high - position).max(0),
        _ => 0,
    }
}

/// The client every part of the runtime shares.
pub type Client = BaseConsumer<RuntimeContext>;

/// The poll thread.
pub struct Poller {
    /// The client.
    pub consumer: Arc<Client>,
    /// Where fetched messages go.
    pub buffer: Arc<Mutex<Buffer>>,
    /// Tells the worker that messages arrived.
    pub wake: Arc<Notify>,
    /// The stall watchdog's input from the statistics.
    pub unhandled: Arc<AtomicI64>,
    /// The stall watchdog's clock.
    pub progress: Arc<Progress>,
    /// Stops polling.
    pub shutdown: CancellationToken,
    /// The consumer group (metrics, logs).
    pub group: String,
    /// The topics (logs).
    pub topics: Vec<String>,
    /// Holding no partition this long gives up (None: never).
    pub unassigned_limit: Option<Duration>,
    /// Records waiting with no progress this long gives up (None: never).
    pub stall_limit: Option<Duration>,
}

impl Poller {
    /// Polls until shutdown; an error when the client fails for good or the consumer gives up.
    pub fn run(self) -> anyhow::Result<()> {
        let mut unassigned_since = Some(Instant::now());
        let mut waiting_since: Option<Instant> = None;
        let mut next_check = Instant::now();
        while !self.shutdown.is_cancelled() {
            self.resume_drained();
            // Every rebalance callback runs inside this call, on this thread.
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    self.progress.mark();
                    self.dispatch(Incoming::from_kafka(&message));
                }
                Some(Err(error)) => {
                    if let Some((code, reason)) = self.consumer.client().fatal_error() {
                        anyhow::bail!("fatal consumer error {code:?}: {reason}");
                    }
                    tracing::warn!(%error, "consumer error");
                }
                None => {}
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_secs(1);
                let held = self.consumer.assignment().map(|list| list.count()).unwrap_or(0);
                metrics::gauge!(telemetry::CONSUMER_ASSIGNED, "group" => self.group.clone()).set(held as f64);
                if held > 0 {
                    unassigned_since = None;
                    // Records unhandled in every report for the whole limit, not in one: the
                    // high watermark may be learnt a moment before the records it announces.
                    let unhandled = self.unhandled.load(Ordering::Relaxed);
                    let waiting_for = if unhandled > 0 {
                        waiting_since.get_or_insert_with(Instant::now).elapsed()
                    } else {
                        waiting_since = None;
                        Duration::ZERO
                    };
                    let silent = self.progress.silent_for();
                    if let Some(limit) = self.stall_limit
                        && waiting_for > limit
                        && silent > limit
                    {
                        return Err(GaveUp(format!(
                            "stalled: {unhandled} records of the {held} partitions held wait to be handled, and no message arrived and no attempt started for {silent:.0?}"
                        ))
                        .into());
                    }
                } else {
                    let since = *unassigned_since.get_or_insert_with(Instant::now);
                    if let Some(limit) = self.unassigned_limit
                        && since.elapsed() > limit
                    {
                        return Err(GaveUp(format!("held no partition of {:?} for {limit:?}", self.topics)).into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands a message to the buffer; pauses its partition when its queue is full, so nothing
    /// more is fetched for it.
    fn dispatch(&self, message: Incoming) {
        let (topic, partition) = (message.topic.clone(), message.partition);
        let pause = lock(&self.buffer).push(message, Instant::now());
        self.wake.notify_one();
        if pause {
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, partition);
            match self.consumer.pause(&list) {
                Ok(()) => tracing::info!(%topic, partition, "partition paused: its queue is full"),
                Err(error) => tracing::warn!(%error, "cannot pause a partition"),
            }
        }
    }

    /// Resumes the paused partitions whose queues drained.
    fn resume_drained(&self) {
        let drained = lock(&self.buffer).drained_paused();
        for (topic, partition) in drained {
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, partition);
            match self.consumer.resume(&list) {
                Ok(()) => tracing::info!(%topic, partition, "partition resumed"),
                Err(error) => tracing::warn!(%error, "cannot resume a partition"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_unhandled_count_from_the_stored_offset_else_the_committed_else_the_log_start() {
        assert_eq!(unhandled_between([40, 30, 0], 50), 10);
        assert_eq!(unhandled_between([-1, 30, 0], 50), 20);
        assert_eq!(unhandled_between([-1, -1, 5], 50), 45);
        assert_eq!(unhandled_between([-1, -1, -1], 50), 0, "nothing known");
        assert_eq!(unhandled_between([40, 30, 0], -1), 0, "no watermark yet");
        assert_eq!(unhandled_between([60, 30, 0], 50), 0, "never negative");
    }

    #[test]
    fn progress_is_silent_until_marked() {
        let progress = Progress::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(progress.silent_for() >= Duration::from_millis(30));
        progress.mark();
        assert!(progress.silent_for() < Duration::from_millis(30));
    }
}
