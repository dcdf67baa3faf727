//! The consumer groups' lag as Kafka counts it (what `kafka-consumer-groups.sh` shows): per
//! partition, the high watermark minus the group's committed offset, summed over every group
//! of the saga on the topic it reads ([`crate::explain::CONSUMERS`]). Read from the broker at
//! each sample, like the other series, instead of the members' librdkafka statistics (a
//! value up to 5 s old per member, 0 for a partition between owners, summed over
//! processes): the benchmark once charted thousands of messages of that lag while the sagas
//! in flight were near zero.
//!
//! Committed offsets trail the work by the auto-commit interval
//! ([`orderflow_platform::kafka::AUTO_COMMIT_INTERVAL`], 1 s), so at a steady rate the lag
//! reads up to a second of each group's records even when nothing waits: a bound on the
//! records not yet handled, and a number that grows only when a group falls behind.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

/// How long one question to the broker may take; a sample that cannot be read is reported
/// as missing, not as zero.
const ASK: Duration = Duration::from_secs(2);

/// Asks the broker for the groups' committed offsets and the topics' high watermarks.
pub struct GroupLag {
    reader: BaseConsumer,
    /// One client per group (a committed offset is asked as the group; none of them joins
    /// it), with the topic it reads.
    askers: Vec<(BaseConsumer, &'static str)>,
    /// Each topic's partition count, asked once.
    partitions: std::sync::Mutex<std::collections::HashMap<&'static str, i32>>,
}

impl std::fmt::Debug for GroupLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupLag")
            .field(
                "topics",
                &self.askers.iter().map(|(_, topic)| topic).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl GroupLag {
    /// Clients for every consumer group of the saga on `cluster` (none connects until asked).
    pub fn new(cluster: &orderflow_platform::kafka::Cluster) -> anyhow::Result<Self> {
        let reader = orderflow_platform::kafka::consumer_config(cluster, "ordersctl-bench-lag", None)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut seen = std::collections::HashSet::new();
        let askers = crate::explain::CONSUMERS
            .iter()
            // A group reading two topics is listed twice there; asked once per topic here.
            .filter(|consumer| seen.insert((consumer.group, consumer.topic)))
            .map(|consumer| {
                let asker: BaseConsumer = orderflow_platform::kafka::consumer_config(cluster, consumer.group, None)
                    .set("enable.auto.commit", "false")
                    .create()?;
                Ok((asker, consumer.topic))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            reader,
            askers,
            partitions: std::sync::Mutex::default(),
        })
    }

    /// The lag summed over every group and partition, now (blocking: one request per group
    /// and one per partition of each topic to the broker).
    pub fn sample(&self) -> anyhow::Result<i64> {
        let mut high_watermarks: std::collections::HashMap<&str, Vec<(i64, i64)>> = std::collections::HashMap::new();
        let mut total = 0;
        for (asker, topic) in &self.askers {
            let partitions = self.partitions_of(topic)?;
            if !high_watermarks.contains_key(topic) {
                let marks = (0..partitions)
                    .map(|partition| Ok(self.reader.fetch_watermarks(topic, partition, ASK)?))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                high_watermarks.insert(topic, marks);
            }
            let mut wanted = TopicPartitionList::new();
            for partition in 0..partitions {
                wanted.add_partition(topic, partition);
            }
            for element in asker.committed_offsets(wanted, ASK)?.elements() {
                let (low, high) = usize::try_from(element.partition())
                    .ok()
                    .and_then(|at| high_watermarks[topic].get(at).copied())
                    .unwrap_or((0, 0));
                total += behind(element.offset(), low, high);
            }
        }
        Ok(total)
    }

    fn partitions_of(&self, topic: &'static str) -> anyhow::Result<i32> {
        if let Some(&known) = self
            .partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
        {
            return Ok(known);
        }
        let metadata = self.reader.fetch_metadata(Some(topic), ASK)?;
        let partitions = i32::try_from(metadata.topics().first().map_or(0, |t| t.partitions().len()))?;
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic, partitions);
        Ok(partitions)
    }
}

/// The latest sample, refreshed about once a second by a task of its own, so that a slow
/// answer from the broker never holds up the benchmark's one-second tick (whose rates assume
/// the second is a second). Stops with the last handle.
pub struct Latest {
    value: std::sync::Mutex<Option<(std::time::Instant, i64)>>,
}

impl Latest {
    /// Starts sampling `lag` (at once, then a second after each answer).
    pub fn watch(lag: std::sync::Arc<GroupLag>) -> std::sync::Arc<Self> {
        let latest = std::sync::Arc::new(Self {
            value: std::sync::Mutex::new(None),
        });
        let weak = std::sync::Arc::downgrade(&latest);
        tokio::spawn(async move {
            loop {
                let lag = lag.clone();
                let sample = tokio::task::spawn_blocking(move || lag.sample()).await;
                let Some(latest) = weak.upgrade() else { return };
                *latest.value.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = match sample {
                    Ok(Ok(value)) => Some((std::time::Instant::now(), value)),
                    _ => None,
                };
                drop(latest);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        latest
    }

    /// The latest answer if it is at most 3 s old: a sample the broker did not answer (or
    /// answered long ago) is missing from the chart, not a zero or a stale value.
    pub fn now(&self) -> Option<f64> {
        self.value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .filter(|(at, _)| at.elapsed() <= Duration::from_secs(3))
            .map(|(_, value)| value as f64)
    }
}

/// Records a group has still to commit on one partition: from its committed offset, or from
/// the earliest record still kept when it has committed none.
fn behind(committed: Offset, low: i64, high: i64) -> i64 {
    let from = match committed {
        Offset::Offset(offset) => offset,
        _ => low,
    };
    (high - from).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_earliest_record() {
        assert_eq!(behind(Offset::Offset(90), 0, 100), 10);
        assert_eq!(
            behind(Offset::Invalid, 40, 100),
            60,
            "nothing committed: everything kept is ahead"
        );
        assert_eq!(behind(Offset::Offset(100), 0, 100), 0);
        // A committed offset past a truncated high watermark is no negative lag.
        assert_eq!(behind(Offset::Offset(120), 0, 100), 0);
    }
}
