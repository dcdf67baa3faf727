//! Kafka client settings shared by every producer and consumer, for Apache Kafka 4.x.
//! Each setting that differs from librdkafka's default says why.

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

/// How long a producer tries to deliver a record before it reports the record failed,
/// unless its caller says otherwise. Finite on purpose: a caller that waits for an
/// acknowledgement (the relay, inside a database transaction) must get an answer while the
/// broker is away, roll back and try again later, instead of holding its transaction open for
/// the whole outage.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of an idempotent producer whose records fail after `delivery_timeout`.
pub fn producer_config(bootstrap_servers: &str, client_id: &str, delivery_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("client.id", client_id)
        // Idempotence: retries inside librdkafka never duplicate or reorder a partition's
        // records, even with several requests in flight.
        .set("enable.idempotence", "true")
        // Acknowledged only once every in-sync replica has the record (with
        // min.insync.replicas=2 on three brokers, losing one broker loses nothing acknowledged).
        .set("acks", "all")
        // Finite (see DEFAULT_DELIVERY_TIMEOUT): a record not acknowledged by then is reported
        // failed; its outbox row stays unpublished and is sent again on a later pass.
        .set("message.timeout.ms", delivery_timeout.as_millis().to_string())
        // A few milliseconds of batching per partition: one request carries a burst of rows.
        .set("linger.ms", tuning("ORDERFLOW_KAFKA_LINGER_MS", "5"))
        .set("compression.type", "none");
    config
}

/// How long the group coordinator waits for a member's heartbeat before it gives the
/// member's partitions to the others. This is the failover time after a member dies without
/// leaving (kill -9, a lost machine) and, with static membership, also after a clean stop:
/// a static member does not leave the group, so that its restart is not a rebalance. 6 s is
/// the broker's smallest allowed value (group.min.session.timeout.ms); the saga deadline is
/// chosen well above it (docs/saga.md).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Settings of a consumer in `group_id` that stores offsets only when told to.
/// `instance_id` makes it a static member: restarted with the same id within the session
/// timeout, it gets its partitions back with no rebalance of the other members.
pub fn consumer_config(bootstrap_servers: &str, group_id: &str, instance_id: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        // The offset of a message is stored only after its effect committed in Postgres.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Incremental rebalances: a member joining or leaving moves only the partitions that
        // change owner; every other partition keeps flowing during the rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", SESSION_TIMEOUT.as_millis().to_string())
        // A third of the session timeout, as Kafka recommends: two lost heartbeats are tolerated.
        .set("heartbeat.interval.ms", (SESSION_TIMEOUT / 3).as_millis().to_string());
    if let Some(instance_id) = instance_id.filter(|id| !id.is_empty()) {
        config.set("group.instance.id", instance_id);
    }
    config
}

/// A consumer assigned every partition of `topic` from the beginning, in a throw-away group
/// with nothing committed, so reading never moves anyone's offsets (tools and tests).
/// Returns it with the number of partitions.
pub fn reader_from_start(bootstrap_servers: &str, topic: &str) -> anyhow::Result<(BaseConsumer, i32)> {
    let group = format!("reader-{}", uuid::Uuid::now_v7());
    let consumer: BaseConsumer = consumer_config(bootstrap_servers, &group, None)
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

/// A replication factor of -1 asks the broker for its `default.replication.factor`.
const BROKER_DEFAULT_REPLICATION: i32 = -1;

/// Creates the topics that do not exist yet, with `partitions` partitions each and the
/// broker's default replication factor (1 on one broker, 3 on the three-node cluster).
/// Existing topics are left as they are.
pub async fn ensure_topics(bootstrap_servers: &str, names: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(BROKER_DEFAULT_REPLICATION)))
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
