//! The one consumer runtime every service uses. A handler writes its effect in a transaction
//! the runtime opened; the runtime records the inbox row, commits, and only then stores the
//! offset. Nothing else in the services begins, records, commits or stores for a message.
//!
//! - **One queue per partition.** A thread of its own polls Kafka and hands each message to
//!   its partition's task through a bounded queue. A partition whose task is slow (a
//!   dependency retried for minutes) fills its own queue and is then paused with the consumer,
//!   so its messages stay at the broker; the poll thread never waits on a handler, every other
//!   partition keeps flowing, and `max.poll.interval.ms` is never exceeded because one
//!   partition is slow. Messages of one partition are handled one after another, in order;
//!   those already queued when one starts join it in a batch (a handler may defer one of
//!   them, [`Outcome::Deferred`], to be handled alone after the batch commits). A service may split each
//!   partition into **key lanes** (`key_lanes`): one key's messages stay in one lane, in
//!   order, while a message waiting on a slow dependency holds up only its own lane; offsets
//!   are still stored in partition order, up to the first message not done.
//! - **The inbox step.** `begin → record the message ids in the inbox → handler's effects →
//!   commit → store the offsets`, here and nowhere else: for a batch, one insert of all its
//!   ids and one commit. A message whose id the inbox knows is a redelivery: no effect,
//!   counted as a duplicate, its offset stored.
//! - **Offsets after the effect.** An offset is stored only after the transaction committed
//!   (or the message was dead-lettered); auto-commit then commits stored offsets. Dying
//!   anywhere before the store means a redelivery, which the inbox makes a no-op.
//! - **Rebalance-safe.** When partitions are revoked, the message in flight for each finishes
//!   and its offset is stored before the revoke completes (the offsets are then committed by
//!   librdkafka as part of the revoke); a message still retrying after `revoke_grace` is
//!   abandoned with its offset unstored, and the partition's new owner redelivers it.
//! - **Errors.** One classifier ([`HandlerError`]'s `From` impls): a transient error (a
//!   dependency away, a concurrent change) is retried with exponential backoff and jitter; a
//!   permanent one (undecodable bytes, data a dependency refuses) sends the message to
//!   `<topic>.dlq` with headers saying why and where it came from, and the partition flows on.
//!   Transient failures of one message are retried for at most `retry_budget`: a message
//!   that keeps failing "transiently" (a dependency that refuses it in a way nobody
//!   classified, a bug) is then dead-lettered too, so it holds up its partition for a bounded
//!   time, never forever. Messages retrying now are a gauge; exhausted budgets a counter.
//! - **Health.** `run` returns an error when the poll thread dies or the client reports a
//!   fatal error (such as a fenced static member): the process then exits and its supervisor
//!   restarts it. It gives up ([`GaveUp`]) when the consumer has held no partition for longer
//!   than `unassigned_limit`; [`run_reconnecting`] then starts a new client in the same
//!   process. The number of partitions held is published as a gauge.
//! - **Stalls.** A consumer can also stop making progress without any error: a fetch that
//!   never resumes after a broker pause, a handler awaiting something that never answers.
//!   When records of the partitions this member holds wait to be handled and, for
//!   `stall_limit`, no message arrived and no attempt started, `run` gives up too
//!   ([`GaveUp`]), and [`run_reconnecting`] starts a new client, to which the group
//!   redelivers from the committed offsets. A message retrying with backoff is progress;
//!   only silence is a stall.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, TopicPartitionList};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::telemetry;
use crate::{inbox, kafka};

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

    /// Decodes the envelope (a contract error is permanent) and records its correlation id on
    /// the current span, so every log line about this message carries it.
    pub fn open(&self) -> Result<orderflow::envelope::OpenedEvent, HandlerError> {
        let event =
            orderflow::envelope::open(&self.payload).map_err(|error| HandlerError::Permanent(error.to_string()))?;
        tracing::Span::current().record("correlation_id", tracing::field::display(event.correlation_id));
        Ok(event)
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        kafka::header_text(&self.headers, name)
    }
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect was committed.
    Processed,
    /// The inbox knew it: a redelivery, nothing done.
    Duplicate,
    /// Nothing to do for this consumer (an event type it does not act on, or a late event
    /// for a settled order): its transaction is rolled back.
    Ignored,
    /// Only from [`Handler::handle_batch`]: not handled in this batch, which commits without
    /// it (its inbox row is taken out again before the commit); the runtime then handles it
    /// alone, with the retries, budget and dead letter of a single message. For a failure
    /// that left the transaction usable (a remote call that failed or timed out), so that one
    /// slow call does not roll back, and redo, the work of its neighbours. The handler must
    /// have written nothing for it, and must defer every later message of the batch with its
    /// key too (they are decided on its effect, which is not there yet).
    Deferred,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::Deferred => "deferred",
        }
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
        if let sqlx::Error::Database(db) = &error {
            // Class 22 (data exception) and 23 (integrity violation) do not heal by retrying.
            if db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
            {
                return Self::Permanent(format!("database refused the effect: {}", db.message()));
            }
        }
        Self::Transient(error.into())
    }
}

impl From<tonic::Status> for HandlerError {
    /// A remote service's refusal of the request itself is permanent; anything else (no
    /// answer, overloaded, a deadline) may heal.
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::OutOfRange => {
                Self::Permanent(format!("refused: {:?} {}", status.code(), status.message()))
            }
            _ => Self::Transient(anyhow::anyhow!("{:?} {}", status.code(), status.message())),
        }
    }
}

/// The effect of one message, written in the transaction the runtime opened. Implementations
/// are idempotent in their own right too (compare-and-set updates, unique keys): the inbox is
/// the first guard, not the only one.
pub trait Handler: Send + Sync + 'static {
    /// The name this consumer records in the inbox table.
    fn inbox(&self) -> &'static str;

    /// Whether this consumer acts on `event` at all. Anything else is acknowledged without
    /// a transaction.
    fn wants(&self, event: &orderflow::envelope::OpenedEvent) -> bool;

    /// Whether several messages of a partition may share one transaction. A handler that
    /// calls a remote service inside its transaction says no: a batch would hold the
    /// transaction (and its locks) across one call after another.
    fn batches(&self) -> bool {
        true
    }

    /// Writes the effect of `event` in `tx`, where the message's inbox row is already
    /// recorded. Returns `Processed` to have it committed, `Ignored` to have it rolled back
    /// (alone; in a batch, only its inbox row is committed, so a handler must write nothing
    /// before it decides to ignore a message).
    fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        message: &Incoming,
        event: &orderflow::envelope::OpenedEvent,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send;

    /// Writes the effects of the new messages of a batch (their inbox rows already recorded)
    /// in `tx`, in their order, with the contract of [`Handler::handle`] for each. A handler
    /// overrides it to do the work in bulk (one statement for many rows, remote calls side
    /// by side); the default handles one after another. On failure, the index in `batch` of
    /// the message that failed: the runtime rolls back, commits those before it without it
    /// and handles it alone.
    fn handle_batch(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> impl Future<Output = Result<Vec<Outcome>, (usize, HandlerError)>> + Send {
        async move {
            let mut outcomes = Vec::with_capacity(batch.len());
            for (index, fresh) in batch.iter().enumerate() {
                let outcome = self
                    .handle(tx, fresh.message, fresh.event)
                    .instrument(fresh.span.clone())
                    .await
                    .map_err(|error| (index, error))?;
                outcomes.push(outcome);
            }
            Ok(outcomes)
        }
    }
}

/// A message of a batch that the inbox did not know, opened, with the span its work belongs
/// to (the trace the message carries on).
pub struct Fresh<'a> {
    /// The message as read.
    pub message: &'a Incoming,
    /// Its event.
    pub event: &'a orderflow::envelope::OpenedEvent,
    /// Its `consume` span: a handler doing work of several messages at once enters each
    /// message's span for that message's part.
    pub span: tracing::Span,
}

/// Splits `items` into consecutive runs in which no key (an order id) appears twice, each
/// with the index of its first item: a handler writes one run in bulk (a statement may not
/// touch one row twice), and a second item of a key starts the next run, which sees the
/// first one's effect.
pub fn runs_of_distinct_keys<T>(items: &[T], key: impl Fn(&T) -> uuid::Uuid) -> Vec<(usize, &[T])> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < items.len() {
        let mut seen = std::collections::HashSet::new();
        let len = items[start..].iter().take_while(|item| seen.insert(key(item))).count();
        runs.push((start, &items[start..start + len]));
        start += len;
    }
    runs
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

/// Most messages of one partition in one transaction unless configured.
pub const DEFAULT_MAX_BATCH: usize = 64;

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
    /// Most messages of one partition handled in one transaction, when they are already
    /// waiting (1: one at a time).
    #[arg(long = "consumer-max-batch", env = "CONSUMER_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// Lanes per partition: messages of different keys in different lanes are handled side
    /// by side, those of one key always in one lane, in order (unset: the service's default).
    #[arg(long = "consumer-key-lanes", env = "CONSUMER_KEY_LANES")]
    pub key_lanes: Option<usize>,
}

impl Default for ConsumerArgs {
    fn default() -> Self {
        Self {
            retry_budget_ms: u64::try_from(DEFAULT_RETRY_BUDGET.as_millis()).unwrap_or(u64::MAX),
            stall_limit_ms: u64::try_from(DEFAULT_STALL_LIMIT.as_millis()).unwrap_or(u64::MAX),
            max_batch: DEFAULT_MAX_BATCH,
            key_lanes: None,
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
            key_lanes: self.key_lanes.unwrap_or(settings.key_lanes).max(1),
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
    /// How long a revoke waits for a partition's message in flight before abandoning it.
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
    /// Most messages of one partition handled in one transaction (1: one at a time).
    pub max_batch: usize,
    /// Lanes per partition (1: the partition's messages one after another). A message goes
    /// to the lane of its key's hash, so one key's messages keep their order; a message that
    /// waits on a slow dependency holds up only its lane, not every order of its partition.
    /// Offsets are stored in partition order all the same: up to the first message not yet
    /// done.
    pub key_lanes: usize,
}

impl ConsumerSettings {
    /// The defaults for `group_id` on `topics`.
    pub fn new(cluster: kafka::Cluster, group_id: String, topics: Vec<String>) -> Self {
        Self {
            cluster,
            group_id,
            instance_id: None,
            topics,
            partition_queue: 64,
            revoke_grace: Duration::from_secs(5),
            retry_budget: Some(DEFAULT_RETRY_BUDGET),
            // Past a 20 s broker outage and the rejoin after it, short of the 90 s saga
            // deadline: a member that lost its coordinator for good (seen after a broker
            // pause under SASL) is restarted while its orders can still settle.
            unassigned_limit: Some(Duration::from_secs(45)),
            stall_limit: Some(DEFAULT_STALL_LIMIT),
            statistics_interval: Duration::from_secs(5),
            max_batch: DEFAULT_MAX_BATCH,
            key_lanes: 1,
        }
    }
}

/// A partition's tasks (one per lane), as the revoke callback and the poll thread see them.
struct PartitionControl {
    /// How many of its lanes are handling a message now.
    busy: Mutex<usize>,
    idle: Condvar,
    /// Cancelled when the partition is revoked: take no further message.
    revoked: CancellationToken,
    /// Cancelled when a revoke gives up waiting: stop retrying the messages in flight.
    abandon: CancellationToken,
    /// Whether a message was handled since the partition was assigned (logged once).
    flowing: std::sync::atomic::AtomicBool,
}

impl PartitionControl {
    fn busy(&self) -> MutexGuard<'_, usize> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_busy(&self, busy: bool) {
        let mut lanes = self.busy();
        if busy {
            *lanes += 1;
        } else {
            *lanes = lanes.saturating_sub(1);
            if *lanes == 0 {
                self.idle.notify_all();
            }
        }
    }

    /// Waits until no message is in flight, at most `limit`; returns whether it is idle.
    fn wait_idle(&self, limit: Duration) -> bool {
        let guard = self.busy();
        let (guard, _) = self
            .idle
            .wait_timeout_while(guard, limit, |lanes| *lanes > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *guard == 0
    }
}

/// Which offsets of a partition are done, so that what is stored is always "everything up to
/// here is done" although lanes finish out of order: an offset is stored only once every
/// message before it in the partition is done too. A message that is never done (abandoned
/// at a revoke) keeps every later offset unstored, and the next owner redelivers them all;
/// the inbox absorbs those already handled.
struct Offsets {
    topic: String,
    partition: i32,
    /// Offsets handed to a lane, in partition order, and whether each is done.
    pending: Mutex<VecDeque<(i64, bool)>>,
}

impl Offsets {
    fn pending(&self) -> MutexGuard<'_, VecDeque<(i64, bool)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the poll thread, in partition order, for each message it hands on.
    fn handed_on(&self, offset: i64) {
        self.pending().push_back((offset, false));
    }

    /// Marks `offset` done and returns the offset to store now, if the done prefix grew.
    fn done(&self, offset: i64) -> Option<i64> {
        let mut pending = self.pending();
        if let Some(entry) = pending
            .iter_mut()
            .find(|(pending_offset, done)| *pending_offset == offset && !done)
        {
            entry.1 = true;
        }
        let mut store = None;
        while let Some(&(front, true)) = pending.front() {
            store = Some(front);
            pending.pop_front();
        }
        store
    }
}

/// The poll thread's view of one assigned partition.
struct PartitionSlot {
    /// One queue per lane.
    lanes: Vec<mpsc::Sender<Incoming>>,
    /// Messages that arrived while their lane's queue was full (already fetched before the
    /// pause took effect), handed on in order before anything newer.
    overflow: VecDeque<Incoming>,
    paused: bool,
    control: Arc<PartitionControl>,
    offsets: Arc<Offsets>,
}

impl PartitionSlot {
    fn lane_of(&self, message: &Incoming) -> &mpsc::Sender<Incoming> {
        let index = match (&message.key, self.lanes.len()) {
            (_, 0 | 1) | (None, _) => 0,
            (Some(key), lanes) => {
                use std::hash::{Hash as _, Hasher as _};
                // SipHash with fixed keys: a key's lane is the same for the life of the slot.
                let mut hasher = std::hash::DefaultHasher::new();
                key.hash(&mut hasher);
                usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
            }
        };
        &self.lanes[index]
    }
}

type PartitionKey = (String, i32);
type Slots = Arc<Mutex<HashMap<PartitionKey, PartitionSlot>>>;

fn lock(slots: &Slots) -> MutexGuard<'_, HashMap<PartitionKey, PartitionSlot>> {
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's callbacks: lag statistics, and the revoke that waits for work in flight.
struct RuntimeContext {
    group: String,
    slots: Slots,
    revoke_grace: Duration,
    /// Records not yet handled in the partitions this member holds, as of the last
    /// statistics.
    unhandled: Arc<AtomicI64>,
}

impl ClientContext for RuntimeContext {
    /// Publishes librdkafka's per-partition consumer lag as a gauge, and counts the records
    /// not yet handled in the partitions held (the stall watchdog's input).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut unhandled = 0;
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                if *partition < 0 {
                    continue;
                }
                if partition_stats.consumer_lag >= 0 {
                    metrics::gauge!(telemetry::CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic.clone(),
                        "partition" => partition.to_string())
                    .set(partition_stats.consumer_lag as f64);
                }
                if partition_stats.desired {
                    unhandled += records_unhandled(partition_stats);
                }
            }
        }
        self.unhandled.store(unhandled, AtomicOrdering::Relaxed);
    }
}

impl ConsumerContext for RuntimeContext {
    /// Runs on the poll thread, inside `poll`, before librdkafka gives the partitions up (and
    /// commits the stored offsets, with auto-commit). Blocking here is the point: the revoke
    /// completes only once each revoked partition's message in flight has finished (its
    /// offset stored) or has been abandoned (its offset not stored, so redelivered to the new
    /// owner, whose inbox absorbs it if its effect did commit after all).
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                metrics::counter!(telemetry::CONSUMER_REBALANCES, "group" => self.group.clone(), "kind" => "revoke")
                    .increment(1);
                let revoked: Vec<PartitionSlot> = {
                    let mut slots = lock(&self.slots);
                    list.elements()
                        .iter()
                        .filter_map(|e| slots.remove(&(e.topic().to_owned(), e.partition())))
                        .collect()
                };
                for slot in &revoked {
                    slot.control.revoked.cancel();
                }
                for slot in revoked {
                    if !slot.control.wait_idle(self.revoke_grace) {
                        tracing::warn!(group = %self.group, "a revoked partition's message is still in flight; abandoning it (it will be redelivered)");
                        slot.control.abandon.cancel();
                        // The message's handler stops at its next retry; its offset is never
                        // stored, whatever it does after this.
                        let _ = slot.control.wait_idle(self.revoke_grace);
                    }
                }
                tracing::info!(group = %self.group, partitions = list.count(), "partitions revoked");
            }
            Rebalance::Assign(list) => {
                metrics::counter!(telemetry::CONSUMER_REBALANCES, "group" => self.group.clone(), "kind" => "assign")
                    .increment(1);
                tracing::info!(group = %self.group, partitions = list.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(group = %self.group, %error, "rebalance error"),
        }
    }

    /// A partition paused while this member last held it (its queue was full when it was
    /// revoked) starts fresh: resumed, with a new queue.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance
            && let Err(error) = consumer.resume(list)
        {
            tracing::debug!(%error, "cannot resume newly assigned partitions");
        }
    }
}

/// Records of a partition that this member has not finished with: from the offset stored
/// after its last handled message (or the committed one, or the log start) to the high
/// watermark. Records fetched but still queued in librdkafka or in a partition's queue
/// count too: a handler that never returns leaves them all unhandled.
/// (Under Kafka transactions a trailing commit marker would count as one record for ever;
/// this system's producers are idempotent, not transactional.)
fn records_unhandled(stats: &rdkafka::statistics::Partition) -> i64 {
    let position = [stats.stored_offset, stats.committed_offset, stats.lo_offset]
        .into_iter()
        .find(|offset| *offset >= 0);
    match position {
        Some(position) if stats.hi_offset >= 0 => (stats.hi_offset - position).max(0),
        _ => 0,
    }
}

type Client = BaseConsumer<RuntimeContext>;

/// Everything a partition's task needs.
struct Worker<H> {
    handler: Arc<H>,
    pool: PgPool,
    consumer: Arc<Client>,
    dead_letters: FutureProducer,
    retry_budget: Option<Duration>,
    max_batch: usize,
    group: String,
    /// When a message last arrived or an attempt last started (the stall watchdog's clock).
    progress: Progress,
}

/// The last sign of progress, as milliseconds since the consumer started.
struct Progress {
    started: Instant,
    last: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, AtomicOrdering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(AtomicOrdering::Relaxed)))
    }
}

/// Consumes until `shutdown`; then lets each partition finish its message in flight, commits
/// the stored offsets and returns.
pub async fn run<H: Handler>(
    settings: ConsumerSettings,
    pool: PgPool,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let slots: Slots = Arc::default();
    let unhandled = Arc::new(AtomicI64::new(0));
    let consumer: Client =
        kafka::consumer_config(&settings.cluster, &settings.group_id, settings.instance_id.as_deref())
            .set(
                "statistics.interval.ms",
                settings.statistics_interval.as_millis().max(1).to_string(),
            )
            .create_with_context(RuntimeContext {
                group: settings.group_id.clone(),
                slots: slots.clone(),
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
    let worker = Arc::new(Worker {
        handler,
        pool,
        consumer: consumer.clone(),
        dead_letters: dead_letters.clone(),
        retry_budget: settings.retry_budget,
        max_batch: settings.max_batch.max(1),
        group: settings.group_id.clone(),
        progress: Progress::new(),
    });
    tracing::info!(group = %settings.group_id, instance = ?settings.instance_id, topics = ?settings.topics, "consumer started");

    let revoke_grace = settings.revoke_grace;
    let group = settings.group_id.clone();
    let tasks = TaskTracker::new();
    // Stops the partitions' tasks when the caller shuts down, and also when the poll thread
    // fails: a task retrying a message must not keep a dead consumer's process alive.
    let stop = shutdown.child_token();
    tokio::spawn(watch_dead_letter_depth(
        dead_letters,
        settings
            .topics
            .iter()
            .map(|topic| orderflow::topics::dead_letter(topic))
            .collect(),
        stop.clone(),
    ));
    let poller = {
        let (runtime, tasks, shutdown, slots) = (
            tokio::runtime::Handle::current(),
            tasks.clone(),
            stop.clone(),
            slots.clone(),
        );
        let consumer = consumer.clone();
        let name = format!("poll-{}", settings.group_id);
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(name).spawn(move || {
            let poll = Poller {
                consumer,
                slots,
                unhandled,
                worker,
                runtime,
                tasks,
                shutdown,
                settings,
            };
            let _ = done.send(poll.run());
        })?;
        finished
    };
    let result = match poller.await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("the consumer's poll thread died")),
    };
    stop.cancel();
    // Each partition's task finishes its message in flight (a retry stops at its next
    // backoff) and stores its offset; then the stored offsets are committed.
    lock(&slots).clear();
    tasks.close();
    // A handler that never returns (the stall above, or a dependency without a timeout) must
    // not keep the process from exiting: after the grace its message is abandoned, its offset
    // unstored, and the next owner of its partition redelivers it.
    if tokio::time::timeout(revoke_grace, tasks.wait()).await.is_err() {
        tracing::warn!("a message in flight did not finish within the grace; abandoning it (it will be redelivered)");
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

/// How often a consumer counts the dead letters held in its dead-letter topics.
const DEAD_LETTER_WATCH_INTERVAL: Duration = Duration::from_secs(30);

/// Sets the dead-letter depth gauge of each topic (`orderflow_dead_letter_messages`, what the
/// DeadLetterTopicFilling alert watches) until `stop`: the sum of its partitions' high minus
/// low watermarks, asked through the producer that writes the dead letters (its principal may
/// describe the topic it writes). Every consumer writing to a topic reports the same number.
async fn watch_dead_letter_depth(producer: FutureProducer, topics: Vec<String>, stop: CancellationToken) {
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

/// The poll thread.
struct Poller<H> {
    consumer: Arc<Client>,
    slots: Slots,
    unhandled: Arc<AtomicI64>,
    worker: Arc<Worker<H>>,
    runtime: tokio::runtime::Handle,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    settings: ConsumerSettings,
}

impl<H: Handler> Poller<H> {
    fn run(self) -> anyhow::Result<()> {
        let mut unassigned_since = Some(Instant::now());
        let mut waiting_since: Option<Instant> = None;
        let mut next_check = Instant::now();
        while !self.shutdown.is_cancelled() {
            self.hand_on_overflow();
            // Every rebalance callback runs inside this call, on this thread.
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    self.worker.progress.mark();
                    self.dispatch(Incoming::from_kafka(&message));
                }
                Some(Err(error)) => {
                    if let Some((code, reason)) = self.consumer.client().fatal_error() {
                        anyhow::bail!("fatal consumer error {code:?}: {reason}");
                    }
                    tracing::warn!(%error, "consumer error");
                }
                None => {}
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_secs(1);
                let held = self.consumer.assignment().map(|list| list.count()).unwrap_or(0);
                metrics::gauge!(telemetry::CONSUMER_ASSIGNED, "group" => self.settings.group_id.clone())
                    .set(held as f64);
                if held > 0 {
                    unassigned_since = None;
                    // Records unhandled in every report for the whole limit, not in one: the
                    // high watermark may be learnt a moment before the records it announces.
                    let unhandled = self.unhandled.load(AtomicOrdering::Relaxed);
                    let waiting_for = if unhandled > 0 {
                        waiting_since.get_or_insert_with(Instant::now).elapsed()
                    } else {
                        waiting_since = None;
                        Duration::ZERO
                    };
                    let silent = self.worker.progress.silent_for();
                    if let Some(limit) = self.settings.stall_limit
                        && waiting_for > limit
                        && silent > limit
                    {
                        return Err(GaveUp(format!(
                            "stalled: {unhandled} records of the {held} partitions held wait to be handled, and no message arrived and no attempt started for {silent:.0?}"
                        ))
                        .into());
                    }
                } else {
                    let since = *unassigned_since.get_or_insert_with(Instant::now);
                    if let Some(limit) = self.settings.unassigned_limit
                        && since.elapsed() > limit
                    {
                        return Err(
                            GaveUp(format!("held no partition of {:?} for {limit:?}", self.settings.topics)).into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands a message to its partition's queue; when the queue is full, keeps it in the
    /// overflow and pauses the partition, so nothing more is fetched for it.
    fn dispatch(&self, message: Incoming) {
        let mut slots = lock(&self.slots);
        let key = (message.topic.clone(), message.partition);
        let slot = slots
            .entry(key)
            .or_insert_with(|| self.spawn_partition(&message.topic, message.partition));
        slot.offsets.handed_on(message.offset);
        if slot.overflow.is_empty() {
            match slot.lane_of(&message).try_send(message) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(message) | mpsc::error::TrySendError::Closed(message)) => {
                    slot.overflow.push_back(message);
                }
            }
        } else {
            slot.overflow.push_back(message);
        }
        if !slot.paused {
            let Some(head) = slot.overflow.front() else { return };
            let mut list = TopicPartitionList::new();
            list.add_partition(&head.topic, head.partition);
            match self.consumer.pause(&list) {
                Ok(()) => {
                    slot.paused = true;
                    tracing::info!(topic = %head.topic, partition = head.partition, "partition paused: its queue is full");
                }
                Err(error) => tracing::warn!(%error, "cannot pause a partition"),
            }
        }
    }

    /// Moves overflowing messages into queues that have room again, and resumes the
    /// partitions whose overflow is empty.
    fn hand_on_overflow(&self) {
        let mut slots = lock(&self.slots);
        for ((topic, partition), slot) in slots.iter_mut().filter(|(_, slot)| slot.paused) {
            while let Some(message) = slot.overflow.pop_front() {
                // Stops at the first message whose lane is full: the overflow keeps the
                // partition's order, so no message of a key passes an earlier one.
                match slot.lane_of(&message).try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(message) | mpsc::error::TrySendError::Closed(message)) => {
                        slot.overflow.push_front(message);
                        break;
                    }
                }
            }
            if slot.overflow.is_empty() {
                let mut list = TopicPartitionList::new();
                list.add_partition(topic, *partition);
                match self.consumer.resume(&list) {
                    Ok(()) => {
                        slot.paused = false;
                        tracing::info!(%topic, partition, "partition resumed");
                    }
                    Err(error) => tracing::warn!(%error, "cannot resume a partition"),
                }
            }
        }
    }

    fn spawn_partition(&self, topic: &str, partition: i32) -> PartitionSlot {
        let control = Arc::new(PartitionControl {
            busy: Mutex::new(0),
            idle: Condvar::new(),
            revoked: CancellationToken::new(),
            abandon: self.shutdown.child_token(),
            flowing: std::sync::atomic::AtomicBool::new(false),
        });
        let offsets = Arc::new(Offsets {
            topic: topic.to_owned(),
            partition,
            pending: Mutex::default(),
        });
        // The naive build stores each offset before its work: one lane, so that what it
        // loses is what the textbook consumer loses, no more.
        let lanes = if crate::chaos::naive() {
            1
        } else {
            self.settings.key_lanes.max(1)
        };
        let lanes = (0..lanes)
            .map(|_| {
                let (queue, receiver) = mpsc::channel(self.settings.partition_queue.max(1));
                self.tasks.spawn_on(
                    partition_task(
                        self.worker.clone(),
                        receiver,
                        control.clone(),
                        offsets.clone(),
                        self.shutdown.clone(),
                    ),
                    &self.runtime,
                );
                queue
            })
            .collect();
        PartitionSlot {
            lanes,
            overflow: VecDeque::new(),
            paused: false,
            control,
            offsets,
        }
    }
}

/// The span of one message: its partition and offset, its order and message id, and the
/// producer's trace continued (one trace per order).
fn message_span(group: &str, message: &Incoming) -> tracing::Span {
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

/// Handles one partition's messages in order until it is revoked or the consumer stops.
///
/// Messages already queued behind the first join it in one batch (at most `max_batch`, and
/// only for a handler that batches): one transaction, one commit, then the offsets. A batch
/// never waits for messages to arrive, so a quiet partition pays no latency for it, and a
/// busy one amortises its commits. A message that fails inside a batch is taken out of it
/// ([`commit_together`]) and handled alone, with the retries, budget and dead letter of a
/// single message: one bad message never fails its neighbours.
async fn partition_task<H: Handler>(
    worker: Arc<Worker<H>>,
    mut queue: mpsc::Receiver<Incoming>,
    control: Arc<PartitionControl>,
    offsets: Arc<Offsets>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = control.revoked.cancelled() => return,
            message = queue.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        control.set_busy(true);
        // Taken after set_busy: a revoke that cancelled before it must not see an idle
        // partition and then have this message handled anyway.
        if control.revoked.is_cancelled() {
            control.set_busy(false);
            return;
        }
        let mut batch = vec![message];
        // The naive build stores each offset before its work: never batched.
        if worker.handler.batches() && !crate::chaos::naive() {
            while batch.len() < worker.max_batch {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        // Each round commits a run of messages together, or handles the first alone.
        let mut done = true;
        let mut next = 0;
        while next < batch.len() {
            let rest = &batch[next..];
            let together = if rest.len() > 1 {
                commit_together(&worker, rest).await
            } else {
                Together {
                    count: 0,
                    deferred: Vec::new(),
                }
            };
            if together.count > 0 {
                fail::fail_point!("consumer::after_commit_before_store", |_| crate::chaos::crash());
                // Committed: now, and only now, the offsets. Dying here redelivers them all,
                // and the inbox absorbs every one. A deferred message's offset waits for its
                // own handling (and holds back the stored offset of those after it).
                for (index, message) in rest[..together.count].iter().enumerate() {
                    if !together.deferred.contains(&index) {
                        worker.done(&offsets, message);
                    }
                }
                for &index in &together.deferred {
                    done = handle_alone(&worker, &offsets, &control, &rest[index]).await;
                    if !done {
                        break;
                    }
                }
                if !done {
                    break;
                }
                next += together.count;
                continue;
            }
            done = handle_alone(&worker, &offsets, &control, &rest[0]).await;
            if !done {
                break;
            }
            next += 1;
        }
        control.set_busy(false);
        if done && !control.flowing.swap(true, AtomicOrdering::Relaxed) {
            // The failover measure of the chaos harness: a partition that moved here is
            // flowing again from this moment.
            tracing::info!(topic = %batch[0].topic, partition = batch[0].partition, offset = batch[0].offset,
                "first message handled since the partition was assigned");
        }
        if !done {
            // Abandoned (revoked or shutting down) before it was processed: its offset stays
            // unstored, so it is redelivered; nothing later of this partition may be stored.
            return;
        }
    }
}

/// What [`commit_together`] committed.
struct Together {
    /// How many leading messages its transaction covered (0: none, so the first is to be
    /// handled alone).
    count: usize,
    /// The positions of those among them that the handler deferred ([`Outcome::Deferred`]),
    /// in order: each is to be handled alone now.
    deferred: Vec<usize>,
}

/// Handles `message` alone until it is processed or dead-lettered, then stores its offset
/// (true); false when its partition was revoked or the consumer stops first.
async fn handle_alone<H: Handler>(
    worker: &Worker<H>,
    offsets: &Offsets,
    control: &PartitionControl,
    message: &Incoming,
) -> bool {
    if crate::chaos::naive() {
        // The textbook mistake: the offset first, then the work. Dying during the work
        // loses the message (its offset is committed already).
        worker.store_offset(message);
    }
    let span = message_span(&worker.group, message);
    if !process(worker, message, &control.abandon).instrument(span).await {
        return false;
    }
    fail::fail_point!("consumer::after_commit_before_store", |_| crate::chaos::crash());
    // The effect is committed (or dead-lettered): now, and only now, the offset. Dying here
    // redelivers the message, and the inbox absorbs it.
    worker.done(offsets, message);
    true
}

/// Commits a leading run of `messages` in one transaction. When a message fails (it cannot
/// be opened, its handler errs), the transaction is rolled back and the messages before it
/// are committed together again without it: the failing one is then handled alone, with the
/// retries, budget and dead letter of a single message, and never fails its neighbours. A
/// message the handler defers is left out without a rollback.
async fn commit_together<H: Handler>(worker: &Worker<H>, messages: &[Incoming]) -> Together {
    let mut run = messages.len();
    while run > 1 {
        match worker.attempt_batch(&messages[..run]).await {
            Ok(outcomes) => {
                metrics::histogram!(telemetry::CONSUMER_BATCH_SIZE, "group" => worker.group.clone()).record(run as f64);
                let mut deferred = Vec::new();
                for (index, (message, outcome)) in messages.iter().zip(outcomes).enumerate() {
                    if outcome == Outcome::Deferred {
                        // Counted among the messages when it is handled alone.
                        metrics::counter!(telemetry::CONSUMER_DEFERRED, "group" => worker.group.clone()).increment(1);
                        deferred.push(index);
                        continue;
                    }
                    metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => worker.group.clone(),
                        "topic" => message.topic.clone(), "outcome" => outcome.label())
                    .increment(1);
                }
                return Together { count: run, deferred };
            }
            Err((failed_at, error)) => {
                tracing::debug!(%error, failed_at, messages = run, "batch rolled back");
                // Failing at the commit (failed_at == run) or at the first message: nothing
                // is known good; the first goes alone.
                if failed_at == 0 || failed_at >= run {
                    break;
                }
                run = failed_at;
            }
        }
    }
    Together {
        count: 0,
        deferred: Vec::new(),
    }
}

impl<H: Handler> Worker<H> {
    /// `message` is done with (committed or dead-lettered): its offset, and those of the
    /// messages before it that other lanes finished, are stored once every earlier message
    /// of the partition is done too.
    fn done(&self, offsets: &Offsets, message: &Incoming) {
        if let Some(offset) = offsets.done(message.offset) {
            self.store(&offsets.topic, offsets.partition, offset);
        }
    }

    fn store_offset(&self, message: &Incoming) {
        self.store(&message.topic, message.partition, message.offset);
    }

    fn store(&self, topic: &str, partition: i32, offset: i64) {
        // The message's own offset: librdkafka commits offset + 1 itself. (Passing offset + 1
        // here would skip the next message after a restart: a lost event.) A partition that
        // is no longer assigned refuses the store, and the new owner redelivers the message.
        if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
            tracing::warn!(%error, "cannot store the offset; the message will be redelivered");
        }
    }

    /// One attempt for a whole batch in one transaction: one inbox insert for the ids of
    /// every message the consumer wants, then the handler's effects of those the inbox did not
    /// know, in order, then one commit. A message the consumer does not want writes nothing;
    /// one the inbox knows (a redelivery, or an earlier message of this batch with the same
    /// id) is a duplicate and writes nothing; one its handler ignores leaves only its inbox
    /// row (handlers write nothing before they decide to ignore).
    /// On failure, the index of the message that failed (`batch.len()` for the commit).
    async fn attempt_batch(&self, batch: &[Incoming]) -> Result<Vec<Outcome>, (usize, HandlerError)> {
        self.progress.mark();
        let mut outcomes = vec![Outcome::Ignored; batch.len()];
        let mut wanted = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            let span = message_span(&self.group, message);
            let event = span.in_scope(|| message.open()).map_err(|error| (index, error))?;
            if self.handler.wants(&event) {
                wanted.push((index, event, span));
            }
        }
        if wanted.is_empty() {
            return Ok(outcomes);
        }
        let mut tx = self.pool.begin().await.map_err(|error| (0, error.into()))?;
        let ids: Vec<uuid::Uuid> = wanted.iter().map(|(_, event, _)| event.message_id).collect();
        let mut first_time = inbox::record_all(&mut tx, self.handler.inbox(), &ids)
            .await
            .map_err(|error| (0, error.into()))?;
        let mut fresh = Vec::with_capacity(wanted.len());
        let mut fresh_at = Vec::with_capacity(wanted.len());
        for (index, event, span) in &wanted {
            // The first message with an id the insert recorded is new; any other with that id
            // is a duplicate, as is one whose id another transaction recorded.
            if first_time.remove(&event.message_id) {
                fresh.push(Fresh {
                    message: &batch[*index],
                    event,
                    span: span.clone(),
                });
                fresh_at.push(*index);
            } else {
                outcomes[*index] = Outcome::Duplicate;
            }
        }
        if !fresh.is_empty() {
            let handled = self
                .handler
                .handle_batch(&mut tx, &fresh)
                .await
                .map_err(|(at, error)| (fresh_at.get(at).copied().unwrap_or(batch.len()), error))?;
            let deferred: Vec<uuid::Uuid> = fresh
                .iter()
                .zip(&handled)
                .filter(|(_, outcome)| **outcome == Outcome::Deferred)
                .map(|(deferred, _)| deferred.event.message_id)
                .collect();
            if !deferred.is_empty() {
                // Their effects are not in this transaction, so neither may their inbox rows
                // be: committed, they would make the message's own handling alone a duplicate
                // of nothing (a lost event).
                inbox::forget_all(&mut tx, self.handler.inbox(), &deferred)
                    .await
                    .map_err(|error| (batch.len(), error.into()))?;
            }
            for (index, outcome) in fresh_at.into_iter().zip(handled) {
                outcomes[index] = outcome;
            }
        }
        // Dying before this commit: nothing of the batch exists, every message is redelivered.
        tx.commit().await.map_err(|error| (batch.len(), error.into()))?;
        Ok(outcomes)
    }

    /// One attempt for a message alone: the inbox step (its id recorded in the transaction;
    /// an id the inbox knows is a redelivery and writes nothing), then the handler's effect,
    /// then the commit.
    async fn attempt(&self, message: &Incoming) -> Result<Outcome, HandlerError> {
        self.progress.mark();
        let event = message.open()?;
        if !self.handler.wants(&event) {
            return Ok(Outcome::Ignored);
        }
        let mut tx = self.pool.begin().await?;
        // The naive build has no inbox: every redelivery is processed again.
        if !crate::chaos::naive() && !inbox::record(&mut tx, self.handler.inbox(), event.message_id).await? {
            // Another transaction recorded it (and committed): a redelivery. Rolled back.
            return Ok(Outcome::Duplicate);
        }
        let outcome = self.handler.handle(&mut tx, message, &event).await?;
        if outcome == Outcome::Deferred {
            // Only a batch can leave a message for later; alone, it is a failure to retry.
            return Err(HandlerError::Transient(anyhow::anyhow!(
                "the handler deferred a message handled alone"
            )));
        }
        if outcome == Outcome::Processed {
            // Dying before this commit: nothing of the effect exists, the message is
            // redelivered. Dying after it, before the offset is stored: redelivered, and the
            // inbox row committed here makes it a duplicate.
            tx.commit().await?;
        }
        // Dropping an uncommitted transaction rolls it back.
        Ok(outcome)
    }
}

/// Counts a message in the retrying gauge from its first failure until it is done with.
struct Retrying {
    group: Option<String>,
}

impl Retrying {
    fn start(&mut self, group: &str) {
        if self.group.is_none() {
            metrics::gauge!(telemetry::CONSUMER_RETRYING, "group" => group.to_owned()).increment(1.0);
            self.group = Some(group.to_owned());
        }
    }
}

impl Drop for Retrying {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            metrics::gauge!(telemetry::CONSUMER_RETRYING, "group" => group).decrement(1.0);
        }
    }
}

/// Handles one message until it is processed or dead-lettered (true), or until `stop`
/// interrupts a retry (false).
async fn process<H: Handler>(worker: &Worker<H>, message: &Incoming, stop: &CancellationToken) -> bool {
    let first_failure = SystemTime::now();
    let started = Instant::now();
    let mut retrying = Retrying { group: None };
    let mut attempts: u32 = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        attempts += 1;
        let error = match worker.attempt(message).await {
            Ok(outcome) => {
                tracing::debug!(?outcome, "message handled");
                metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => worker.group.clone(),
                    "topic" => message.topic.clone(), "outcome" => outcome.label())
                .increment(1);
                return true;
            }
            Err(error) => error,
        };
        let reason = match error {
            HandlerError::Permanent(reason) => {
                tracing::error!(%reason, attempts, "message cannot be processed; dead-lettering it");
                Some(reason)
            }
            HandlerError::Transient(error) => match worker.retry_budget {
                Some(budget) if started.elapsed() >= budget => {
                    let reason = format!(
                        "transient failures for {:.0?} ({attempts} attempts, retry budget {budget:?}); last: {error:#}",
                        started.elapsed()
                    );
                    tracing::error!(%reason, "retry budget exhausted; dead-lettering the message");
                    metrics::counter!(telemetry::CONSUMER_BUDGET_EXHAUSTED, "group" => worker.group.clone())
                        .increment(1);
                    Some(reason)
                }
                _ => {
                    retrying.start(&worker.group);
                    metrics::counter!(telemetry::CONSUMER_RETRIES, "group" => worker.group.clone()).increment(1);
                    tracing::warn!(error = format!("{error:#}"), attempts, "transient failure; retrying");
                    None
                }
            },
        };
        if let Some(reason) = reason {
            match dead_letter(
                &worker.dead_letters,
                message,
                &worker.group,
                &reason,
                attempts,
                first_failure,
            )
            .await
            {
                Ok(()) => {
                    metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => worker.group.clone(),
                        "topic" => message.topic.clone(), "outcome" => "dead_lettered")
                    .increment(1);
                    return true;
                }
                Err(error) => {
                    retrying.start(&worker.group);
                    tracing::warn!(%error, "cannot dead-letter yet; retrying");
                }
            }
        }
        let jittered = backoff.mul_f64(0.5 + jitter());
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A number in [0, 1) that differs between calls (spreads retries of many partitions).
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1_000) / 1_000.0
}

fn rfc3339(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339()
}

async fn dead_letter(
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
