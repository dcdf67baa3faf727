//! Kafka client settings shared by every producer and consumer.
//!
//! The values follow what was measured against the local broker (Tansu 0.6.0, see
//! `shared/reference/broker.md` in the project's design notes and docs/local-stack.md) and
//! are also right for Apache Kafka.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A client setting that the benchmark's tuning runs may override from the environment
/// (docs/performance.md); the default is the measured choice.
fn tuning(variable: &str, default: &str) -> String {
    std::env::var(variable)
        .ok()
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| default.to_owned())
}

/// Settings of an idempotent producer that never gives up on a message.
pub fn producer_config(bootstrap_servers: &str, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("client.id", client_id)
        // Idempotence gives per-partition order and no broker-side duplicates from retries.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // 0 = a message never times out. A timed-out message makes librdkafka re-initialise
        // the idempotent producer (InitProducerId with its old id), which the local broker
        // cannot survive; and a message that times out would have to be retried anyway,
        // because its outbox row is still unpublished. So: wait for the broker, however long.
        .set("message.timeout.ms", "0")
        .set("linger.ms", tuning("ORDERFLOW_KAFKA_LINGER_MS", "5"))
        .set("compression.type", "none");
    config
}

/// Settings of a consumer in `group_id` that stores offsets only when told to.
pub fn consumer_config(bootstrap_servers: &str, group_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        // The offset of a message is stored only after its effect committed in Postgres.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // The local broker does not wake a waiting fetch when data arrives: with the default
        // 500 ms every hop would cost ~400 ms. 10 ms brings produce-to-consume p50 to ~17 ms.
        .set("fetch.wait.max.ms", tuning("ORDERFLOW_KAFKA_FETCH_WAIT_MS", "10"))
        .set("session.timeout.ms", "10000");
    config
}

/// A consumer assigned every partition of `topic` from the beginning, in a throw-away group
/// with nothing committed, so reading never moves anyone's offsets (tools and tests).
/// Returns it with the number of partitions.
pub fn reader_from_start(bootstrap_servers: &str, topic: &str) -> anyhow::Result<(BaseConsumer, i32)> {
    let group = format!("reader-{}", uuid::Uuid::now_v7());
    let consumer: BaseConsumer = consumer_config(bootstrap_servers, &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = i32::try_from(metadata.topics().first().map_or(0, |t| t.partitions().len()))?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, partitions))
}

/// Creates the topics that do not exist yet, with `partitions` partitions each.
/// Existing topics are left as they are.
pub async fn ensure_topics(bootstrap_servers: &str, names: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}
