//! The one consumer loop every service uses.
//!
//! - Offsets are stored only after the handler returned, that is after its database
//!   transaction committed (`enable.auto.offset.store=false`); auto-commit then commits the
//!   stored offsets. Dying anywhere before the store means a redelivery, which the
//!   handler's inbox makes a no-op.
//! - Messages of one partition are handled one after another, in order, by one worker;
//!   different partitions run concurrently on different workers.
//! - A transient error (database or gateway away) is retried with exponential backoff and
//!   jitter, for as long as it takes: the message is never dropped.
//! - A permanent error (undecodable bytes, unknown event type, an unknown order...) sends
//!   the message to `<topic>.dlq` with headers saying why and where it came from, and the
//!   partition keeps flowing. Nothing panics on a message.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};

/// How long a consumer may hold no partition before it is re-created.
const REJOIN_AFTER: Duration = Duration::from_secs(20);
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::kafka;
use crate::telemetry;

/// Publishes librdkafka's per-partition consumer lag as a gauge (statistics every 5 s).
struct LagContext {
    group: String,
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, partition_stats) in &stats.partitions {
                if *partition >= 0 && partition_stats.consumer_lag >= 0 {
                    metrics::gauge!(telemetry::CONSUMER_LAG, "group" => self.group.clone(), "topic" => topic.clone(),
                        "partition" => partition.to_string())
                    .set(partition_stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

/// A message as handlers see it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Where it came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The record key (the order id), if any.
    pub key: Option<Vec<u8>>,
    /// The record value.
    pub payload: Vec<u8>,
    /// The record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Incoming {
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
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }
}

/// What a handler did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect was committed.
    Processed,
    /// The inbox knew it: a redelivery, nothing done.
    Duplicate,
    /// Not for this consumer (an event type it does not act on).
    Ignored,
}

/// Why a handler could not process a message.
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

/// Handles one message. Implementations are idempotent (an inbox, compare-and-set updates).
pub trait Handler: Send + Sync + 'static {
    /// Processes `message`.
    fn handle(&self, message: &Incoming) -> impl Future<Output = Result<Outcome, HandlerError>> + Send;
}

/// Where and how to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// The consumer group.
    pub group_id: String,
    /// The topics.
    pub topics: Vec<String>,
    /// How many partitions are handled at once.
    pub workers: usize,
}

/// Consumes until `shutdown`; then lets every worker finish its message and returns.
pub async fn run<H: Handler>(
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let create = || -> anyhow::Result<Arc<StreamConsumer<LagContext>>> {
        let consumer: StreamConsumer<LagContext> =
            kafka::consumer_config(&settings.bootstrap_servers, &settings.group_id)
                .set("statistics.interval.ms", "5000")
                .create_with_context(LagContext {
                    group: settings.group_id.clone(),
                })?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Arc::new(consumer))
    };
    let mut consumer = create()?;
    // Workers store offsets through whichever consumer is current (see the watchdog below).
    let (current_consumer, consumer_for_workers) = watch::channel(consumer.clone());
    let dead_letters: FutureProducer =
        kafka::producer_config(&settings.bootstrap_servers, &format!("{}-dlq", settings.group_id)).create()?;
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, "consumer started");

    let workers = settings.workers.max(1);
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (sender, mut receiver) = mpsc::channel::<Incoming>(64);
        senders.push(sender);
        let handler = handler.clone();
        let consumer = consumer_for_workers.clone();
        let dead_letters = dead_letters.clone();
        let shutdown = shutdown.clone();
        let group = settings.group_id.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(message) = receiver.recv().await {
                let span = tracing::info_span!(
                    "consume",
                    group = %group,
                    topic = %message.topic,
                    partition = message.partition,
                    offset = message.offset,
                    order_id = %String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()),
                    message_id = %message.header(orderflow::envelope::headers::MESSAGE_ID).unwrap_or_default(),
                    correlation_id = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                // One trace per order: this span continues the producer's trace.
                if let Some(traceparent) = message.header(orderflow::envelope::headers::TRACEPARENT) {
                    telemetry::continue_trace(&span, &traceparent);
                    if let Some(trace_id) = telemetry::trace_id_of(&traceparent) {
                        span.record("trace_id", trace_id);
                    }
                }
                if crate::chaos::naive() {
                    // The textbook mistake: the offset first, then the work. Dying during the
                    // work loses the message (its offset is committed already).
                    let _ = consumer
                        .borrow()
                        .clone()
                        .store_offset(&message.topic, message.partition, message.offset);
                }
                let done = process(&*handler, &message, &dead_letters, &group, &shutdown)
                    .instrument(span)
                    .await;
                if !done {
                    // Shutting down before the message was processed: leave its offset
                    // unstored, so it is redelivered; stop taking more from this partition.
                    break;
                }
                fail::fail_point!("consumer::after_commit_before_store", |_| crate::chaos::crash());
                // The effect is committed (or dead-lettered): now, and only now, the offset.
                // Dying here redelivers the message, and the inbox absorbs it.
                // The message's own offset: librdkafka commits offset + 1 itself. (Passing
                // offset + 1 here would skip the next message after a restart: a lost event.)
                if let Err(error) =
                    consumer
                        .borrow()
                        .clone()
                        .store_offset(&message.topic, message.partition, message.offset)
                {
                    tracing::warn!(%error, "cannot store the offset; the message will be redelivered");
                }
            }
        }));
    }

    // Watchdog: after a long broker outage every member's session has expired, and the
    // local broker gives rejoining members none or only some of their partitions back; a new
    // member does get them all. So a consumer missing partitions for REJOIN_AFTER is
    // re-created. As the only member of its group (the local stack's rule, and the default)
    // it must hold every partition of its topics; as one of several members
    // (ORDERFLOW_CONSUMER_SOLE_MEMBER=false, Apache Kafka scaled out) it must hold at least one.
    let sole_member = std::env::var("ORDERFLOW_CONSUMER_SOLE_MEMBER").map_or(true, |v| v != "false");
    let mut watchdog = tokio::time::interval(Duration::from_secs(5));
    let mut unassigned_since: Option<std::time::Instant> = None;
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = watchdog.tick() => {
                let held = consumer.assignment().map(|list| list.count()).unwrap_or(0);
                let wanted = if sole_member {
                    let (probe, topics) = (consumer.clone(), settings.topics.clone());
                    tokio::task::spawn_blocking(move || partitions_of(&*probe, &topics)).await.unwrap_or(None)
                } else {
                    Some(1)
                };
                // Unknown (metadata unavailable, the broker is away): judge on holding nothing.
                let assigned = held > 0 && wanted.is_none_or(|wanted| held >= wanted);
                if assigned {
                    unassigned_since = None;
                } else if unassigned_since.get_or_insert_with(std::time::Instant::now).elapsed() >= REJOIN_AFTER {
                    tracing::warn!(group = %settings.group_id, "partitions missing for {REJOIN_AFTER:?}; re-creating the consumer to rejoin the group");
                    match create() {
                        Ok(fresh) => {
                            let old = std::mem::replace(&mut consumer, fresh);
                            let _ = current_consumer.send(consumer.clone());
                            // Closing a consumer blocks until the broker answers (it leaves the
                            // group), possibly for as long as the outage lasts: never on a worker.
                            tokio::task::spawn_blocking(move || drop(old));
                            unassigned_since = None;
                        }
                        Err(error) => tracing::warn!(%error, "cannot re-create the consumer; trying again"),
                    }
                }
                continue;
            }
            received = consumer.recv() => received,
        };
        match received {
            Ok(message) => {
                let incoming = Incoming {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    headers: message
                        .headers()
                        .map(|headers| {
                            headers
                                .iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                let worker = usize::try_from(incoming.partition).unwrap_or(0) % workers;
                if senders[worker].send(incoming).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(senders);
    for task in tasks {
        let _ = task.await;
    }
    // Commit what was stored before leaving the group.
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    tracing::info!(group = %settings.group_id, "consumer stopped");
    Ok(())
}

/// How many partitions `topics` have, or None when the broker does not answer.
fn partitions_of<C: rdkafka::consumer::Consumer<LagContext>>(consumer: &C, topics: &[String]) -> Option<usize> {
    let mut total = 0;
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)).ok()?;
        total += metadata.topics().first()?.partitions().len();
    }
    Some(total)
}

/// Handles one message until it is processed or dead-lettered (true), or until shutdown
/// interrupts a retry (false).
async fn process<H: Handler>(
    handler: &H,
    message: &Incoming,
    dead_letters: &FutureProducer,
    group: &str,
    shutdown: &CancellationToken,
) -> bool {
    let first_failure = SystemTime::now();
    let mut attempts: u32 = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        attempts += 1;
        let error = match handler.handle(message).await {
            Ok(outcome) => {
                tracing::debug!(?outcome, "message handled");
                let outcome = match outcome {
                    Outcome::Processed => "processed",
                    Outcome::Duplicate => "duplicate",
                    Outcome::Ignored => "ignored",
                };
                metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => group.to_owned(),
                    "topic" => message.topic.clone(), "outcome" => outcome)
                .increment(1);
                return true;
            }
            Err(error) => error,
        };
        match error {
            HandlerError::Permanent(reason) => {
                tracing::error!(%reason, attempts, "message cannot be processed; dead-lettering it");
                match dead_letter(dead_letters, message, group, &reason, attempts, first_failure).await {
                    Ok(()) => {
                        metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => group.to_owned(),
                            "topic" => message.topic.clone(), "outcome" => "dead_lettered")
                        .increment(1);
                        return true;
                    }
                    Err(error) => tracing::warn!(%error, "cannot dead-letter yet; retrying"),
                }
            }
            HandlerError::Transient(error) => {
                metrics::counter!(telemetry::CONSUMER_RETRIES, "group" => group.to_owned()).increment(1);
                tracing::warn!(error = format!("{error:#}"), attempts, "transient failure; retrying");
            }
        }
        let jittered = backoff.mul_f64(0.5 + jitter());
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A number in [0, 1) that differs between calls (spreads retries of many workers).
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
