//! The consumer groups' lag as Kafka counts it (what `kafka-consumer-groups.sh` shows): per
//! partition, the high watermark minus the group's committed offset, summed over every group
//! of the saga on the topic it reads ([`crate::explain::CONSUMERS`]). Read from the broker at
//! each sample, like the other series, instead of the members' librdkafka statistics (a
//! value up to 5 s old per member, 0 for a partition between owners, summed over
//! processes): the benchmark once charted thousands of messages of that lag while the sagas
//! in flight were near zero.
//!
//! Committed offsets trail the work by the auto-commit interval, so at a steady rate the lag
//! reads about rate × that interval per group even when nothing waits: it is a bound on the
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
    /// One client per group (a committed offset is asked as the group; none of them joins it).
    askers: Vec<(BaseConsumer, &'static str)>,
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
        let askers = crate::explain::CONSUMERS
            .iter()
            .map(|consumer| {
                let asker: BaseConsumer = orderflow_platform::kafka::consumer_config(cluster, consumer.group, None)
                    .set("enable.auto.commit", "false")
                    .create()?;
                Ok((asker, consumer.topic))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { reader, askers })
    }

    /// The lag summed over every group and partition, now (blocking: a few requests to the
    /// broker).
    pub fn sample(&self) -> anyhow::Result<i64> {
        let mut total = 0;
        for (asker, topic) in &self.askers {
            let metadata = self.reader.fetch_metadata(Some(topic), ASK)?;
            let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
            let mut wanted = TopicPartitionList::new();
            for partition in 0..partitions {
                wanted.add_partition(topic, i32::try_from(partition)?);
            }
            for element in asker.committed_offsets(wanted, ASK)?.elements() {
                let (low, high) = self.reader.fetch_watermarks(topic, element.partition(), ASK)?;
                total += behind(element.offset(), low, high);
            }
        }
        Ok(total)
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
