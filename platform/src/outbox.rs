//! The outbox row: an event that a service committed together with its business change
//! and that its relay will publish to Kafka.
//!
//! Every service database has the same `outbox` table (see `migrations/*/`); the relay
//! reads it, the services only ever insert into it, inside the transaction that makes
//! the change the event describes.

use orderflow::envelope::{EventMeta, headers, seal};
use orderflow::events::v1::EventEnvelope;
use orderflow::events::v1::event_envelope::Payload;
use prost::Message as _;

/// One event ready to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// The topic to publish to.
    pub topic: String,
    /// The sealed envelope; its `aggregate_id` becomes the record key.
    pub envelope: EventEnvelope,
}

/// Inserts the message into the outbox, inside the caller's transaction (a span of its own). The insert fires
/// a NOTIFY (a trigger in the migration) that wakes the relay when the transaction commits.
#[tracing::instrument(name = "outbox_write", skip_all, fields(event_type = %message.envelope.event_type))]
pub async fn insert(tx: &mut sqlx::PgConnection, message: &OutboxMessage) -> Result<(), sqlx::Error> {
    let envelope = &message.envelope;
    let message_id =
        uuid::Uuid::parse_str(&envelope.message_id).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    sqlx::query(
        "INSERT INTO outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
         VALUES ($1, $2, $3, $4, $5, NULLIF($6, ''), $7)",
    )
    .bind(message_id)
    .bind(&message.topic)
    .bind(&envelope.aggregate_id)
    .bind(&envelope.event_type)
    .bind(i32::try_from(envelope.schema_version).unwrap_or(i32::MAX))
    .bind(&envelope.traceparent)
    .bind(envelope.encode_to_vec())
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
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id: cause.aggregate_id,
        correlation_id: cause.correlation_id,
        causation_id: Some(cause.message_id),
        // The current span (the consumer's, a child of the producer's) continues the trace.
        traceparent: crate::telemetry::current_traceparent().or_else(|| cause.traceparent.clone()),
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
