//! The outbox row: an event that a service committed together with its business change
//! and that its relay will publish to Kafka.
//!
//! Every service database has the same `outbox` table (see `migrations/*/`); the relay
//! reads it, the services only ever insert into it, inside the transaction that makes
//! the change the event describes.
//!
//! Or, in [`OutboxMode::WalMessage`], no row at all: the event is written into the
//! write-ahead log as a transactional logical decoding message
//! (`pg_logical_emit_message(true, ...)`) and reaches a relay through a logical
//! replication slot when, and only if, the business transaction commits. Same atomicity
//! (the message is part of the transaction), no table to poll, mark or purge; the WAL
//! the slot has not confirmed is what holds the unpublished events (docs/adr/0003).

use orderflow::envelope::{EventMeta, headers, seal};
use orderflow::events::v1::EventEnvelope;
use orderflow::events::v1::event_envelope::Payload;

use crate::signing::EventSigner;

/// One event ready to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// The topic to publish to.
    pub topic: String,
    /// The sealed envelope; its `aggregate_id` becomes the record key.
    pub envelope: EventEnvelope,
}

/// The prefix of every outbox WAL message; the topic follows it (`orderflow.outbox/orders.events`),
/// the content is the sealed envelope, exactly the outbox table's `payload`.
pub const WAL_MESSAGE_PREFIX: &str = "orderflow.outbox/";

/// How a service hands its events to the relay: the one setting both sides of the outbox share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboxMode {
    /// A row in the `outbox` table; a polling relay publishes and marks it.
    #[default]
    Table,
    /// A transactional logical decoding message in the WAL; a relay reading a logical
    /// replication slot publishes it and confirms the slot past it.
    WalMessage,
}

impl OutboxMode {
    /// Its name as `RELAY_MODE` and `OUTBOX_MODE` spell it (and spans and messages show it).
    pub fn name(self) -> &'static str {
        match self {
            OutboxMode::Table => "table",
            OutboxMode::WalMessage => "wal-message",
        }
    }
}

/// A service's outbox: where its events go (the mode) and the key it signs them with. The one
/// way a service writes an event: every envelope it writes is signed ([`crate::signing`]).
#[derive(Debug, Clone)]
pub struct Outbox {
    mode: OutboxMode,
    signer: EventSigner,
}

impl Outbox {
    /// Events written the `mode` way, signed by `signer`.
    pub fn new(mode: OutboxMode, signer: EventSigner) -> Self {
        Self { mode, signer }
    }

    /// Writes `message` inside the caller's transaction: it exists for the relay exactly when
    /// the transaction commits.
    pub async fn write(&self, tx: &mut sqlx::PgConnection, message: &OutboxMessage) -> Result<(), sqlx::Error> {
        self.write_all(tx, std::slice::from_ref(message)).await
    }

    /// Writes `messages` in one statement, inside the caller's transaction, each signed.
    pub async fn write_all(&self, tx: &mut sqlx::PgConnection, messages: &[OutboxMessage]) -> Result<(), sqlx::Error> {
        if messages.is_empty() {
            return Ok(());
        }
        let _spans = write_spans(messages, self.mode);
        let sealed: Vec<Vec<u8>> = messages.iter().map(|m| self.signer.seal(&m.envelope)).collect();
        match self.mode {
            OutboxMode::Table => insert_all(tx, messages, &sealed).await,
            OutboxMode::WalMessage => emit_all(tx, messages, &sealed).await,
        }
    }
}

/// The services' choice of [`OutboxMode`] (`OUTBOX_MODE`); the relay of the database must
/// be started with the same one (`RELAY_MODE`).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutboxArgs {
    /// How events reach the relay: `table` (outbox rows, the polling relay) or
    /// `wal-message` (logical decoding messages, the relay reading a replication slot).
    #[arg(long = "outbox-mode", env = "OUTBOX_MODE", value_enum, default_value_t = OutboxMode::Table)]
    pub mode: OutboxMode,
}

/// One `outbox_write` span per message, each in the trace of what caused it (the span its
/// envelope's traceparent names): a batch's statement writes the events of many orders, and
/// each order's trace shows the write of its own event, with how many shared the statement.
/// The spans end when the caller drops them, after the statement.
fn write_spans(messages: &[OutboxMessage], mode: OutboxMode) -> Vec<tracing::Span> {
    let mode = mode.name();
    messages
        .iter()
        .map(|message| {
            let envelope = &message.envelope;
            let span =
                tracing::info_span!("outbox_write", event_type = %envelope.event_type, events = messages.len(), mode);
            crate::telemetry::continue_trace_of(&span, &envelope.traceparent);
            span
        })
        .collect()
}

/// Inserts `messages` (their `sealed` bytes) into the outbox table in one statement, their ids
/// in the given order. The insert fires a NOTIFY (a trigger in the migration) that wakes the
/// relay when the transaction commits.
async fn insert_all(
    tx: &mut sqlx::PgConnection,
    messages: &[OutboxMessage],
    sealed: &[Vec<u8>],
) -> Result<(), sqlx::Error> {
    let mut message_ids = Vec::with_capacity(messages.len());
    let mut topics = Vec::with_capacity(messages.len());
    let mut keys = Vec::with_capacity(messages.len());
    let mut event_types = Vec::with_capacity(messages.len());
    let mut versions = Vec::with_capacity(messages.len());
    let mut traceparents = Vec::with_capacity(messages.len());
    for message in messages {
        let envelope = &message.envelope;
        message_ids
            .push(uuid::Uuid::parse_str(&envelope.message_id).map_err(|error| sqlx::Error::Encode(Box::new(error)))?);
        topics.push(message.topic.as_str());
        keys.push(envelope.aggregate_id.as_str());
        event_types.push(envelope.event_type.as_str());
        versions.push(i32::try_from(envelope.schema_version).unwrap_or(i32::MAX));
        traceparents.push(envelope.traceparent.as_str());
    }
    sqlx::query(
        "INSERT INTO outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
         SELECT m, t, k, e, v, NULLIF(tp, ''), p
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::bytea[])
              WITH ORDINALITY AS u(m, t, k, e, v, tp, p, n)
         ORDER BY n",
    )
    .bind(&message_ids)
    .bind(&topics)
    .bind(&keys)
    .bind(&event_types)
    .bind(&versions)
    .bind(&traceparents)
    .bind(sealed)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Writes `messages` (their `sealed` bytes) into the WAL as transactional logical decoding
/// messages in one statement, in the given order: decoded only once the transaction commits,
/// and never if it rolls back.
async fn emit_all(
    tx: &mut sqlx::PgConnection,
    messages: &[OutboxMessage],
    sealed: &[Vec<u8>],
) -> Result<(), sqlx::Error> {
    let prefixes: Vec<String> = messages
        .iter()
        .map(|message| format!("{WAL_MESSAGE_PREFIX}{}", message.topic))
        .collect();
    sqlx::query(
        "SELECT pg_logical_emit_message(true, p, c)::text
         FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(p, c, n) ORDER BY n",
    )
    .bind(&prefixes)
    .bind(sealed)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The Kafka headers of an outbox row, mirroring the envelope (see `orderflow::envelope::headers`).
pub fn record_headers(
    message_id: &str,
    event_type: &str,
    schema_version: &str,
    traceparent: Option<&str>,
) -> rdkafka::message::OwnedHeaders {
    let mut list = vec![
        (headers::MESSAGE_ID, message_id),
        (headers::EVENT_TYPE, event_type),
        (headers::SCHEMA_VERSION, schema_version),
    ];
    if let Some(traceparent) = traceparent {
        list.push((headers::TRACEPARENT, traceparent));
    }
    list.into_iter()
        .fold(rdkafka::message::OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(rdkafka::message::Header {
                key,
                value: Some(value),
            })
        })
}

/// A time as a protobuf timestamp.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        // Below one billion, so it fits.
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    timestamp(chrono::Utc::now())
}

/// An event caused by `cause`: same order, same correlation id and trace, `cause` as its
/// causation, a new message id.
pub fn caused_by(topic: &str, cause: &orderflow::envelope::OpenedEvent, payload: Payload) -> OutboxMessage {
    continuing(
        topic,
        cause.aggregate_id,
        cause.correlation_id,
        Some(cause.message_id),
        cause.traceparent.as_deref(),
        payload,
    )
}

/// An event of `aggregate_id` that continues a conversation: its correlation id, the message
/// that caused it (None: a timer's decision), and the current span's trace (else
/// `traceparent`, the trace it continues). A new message id.
pub fn continuing(
    topic: &str,
    aggregate_id: uuid::Uuid,
    correlation_id: uuid::Uuid,
    causation_id: Option<uuid::Uuid>,
    traceparent: Option<&str>,
    payload: Payload,
) -> OutboxMessage {
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id,
        correlation_id,
        causation_id,
        // The current span (the consumer's, a child of the producer's) continues the trace.
        traceparent: crate::telemetry::current_traceparent().or_else(|| traceparent.map(str::to_owned)),
        occurred_at: now_timestamp(),
    };
    OutboxMessage {
        topic: topic.to_owned(),
        envelope: seal(meta, payload),
    }
}

/// An event no message caused (a timer's decision, such as a deadline passing): a new
/// correlation id, the current span's trace.
pub fn spontaneous(topic: &str, aggregate_id: uuid::Uuid, payload: Payload) -> OutboxMessage {
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id,
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: None,
        traceparent: crate::telemetry::current_traceparent(),
        occurred_at: now_timestamp(),
    };
    OutboxMessage {
        topic: topic.to_owned(),
        envelope: seal(meta, payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_modes_name_is_the_one_its_flag_takes() {
        use clap::ValueEnum as _;
        for mode in OutboxMode::value_variants() {
            let flag = mode.to_possible_value().unwrap();
            assert_eq!(flag.get_name(), mode.name());
        }
    }
}
