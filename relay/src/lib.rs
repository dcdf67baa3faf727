//! The outbox relay: publishes one service database's outbox rows to Kafka, at least once,
//! in order per key.
//!
//! How it stays correct (see `shared/reference/pitfalls.md` for the failures it avoids):
//! - Unpublished rows are found by their flag (`published_at IS NULL`), in id order. There
//!   is no "last published id": a row whose id is lower than one already published but
//!   whose transaction committed later is simply found on the next pass.
//! - Every row belongs to one of [`KEY_SLOTS`] key slots (a hash of its key, a column the
//!   schema computes). A relay publishes only the slots it holds: session advisory locks
//!   taken on the one connection it also claims and marks on ([`Leases`]). So each key has
//!   exactly one publisher at a time, which publishes its rows in id order, while several
//!   relays publish different slots side by side. Relays share the slots out between them
//!   (each takes its fair share, counting the relays by their membership locks) and take over
//!   a dead relay's slots: its connection closes and Postgres releases its locks. A relay that
//!   lost its connection cannot mark anything either: its marks go through that connection.
//! - Rows are claimed without a transaction or a row lock (nobody else publishes the slots),
//!   published with an idempotent producer (per-partition order kept, no broker-side
//!   duplicates from retries) and marked only after the broker acknowledged them. Up to
//!   `RELAY_PIPELINE_DEPTH` batches are in flight at once (a key's rows in one of them at a
//!   time), settled in claim order ([`pipeline`]).
//!
//! Failure windows:
//! - dies before publishing: nothing was written for the claim, the rows stay unpublished
//!   and the next claim (of this or another relay) publishes them; nothing is lost;
//! - dies after the broker acknowledged and before the statement that marks the rows: the
//!   rows stay unpublished and are published again, with every batch claimed after them;
//!   consumers see a duplicate with the same message_id, and their inbox makes it a no-op (at
//!   least once, never lost);
//! - broker down: every record in flight fails after the delivery timeout
//!   (`RELAY_DELIVERY_TIMEOUT_MS`), nothing is marked, and the relay backs off; the rows are
//!   published when the broker returns. The relay holds no transaction (no row lock, no hold
//!   on the database's xmin horizon) while it waits for the broker.
//! - a record of a key fails while a later record of the same key is acknowledged, in its
//!   batch or a later one: neither is marked ([`pipeline::Pipeline::marks`]), so the next
//!   drain publishes the key's rows again in id order;
//! - a database error (a claim, a mark) with batches in flight: the relay waits for their
//!   answers, marks none, and only then gives up its leases; every row of them is published
//!   again, by this relay or the one that takes the slots, never by two producers at once.

mod pipeline;
pub mod wal;

use std::time::Duration;

use futures::FutureExt as _;
use futures::future::join_all;
use orderflow_platform::{Secret, kafka, outbox, telemetry};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Key slots of the outbox: fixed by the schema (`outbox.key_slot`, a hash of the partition
/// key modulo this), so every relay of a database agrees on them.
pub const KEY_SLOTS: i32 = 64;
/// Advisory lock class of a key slot's lease (the slot is the second key): "OFKS". Public for
/// whoever looks for the holders in `pg_locks` (operators, the tests).
pub const SLOT_LOCK_CLASS: i32 = 0x4f46_4b53;
/// Advisory lock class of a relay's membership (its random member id is the second key):
/// the relays count each other by these. "OFRM".
const MEMBER_LOCK_CLASS: i32 = 0x4f46_524d;
/// How often a relay rebalances its share of the slots (sooner when it holds none).
const LEASE_BALANCE_INTERVAL: Duration = Duration::from_secs(1);
/// The NOTIFY channel the outbox trigger signals on commit.
const OUTBOX_CHANNEL: &str = "outbox";
/// How often the backlog gauge is counted.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(1);
/// How long every pass may fail before the relay replaces its producer (or, with no way to
/// make one, gives up) (`RELAY_STALL_LIMIT_MS`): past a short broker outage, well within the
/// 90 s saga deadline.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_millis(DEFAULT_STALL_LIMIT_MS);

// The defaults of the settings one mode reads and the other refuses (each spelled once: the
// flag's default and `Config::check_mode` read the same constant).
const DEFAULT_BATCH_SIZE: i64 = 500;
const DEFAULT_POLL_INTERVAL_MS: u64 = 1_000;
const DEFAULT_PUBLISHED_RETENTION_SECS: u64 = 3_600;
const DEFAULT_COALESCE_MS: u64 = 20;
const DEFAULT_STALL_LIMIT_MS: u64 = 30_000;
const DEFAULT_STATUS_INTERVAL_MS: u64 = 1_000;
const DEFAULT_WAL_MAX_IN_FLIGHT: usize = wal::DEFAULT_MAX_IN_FLIGHT;
const DEFAULT_PIPELINE_DEPTH: u16 = 4;

/// The relay's settings: defaults, overridden by environment variables, overridden by flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "relay", about = "orderflow's outbox relay: publishes outbox rows to Kafka")]
pub struct Config {
    /// Postgres URL of the service database whose outbox this relay publishes.
    #[arg(long, env = "RELAY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Kafka bootstrap servers.
    #[arg(long, env = "RELAY_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:19092")]
    pub bootstrap_servers: String,
    /// Who this relay is to Kafka (SASL/SCRAM): each relay's principal may write its own
    /// topic and nothing else.
    #[command(flatten)]
    pub kafka_auth: kafka::KafkaArgs,
    /// Its logs, spans and metrics (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `ORDERFLOW_METRICS_ADDR`).
    #[command(flatten)]
    pub telemetry: orderflow_platform::telemetry::TelemetryArgs,
    /// Kafka client id (shows in broker logs).
    #[arg(long, env = "RELAY_CLIENT_ID", default_value = "orderflow-relay")]
    pub client_id: String,
    /// Most rows published per batch (one claim, one mark).
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: i64,
    /// Most batches in flight at once: the next is claimed and handed to the producer while
    /// the broker acknowledges the ones before it (1: one batch at a time). With
    /// RELAY_KAFKA_TRANSACTIONS always 1: the producer has one transaction at a time.
    #[arg(long, env = "RELAY_PIPELINE_DEPTH", default_value_t = DEFAULT_PIPELINE_DEPTH,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub pipeline_depth: u16,
    /// Polling fallback: look for rows this often even without a NOTIFY, in milliseconds.
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = DEFAULT_POLL_INTERVAL_MS)]
    pub poll_interval_ms: u64,
    /// Published rows are deleted this long after publication, in seconds.
    #[arg(long, env = "RELAY_PUBLISHED_RETENTION_SECS", default_value_t = DEFAULT_PUBLISHED_RETENTION_SECS)]
    pub published_retention_secs: u64,
    /// Wake on the outbox's NOTIFY (false: polling alone, for the tuning comparison).
    #[arg(long, env = "RELAY_LISTEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub listen: bool,
    /// How long the broker may take to acknowledge a record before the relay counts it failed
    /// (its row stays unpublished, and so does every later row of its key in flight) and
    /// backs off, in milliseconds. Bounds how long a batch stays in flight while the broker
    /// is away.
    #[arg(long, env = "RELAY_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    pub delivery_timeout_ms: u64,
    /// After a NOTIFY, wait this long before the claim, so that a burst of commits shares one
    /// batch, in milliseconds.
    #[arg(long, env = "RELAY_COALESCE_MS", default_value_t = DEFAULT_COALESCE_MS)]
    pub coalesce_ms: u64,
    /// Every pass failing for this long makes the relay replace its producer (new broker
    /// connections), in milliseconds (0: never).
    #[arg(long, env = "RELAY_STALL_LIMIT_MS", default_value_t = DEFAULT_STALL_LIMIT_MS)]
    pub stall_limit_ms: u64,
    /// How the events reach this relay: `table` (poll the outbox table) or `wal-message`
    /// (stream the database's logical replication slot); the services of the database must
    /// write with the same `OUTBOX_MODE`.
    #[arg(long, env = "RELAY_MODE", value_enum, default_value_t = outbox::OutboxMode::Table)]
    pub mode: outbox::OutboxMode,
    /// The replication slot of the wal-message mode (default: `<database>_outbox`). Created
    /// on the first start; never silently re-created once lost.
    #[arg(long, env = "RELAY_SLOT")]
    pub slot: Option<String>,
    /// How often the wal-message mode confirms its position to Postgres, in milliseconds:
    /// after a crash up to this much is published again.
    #[arg(long, env = "RELAY_STATUS_INTERVAL_MS", default_value_t = DEFAULT_STATUS_INTERVAL_MS)]
    pub status_interval_ms: u64,
    /// Records the wal-message mode may have waiting for the broker's acknowledgement before
    /// it stops reading the slot (bounds its memory while the broker is slow).
    #[arg(long, env = "RELAY_WAL_MAX_IN_FLIGHT", default_value_t = DEFAULT_WAL_MAX_IN_FLIGHT)]
    pub wal_max_in_flight: usize,
    /// Publish each batch in a Kafka transaction (table mode): a batch becomes visible to
    /// read_committed consumers all at once or not at all. It does not make publishing
    /// exactly-once: the outbox is marked after the Kafka commit, outside it.
    #[arg(long, env = "RELAY_KAFKA_TRANSACTIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub kafka_transactions: bool,
    /// The producer's `transactional.id` with RELAY_KAFKA_TRANSACTIONS (default: the client
    /// id). Stable across restarts, so a restarted relay fences its dead predecessor and
    /// aborts its open transaction at once (a new id would leave it open, holding back every
    /// read_committed consumer of its partitions, until the transaction timeout). Each relay
    /// of a database needs its own.
    #[arg(long, env = "RELAY_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
    /// Prepare and exit: in the wal-message mode, make sure the slot exists (creating it on
    /// the very first start), so that the services may start writing events; nothing to do
    /// in the table mode.
    #[arg(long, env = "RELAY_PREPARE_ONLY", default_value_t = false, action = clap::ArgAction::Set)]
    pub prepare_only: bool,
    /// Fault injection for tests and the chaos harness: publish every row twice. Only in a
    /// build with the `failpoints` feature.
    #[cfg(feature = "failpoints")]
    #[arg(long, env = "RELAY_PUBLISH_TWICE", default_value_t = false, action = clap::ArgAction::Set)]
    pub publish_twice: bool,
}

impl Config {
    /// Refuses, naming each variable, a setting that the chosen mode does not read and that
    /// was given a value other than its default: a setting silently ignored is a setting the
    /// operator believes in and that does nothing.
    pub fn check_mode(&self) -> anyhow::Result<()> {
        // One batch at a time is what transactions get anyway: only a deeper pipeline is refused.
        if self.kafka_transactions && self.pipeline_depth > 1 && self.pipeline_depth != DEFAULT_PIPELINE_DEPTH {
            anyhow::bail!(
                "RELAY_PIPELINE_DEPTH does not apply with RELAY_KAFKA_TRANSACTIONS: the producer has one \
                 transaction, so one batch, at a time"
            );
        }
        let (other_mode, given): (outbox::OutboxMode, Vec<(&str, bool)>) = match self.mode {
            outbox::OutboxMode::WalMessage => (
                outbox::OutboxMode::Table,
                vec![
                    ("RELAY_BATCH_SIZE", self.batch_size != DEFAULT_BATCH_SIZE),
                    (
                        "RELAY_POLL_INTERVAL_MS",
                        self.poll_interval_ms != DEFAULT_POLL_INTERVAL_MS,
                    ),
                    (
                        "RELAY_PUBLISHED_RETENTION_SECS",
                        self.published_retention_secs != DEFAULT_PUBLISHED_RETENTION_SECS,
                    ),
                    ("RELAY_LISTEN", !self.listen),
                    ("RELAY_PIPELINE_DEPTH", self.pipeline_depth != DEFAULT_PIPELINE_DEPTH),
                    ("RELAY_COALESCE_MS", self.coalesce_ms != DEFAULT_COALESCE_MS),
                    ("RELAY_STALL_LIMIT_MS", self.stall_limit_ms != DEFAULT_STALL_LIMIT_MS),
                    ("RELAY_KAFKA_TRANSACTIONS", self.kafka_transactions),
                    ("RELAY_TRANSACTIONAL_ID", self.transactional_id.is_some()),
                ],
            ),
            outbox::OutboxMode::Table => (
                outbox::OutboxMode::WalMessage,
                vec![
                    ("RELAY_SLOT", self.slot.is_some()),
                    (
                        "RELAY_STATUS_INTERVAL_MS",
                        self.status_interval_ms != DEFAULT_STATUS_INTERVAL_MS,
                    ),
                    (
                        "RELAY_WAL_MAX_IN_FLIGHT",
                        self.wal_max_in_flight != DEFAULT_WAL_MAX_IN_FLIGHT,
                    ),
                ],
            ),
        };
        orderflow_platform::refuse_unread_settings(
            &given,
            &format!(
                "the {} mode; this relay runs in the {} mode (RELAY_MODE)",
                other_mode.name(),
                self.mode.name()
            ),
        )
    }
}

/// How many times each row or event is published: once. The fault-injection build
/// (`failpoints` feature) can make it twice (`publishing_twice`): the duplicate delivery a
/// crash between publish and mark causes, for every row.
#[derive(Debug, Clone, Copy, Default)]
struct Copies {
    #[cfg(feature = "failpoints")]
    twice: bool,
}

impl Copies {
    fn per_row(self) -> usize {
        #[cfg(feature = "failpoints")]
        if self.twice {
            return 2;
        }
        1
    }
}

/// Reads the outbox channel's notifications for as long as the relay runs, whatever the relay
/// is doing meanwhile. A listening session whose client stops reading blocks in Postgres once
/// its socket is full, inside the transaction that reads the notification queue, holding back
/// the xmin horizon: tests/outages.rs caught one open 31 s into a broker pause, while every
/// pass waited for acknowledgements and the relay read nothing. Each notification counts in
/// `received` and wakes the relay (`wake` keeps one permit: a burst is one wake-up).
async fn read_notifications(
    mut listener: PgListener,
    wake: std::sync::Arc<tokio::sync::Notify>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            notification = listener.recv() => match notification {
                Ok(_) => {
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    wake.notify_one();
                }
                Err(error) => {
                    // The listener reconnects on the next recv; meanwhile polling covers.
                    tracing::warn!(%error, "outbox listener lost its connection");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }
}

/// One relay over one database.
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    batch_size: i64,
    copies: Copies,
    listen: bool,
    delivery_timeout: Duration,
    stall_limit: Option<Duration>,
    new_producer: Option<ProducerFactory>,
    coalesce: Duration,
    leases: tokio::sync::Mutex<Leases>,
    depth: usize,
    in_flight_peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    kafka_transactions: bool,
    transactions_ready: std::sync::atomic::AtomicBool,
}

/// The key slots a relay holds, and the one connection that holds them, claims and marks.
struct Leases {
    connection: Option<sqlx::PgConnection>,
    member: i32,
    owned: Vec<i32>,
    balanced_at: Option<tokio::time::Instant>,
}

/// A random member id (the low, random bits of a UUIDv7), positive.
fn new_member_id() -> i32 {
    (uuid::Uuid::now_v7().as_u128() & 0x7fff_ffff) as i32
}

impl Leases {
    fn new() -> Self {
        Self {
            connection: None,
            member: new_member_id(),
            owned: Vec::new(),
            balanced_at: None,
        }
    }

    /// Forgets the connection: closing it releases every lease.
    fn reset(&mut self) {
        self.connection = None;
        self.owned.clear();
        self.balanced_at = None;
        metrics::gauge!(telemetry::RELAY_KEY_SLOTS_OWNED).set(0.0);
    }

    /// The connection, connected and joined to the database's relays, with this relay's
    /// share of the slots (rebalanced at most every [`LEASE_BALANCE_INTERVAL`]).
    async fn ready(&mut self, pool: &PgPool) -> Result<(), sqlx::Error> {
        use sqlx::Connection as _;
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let mut connection = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
                // Another relay drew the same id (one chance in 2^31): draw again.
                while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(MEMBER_LOCK_CLASS)
                    .bind(self.member)
                    .fetch_one(&mut connection)
                    .await?
                {
                    self.member = new_member_id();
                }
                self.owned.clear();
                self.balanced_at = None;
                connection
            }
        };
        if self.balance_due() {
            self.balance(&mut connection).await?;
        }
        self.connection = Some(connection);
        Ok(())
    }

    /// Whether the slots are due to be rebalanced (every [`LEASE_BALANCE_INTERVAL`], and at once
    /// while this relay holds none).
    fn balance_due(&self) -> bool {
        self.balanced_at
            .is_none_or(|at| at.elapsed() >= LEASE_BALANCE_INTERVAL || self.owned.is_empty())
    }

    /// Takes this relay's fair share of the slots (all of them divided among the relays
    /// present, rounded up), giving back what it holds beyond it. Only between batches: a
    /// slot is never released while a batch of it is being published.
    async fn balance(&mut self, connection: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let relays: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::int4::oid
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(MEMBER_LOCK_CLASS)
        .fetch_one(&mut *connection)
        .await?;
        let fair = usize::try_from(KEY_SLOTS)
            .unwrap_or(64)
            .div_ceil(usize::try_from(relays.max(1)).unwrap_or(1));
        if self.owned.len() > fair {
            let extra = self.owned.split_off(fair);
            sqlx::query("SELECT pg_advisory_unlock($1, s) FROM unnest($2::int4[]) s")
                .bind(SLOT_LOCK_CLASS)
                .bind(&extra)
                .execute(&mut *connection)
                .await?;
            tracing::info!(
                released = extra.len(),
                kept = self.owned.len(),
                relays,
                "key slots given back"
            );
        } else if self.owned.len() < fair {
            // The slots nobody holds, in an order of this relay's own (so relays starting
            // together do not all reach for the same ones first), then locked one at a time
            // until the share is reached: another relay may take one in between, which the
            // try-lock tells. (One statement that filtered on pg_try_advisory_lock under a
            // LIMIT locked every free slot: Postgres evaluated the filter before the limit.)
            let free: Vec<i32> = sqlx::query_scalar(
                "SELECT s FROM generate_series(0, $2 - 1) s
                 WHERE s NOT IN (SELECT l.objid::text::int FROM pg_locks l
                                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                                   AND l.classid = $1::int4::oid
                                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
                 ORDER BY (s + $3) % $2",
            )
            .bind(SLOT_LOCK_CLASS)
            .bind(KEY_SLOTS)
            .bind(self.member % KEY_SLOTS)
            .fetch_all(&mut *connection)
            .await?;
            let mut taken = Vec::new();
            for slot in free {
                if self.owned.len() + taken.len() >= fair {
                    break;
                }
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(SLOT_LOCK_CLASS)
                    .bind(slot)
                    .fetch_one(&mut *connection)
                    .await?;
                if locked {
                    taken.push(slot);
                }
            }
            if !taken.is_empty() {
                tracing::info!(taken = taken.len(), relays, "key slots taken");
            }
            self.owned.extend(taken);
            self.owned.sort_unstable();
        }
        metrics::gauge!(telemetry::RELAY_KEY_SLOTS_OWNED).set(self.owned.len() as f64);
        self.balanced_at = Some(tokio::time::Instant::now());
        Ok(())
    }
}

/// Makes a new producer for a relay whose producer stopped delivering.
pub type ProducerFactory = Box<dyn Fn() -> anyhow::Result<FutureProducer> + Send + Sync>;

type OutboxRow = (
    i64,
    uuid::Uuid,
    String,
    String,
    String,
    i32,
    Option<String>,
    Vec<u8>,
    chrono::DateTime<chrono::Utc>,
);

impl Relay {
    /// A relay publishing `pool`'s outbox with `producer`.
    pub fn new(pool: PgPool, producer: FutureProducer, batch_size: i64) -> Self {
        Self {
            pool,
            producer,
            batch_size,
            copies: Copies::default(),
            listen: true,
            delivery_timeout: kafka::DEFAULT_DELIVERY_TIMEOUT,
            stall_limit: Some(DEFAULT_STALL_LIMIT),
            new_producer: None,
            coalesce: Duration::ZERO,
            leases: tokio::sync::Mutex::new(Leases::new()),
            depth: usize::from(DEFAULT_PIPELINE_DEPTH),
            in_flight_peak: std::sync::Arc::default(),
            kafka_transactions: false,
            transactions_ready: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// After a NOTIFY wakes it, waits `coalesce` before its pass, so that the commits of a
    /// burst share one pass (each such commit's row waits that much longer).
    pub fn coalescing(self, coalesce: Duration) -> Self {
        Self { coalesce, ..self }
    }

    /// When every pass has failed for `limit` (None: never): replaces the producer with a
    /// new one from [`Relay::reconnecting_with`], or without one gives up (`run` returns an
    /// error, so the process exits and its supervisor starts a new one).
    pub fn with_stall_limit(self, limit: Option<Duration>) -> Self {
        Self {
            stall_limit: limit,
            ..self
        }
    }

    /// How to make a new producer when the current one stopped delivering (see
    /// [`Relay::with_stall_limit`]).
    pub fn reconnecting_with(self, new_producer: ProducerFactory) -> Self {
        Self {
            new_producer: Some(new_producer),
            ..self
        }
    }

    /// Waits at most `timeout` for the broker's acknowledgements of a batch (the producer's
    /// own `message.timeout.ms` should be the same). The relay enforces it itself because
    /// librdkafka fails a record already sent only when its request times out
    /// (`request.timeout.ms`, 30 s): measured, a batch's transaction stayed open 33 s during
    /// a broker pause before this bound.
    pub fn with_delivery_timeout(self, timeout: Duration) -> Self {
        Self {
            delivery_timeout: timeout,
            ..self
        }
    }

    /// Publishes every row twice: the duplicate-delivery fault of the tests and the chaos
    /// harness (what a crash between publish and mark does to every row).
    #[cfg(feature = "failpoints")]
    pub fn publishing_twice(self) -> Self {
        Self {
            copies: Copies { twice: true },
            ..self
        }
    }

    /// Publishes each batch in a Kafka transaction: its producer must have a
    /// `transactional.id` (see [`run`]). A batch's records become visible to read_committed
    /// consumers (librdkafka's default) all at once, or not at all; the database's mark
    /// stays outside the transaction (docs/adr/0003).
    pub fn with_kafka_transactions(self) -> Self {
        Self {
            kafka_transactions: true,
            ..self
        }
    }

    /// Wakes on the poll interval alone, never on NOTIFY (the tuning comparison).
    pub fn polling_only(self) -> Self {
        Self { listen: false, ..self }
    }

    /// At most `depth` batches in flight (the next claimed while the broker acknowledges the
    /// ones before it; see [`pipeline`]). With Kafka transactions always one: the producer has
    /// one transaction at a time.
    pub fn pipelining(self, depth: usize) -> Self {
        Self {
            depth: depth.max(1),
            ..self
        }
    }

    /// The most batches this relay has had in flight at once (what a test of the pipeline
    /// watches; a gauge says the same to Prometheus).
    pub fn in_flight_peak(&self) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        self.in_flight_peak.clone()
    }

    fn depth(&self) -> usize {
        if self.kafka_transactions { 1 } else { self.depth }
    }

    /// Publishes until the owned slots have nothing more to publish (or a failure), keeping
    /// up to `depth` batches in flight; a NOTIFY that arrives meanwhile starts the next claim
    /// (after the coalescing delay) instead of waiting for the batches to settle.
    async fn drain(&self, wakeups: &Wakeups, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // Most wake-ups find nothing (the pass before already took the row whose NOTIFY woke
        // this one): one statement says so, instead of the lease check and a claim. The
        // partial index on unpublished rows answers it without touching the table.
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)")
            .fetch_one(&self.pool)
            .await?;
        if !any {
            return Ok(());
        }
        let mut leases = self.leases.lock().await;
        let mut pipeline = pipeline::Pipeline::new(self.depth());
        match self.drain_owned(&mut leases, &mut pipeline, wakeups, shutdown).await {
            Ok(0) => Ok(()),
            // The broker refused or did not answer: back off, keeping the leases (nothing is
            // wrong with the database; giving the slots away would move them between relays at
            // every backoff while this producer may still deliver the records it gave up on).
            Ok(failed) => anyhow::bail!("{failed} records were not acknowledged"),
            Err(error) => {
                // A database error with batches in flight: their records are still in the
                // producer. Wait for their answers (at most the delivery timeout) before the
                // leases go, so that no other relay publishes these keys while this producer
                // still holds records of them. None is marked: all are published again (at
                // least once).
                while pipeline.next_settled().await.is_some() {}
                // The connection may be broken: start over with a new one (the old one's
                // leases end with it).
                leases.reset();
                Err(error)
            }
        }
    }

    /// Claims and sends batches, settling them in order, until the owned slots have nothing
    /// more to publish, a record fails or `shutdown`; how many records failed. On a database
    /// error it returns at once, with whatever is still in `pipeline`.
    async fn drain_owned(
        &self,
        leases: &mut Leases,
        pipeline: &mut pipeline::Pipeline<OutboxRow>,
        wakeups: &Wakeups,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<usize> {
        let batch_size = usize::try_from(self.batch_size.max(1)).unwrap_or(usize::MAX);
        let mut claim_at = Some(tokio::time::Instant::now());
        // A claim left rows of a key in flight behind: claim again once a batch settles.
        let mut held_back = false;
        let mut failed = 0;
        loop {
            let stopping = failed > 0 || shutdown.is_cancelled();
            // Slots are rebalanced only with nothing in flight (a slot given back with a batch
            // of it in flight would have two publishers); while that is due, claims wait for
            // the batches in flight to settle. A drain under steady load never ends, so this
            // is where a relay takes its share of the slots, or gives some back.
            let balance_due = leases.balance_due() || leases.connection.is_none();
            if pipeline.is_empty() && balance_due && !stopping {
                leases.ready(&self.pool).await?;
                if leases.owned.is_empty() {
                    break;
                }
                // Slots it just took may have rows waiting.
                claim_at = Some(tokio::time::Instant::now());
                continue;
            }
            // Claims stop after a failure: the batches in flight settle, then the relay backs off.
            let room = if stopping || balance_due {
                0
            } else {
                pipeline.room(batch_size)
            };
            let Some(connection) = leases.connection.as_mut() else {
                break;
            };
            if room > 0 && claim_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                let claimed = claim(connection, &leases.owned, &pipeline.in_flight_ids(), room).await?;
                let full = claimed.len() >= room;
                let (rows, held) = pipeline.admit(claimed, |row| row.3.as_str());
                held_back |= held;
                // As many rows as it could take leaves more behind: claim again when there is
                // room. Unless it held rows back: claiming before a batch settles would find
                // the same rows and hold them back again.
                claim_at = (full && !held).then(tokio::time::Instant::now);
                if rows.is_empty() {
                    continue;
                }
                // Dying here (or anywhere before the broker has the records) leaves every
                // row unpublished: nothing was written for the claim.
                fail::fail_point!("relay::before_publish");
                pipeline.push(self.send(rows).await?);
                self.in_flight_peak
                    .fetch_max(pipeline.len(), std::sync::atomic::Ordering::Relaxed);
                metrics::gauge!(telemetry::RELAY_BATCHES_IN_FLIGHT).set(pipeline.len() as f64);
                continue;
            }
            if pipeline.is_empty() && (claim_at.is_none() || stopping) {
                break;
            }
            tokio::select! {
                biased;
                Some(settled) = pipeline.next_settled() => {
                    failed += self.settle(connection, pipeline, settled).await?;
                    metrics::gauge!(telemetry::RELAY_BATCHES_IN_FLIGHT).set(pipeline.len() as f64);
                    if std::mem::take(&mut held_back) {
                        claim_at = Some(tokio::time::Instant::now());
                    }
                }
                () = wakeups.notified(), if !stopping && claim_at.is_none() => {
                    claim_at = Some(tokio::time::Instant::now() + wakeups.coalesce);
                }
                // Not due yet: the coalescing delay after a notification.
                () = tokio::time::sleep_until(claim_at.unwrap_or_else(tokio::time::Instant::now)),
                    if !stopping && claim_at.is_some_and(|at| at > tokio::time::Instant::now()) => {
                    wakeups.absorb();
                }
            }
        }
        Ok(failed)
    }

    /// Hands a claimed batch's records to the producer (in a Kafka transaction, if so
    /// configured) and returns it with its acknowledgements outstanding.
    async fn send(&self, rows: Vec<OutboxRow>) -> anyhow::Result<pipeline::InFlight<OutboxRow>> {
        if self.kafka_transactions {
            self.begin_kafka_transaction().await?;
        }
        // Enqueue the whole batch first, then await the acknowledgements: awaiting each
        // send in turn would cost one broker round trip per row.
        let mut deliveries = Vec::with_capacity(rows.len());
        // One span per batch, linked to the trace of every row it publishes (the row's own
        // traceparent travels on in the record's headers, so consumers continue that trace).
        let batch_span = tracing::info_span!("relay_publish", rows = rows.len());
        for (_, message_id, topic, key, event_type, version, traceparent, payload, _) in &rows {
            if let Some(traceparent) = traceparent {
                use opentelemetry::trace::TraceContextExt as _;
                use tracing_opentelemetry::OpenTelemetrySpanExt as _;
                let linked = telemetry::context_of(traceparent);
                batch_span.add_link(linked.span().span_context().clone());
            }
            let message_id = message_id.to_string();
            let version = version.to_string();
            let (span, headers) = publication(&message_id, event_type, &version, key, traceparent.as_deref());
            for _ in 0..self.copies.per_row() {
                let record = FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers.clone());
                deliveries.push((self.enqueue(record).await, span.clone()));
            }
        }
        // A record not acknowledged by the deadline counts as failed: its row stays
        // unpublished (the broker may still store it later: a duplicate, which the inboxes
        // absorb, never a loss). The wait runs in the batch's span as an instrumented future:
        // a guard held across the await left the span entered on a thread it no longer ran
        // on, and OpenTelemetry's context stack of that thread panicked when the thread ended
        // (a test process aborted).
        let deadline = tokio::time::Instant::now() + self.delivery_timeout;
        let per_row = self.copies.per_row();
        let acknowledgements = join_all(
            deliveries
                .into_iter()
                .map(|(delivery, span)| acknowledged(delivery, deadline).instrument(span)),
        )
        .instrument(batch_span)
        // Publishing twice, each row has two deliveries: both must succeed.
        .map(move |results| {
            results
                .chunks(per_row)
                .map(|chunk| chunk.iter().cloned().collect::<Result<Vec<()>, String>>().map(drop))
                .collect()
        });
        Ok(pipeline::InFlight {
            ids: rows.iter().map(|row| row.0).collect(),
            keys: rows.iter().map(|row| row.3.clone()).collect(),
            rows,
            acknowledgements: Box::pin(acknowledgements),
        })
    }

    /// Marks what a settled batch may mark and records its failures; how many failed.
    async fn settle(
        &self,
        connection: &mut sqlx::PgConnection,
        pipeline: &mut pipeline::Pipeline<OutboxRow>,
        settled: pipeline::Settled<OutboxRow>,
    ) -> anyhow::Result<usize> {
        let pipeline::Settled { ids, rows, results } = settled;
        let results = if self.kafka_transactions {
            // Dying here: the Kafka transaction is never committed; the broker aborts it (at
            // once when the restarted relay, with the same transactional.id, fences it) and
            // read_committed consumers never see its records. The rows are published again.
            fail::fail_point!("relay::before_kafka_commit");
            match self.finish_kafka_transaction(results.iter().all(Result::is_ok)).await {
                Ok(()) => results,
                // Aborted: none of the batch is visible, none of it is marked.
                Err(error) => results.iter().map(|_| Err(error.clone())).collect(),
            }
        } else {
            results
        };

        // Dying here: the broker has the records, the rows are still unpublished, so they are
        // published again. Consumers deduplicate by message_id. With Kafka transactions too:
        // the transaction ends at the broker; this database's mark is outside it. A batch
        // claimed after this one and already acknowledged is published again too: it is not
        // marked before this one is.
        fail::fail_point!("relay::after_ack_before_mark");

        let marks = pipeline.marks(
            rows.iter()
                .zip(&results)
                .map(|(row, result)| (row.3.as_str(), result.is_ok())),
        );
        let mut published = Vec::with_capacity(rows.len());
        let (mut failed_ids, mut errors) = (Vec::new(), Vec::new());
        let acknowledged_at = chrono::Utc::now();
        for (((id, row), result), mark) in ids.iter().zip(&rows).zip(results).zip(marks) {
            match result {
                Ok(()) if mark => {
                    published.push(*id);
                    // Commit → acknowledgement (created_at is the inserting transaction's time).
                    let lag = (acknowledged_at - row.8).to_std().unwrap_or_default();
                    metrics::histogram!(telemetry::RELAY_LAG).record(lag.as_secs_f64());
                }
                Ok(()) => {
                    tracing::info!(outbox_id = id, message_id = %row.1, "acknowledged, but an earlier row of its key was not: published again after it");
                }
                Err(error) => {
                    metrics::counter!(telemetry::RELAY_PUBLISH_ERRORS).increment(1);
                    tracing::warn!(outbox_id = id, message_id = %row.1, %error, "broker refused an outbox row");
                    failed_ids.push(*id);
                    errors.push(error);
                }
            }
        }
        if !failed_ids.is_empty() {
            sqlx::query(
                "UPDATE outbox SET failed_attempts = failed_attempts + 1, last_error = f.error
                 FROM unnest($1::int8[], $2::text[]) AS f(id, error) WHERE outbox.id = f.id",
            )
            .bind(&failed_ids)
            .bind(&errors)
            .execute(&mut *connection)
            .await?;
        }
        if !published.is_empty() {
            // On the connection that holds the slots' leases: a relay that lost them (its
            // connection closed) cannot mark anything either.
            sqlx::query("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1)")
                .bind(&published)
                .execute(&mut *connection)
                .await?;
        }
        metrics::counter!(telemetry::RELAY_PUBLISHED).increment(published.len() as u64);
        tracing::debug!(published = published.len(), failed = failed_ids.len(), "batch settled");
        Ok(failed_ids.len())
    }

    /// Starts the batch's Kafka transaction (initialising the producer's transactions first
    /// if this producer has not: that also aborts whatever a previous relay with the same
    /// `transactional.id` left open, and fences it).
    async fn begin_kafka_transaction(&self) -> anyhow::Result<()> {
        let producer = self.producer.clone();
        let initialise = !self.transactions_ready.load(std::sync::atomic::Ordering::Relaxed);
        let timeout = self.delivery_timeout;
        // librdkafka's transaction calls block until the coordinator answers.
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            if initialise {
                producer.init_transactions(timeout)?;
            }
            producer.begin_transaction()?;
            Ok(())
        })
        .await??;
        self.transactions_ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Commits the batch's Kafka transaction when every record was acknowledged, aborts it
    /// otherwise; an error when nothing of it became visible.
    async fn finish_kafka_transaction(&self, all_acknowledged: bool) -> Result<(), String> {
        let producer = self.producer.clone();
        let timeout = self.delivery_timeout;
        let outcome = tokio::task::spawn_blocking(move || {
            if all_acknowledged {
                match producer.commit_transaction(timeout) {
                    Ok(()) => return Ok(()),
                    Err(error) => {
                        let _ = producer.abort_transaction(timeout);
                        return Err(format!("Kafka transaction not committed: {error}"));
                    }
                }
            }
            let _ = producer.abort_transaction(timeout);
            Err("a record was not acknowledged: Kafka transaction aborted".to_owned())
        })
        .await
        .unwrap_or_else(|error| Err(error.to_string()));
        if outcome.is_err() {
            // A fatal error leaves the producer unusable: the stall limit replaces it, and
            // the new one initialises its transactions again.
            metrics::counter!(telemetry::RELAY_PUBLISH_ERRORS).increment(1);
        }
        outcome
    }

    /// Hands a record to the producer's queue, waiting while the queue is full.
    async fn enqueue(
        &self,
        record: FutureRecord<'_, String, Vec<u8>>,
    ) -> Result<rdkafka::producer::DeliveryFuture, String> {
        enqueue(&self.producer, record).await
    }

    /// Publishes batches until `shutdown`, woken by NOTIFY and by a polling fallback.
    ///
    /// One claim per burst: every commit that wrote an outbox row sends a NOTIFY, and a claim
    /// takes every row committed before it began, so the notifications already received when
    /// it starts are all answered by it (at 150 orders/s, one pass per NOTIFY was about 300
    /// mostly empty passes a second per relay). The backlog gauge is counted by a task of its
    /// own, not after every pass.
    pub async fn run(mut self, poll_interval: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
        let wakeups = Wakeups {
            wake: std::sync::Arc::new(tokio::sync::Notify::new()),
            received: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
            coalesce: self.coalesce,
        };
        // The listener and the backlog counter stop with the relay, whichever way `run` returns.
        let stop_helpers = shutdown.child_token();
        let _stop_helpers = stop_helpers.clone().drop_guard();
        if self.listen {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(OUTBOX_CHANNEL).await?;
            tokio::spawn(read_notifications(
                listener,
                wakeups.wake.clone(),
                wakeups.received.clone(),
                stop_helpers.clone(),
            ));
        }
        tokio::spawn(count_backlog(self.pool.clone(), stop_helpers));
        let mut backoff = Duration::from_millis(100);
        let mut failing_since: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            let pass = self.drain(&wakeups, &shutdown).await;
            metrics::counter!(telemetry::RELAY_PASSES).increment(1);
            metrics::gauge!(telemetry::RELAY_BATCHES_IN_FLIGHT).set(0.0);
            match pass {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    failing_since = None;
                }
                Err(error) => {
                    // A producer whose broker connection wedged (seen after a broker pause
                    // under SASL: every record timed out for minutes while a new client
                    // connected at once) does not heal: replace it (or, with no way to make
                    // one, give up for the supervisor to start a new relay). A real outage
                    // costs a new producer per limit.
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if let Some(limit) = self.stall_limit
                        && since.elapsed() > limit
                    {
                        let Some(new_producer) = &self.new_producer else {
                            let _ = self.producer.flush(Duration::from_secs(1));
                            anyhow::bail!("every pass failed for {limit:?}; last: {error:#}");
                        };
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "every pass failed for {limit:?}; replacing the producer"
                        );
                        let old = std::mem::replace(&mut self.producer, new_producer()?);
                        self.transactions_ready
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        // Destroying a client waits for its broker threads: not on a runtime
                        // thread, and not for long (its records all failed already).
                        std::thread::spawn(move || drop(old));
                        metrics::counter!(telemetry::RELAY_PRODUCERS_REPLACED).increment(1);
                        failing_since = None;
                    }
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "relay pass failed"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            // Waits for a reason to pass again.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = wakeups.notified(), if self.listen => {
                    // A moment for the rest of the burst to commit and notify, so one claim
                    // takes them all.
                    if !self.coalesce.is_zero() {
                        tokio::time::sleep(self.coalesce).await;
                    }
                    wakeups.absorb();
                }
                _ = tokio::time::sleep(poll_interval) => {}
            }
        }
        // A drain returns with every batch settled, so nothing is in flight; flush anyway.
        let _ = self.producer.flush(Duration::from_secs(5));
        tracing::info!("relay stopped");
        Ok(())
    }
}

/// What wakes a relay: the notifications of commits that wrote outbox rows.
struct Wakeups {
    wake: std::sync::Arc<tokio::sync::Notify>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// After a notification, how long to wait before claiming, so that a burst of commits
    /// shares one claim.
    coalesce: Duration,
}

impl Wakeups {
    async fn notified(&self) {
        self.wake.notified().await;
    }

    /// The claim about to start answers every notification received so far: they all came
    /// from commits before it (the wake-up they left behind is taken too).
    fn absorb(&self) {
        let _ = futures::FutureExt::now_or_never(self.wake.notified());
        let coalesced = self
            .received
            .swap(0, std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(1);
        metrics::counter!(telemetry::RELAY_WAKEUPS_COALESCED).increment(coalesced);
    }
}

/// The oldest unpublished rows of the `owned` key slots, at most `limit`, leaving out the
/// rows in flight. No transaction and no row lock: only this relay publishes these slots
/// (their leases are held by this connection's session), and it writes nothing until the
/// broker has answered.
async fn claim(
    connection: &mut sqlx::PgConnection,
    owned: &[i32],
    in_flight: &[i64],
    limit: usize,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, message_id, topic, partition_key, event_type, schema_version, traceparent, payload, created_at
         FROM outbox
         WHERE published_at IS NULL AND key_slot = ANY($2::int4[]) AND id <> ALL($3::int8[])
         ORDER BY id LIMIT $1",
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(owned)
    .bind(in_flight)
    .fetch_all(connection)
    .await
}

/// Sets the backlog gauges every [`BACKLOG_INTERVAL`] until `stop`: rows waiting, and how long
/// the oldest has waited (what an alert on a relay that stopped publishing watches: a count
/// can stay low while nothing moves). The partial index makes both cheap: it only covers
/// unpublished rows.
async fn count_backlog(pool: PgPool, stop: CancellationToken) {
    let mut tick = tokio::time::interval(BACKLOG_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pending = sqlx::query_as::<_, (i64, f64)>(
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at))::float8, 0)
             FROM outbox WHERE published_at IS NULL",
        );
        match pending.fetch_one(&pool).await {
            Ok((pending, oldest_seconds)) => {
                metrics::gauge!(telemetry::OUTBOX_PENDING).set(pending as f64);
                metrics::gauge!(telemetry::OUTBOX_OLDEST_PENDING).set(oldest_seconds);
            }
            Err(error) => tracing::debug!(%error, "cannot count the outbox backlog"),
        }
    }
}

/// The span of one event's publication and the headers of its record. The span is in the
/// event's own trace, a child of the span that wrote the event, so an order's trace shows when
/// each of its events left (it lasts until the broker answers); the record carries the span's
/// traceparent, so the consumers' spans follow from it.
pub(crate) fn publication(
    message_id: &str,
    event_type: &str,
    version: &str,
    key: &str,
    traceparent: Option<&str>,
) -> (tracing::Span, rdkafka::message::OwnedHeaders) {
    let span = tracing::info_span!(parent: None, "relay_publish", order_id = %key, event_type, message_id);
    let traceparent = traceparent.map(|written_by| {
        telemetry::continue_trace(&span, written_by);
        telemetry::traceparent_of(&span).unwrap_or_else(|| written_by.to_owned())
    });
    let headers = outbox::record_headers(message_id, event_type, version, traceparent.as_deref());
    (span, headers)
}

/// Waits for the broker's acknowledgement of one record, at most until `deadline`.
pub(crate) async fn acknowledged(
    delivery: Result<rdkafka::producer::DeliveryFuture, String>,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, delivery?).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((error, _)))) => Err(error.to_string()),
        Ok(Err(_)) => Err("producer dropped the message".to_owned()),
        Err(_) => Err("not acknowledged within the delivery timeout".to_owned()),
    }
}

/// Hands a record to the producer's queue, waiting while the queue is full.
pub(crate) async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, String, Vec<u8>>,
) -> Result<rdkafka::producer::DeliveryFuture, String> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((error, _)) => return Err(error.to_string()),
        }
    }
}

/// The relay binary: logging, failpoints (when compiled in), configuration from flags and
/// environment, and a run until SIGINT or SIGTERM. Shared by `relay` and the test crate's
/// `relay-with-failpoints`, which differ only in the `failpoints` feature.
pub async fn main_from_env() -> anyhow::Result<()> {
    let config: Config = orderflow_platform::config::parse();
    // A relay's spans carry its client id as their service (relay-orders, relay-payments):
    // an order's trace tells which database's relay published each event.
    let _telemetry = orderflow_platform::telemetry::init(config.client_id.clone(), &config.telemetry);
    config.telemetry.install()?;
    // Reads FAILPOINTS (e.g. `relay::after_ack_before_mark=pause`) when built with the
    // `failpoints` feature; does nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    run(config, orderflow_platform::shutdown_on_signals()).await
}

/// Connects to the database and the broker and runs the relay until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.check_mode()?;
    let pool = orderflow_platform::connect_postgres(&config.database_url, 2).await?;
    let slot = || -> anyhow::Result<String> {
        let database = url::Url::parse(config.database_url.expose())?
            .path()
            .trim_start_matches('/')
            .to_owned();
        Ok(config.slot.clone().unwrap_or_else(|| wal::default_slot_name(&database)))
    };
    if config.prepare_only {
        if config.mode == outbox::OutboxMode::WalMessage {
            wal::ensure_slot(&pool, &slot()?).await?;
        }
        return Ok(());
    }
    let cluster = kafka::Cluster::new(config.bootstrap_servers.clone(), &config.kafka_auth);
    let new_producer: ProducerFactory = {
        let (client_id, delivery_timeout) = (
            config.client_id.clone(),
            Duration::from_millis(config.delivery_timeout_ms),
        );
        let transactional_id = config.kafka_transactions.then(|| {
            config
                .transactional_id
                .clone()
                .unwrap_or_else(|| config.client_id.clone())
        });
        Box::new(move || {
            let mut producer = kafka::producer_config(&cluster, &client_id, delivery_timeout);
            if let Some(id) = &transactional_id {
                producer.set("transactional.id", id);
            }
            Ok(producer.create()?)
        })
    };
    let producer = new_producer()?;
    if config.mode == outbox::OutboxMode::WalMessage {
        let slot = slot()?;
        tracing::info!(bootstrap_servers = %config.bootstrap_servers, slot, "relay started (wal-message mode)");
        let replication = wal::replication_config(&config.database_url, &slot)?
            .with_status_interval(Duration::from_millis(config.status_interval_ms));
        let relay = wal::WalRelay::new(pool, producer, replication)
            .with_delivery_timeout(Duration::from_millis(config.delivery_timeout_ms))
            .with_max_in_flight(config.wal_max_in_flight);
        #[cfg(feature = "failpoints")]
        let relay = if config.publish_twice {
            relay.publishing_twice()
        } else {
            relay
        };
        return relay.run(shutdown).await;
    }
    tracing::info!(bootstrap_servers = %config.bootstrap_servers, batch_size = config.batch_size, "relay started");
    let cleanup =
        orderflow_platform::housekeeping::published_outbox(Duration::from_secs(config.published_retention_secs));
    tokio::spawn(orderflow_platform::housekeeping::run(
        pool.clone(),
        vec![cleanup],
        orderflow_platform::housekeeping::INTERVAL,
        shutdown.clone(),
    ));
    let relay = Relay::new(pool, producer, config.batch_size)
        .with_delivery_timeout(Duration::from_millis(config.delivery_timeout_ms))
        .with_stall_limit((config.stall_limit_ms > 0).then(|| Duration::from_millis(config.stall_limit_ms)))
        .reconnecting_with(new_producer)
        .coalescing(Duration::from_millis(config.coalesce_ms))
        .pipelining(usize::from(config.pipeline_depth));
    #[cfg(feature = "failpoints")]
    let relay = if config.publish_twice {
        relay.publishing_twice()
    } else {
        relay
    };
    let relay = if config.kafka_transactions {
        relay.with_kafka_transactions()
    } else {
        relay
    };
    let relay = if config.listen { relay } else { relay.polling_only() };
    relay
        .run(Duration::from_millis(config.poll_interval_ms), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    fn config(args: &[&str]) -> super::Config {
        use clap::Parser as _;
        let mut argv = vec!["relay", "--database-url", "postgres://x@127.0.0.1/db"];
        argv.extend_from_slice(args);
        super::Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn a_setting_the_mode_does_not_read_is_refused_by_name() {
        assert!(config(&[]).check_mode().is_ok(), "the defaults, table mode");
        assert!(
            config(&["--mode", "wal-message"]).check_mode().is_ok(),
            "the defaults, WAL mode"
        );
        let error = config(&["--mode", "wal-message", "--batch-size", "50", "--listen", "false"])
            .check_mode()
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("RELAY_BATCH_SIZE, RELAY_LISTEN apply only to the table mode"),
            "{error}"
        );
        let error = config(&["--slot", "orders_outbox"])
            .check_mode()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("RELAY_SLOT apply only to the wal-message mode"),
            "{error}"
        );
        let error = config(&["--mode", "wal-message", "--pipeline-depth", "8"])
            .check_mode()
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("RELAY_PIPELINE_DEPTH apply only to the table mode"),
            "{error}"
        );
        let error = config(&["--kafka-transactions", "true", "--pipeline-depth", "8"])
            .check_mode()
            .unwrap_err()
            .to_string();
        assert!(error.contains("one batch, at a time"), "{error}");
        assert!(
            config(&["--kafka-transactions", "true", "--pipeline-depth", "1"])
                .check_mode()
                .is_ok(),
            "one batch at a time is what transactions do: saying so is not refused"
        );
        let zero = [
            "relay",
            "--database-url",
            "postgres://x@127.0.0.1/db",
            "--pipeline-depth",
            "0",
        ];
        assert!(
            <super::Config as clap::Parser>::try_parse_from(zero).is_err(),
            "a depth of 0 would publish nothing"
        );
    }
}
