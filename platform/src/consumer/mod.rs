//! The one consumer runtime every service uses. A handler writes its effect in a transaction
//! the runtime opened; the runtime records the inbox rows, commits, and only then stores the
//! offsets. Nothing else in the services begins, records, commits or stores for a message.
//!
//! In layers, each small enough to read alone and tested without a broker or a database:
//! - [`source`]: the poll thread (it never waits on a handler), pause and resume of full
//!   partitions, rebalances (a revoke waits for the work in flight on its partitions), the
//!   watchdog that gives up on a consumer holding nothing or stalled.
//! - [`buffer`]: per-partition queues of what was fetched, and which messages form the next
//!   unit of work; [`linger`]: whether a small unit waits a few milliseconds to grow.
//! - [`worker`]: one unit of work at a time, which keeps per-key order; a message failing
//!   inside a unit is tried alone, a message failing alone parks its partition while it is
//!   retried (bounded by the retry budget, then dead-lettered), a unit failing as a whole is
//!   retried whole ([`crate::retry`]: the backoff). [`in_flight`]: what a revoke waits for.
//! - [`unit`]: the unit of work itself, the only place a message's transaction is made:
//!   `begin → record every message id in the inbox in one insert → the handler's effects →
//!   commit`. A unit spans partitions (and topics): what is ready across every partition the
//!   process holds, bounded in count and bytes.
//! - [`dead_letter`]: `<topic>.dlq` with the headers that say why, and its depth gauge.
//!
//! **Errors.** One classifier ([`HandlerError`]'s `From` impls): a transient error (a
//! dependency away, a concurrent change) is retried with exponential backoff and jitter; a
//! permanent one (undecodable bytes, data a dependency refuses) sends the message to
//! `<topic>.dlq`. **Handlers make no remote call**: a unit holds a transaction, and a
//! transaction must never wait on another service (payment-svc records its intent here and
//! calls the gateway outside any transaction).
//!
//! **Health.** `run` returns an error when the poll thread dies or the client reports a fatal
//! error: the process then exits and its supervisor restarts it. It gives up ([`GaveUp`])
//! when the consumer held no partition for longer than `unassigned_limit`, or stalled (records
//! wait and, for `stall_limit`, no message arrived and no attempt started);
//! [`run_reconnecting`] then starts a new client in the same process.

mod buffer;
mod dead_letter;
mod in_flight;
mod linger;
#[cfg(feature = "naive")]
mod naive;
mod source;
mod unit;
mod worker;

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::signing::EventVerifier;
use crate::{kafka, telemetry};
use source::Progress;
pub use unit::Outcome;

/// A message as handlers see it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The topic it was read from.
    pub topic: String,
    /// The partition it was read from (with the offset, where a dead letter says it came from).
    pub partition: i32,
    /// Its position in the partition.
    pub offset: i64,
    /// The record key (the order id), if any.
    pub key: Option<Vec<u8>>,
    /// The record value: an event envelope.
    pub payload: Vec<u8>,
    /// The record headers (message id, event type, trace context).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Incoming {
    fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers: kafka::headers_of(message),
        }
    }

    /// Decodes the envelope (a contract error is permanent), checks that a trusted key of the
    /// service that produces its type signed it and that the record's key is its order (else
    /// permanent too: counted in `orderflow_events_rejected_total` and dead-lettered, never
    /// acted on), and records its correlation id on the current span, so every log line about
    /// this message carries it. The one place a consumer opens a record.
    pub fn open(
        &self,
        verifier: &EventVerifier,
        group: &str,
    ) -> Result<orderflow::envelope::OpenedEvent, HandlerError> {
        let event =
            orderflow::envelope::open(&self.payload).map_err(|error| HandlerError::Permanent(error.to_string()))?;
        if let Err(untrusted) = verifier.verify(&self.payload, &event, self.key.as_deref()) {
            metrics::counter!(telemetry::EVENTS_REJECTED, "group" => group.to_owned(), "reason" => untrusted.label())
                .increment(1);
            tracing::error!(reason = %untrusted, message_id = %event.message_id, "an event no trusted key signed: dead-lettered, not acted on");
            return Err(HandlerError::Permanent(format!("untrusted event: {untrusted}")));
        }
        tracing::Span::current().record("correlation_id", tracing::field::display(event.correlation_id));
        Ok(event)
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        kafka::header_text(&self.headers, name)
    }
}

/// Why a handler could not process a message. Every service classifies its errors through
/// the `From` impls below, so "transient or permanent" is decided in one place.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Retrying later may succeed (a dependency is away, a concurrent change won).
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Retrying the same bytes will fail the same way: dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(refusal) = refused_by_database(&error) {
            return Self::Permanent(refusal);
        }
        Self::Transient(error.into())
    }
}

/// Why the database refused the data itself, if it did: class 22 (data exception) and 23
/// (integrity violation) do not heal by retrying. The one classifier of database errors, for
/// whatever writes what it consumed (the runtime's handlers, payment-svc's executor).
pub fn refused_by_database(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db)
            if db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")) =>
        {
            Some(format!("database refused the effect: {}", db.message()))
        }
        _ => None,
    }
}

/// The effect of messages, written in the transaction the runtime opened. Implementations
/// are idempotent in their own right too (compare-and-set updates, unique keys): the inbox is
/// the first guard, not the only one.
pub trait Handler: Send + Sync + 'static {
    /// Work a handler hands on once its unit of work committed (work it starts outside the
    /// transaction: payment-svc's owed gateway calls); `()` for a handler that has none.
    type Committed: Send + 'static;

    /// Whether [`Handler::handle`] gets at most one message of each key (order id) per call
    /// (the default): the runtime then calls it in rounds, a key's next message in the next
    /// round, all in one transaction. A handler that folds several messages of one key
    /// itself, in their order, says false and gets the whole unit at once.
    const ONE_PER_KEY: bool = true;

    /// The name this consumer records in the inbox table.
    fn inbox(&self) -> &'static str;

    /// Whether this consumer acts on `event` at all. Anything else is acknowledged with no
    /// inbox row and no transaction of its own.
    fn wants(&self, event: &orderflow::envelope::OpenedEvent) -> bool;

    /// Writes the effects of `batch` (messages the inbox did not know, their inbox rows
    /// already recorded in `tx`) in their order, and returns the work to hand on if (and only
    /// if) the unit commits ([`Handler::committed`]). No remote call: `tx` is open. On failure,
    /// the index in `batch` of the message whose effect failed: the runtime rolls back,
    /// commits the others without it (and its partition's later messages), and handles it
    /// alone; or `batch.len()` when no one message is to blame (a statement for all of them
    /// failed): the unit is retried whole, or halved if the error is permanent.
    /// A message whose event needs nothing done (a late event for a settled order) is simply
    /// written nothing for: its inbox row commits.
    fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> impl Future<Output = Result<Vec<Self::Committed>, (usize, HandlerError)>> + Send;

    /// Receives, right after a unit of work committed, the work its calls of
    /// [`Handler::handle`] returned. Dying before it runs loses nothing that was committed: a
    /// handler that hands work on here must find it again from its tables after a restart.
    fn committed(&self, _work: Vec<Self::Committed>) {}
}

/// A message of a unit that the inbox did not know, opened, with the span its work belongs
/// to (the trace the message carries on).
#[derive(Clone)]
pub struct Fresh<'a> {
    /// The message as read.
    pub message: &'a Incoming,
    /// Its event.
    pub event: &'a orderflow::envelope::OpenedEvent,
    /// Its `consume` span: a handler doing work of several messages at once enters each
    /// message's span for that message's part.
    pub span: tracing::Span,
}

/// The retry budget unless configured: 60 s, two thirds of the stack's 90 s saga deadline
/// and longer than the outages the chaos harness injects into a handler's dependencies
/// (a Postgres restart, a gateway that does not answer 12 times).
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(60);

/// The stall limit unless configured: 30 s, six times the longest backoff between two
/// attempts (5 s) plus the statistics' 5 s resolution, and short enough that a restarted
/// consumer still settles the orders it held up within the 90 s saga deadline.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(30);

/// Why a consumer gave up although nothing is wrong with the process: it held no partition
/// for too long, or it stalled. A new client usually heals it (a librdkafka connection that
/// stayed down after a broker pause under SASL was seen to cause both).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GaveUp(String);

/// [`run`], with a new client each time the consumer gives up ([`GaveUp`]), until `shutdown`:
/// what every service runs. The process heals without a supervisor (the local stack has
/// none) and order-svc goes on taking orders meanwhile. Any other error (the poll thread
/// died, a fatal client error) is returned: the process exits and its supervisor restarts it.
pub async fn run_reconnecting<H: Handler>(
    settings: ConsumerSettings,
    pool: PgPool,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        match run(settings.clone(), pool.clone(), handler.clone(), shutdown.clone()).await {
            Err(error) if error.downcast_ref::<GaveUp>().is_some() && !shutdown.is_cancelled() => {
                metrics::counter!(telemetry::CONSUMER_RECONNECTS, "group" => settings.group_id.clone()).increment(1);
                tracing::warn!(
                    error = format!("{error:#}"),
                    "the consumer gave up; starting a new client"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            other => return other,
        }
    }
}

/// How long a stopping consumer waits for its last commit and its close (see `run`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most messages in one unit of work unless configured: under load a unit takes what is
/// ready across every partition the process holds, one transaction for all of it.
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Most payload bytes in one unit of work (a single bigger message still goes, alone).
pub const MAX_UNIT_BYTES: usize = 4 << 20;

/// How long a small unit may wait for more messages unless configured, in milliseconds.
pub const DEFAULT_LINGER_MS: u64 = 20;

/// The consumer settings every service exposes in its own configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerArgs {
    /// How long one message's transient failures are retried before it is dead-lettered,
    /// in milliseconds (0: forever).
    #[arg(
        long = "consumer-retry-budget-ms",
        env = "CONSUMER_RETRY_BUDGET_MS",
        default_value_t = 60_000
    )]
    pub retry_budget_ms: u64,
    /// How long a consumer may hold records waiting to be handled while it receives and
    /// attempts nothing before it gives up and starts a new client, in milliseconds
    /// (0: never).
    #[arg(
        long = "consumer-stall-limit-ms",
        env = "CONSUMER_STALL_LIMIT_MS",
        default_value_t = 30_000
    )]
    pub stall_limit_ms: u64,
    /// Most messages in one unit of work (one transaction), taken across every partition
    /// held (1: one at a time).
    #[arg(long = "consumer-max-batch", env = "CONSUMER_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// How long a small unit of work may wait for more messages while messages keep
    /// arriving, in milliseconds (0: never; an idle consumer never waits).
    #[arg(long = "consumer-linger-ms", env = "CONSUMER_LINGER_MS", default_value_t = DEFAULT_LINGER_MS)]
    pub linger_ms: u64,
}

impl Default for ConsumerArgs {
    fn default() -> Self {
        Self {
            retry_budget_ms: u64::try_from(DEFAULT_RETRY_BUDGET.as_millis()).unwrap_or(u64::MAX),
            stall_limit_ms: u64::try_from(DEFAULT_STALL_LIMIT.as_millis()).unwrap_or(u64::MAX),
            max_batch: DEFAULT_MAX_BATCH,
            linger_ms: DEFAULT_LINGER_MS,
        }
    }
}

impl ConsumerArgs {
    /// Applies these settings to `settings`.
    pub fn apply(&self, settings: ConsumerSettings) -> ConsumerSettings {
        ConsumerSettings {
            retry_budget: (self.retry_budget_ms > 0).then(|| Duration::from_millis(self.retry_budget_ms)),
            stall_limit: (self.stall_limit_ms > 0).then(|| Duration::from_millis(self.stall_limit_ms)),
            max_batch: self.max_batch.max(1),
            linger: Duration::from_millis(self.linger_ms),
            ..settings
        }
    }
}

/// Where and how to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// The cluster, and who this consumer is to it.
    pub cluster: kafka::Cluster,
    /// The consumer group.
    pub group_id: String,
    /// Static membership id (`group.instance.id`), unique within the group; None for a
    /// dynamic member.
    pub instance_id: Option<String>,
    /// The topics.
    pub topics: Vec<String>,
    /// Messages buffered per partition before the partition is paused.
    pub partition_queue: usize,
    /// How long a revoke waits for the work in flight on its partitions before abandoning it.
    pub revoke_grace: Duration,
    /// How long transient failures of one message are retried before it is dead-lettered
    /// (None: forever). Shorter than the saga deadline, so a message stuck on a dependency
    /// is out of its partition's way before the orders behind it time out.
    pub retry_budget: Option<Duration>,
    /// Holding no partition for longer than this makes `run` give up ([`GaveUp`]); None
    /// never (a member of a group that has more members than partitions).
    pub unassigned_limit: Option<Duration>,
    /// Records of this member's partitions waiting to be handled while nothing arrives and
    /// no attempt starts for this long makes `run` give up ([`GaveUp`]); None never.
    /// Longer than the longest backoff between attempts.
    pub stall_limit: Option<Duration>,
    /// How often librdkafka reports its statistics (consumer lag, records waiting).
    pub statistics_interval: Duration,
    /// Most messages in one unit of work (1: one at a time).
    pub max_batch: usize,
    /// How long a small unit may wait for more messages while they keep arriving.
    pub linger: Duration,
    /// Whose signatures this consumer trusts: a record no trusted key of its producer signed
    /// is dead-lettered, never acted on.
    pub verifier: EventVerifier,
}

impl ConsumerSettings {
    /// The defaults for `group_id` on `topics`, trusting `verifier`'s keys.
    pub fn new(cluster: kafka::Cluster, group_id: String, topics: Vec<String>, verifier: EventVerifier) -> Self {
        Self {
            cluster,
            group_id,
            instance_id: None,
            topics,
            // Four full units: enough to keep the worker busy, bounded memory per partition.
            partition_queue: 4 * DEFAULT_MAX_BATCH,
            revoke_grace: Duration::from_secs(5),
            retry_budget: Some(DEFAULT_RETRY_BUDGET),
            // Past a 20 s broker outage and the rejoin after it, short of the 90 s saga
            // deadline: a member that lost its coordinator for good (seen after a broker
            // pause under SASL) is restarted while its orders can still settle.
            unassigned_limit: Some(Duration::from_secs(45)),
            stall_limit: Some(DEFAULT_STALL_LIMIT),
            statistics_interval: Duration::from_secs(5),
            max_batch: DEFAULT_MAX_BATCH,
            linger: Duration::from_millis(DEFAULT_LINGER_MS),
            verifier,
        }
    }
}

/// The real effects: Postgres for the unit of work, Kafka for offsets and dead letters.
struct Live<H> {
    handler: Arc<H>,
    pool: PgPool,
    consumer: Arc<source::Client>,
    dead_letters: FutureProducer,
    group: String,
    verifier: EventVerifier,
}

impl<H: Handler> worker::Effects for Live<H> {
    async fn attempt(&self, messages: &[Incoming]) -> Result<Vec<Outcome>, unit::Failure> {
        unit::attempt(&self.pool, self.handler.as_ref(), &self.group, &self.verifier, messages).await
    }

    async fn dead_letter(
        &self,
        message: &Incoming,
        reason: &str,
        attempts: u32,
        first_failure: SystemTime,
    ) -> anyhow::Result<()> {
        dead_letter::dead_letter(
            &self.dead_letters,
            message,
            &self.group,
            reason,
            attempts,
            first_failure,
        )
        .await
    }

    fn store(&self, topic: &str, partition: i32, offset: i64) {
        // The message's own offset: librdkafka commits offset + 1 itself. (Passing offset + 1
        // here would skip the next message after a restart: a lost event.) A partition that
        // is no longer assigned refuses the store, and the new owner redelivers the message.
        if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
            tracing::warn!(%error, "cannot store the offset; the message will be redelivered");
        }
    }
}

/// Consumes until `shutdown`; then lets the work in flight finish, commits the stored offsets
/// and returns.
pub async fn run<H: Handler>(
    settings: ConsumerSettings,
    pool: PgPool,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let buffer = Arc::new(Mutex::new(buffer::Buffer::new(buffer::Backpressure {
        pause_at: settings.partition_queue.max(1),
        resume_at: settings.partition_queue / 4,
    })));
    let in_flight = Arc::new(in_flight::InFlight::default());
    let unhandled = Arc::new(AtomicI64::new(0));
    let consumer: source::Client =
        kafka::consumer_config(&settings.cluster, &settings.group_id, settings.instance_id.as_deref())
            .set(
                "statistics.interval.ms",
                settings.statistics_interval.as_millis().max(1).to_string(),
            )
            .create_with_context(source::RuntimeContext {
                group: settings.group_id.clone(),
                buffer: buffer.clone(),
                in_flight: in_flight.clone(),
                revoke_grace: settings.revoke_grace,
                unhandled: unhandled.clone(),
            })?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let consumer = Arc::new(consumer);
    let dead_letters: FutureProducer = kafka::producer_config(
        &settings.cluster,
        &format!("{}-dlq", settings.group_id),
        kafka::DEFAULT_DELIVERY_TIMEOUT,
    )
    .create()?;
    tracing::info!(group = %settings.group_id, instance = ?settings.instance_id, topics = ?settings.topics, "consumer started");
    // Every refusal count exists from the start, at zero: a counter first exported at 1 shows
    // no increase, and the first forged event would raise no alert.
    for reason in crate::signing::Untrusted::LABELS {
        metrics::counter!(telemetry::EVENTS_REJECTED, "group" => settings.group_id.clone(), "reason" => reason)
            .increment(0);
    }

    // Stops the worker and the retries when the caller shuts down, and also when the poll
    // thread fails: a message retrying must not keep a dead consumer's process alive.
    let stop = shutdown.child_token();
    let progress = Arc::new(Progress::new());
    let wake = Arc::new(tokio::sync::Notify::new());
    let tasks = TaskTracker::new();
    let effects = Live {
        handler,
        pool,
        consumer: consumer.clone(),
        dead_letters: dead_letters.clone(),
        group: settings.group_id.clone(),
        verifier: settings.verifier.clone(),
    };
    let max_messages = settings.max_batch.max(1);
    // The naive build's seams: its mistakes wrap the real effects (naive.rs).
    #[cfg(feature = "naive")]
    let (effects, max_messages) = (naive::StoreFirst(effects), naive::unit_size(max_messages));
    let worker = Arc::new(worker::Worker {
        effects: Arc::new(effects),
        buffer: buffer.clone(),
        wake: wake.clone(),
        in_flight,
        limits: worker::UnitLimits {
            max_messages,
            max_bytes: MAX_UNIT_BYTES,
        },
        linger: linger::Linger {
            max_wait: settings.linger,
            enough: settings.max_batch.max(1),
        },
        retry: crate::retry::RetryPolicy {
            budget: settings.retry_budget,
            first: Duration::from_millis(50),
            max: Duration::from_secs(5),
        },
        group: settings.group_id.clone(),
        progress: progress.clone(),
        shutdown: stop.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(worker.run());
    tokio::spawn(dead_letter::watch_depth(
        dead_letters,
        settings
            .topics
            .iter()
            .map(|topic| orderflow::topics::dead_letter(topic))
            .collect(),
        stop.clone(),
    ));
    let revoke_grace = settings.revoke_grace;
    let group = settings.group_id.clone();
    let poller = {
        let poll = source::Poller {
            consumer: consumer.clone(),
            buffer: buffer.clone(),
            wake,
            unhandled,
            progress,
            shutdown: stop.clone(),
            group: settings.group_id.clone(),
            topics: settings.topics.clone(),
            unassigned_limit: settings.unassigned_limit,
            stall_limit: settings.stall_limit,
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("poll-{}", settings.group_id))
            .spawn(move || {
                let _ = done.send(poll.run());
            })?;
        finished
    };
    let result = match poller.await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("the consumer's poll thread died")),
    };
    stop.cancel();
    // The unit in flight finishes (a retry stops at its next backoff) and stores its offsets;
    // then the stored offsets are committed.
    buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    tasks.close();
    // A handler that never returns (a stall, or a statement without a timeout) must not keep
    // the process from exiting: after the grace its unit is abandoned, its offsets unstored,
    // and the next owner of its partitions redelivers it.
    if tokio::time::timeout(revoke_grace, tasks.wait()).await.is_err() {
        tracing::warn!("work in flight did not finish within the grace; abandoning it (it will be redelivered)");
    }
    // Committing and closing wait for the group coordinator, for as long as it does not
    // answer: measured in the chaos harness's broker-pause under SASL, a coordinator
    // connection can stay down for good after the broker was stopped, and closing never
    // returned, so a consumer that had decided to exit (for its supervisor to restart it)
    // stayed alive holding nothing while its orders timed out. Both run on a thread of their
    // own, waited for at most CLOSE_TIMEOUT; past it, the thread is left behind (the process
    // is exiting) and the offsets not committed are redelivered to the next owner, whose
    // inbox absorbs them.
    let (closed, closed_wait) = tokio::sync::oneshot::channel();
    let closing = std::thread::Builder::new()
        .name(format!("close-{group}"))
        .spawn(move || {
            let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
            drop(consumer);
            let _ = closed.send(());
        });
    match closing {
        Ok(_) => {
            if tokio::time::timeout(CLOSE_TIMEOUT, closed_wait).await.is_err() {
                tracing::warn!(timeout = ?CLOSE_TIMEOUT, "the consumer did not close in time (its group coordinator does not answer); leaving it behind");
            }
        }
        Err(error) => tracing::warn!(%error, "cannot start the thread that closes the consumer"),
    }
    match &result {
        Ok(()) => tracing::info!("consumer stopped"),
        Err(error) => tracing::error!(error = format!("{error:#}"), "consumer failed"),
    }
    result
}

/// The span of one message: its partition and offset, its order and message id, and the
/// producer's trace continued (one trace per order).
pub(crate) fn message_span(group: &str, message: &Incoming) -> tracing::Span {
    let span = tracing::info_span!(
        "consume",
        group = %group,
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        order_id = %String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()),
        message_id = %message.header(orderflow::envelope::headers::MESSAGE_ID).unwrap_or_default(),
        event_type = %message.header(orderflow::envelope::headers::EVENT_TYPE).unwrap_or_default(),
        correlation_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if let Some(traceparent) = message.header(orderflow::envelope::headers::TRACEPARENT) {
        telemetry::continue_trace(&span, &traceparent);
        if let Some(trace_id) = telemetry::trace_id_of(&traceparent) {
            span.record("trace_id", trace_id);
        }
    }
    span
}

/// A message of `topic`'s `partition` at `offset` for the runtime's unit tests: 4 bytes of
/// payload, keyed by its partition and offset.
#[cfg(test)]
pub(crate) fn test_message(topic: &str, partition: i32, offset: i64) -> Incoming {
    Incoming {
        topic: topic.to_owned(),
        partition,
        offset,
        key: Some(format!("k{partition}-{offset}").into_bytes()),
        payload: vec![0; 4],
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_away_is_transient() {
        assert!(matches!(
            HandlerError::from(sqlx::Error::PoolTimedOut),
            HandlerError::Transient(_)
        ));
        assert!(matches!(
            HandlerError::from(sqlx::Error::Protocol("closed".into())),
            HandlerError::Transient(_)
        ));
    }

    #[test]
    fn the_settings_apply_on_top_of_the_services_and_zero_means_never() {
        let base = ConsumerSettings::new(
            kafka::Cluster::anonymous("127.0.0.1:9"),
            "g".into(),
            vec!["t".into()],
            crate::signing::EventVerifier::default(),
        );
        let applied = ConsumerArgs {
            retry_budget_ms: 0,
            stall_limit_ms: 1_500,
            max_batch: 0,
            linger_ms: 7,
        }
        .apply(base);
        assert_eq!(applied.retry_budget, None, "0: retried forever");
        assert_eq!(applied.stall_limit, Some(Duration::from_millis(1_500)));
        assert_eq!(applied.max_batch, 1, "at least one message a unit");
        assert_eq!(applied.linger, Duration::from_millis(7));
        let defaults = ConsumerArgs::default();
        assert_eq!(defaults.max_batch, DEFAULT_MAX_BATCH);
        assert_eq!(defaults.linger_ms, DEFAULT_LINGER_MS);
    }
}
