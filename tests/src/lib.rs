//! The test harness. Tests run against the real Postgres and Kafka of the local stack
//! (`scripts/stack up --infra`, which `scripts/test` runs first); each test gets its own
//! database and its own topic, so tests run in parallel without seeing each other's rows.

// Test support: a failed setup step must stop the test at once with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use orderflow::orders::v1 as api;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use orderflow_platform::{Secret, kafka};

pub mod saga;
use rdkafka::message::Message as _;
use tokio_util::sync::CancellationToken;

/// Where the local stack is.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Superuser URL, used only to create test databases.
    pub admin_url: String,
    /// URL of the `orders` database as its owner, `orders_owner`.
    pub orders_url: String,
    /// Every `ORDERFLOW_*` variable of the stack (the service roles' URLs among them).
    pub vars: HashMap<String, String>,
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// The cluster, as the stack's admin principal (a super user: tests create topics and
    /// groups of their own).
    pub kafka: kafka::Cluster,
}

/// The stack's coordinates, from the environment or else from `.stack/env`.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let mut vars: HashMap<String, String> = std::env::vars().collect();
        let env_file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack/env");
        if let Ok(text) = std::fs::read_to_string(&env_file) {
            for (key, value) in parse_stack_env(&text) {
                vars.entry(key).or_insert(value);
            }
        }
        let get = |key: &str| {
            vars.get(key).cloned().unwrap_or_else(|| {
                panic!(
                    "{key} is not set and {} has no value for it: start the stack with `scripts/stack up --infra`",
                    env_file.display()
                )
            })
        };
        Stack {
            admin_url: get("ORDERFLOW_PG_ADMIN_URL"),
            orders_url: get("ORDERFLOW_ORDERS_DATABASE_URL"),
            bootstrap_servers: get("ORDERFLOW_BOOTSTRAP_SERVERS"),
            kafka: kafka::Cluster::scram(
                get("ORDERFLOW_BOOTSTRAP_SERVERS"),
                get("ORDERFLOW_KAFKA_USERNAME"),
                Secret::new(get("ORDERFLOW_KAFKA_PASSWORD")),
            ),
            vars: vars
                .into_iter()
                .filter(|(key, _)| key.starts_with("ORDERFLOW_"))
                .collect(),
        }
    })
}

impl Stack {
    /// The admin principal's credentials, as a service's configuration takes them.
    pub fn kafka_auth(&self) -> kafka::KafkaArgs {
        kafka::KafkaArgs {
            kafka_username: self.vars.get("ORDERFLOW_KAFKA_USERNAME").cloned(),
            kafka_password: self.vars.get("ORDERFLOW_KAFKA_PASSWORD").map(Secret::new),
            tuning: kafka::KafkaTuning::default(),
        }
    }
}

/// The variables of a `.stack/env` file (`export KEY='value'` lines, as `scripts/stack` writes
/// them).
pub fn parse_stack_env(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.lines()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.trim_matches('\'').to_owned()))
}

/// A payload field number the envelope's `oneof` does not define: how the tests write the
/// event type of a later build (its consumer must dead-letter it by name, never drop it). Not
/// one a future event may take by accident: the event numbers are allotted in tens (orders
/// 20s, payments 30s, stock 40s, …) and this one is far above them.
pub const UNDEFINED_PAYLOAD_FIELD: u32 = 89;

/// A database of its own for one test, migrated like the orders database.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Its URL, as the `orders_owner` role.
    pub url: String,
    /// A small pool on it.
    pub pool: sqlx::PgPool,
}

/// The URL of `database` (a test database's name, or one of the stack's) as `role`, with
/// the password the stack gave it (the stack's `ORDERFLOW_DB_AS_<ROLE>` with that name).
pub fn database_url_as(role: &str, database: &str) -> String {
    let key = format!("ORDERFLOW_DB_AS_{}", role.to_uppercase());
    let url = stack()
        .vars
        .get(&key)
        .unwrap_or_else(|| panic!("{key} missing: start the stack with scripts/stack up --infra"));
    let (base, _) = url.rsplit_once('/').expect("a database URL ends in /NAME");
    format!("{base}/{database}")
}

impl TestDb {
    /// Applies `deploy/postgres/grants/{database}.sql` here, as `scripts/stack up` applies it
    /// to the stack's database of that name.
    pub async fn grant(&self, database: &str) {
        let path = format!(
            "{}/../deploy/postgres/grants/{database}.sql",
            env!("CARGO_MANIFEST_DIR")
        );
        let sql = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("{path}: {error}"));
    }

    /// This database's URL as `role`, with the password the stack gave it (the stack's
    /// `ORDERFLOW_DB_AS_<ROLE>` with this database's name).
    pub fn url_as(&self, role: &str) -> String {
        database_url_as(role, &self.name)
    }

    /// A small pool on this database as `role` (after [`TestDb::grant`]), for running a
    /// process kind's code with exactly its production rights.
    pub async fn pool_as(&self, role: &str) -> Result<sqlx::PgPool, sqlx::Error> {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url_as(role))
            .await
    }
}

/// Creates and migrates a fresh orders database, owned by `orders_owner`.
pub async fn fresh_orders_db() -> TestDb {
    fresh_db(&order_svc::MIGRATOR).await
}

/// Creates a fresh database owned by `orders_owner` and applies `migrator`.
pub async fn fresh_db(migrator: &sqlx::migrate::Migrator) -> TestDb {
    use sqlx::Connection as _;
    let stack = stack();
    let name = format!("test_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&stack.admin_url)
        .await
        .expect("connect as the stack's superuser");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} OWNER orders_owner"
    )))
    .execute(&mut admin)
    .await
    .expect("create a test database");
    let (base, _) = stack.orders_url.rsplit_once('/').expect("a database URL ends in /NAME");
    let url = format!("{base}/{name}");
    // The tests' own pool pings before each acquire (sqlx's default; the services' pools do
    // not): a test's check right after a Postgres restart must not fail on a stale
    // connection, which the services handle as a transient error and retry.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("connect to the test database");
    migrator.run(&pool).await.expect("migrate the test database");
    TestDb { name, url, pool }
}

/// Creates a topic of its own for one test, with its dead-letter topic.
pub async fn fresh_topic(partitions: i32) -> String {
    let name = format!("test.{}", uuid::Uuid::now_v7().simple());
    let dead_letters = orderflow::topics::dead_letter(&name);
    kafka::ensure_topics(&stack().kafka, &[&name, &dead_letters], partitions)
        .await
        .expect("create a test topic");
    name
}

/// A new PKI of the stack's kind (CA, certificates, token and event keys) in a directory of
/// its own, as `ordersctl pki` makes it.
pub fn fresh_pki() -> ordersctl::pki::Pki {
    let dir = std::env::temp_dir().join(format!("orderflow-pki-{}", uuid::Uuid::now_v7().simple()));
    assert!(ordersctl::pki::init(&dir).unwrap(), "a new directory gets a whole PKI");
    ordersctl::pki::Pki::at(dir)
}

/// `message` with `token` as its bearer token.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The tests' event keys: each producing service's signing key and the verifying keys every
/// consumer of a test trusts, as files (what the services' configurations name) and loaded.
/// Made once per test process, like a stack's (`ordersctl pki`).
pub struct EventKeys {
    /// The directory (`events/<service>.key`, `events/verifying/<service>.1.pub`).
    pub dir: std::path::PathBuf,
    /// order-svc's signer.
    pub order_svc: orderflow_platform::signing::EventSigner,
    /// payment-svc's signer.
    pub payment_svc: orderflow_platform::signing::EventSigner,
    /// A verifier trusting both.
    pub verifier: orderflow_platform::signing::EventVerifier,
}

impl EventKeys {
    /// A producing service's signing key file.
    pub fn signing_key(&self, service: &str) -> std::path::PathBuf {
        ordersctl::pki::Pki::at(&self.dir).event_signing_key(service)
    }

    /// The verifying keys' directory.
    pub fn verifying_keys(&self) -> std::path::PathBuf {
        ordersctl::pki::Pki::at(&self.dir).event_verifying_keys()
    }

    /// A service's signing configuration.
    pub fn signing_args(&self, service: &str) -> orderflow_platform::signing::SigningArgs {
        orderflow_platform::signing::SigningArgs {
            event_signing_key: self.signing_key(service),
        }
    }

    /// A consumer's verifying configuration.
    pub fn verifying_args(&self) -> orderflow_platform::signing::VerifyingArgs {
        orderflow_platform::signing::VerifyingArgs {
            event_verifying_keys: Some(self.verifying_keys()),
        }
    }

    /// `envelope` as order-svc (order events) or payment-svc (payment events) writes it.
    pub fn seal(&self, envelope: &orderflow::events::v1::EventEnvelope) -> Vec<u8> {
        let payload = envelope.payload.as_ref().expect("an envelope with its event");
        match orderflow_platform::signing::producer_of(payload) {
            orderflow_platform::signing::ORDER_SVC => self.order_svc.seal(envelope),
            _ => self.payment_svc.seal(envelope),
        }
    }
}

/// The test process's [`EventKeys`].
pub fn event_keys() -> &'static EventKeys {
    static KEYS: OnceLock<EventKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        use orderflow_platform::signing::{EventSigner, EventVerifier, ORDER_SVC, PAYMENT_SVC};
        let dir = std::env::temp_dir().join(format!("orderflow-test-keys-{}", uuid::Uuid::now_v7().simple()));
        ordersctl::pki::init_event_keys(&dir).expect("the tests' event keys");
        let pki = ordersctl::pki::Pki::at(&dir);
        EventKeys {
            order_svc: EventSigner::from_file(ORDER_SVC, &pki.event_signing_key(ORDER_SVC)).unwrap(),
            payment_svc: EventSigner::from_file(PAYMENT_SVC, &pki.event_signing_key(PAYMENT_SVC)).unwrap(),
            verifier: EventVerifier::from_dir(&pki.event_verifying_keys()).unwrap(),
            dir,
        }
    })
}

/// gateway-sim's settings for a test: its database, its address, its initial faults and its
/// transport security.
pub fn gateway_config(
    listen_addr: SocketAddr,
    db: &TestDb,
    faults: orderflow::gateway::v1::Faults,
    security: orderflow_platform::security::ServerSecurityArgs,
) -> gateway_sim::Config {
    gateway_sim::Config {
        listen_addr,
        database_url: Secret::new(db.url.clone()),
        key_retention_hours: 24,
        latency_ms: faults.latency_ms,
        latency_jitter_ms: faults.latency_jitter_ms,
        decline_rate: faults.decline_rate,
        timeout_rate: faults.timeout_rate,
        hang_rate: faults.hang_rate,
        hang_attempts: faults.hang_attempts,
        timeout_reply_delay_ms: faults.timeout_reply_delay_ms,
        seed: faults.seed,
        migrate: false,
        security,
        fairness: Default::default(),
        telemetry: Default::default(),
    }
}

/// An order service running inside the test process.
pub struct RunningOrderSvc {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningOrderSvc {
    /// A connected client.
    pub async fn client(&self) -> OrderServiceClient<tonic::transport::Channel> {
        OrderServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to order-svc")
    }

    /// Stops it gracefully and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("order-svc task")
            .expect("order-svc stops cleanly");
    }
}

/// Starts order-svc on a free port, on `db`, writing events for `topic` (gRPC only).
pub async fn start_order_svc(db: &TestDb, topic: &str) -> RunningOrderSvc {
    start_order_svc_with(db, topic, |_| {}).await
}

/// Starts order-svc with `adjust` applied to its configuration.
pub async fn start_order_svc_with(
    db: &TestDb,
    topic: &str,
    adjust: impl FnOnce(&mut order_svc::Config),
) -> RunningOrderSvc {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("a bound listener has an address");
    let config = order_svc::Config {
        listen_addr: addr,
        database_url: Secret::new(db.url.clone()),
        db_max_connections: 8,
        orders_topic: topic.to_owned(),
        idempotency_retention_hours: 24,
        request_timeout_ms: 5_000,
        max_concurrent_requests: 64,
        fairness: Default::default(),
        migrate: false,
        bootstrap_servers: None,
        kafka_auth: stack().kafka_auth(),
        telemetry: Default::default(),
        payments_topic: orderflow::topics::PAYMENTS_EVENTS.to_owned(),
        group_id: "order".to_owned(),
        instance_id: None,
        saga_deadline_ms: 30_000,
        sweep_interval_ms: 1_000,
        inbox_retention_hours: 168,
        max_order_total: orderflow::money::TotalLimits::default(),
        consumer: Default::default(),
        outbox: Default::default(),
        signing: event_keys().signing_args(orderflow_platform::signing::ORDER_SVC),
        verifying: event_keys().verifying_args(),
        security: orderflow_platform::security::ServerSecurityArgs::insecure(),
        placing: Default::default(),
    };
    let mut config = config;
    adjust(&mut config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(order_svc::run(config, listener, shutdown.clone()));
    RunningOrderSvc { addr, shutdown, task }
}

/// A valid PlaceOrder request: two lines in EUR, total 3 x 12.50 + 1 x 5.00 = 42.50.
pub fn valid_order(customer_id: i64) -> api::PlaceOrderRequest {
    let eur = |amount_minor| {
        Some(api::Money {
            amount_minor,
            currency_code: "EUR".into(),
        })
    };
    api::PlaceOrderRequest {
        request_id: String::new(),
        customer_id,
        items: vec![
            api::OrderItem {
                sku: "BOOK-1".into(),
                quantity: 3,
                unit_price: eur(1_250),
            },
            api::OrderItem {
                sku: "PEN-2".into(),
                quantity: 1,
                unit_price: eur(500),
            },
        ],
        total: eur(4_250),
        payment_token: "tok_visa".into(),
    }
}

/// Counts rows of `table` (a fixed name from the test) in `db`.
pub async fn count(db: &TestDb, table: &'static str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&db.pool)
        .await
        .expect("count rows")
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The key, as text.
    pub key: String,
    /// The headers, as text.
    pub headers: HashMap<String, String>,
    /// The value.
    pub payload: Vec<u8>,
}

/// Reads `topic` from the beginning of every partition until `done(records)` holds or
/// `timeout` passes; returns what was read either way. `done` is asked when the reader has
/// caught up (a poll with nothing new) or has read a twentieth more records since it was
/// last asked, not after every record: a predicate over all records asked per record is
/// quadratic, and over the 13,000 records of the relay's crash tests it took the debug build
/// longer than the whole wait (CI saw 173 records "missing" that were on the topic all
/// along). Asked this way it costs about twenty passes over the records, and a condition
/// such as "2,000 records" is seen at most 5% late.
pub async fn read_topic(
    cluster: &kafka::Cluster,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool + Send + 'static,
) -> Vec<Record> {
    let cluster = cluster.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let (consumer, partitions) = kafka::reader_from_start(&cluster, &topic).expect("a reader of the topic");
        assert!(partitions > 0, "topic {topic} has no partitions");
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        let mut asked_at = 0;
        let mut caught_up = true;
        while Instant::now() < deadline {
            if caught_up || records.len() - asked_at >= (records.len() / 20).max(16) {
                if done(&records) {
                    break;
                }
                asked_at = records.len();
            }
            let polled = consumer.poll(Duration::from_millis(100));
            caught_up = polled.is_none();
            match polled {
                Some(Ok(message)) => records.push(Record {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                    headers: orderflow_platform::kafka::headers_of(&message)
                        .into_iter()
                        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
                        .collect(),
                    payload: message.payload().unwrap_or_default().to_vec(),
                }),
                Some(Err(error)) => eprintln!("consumer error (retrying): {error}"),
                None => {}
            }
        }
        records
    })
    .await
    .expect("reader task")
}

/// How many times each message id appears among `records` (a republished event twice).
pub fn count_by_message_id(records: &[Record]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for record in records {
        *counts
            .entry(record.headers.get("message_id").cloned().unwrap_or_default())
            .or_default() += 1;
    }
    counts
}

/// kill -9 a process the test started, and check that it was killed, not stopped.
pub async fn kill_9(child: &mut tokio::process::Child) {
    child.start_kill().expect("SIGKILL the process");
    let status = child.wait().await.expect("reap the process");
    assert!(!status.success(), "the process was killed, not stopped: {status:?}");
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes; returns the last answer.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Commits offset 0 on every partition of `topic` for `group`, so the group's next member
/// replays the topic from the start (no member may be active meanwhile).
pub fn reset_group_to_start(cluster: &kafka::Cluster, group: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
    let consumer: BaseConsumer = orderflow_platform::kafka::consumer_config(cluster, group, None)
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition_offset(topic, i32::try_from(partition)?, rdkafka::Offset::Offset(0))?;
    }
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(())
}

/// The state of consumer group `group` as the broker's coordinator says it (`Empty` once
/// its last member left or its session expired, `Stable`, `PreparingRebalance`, ...;
/// `Dead` for a group it does not know).
pub fn group_state(cluster: &kafka::Cluster, group: &str) -> anyhow::Result<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer =
        orderflow_platform::kafka::consumer_config(cluster, &format!("{group}-probe"), None).create()?;
    let groups = consumer.fetch_group_list(Some(group), Duration::from_secs(10))?;
    Ok(groups
        .groups()
        .first()
        .map_or_else(|| "Dead".to_owned(), |g| g.state().to_owned()))
}

/// The group's committed offsets (0 where none) and the high watermarks on `topic`, per
/// partition.
pub fn committed_and_end(cluster: &kafka::Cluster, group: &str, topic: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer = orderflow_platform::kafka::consumer_config(cluster, group, None).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, i32::try_from(partition)?);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
    committed
        .elements()
        .iter()
        .map(|e| {
            let (_, high) = consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(10))?;
            Ok((e.offset().to_raw().unwrap_or(-1).max(0), high))
        })
        .collect()
}

/// Apache Kafka brokers of one test's own (`scripts/stack kafka`), in a directory of their
/// own, on free ports chosen at random (two per broker: clients, controller), so that test
/// binaries run in parallel never share a broker. Stopped and deleted when dropped.
pub struct PrivateKafka {
    dir: std::path::PathBuf,
    port: u16,
    brokers: u8,
    /// Where clients connect.
    pub bootstrap_servers: String,
    /// The cluster as its admin principal.
    pub cluster: kafka::Cluster,
}

impl PrivateKafka {
    /// Brokers of a test's own (1 or 3 nodes), not started yet: their coordinates and admin
    /// credentials are known before they run (a test can point a client at a broker that does
    /// not exist yet).
    pub fn new(brokers: u8) -> Self {
        let port = free_ports(2 * u16::from(brokers));
        let dir = std::env::temp_dir().join(format!("orderflow-kafka-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("the private stack's directory");
        // scripts/stack keeps a password it finds in the secrets file.
        let password = uuid::Uuid::now_v7().simple().to_string();
        std::fs::write(dir.join("secrets"), format!("kafka-admin={password}\n")).expect("the private stack's secrets");
        let bootstrap_servers = (0..u16::from(brokers))
            .map(|n| format!("127.0.0.1:{}", port + 2 * n))
            .collect::<Vec<_>>()
            .join(",");
        Self {
            dir,
            port,
            brokers,
            cluster: kafka::Cluster::scram(bootstrap_servers.clone(), "admin", Secret::new(password)),
            bootstrap_servers,
        }
    }

    /// Starts the brokers and creates the stack's topics on them.
    pub async fn start(&self) {
        self.stack(&["kafka", "--brokers", &self.brokers.to_string()]).await;
    }

    /// Stops every broker (SIGSTOP): connections stay open, nothing answers.
    pub async fn pause(&self) {
        self.stack(&["broker-pause"]).await;
    }

    /// Resumes the brokers `pause` stopped.
    pub async fn resume(&self) {
        self.stack(&["broker-resume"]).await;
    }

    /// Runs `scripts/stack ARGS` on these brokers; panics if it fails.
    async fn stack(&self, args: &[&str]) {
        let status = self.command(args).status().await.expect("run scripts/stack");
        assert!(status.success(), "scripts/stack {args:?} failed: {status}");
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command =
            std::process::Command::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack"));
        command
            .args(args)
            .env("ORDERFLOW_STACK_DIR", &self.dir)
            .env("ORDERFLOW_KAFKA_PORT", self.port.to_string())
            .env("ORDERFLOW_BROKERS", self.brokers.to_string())
            .env("ORDERFLOW_PARTITIONS", "12");
        command.into()
    }
}

/// The first of `count` consecutive loopback ports that are free now, from a random start
/// (another test binary probing at the same moment almost surely starts elsewhere).
fn free_ports(count: u16) -> u16 {
    // Below the kernel's ephemeral range (32768 and up here): no outgoing connection takes one
    // of these between the probe and the broker's bind.
    let mut candidate = 20_000 + u16::try_from(uuid::Uuid::now_v7().as_u128() % 12_000).unwrap_or(0);
    loop {
        let free = (candidate..candidate + count).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        if free {
            return candidate;
        }
        candidate = if candidate > 32_000 { 20_000 } else { candidate + count };
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        // A broker a failed test left paused cannot stop gracefully.
        let mut resume: std::process::Command = self.command(&["broker-resume"]).into_std();
        let _ = resume
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let mut down: std::process::Command = self.command(&["down"]).into_std();
        let _ = down.stdout(std::process::Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
