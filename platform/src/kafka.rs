//! Kafka client settings shared by every producer and consumer, for Apache Kafka 4.x.
//! Each setting that differs from librdkafka's default says why.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Where the cluster is and who this client is. The brokers authenticate every client with
/// SASL/SCRAM (SHA-512) and authorize it with ACLs per principal (each service has its own:
/// deploy/kafka/acls.txt); a cluster without credentials (a broker for development) is
/// reached anonymously.
#[derive(Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    credentials: Option<(String, crate::Secret)>,
    tuning: KafkaTuning,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("principal", &self.credentials.as_ref().map(|(user, _)| user))
            .finish()
    }
}

impl Cluster {
    /// A cluster reached anonymously.
    pub fn anonymous(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            credentials: None,
            tuning: KafkaTuning::default(),
        }
    }

    /// A cluster reached as `username` (SASL/SCRAM-SHA-512).
    pub fn scram(bootstrap_servers: impl Into<String>, username: impl Into<String>, password: crate::Secret) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            credentials: Some((username.into(), password)),
            tuning: KafkaTuning::default(),
        }
    }

    /// `bootstrap_servers` with the credentials of `args`, if it has them, and its tuning.
    pub fn new(bootstrap_servers: impl Into<String>, args: &KafkaArgs) -> Self {
        let cluster = match (&args.kafka_username, &args.kafka_password) {
            (Some(user), Some(password)) => Self::scram(bootstrap_servers, user.clone(), password.clone()),
            _ => Self::anonymous(bootstrap_servers),
        };
        Self {
            tuning: args.tuning.clone(),
            ..cluster
        }
    }

    /// The principal this client authenticates as.
    pub fn principal(&self) -> Option<&str> {
        self.credentials.as_ref().map(|(user, _)| user.as_str())
    }

    /// A client configuration for this cluster: its servers and, with credentials, SASL.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        if let Some((user, password)) = &self.credentials {
            // SCRAM over plaintext: the password never crosses the wire (the client proves
            // it knows it), but the records do; the brokers listen on loopback only.
            config
                .set("security.protocol", "SASL_PLAINTEXT")
                .set("sasl.mechanism", "SCRAM-SHA-512")
                .set("sasl.username", user)
                .set("sasl.password", password.expose());
        }
        config
    }
}

/// The Kafka settings every process takes in its configuration: its credentials (generic
/// names: each process is given its own principal's) and the client tuning.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaArgs {
    /// The SASL/SCRAM principal this process authenticates to Kafka as.
    #[arg(long, env = "KAFKA_USERNAME", requires = "kafka_password")]
    pub kafka_username: Option<String>,
    /// Its password.
    #[arg(long, env = "KAFKA_PASSWORD", hide_env_values = true, requires = "kafka_username")]
    pub kafka_password: Option<crate::Secret>,
    /// The client settings the benchmark's tuning runs vary.
    #[command(flatten)]
    pub tuning: KafkaTuning,
}

const DEFAULT_LINGER_MS: u64 = 5;
const DEFAULT_FETCH_MIN_BYTES: u32 = 1;
const DEFAULT_FETCH_WAIT_MS: u64 = 500;

/// Client settings that the benchmark's tuning runs vary (docs/performance.md); each default
/// is the measured choice. Typed: a value that is not a number stops the process at start-up
/// naming its variable, instead of falling back to the default.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct KafkaTuning {
    /// Producers' `linger.ms`: how long a record may wait for others of its partition.
    #[arg(long, env = "ORDERFLOW_KAFKA_LINGER_MS", default_value_t = DEFAULT_LINGER_MS)]
    pub kafka_linger_ms: u64,
    /// Consumers' `fetch.min.bytes`.
    #[arg(long, env = "ORDERFLOW_KAFKA_FETCH_MIN_BYTES", default_value_t = DEFAULT_FETCH_MIN_BYTES)]
    pub kafka_fetch_min_bytes: u32,
    /// Consumers' `fetch.wait.max.ms`: how long the broker may hold a fetch to gather them.
    #[arg(long, env = "ORDERFLOW_KAFKA_FETCH_WAIT_MS", default_value_t = DEFAULT_FETCH_WAIT_MS)]
    pub kafka_fetch_wait_ms: u64,
}

impl Default for KafkaTuning {
    fn default() -> Self {
        Self {
            kafka_linger_ms: DEFAULT_LINGER_MS,
            kafka_fetch_min_bytes: DEFAULT_FETCH_MIN_BYTES,
            kafka_fetch_wait_ms: DEFAULT_FETCH_WAIT_MS,
        }
    }
}

/// How long a producer tries to deliver a record before it reports the record failed,
/// unless its caller says otherwise. Finite on purpose: a caller that waits for an
/// acknowledgement (the relay, inside a database transaction) must get an answer while the
/// broker is away, roll back and try again later, instead of holding its transaction open for
/// the whole outage.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of an idempotent producer whose records fail after `delivery_timeout`.
pub fn producer_config(cluster: &Cluster, client_id: &str, delivery_timeout: Duration) -> ClientConfig {
    let mut config = cluster.client_config();
    config
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
        .set("linger.ms", cluster.tuning.kafka_linger_ms.to_string())
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

/// How often a consumer commits the offsets it stored.
pub const AUTO_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of a consumer in `group_id` that stores offsets only when told to.
/// `instance_id` makes it a static member: restarted with the same id within the session
/// timeout, it gets its partitions back with no rebalance of the other members.
pub fn consumer_config(cluster: &Cluster, group_id: &str, instance_id: Option<&str>) -> ClientConfig {
    let mut config = cluster.client_config();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "true")
        // The offset of a message is stored only after its effect committed in Postgres.
        .set("enable.auto.offset.store", "false")
        // Stored offsets reach the broker within a second (librdkafka's default is 5 s): a
        // member that dies redelivers at most a second of handled messages (the inbox
        // absorbs them), and the group's lag as Kafka reports it (committed offset to high
        // watermark) trails the work by that much, not by five seconds of traffic.
        .set("auto.commit.interval.ms", AUTO_COMMIT_INTERVAL.as_millis().to_string())
        .set("auto.offset.reset", "earliest")
        // Incremental rebalances: a member joining or leaving moves only the partitions that
        // change owner; every other partition keeps flowing during the rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", SESSION_TIMEOUT.as_millis().to_string())
        // A third of the session timeout, as Kafka recommends: two lost heartbeats are tolerated.
        .set("heartbeat.interval.ms", (SESSION_TIMEOUT / 3).as_millis().to_string())
        // How long the broker may hold a fetch to gather `fetch.min.bytes`: fewer, fuller
        // fetch requests for a few milliseconds of latency per hop (docs/performance.md).
        .set("fetch.min.bytes", cluster.tuning.kafka_fetch_min_bytes.to_string())
        .set("fetch.wait.max.ms", cluster.tuning.kafka_fetch_wait_ms.to_string());
    if let Some(instance_id) = instance_id.filter(|id| !id.is_empty()) {
        config.set("group.instance.id", instance_id);
    }
    config
}

/// A consumer assigned every partition of `topic` from the beginning, in a throw-away group
/// with nothing committed, so reading never moves anyone's offsets (tools and tests).
/// Returns it with the number of partitions.
pub fn reader_from_start(cluster: &Cluster, topic: &str) -> anyhow::Result<(BaseConsumer, i32)> {
    reader(cluster, topic, Offset::Beginning)
}

/// Like [`reader_from_start`], every partition from `start` (`Offset::End`: only what is
/// written from now on).
pub fn reader(cluster: &Cluster, topic: &str, start: Offset) -> anyhow::Result<(BaseConsumer, i32)> {
    let group = format!("reader-{}", uuid::Uuid::now_v7());
    let consumer: BaseConsumer = consumer_config(cluster, &group, None)
        .set("enable.auto.commit", "false")
        .create()?;
    let partitions = partition_count(&consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, start)?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, partitions))
}

/// How many partitions `topic` has, from the cluster's metadata (0 for a topic that does not
/// exist).
pub fn partition_count(client: &impl Consumer, topic: &str) -> anyhow::Result<i32> {
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(i32::try_from(
        metadata.topics().first().map_or(0, |t| t.partitions().len()),
    )?)
}

/// A record's headers as (name, value) pairs, for a copy of the record that outlives the
/// client's buffer (a header without a value is kept with an empty one).
pub fn headers_of(message: &impl rdkafka::Message) -> Vec<(String, Vec<u8>)> {
    use rdkafka::message::Headers as _;
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|header| (header.key.to_owned(), header.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of the header `name` among `headers` (from [`headers_of`]) as text.
pub fn header_text(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

/// A replication factor of -1 asks the broker for its `default.replication.factor`.
const BROKER_DEFAULT_REPLICATION: i32 = -1;

/// Creates the topics that do not exist yet, with `partitions` partitions each and the
/// broker's default replication factor (1 on one broker, 3 on the three-node cluster).
/// Existing topics are left as they are.
pub async fn ensure_topics(cluster: &Cluster, names: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = cluster.client_config().create()?;
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
