//! The event envelope: how an event is sealed for the wire and how a consumer opens it.
//!
//! A consumer recognises the payload by the envelope's `oneof payload` (not by
//! `google.protobuf.Any`): the generated code gives an exhaustive Rust enum, so adding an
//! event type is a compile error in every consumer that must handle it. A message whose
//! payload variant this build does not know decodes with no payload set; [`open`] then
//! answers [`ContractError::UnknownEventType`] naming the `event_type` the producer wrote,
//! and the consumer dead-letters it. Nothing is dropped silently and nothing panics.

use crate::events::v1::{EventEnvelope, event_envelope::Payload};

/// Kafka record header names. The record headers mirror these envelope fields so that
/// routers, the dead-letter tooling and tracing can act without decoding the payload.
pub mod headers {
    /// The envelope's `message_id`.
    pub const MESSAGE_ID: &str = "message_id";
    /// The envelope's `event_type`.
    pub const EVENT_TYPE: &str = "event_type";
    /// The envelope's `schema_version`, as decimal text.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// W3C trace context (`traceparent`), the same value as in the envelope.
    pub const TRACEPARENT: &str = "traceparent";
}

/// The highest payload schema version this build understands, for every event type.
pub const SUPPORTED_SCHEMA_VERSION: u32 = 1;

/// The fully-qualified protobuf name of a payload, as written to `event_type`.
pub fn event_type_of(payload: &Payload) -> &'static str {
    match payload {
        Payload::OrderPlaced(_) => "orderflow.events.v1.OrderPlaced",
        Payload::OrderConfirmed(_) => "orderflow.events.v1.OrderConfirmed",
        Payload::OrderCancelled(_) => "orderflow.events.v1.OrderCancelled",
        Payload::PaymentAuthorized(_) => "orderflow.events.v1.PaymentAuthorized",
        Payload::PaymentFailed(_) => "orderflow.events.v1.PaymentFailed",
        Payload::PaymentCaptured(_) => "orderflow.events.v1.PaymentCaptured",
        Payload::PaymentVoided(_) => "orderflow.events.v1.PaymentVoided",
        Payload::StockReserved(_) => "orderflow.events.v1.StockReserved",
        Payload::StockRejected(_) => "orderflow.events.v1.StockRejected",
        Payload::StockReleased(_) => "orderflow.events.v1.StockReleased",
        Payload::StockCommitted(_) => "orderflow.events.v1.StockCommitted",
        Payload::StockCameShort(_) => "orderflow.events.v1.StockCameShort",
    }
}

/// What a producer knows about an event besides its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    /// Unique message id (UUIDv7).
    pub message_id: uuid::Uuid,
    /// The order the event belongs to.
    pub aggregate_id: uuid::Uuid,
    /// Shared by every message of one PlaceOrder call.
    pub correlation_id: uuid::Uuid,
    /// The message that caused this one, if any.
    pub causation_id: Option<uuid::Uuid>,
    /// W3C traceparent of the producing span, if any.
    pub traceparent: Option<String>,
    /// When the fact happened.
    pub occurred_at: prost_types::Timestamp,
}

/// Wraps a payload in an envelope, filling `event_type` and `schema_version` from the payload.
pub fn seal(meta: EventMeta, payload: Payload) -> EventEnvelope {
    EventEnvelope {
        message_id: meta.message_id.to_string(),
        event_type: event_type_of(&payload).to_owned(),
        schema_version: SUPPORTED_SCHEMA_VERSION,
        occurred_at: Some(meta.occurred_at),
        aggregate_id: meta.aggregate_id.to_string(),
        correlation_id: meta.correlation_id.to_string(),
        causation_id: meta.causation_id.map(|id| id.to_string()).unwrap_or_default(),
        traceparent: meta.traceparent.unwrap_or_default(),
        // Set when the producing service writes it to its outbox, which signs it there.
        signing_key_id: String::new(),
        signature: Vec::new(),
        payload: Some(payload),
    }
}

/// Why a consumer cannot act on a message. Every variant is permanent: retrying the same
/// bytes gives the same answer, so the consumer dead-letters instead of retrying.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ContractError {
    /// The bytes are not an `EventEnvelope`.
    #[error("undecodable envelope: {0}")]
    Undecodable(#[from] prost::DecodeError),
    /// A payload variant this build does not know (a newer producer added it).
    #[error("unknown event type {event_type:?}")]
    UnknownEventType {
        /// What the producer wrote in `event_type`.
        event_type: String,
    },
    /// A known event type at a schema version this build does not understand.
    #[error("{event_type} schema version {version} is not supported (up to {SUPPORTED_SCHEMA_VERSION})")]
    UnsupportedSchemaVersion {
        /// The event type.
        event_type: String,
        /// The version found.
        version: u32,
    },
    /// The envelope's `event_type` names a different payload than the one it carries.
    #[error("event_type {declared:?} does not match payload {actual}")]
    EventTypeMismatch {
        /// What `event_type` says.
        declared: String,
        /// What the payload is.
        actual: &'static str,
    },
    /// A required envelope field is missing or not a valid id.
    #[error("envelope field {0} is missing or invalid")]
    InvalidField(&'static str),
}

/// An envelope whose ids were checked and whose payload this build understands.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedEvent {
    /// The message id.
    pub message_id: uuid::Uuid,
    /// The order.
    pub aggregate_id: uuid::Uuid,
    /// The correlation id.
    pub correlation_id: uuid::Uuid,
    /// The causing message, if any.
    pub causation_id: Option<uuid::Uuid>,
    /// W3C traceparent, if any.
    pub traceparent: Option<String>,
    /// The key that signed it, if it is signed (whether the signature holds is the
    /// consumer's check: `orderflow_platform::signing`).
    pub signing_key_id: Option<String>,
    /// The schema version the producer wrote (at most [`SUPPORTED_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// When the fact happened, as the producer stated it.
    pub occurred_at: Option<prost_types::Timestamp>,
    /// The event.
    pub payload: Payload,
}

fn parse_id(value: &str, field: &'static str) -> Result<uuid::Uuid, ContractError> {
    match uuid::Uuid::parse_str(value) {
        Ok(id) if !id.is_nil() => Ok(id),
        _ => Err(ContractError::InvalidField(field)),
    }
}

/// Decodes and checks an envelope. Unknown fields (written by a newer schema that only
/// added fields) are ignored; an unknown payload type or a newer major version is an error.
pub fn open(bytes: &[u8]) -> Result<OpenedEvent, ContractError> {
    use prost::Message as _;
    let envelope = EventEnvelope::decode(bytes)?;
    let Some(payload) = envelope.payload else {
        return Err(ContractError::UnknownEventType {
            event_type: envelope.event_type,
        });
    };
    let actual = event_type_of(&payload);
    if envelope.event_type != actual {
        return Err(ContractError::EventTypeMismatch {
            declared: envelope.event_type,
            actual,
        });
    }
    if envelope.schema_version == 0 || envelope.schema_version > SUPPORTED_SCHEMA_VERSION {
        return Err(ContractError::UnsupportedSchemaVersion {
            event_type: envelope.event_type,
            version: envelope.schema_version,
        });
    }
    let causation_id = if envelope.causation_id.is_empty() {
        None
    } else {
        Some(parse_id(&envelope.causation_id, "causation_id")?)
    };
    Ok(OpenedEvent {
        message_id: parse_id(&envelope.message_id, "message_id")?,
        aggregate_id: parse_id(&envelope.aggregate_id, "aggregate_id")?,
        correlation_id: parse_id(&envelope.correlation_id, "correlation_id")?,
        causation_id,
        traceparent: (!envelope.traceparent.is_empty()).then_some(envelope.traceparent),
        signing_key_id: (!envelope.signing_key_id.is_empty()).then_some(envelope.signing_key_id),
        schema_version: envelope.schema_version,
        occurred_at: envelope.occurred_at,
        payload,
    })
}

/// Property tests fed with arbitrary bytes and with valid envelopes damaged at random: the
/// decoder never panics, and whatever it accepts has the ids it promises. `scripts/test`
/// runs them with many more cases than the default (`PROPTEST_CASES`).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::events::v1::OrderPlaced;
    use proptest::prelude::*;
    use prost::Message as _;

    fn valid() -> Vec<u8> {
        let id = uuid::Uuid::now_v7();
        seal(
            EventMeta {
                message_id: id,
                aggregate_id: id,
                correlation_id: id,
                causation_id: None,
                traceparent: None,
                occurred_at: prost_types::Timestamp::default(),
            },
            Payload::OrderPlaced(OrderPlaced {
                order_id: id.to_string(),
                ..OrderPlaced::default()
            }),
        )
        .encode_to_vec()
    }

    fn accepted_is_well_formed(opened: &Result<OpenedEvent, ContractError>) {
        if let Ok(event) = opened {
            assert!(!event.message_id.is_nil() && !event.aggregate_id.is_nil());
            assert!(event.schema_version <= SUPPORTED_SCHEMA_VERSION);
        }
    }

    proptest! {
        #[test]
        fn fuzz_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            accepted_is_well_formed(&open(&bytes));
        }

        #[test]
        fn fuzz_damaged_envelopes_open_or_are_refused(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = valid();
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            bytes.truncate(cut % (bytes.len() + 1));
            bytes.extend(tail);
            accepted_is_well_formed(&open(&bytes));
        }
    }
}
