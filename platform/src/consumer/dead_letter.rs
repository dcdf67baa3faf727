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

/// The headers of `message`'s dead letter: its own, then what says why it is here and where it
/// came from (enough for an operator to redrive it: `ordersctl dlq`).
fn headers_of(
    message: &Incoming,
    group: &str,
    reason: &str,
    attempts: u32,
    first_failure: SystemTime,
    last_failure: SystemTime,
) -> Vec<(String, Vec<u8>)> {
    let mut headers = message.headers.clone();
    let key = String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()).into_owned();
    for (name, value) in [
        ("dlq.error", reason.to_owned()),
        ("dlq.consumer_group", group.to_owned()),
        ("dlq.attempts", attempts.to_string()),
        ("dlq.original_topic", message.topic.clone()),
        ("dlq.original_partition", message.partition.to_string()),
        ("dlq.original_offset", message.offset.to_string()),
        ("dlq.original_key", key),
        ("dlq.first_failure_at", rfc3339(first_failure)),
        ("dlq.last_failure_at", rfc3339(last_failure)),
    ] {
        headers.push((name.to_owned(), value.into_bytes()));
    }
    headers
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
    let listed = headers_of(message, group, reason, attempts, first_failure, SystemTime::now());
    let headers = listed.iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key: key.as_str(),
            value: Some(value.as_slice()),
        })
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_its_headers_and_says_why_and_where_it_came_from() {
        let message = Incoming {
            topic: "orders.events".into(),
            partition: 3,
            offset: 41,
            key: Some(b"order-7".to_vec()),
            payload: b"bytes".to_vec(),
            headers: vec![("message_id".into(), b"m-1".to_vec())],
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let headers = headers_of(&message, "payment", "poison", 4, at, at);
        let text = |name: &str| {
            headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
        };
        assert_eq!(text("message_id").as_deref(), Some("m-1"), "its own headers kept");
        assert_eq!(text("dlq.error").as_deref(), Some("poison"));
        assert_eq!(text("dlq.consumer_group").as_deref(), Some("payment"));
        assert_eq!(text("dlq.attempts").as_deref(), Some("4"));
        assert_eq!(text("dlq.original_topic").as_deref(), Some("orders.events"));
        assert_eq!(text("dlq.original_partition").as_deref(), Some("3"));
        assert_eq!(text("dlq.original_offset").as_deref(), Some("41"));
        assert_eq!(text("dlq.original_key").as_deref(), Some("order-7"));
        assert_eq!(
            text("dlq.first_failure_at").as_deref(),
            Some("2027-01-15T08:00:00+00:00")
        );
    }
}
