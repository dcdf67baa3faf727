//! Dead letters: what a consumer can never process goes to `<topic>.dlq` with headers that
//! say why and where it came from (enough to redrive it: `ordersctl dlq`), and each
//! consumer reports how many its dead-letter topics hold.

use std::time::{Duration, SystemTime};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use super::Incoming;
use crate::telemetry;

/// How often a consumer counts the dead letters held in its dead-letter topics.
const DEAD_LETTER_WATCH_INTERVAL: Duration = Duration::from_secs(30);

/// Sets the dead-letter depth gauge of each topic (`orderflow_dead_letter_messages`, what the
/// DeadLetterTopicFilling alert watches) until `stop`: the sum of its partitions' high minus
/// low watermarks, asked through the producer that writes the dead letters (its principal may
/// describe the topic it writes). Every consumer writing to a topic reports the same number.
pub async fn watch_depth(producer: FutureProducer, topics: Vec<String>, stop: CancellationToken) {
    use rdkafka::producer::Producer as _;
    const ASK_TIMEOUT: Duration = Duration::from_secs(5);
    let mut tick = tokio::time::interval(DEAD_LETTER_WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for topic in &topics {
            let (producer, topic) = (producer.clone(), topic.clone());
            // librdkafka's metadata and offset requests block: off the async workers.
            let counted = tokio::task::spawn_blocking(move || {
                let client = producer.client();
                let metadata = client.fetch_metadata(Some(&topic), ASK_TIMEOUT)?;
                let mut held = 0;
                for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                    let (low, high) = client.fetch_watermarks(&topic, partition.id(), ASK_TIMEOUT)?;
                    held += (high - low).max(0);
                }
                Ok::<_, rdkafka::error::KafkaError>((topic, held))
            })
            .await;
            match counted {
                Ok(Ok((topic, held))) => {
                    metrics::gauge!(telemetry::DEAD_LETTER_MESSAGES, "topic" => topic).set(held as f64)
                }
                Ok(Err(error)) => tracing::debug!(%error, "cannot count the dead letters"),
                Err(error) => tracing::debug!(%error, "the dead-letter count did not finish"),
            }
        }
    }
}

fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339()
}

/// Sends `message` to its topic's dead-letter topic, with why (`reason`), how often it was
/// tried and when it first failed.
pub async fn dead_letter(
    producer: &FutureProducer,
    message: &Incoming,
    group: &str,
    reason: &str,
    attempts: u32,
    first_failure: SystemTime,
) -> anyhow::Result<()> {
    let topic = orderflow::topics::dead_letter(&message.topic);
    let mut headers = OwnedHeaders::new();
    for (key, value) in &message.headers {
        headers = headers.insert(Header {
            key: key.as_str(),
            value: Some(value.as_slice()),
        });
    }
    let attempts = attempts.to_string();
    let partition = message.partition.to_string();
    let offset = message.offset.to_string();
    let first = rfc3339(first_failure);
    let last = rfc3339(SystemTime::now());
    let key = String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()).into_owned();
    for (name, value) in [
        ("dlq.error", reason),
        ("dlq.consumer_group", group),
        ("dlq.attempts", attempts.as_str()),
        ("dlq.original_topic", message.topic.as_str()),
        ("dlq.original_partition", partition.as_str()),
        ("dlq.original_offset", offset.as_str()),
        ("dlq.original_key", key.as_str()),
        ("dlq.first_failure_at", first.as_str()),
        ("dlq.last_failure_at", last.as_str()),
    ] {
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    let mut record = FutureRecord::to(&topic).payload(&message.payload).headers(headers);
    if let Some(key) = &message.key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(error, _)| anyhow::anyhow!(error))?;
    Ok(())
}
