//! Events as people and tools read them: a line for a terminal, or the envelope in the proto3
//! JSON mapping (the field names grpcurl shows: `messageId`, `orderPlaced.total.amountMinor`),
//! read from the schema itself (events.proto's descriptors) so a new field appears without a
//! change here. Payment tokens never leave: whoever reads the output could charge the card.

use std::sync::OnceLock;

use orderflow::events::v1::EventEnvelope;
use orderflow::events::v1::event_envelope::Payload;
use prost::Message as _;

/// What a redacted secret reads as.
pub const REDACTED: &str = "[redacted]";

/// Blanks every secret of an envelope's payload (today: the payment token of OrderPlaced).
/// The one place that knows which fields are secret, for every way ordersctl prints events.
pub fn redact(envelope: &mut EventEnvelope) {
    if let Some(Payload::OrderPlaced(placed)) = &mut envelope.payload
        && !placed.payment_token.is_empty()
    {
        placed.payment_token = REDACTED.into();
    }
}

/// An event's payload for a terminal or a log line: its type, then its fields in the proto3
/// JSON mapping (what `--json` and grpcurl show), redacted.
pub fn describe_payload(payload: &Payload) -> String {
    let envelope = EventEnvelope {
        payload: Some(payload.clone()),
        ..EventEnvelope::default()
    };
    let full_name = orderflow::envelope::event_type_of(payload);
    let name = full_name.rsplit('.').next().unwrap_or(full_name);
    // The envelope with only its payload set: its one JSON field is the payload's.
    match envelope_json(&envelope.encode_to_vec()) {
        Ok(serde_json::Value::Object(fields)) => match fields.into_iter().next() {
            Some((_, fields)) => format!("{name} {fields}"),
            None => name.to_owned(),
        },
        // Only undecodable bytes fail, and these were just encoded from a payload.
        _ => name.to_owned(),
    }
}

fn envelope_descriptor() -> &'static prost_reflect::MessageDescriptor {
    static DESCRIPTOR: OnceLock<prost_reflect::MessageDescriptor> = OnceLock::new();
    DESCRIPTOR.get_or_init(|| {
        // The descriptors are built from proto/ by build.rs and compiled in; a failure here is
        // a broken build, not an input.
        #[allow(clippy::expect_used)]
        let pool = prost_reflect::DescriptorPool::decode(orderflow::EVENTS_FILE_DESCRIPTOR_SET)
            .expect("the compiled-in events descriptors decode");
        #[allow(clippy::expect_used)]
        pool.get_message_by_name("orderflow.events.v1.EventEnvelope")
            .expect("events.proto defines EventEnvelope")
    })
}

/// A record's value as the envelope in the proto3 JSON mapping, secrets redacted. Fails only
/// on bytes that are not an envelope at all.
pub fn envelope_json(record: &[u8]) -> anyhow::Result<serde_json::Value> {
    let mut envelope = EventEnvelope::decode(record)?;
    redact(&mut envelope);
    let dynamic =
        prost_reflect::DynamicMessage::decode(envelope_descriptor().clone(), envelope.encode_to_vec().as_slice())?;
    Ok(serde_json::to_value(&dynamic)?)
}

/// Where a record was read, alongside its envelope in `--json` lines.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Coordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    /// The record's timestamp (milliseconds since the epoch), if it has one.
    pub timestamp_ms: Option<i64>,
}

/// One `--json` line: the record's coordinates under `kafka`, the envelope's fields beside
/// them; a record that is not an envelope gets `error` instead.
pub fn json_line(coordinates: &Coordinates, record: &[u8]) -> serde_json::Value {
    let mut line = match envelope_json(record) {
        Ok(serde_json::Value::Object(fields)) => fields,
        Ok(other) => serde_json::Map::from_iter([("envelope".to_owned(), other)]),
        Err(error) => serde_json::Map::from_iter([("error".to_owned(), serde_json::Value::String(error.to_string()))]),
    };
    line.insert("kafka".to_owned(), serde_json::json!(coordinates));
    serde_json::Value::Object(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow::events::v1::OrderPlaced;

    fn placed() -> EventEnvelope {
        EventEnvelope {
            message_id: "0190c0de-0000-7000-8000-000000000001".into(),
            event_type: "orderflow.events.v1.OrderPlaced".into(),
            schema_version: 1,
            aggregate_id: "o-1".into(),
            payload: Some(Payload::OrderPlaced(OrderPlaced {
                order_id: "o-1".into(),
                customer_id: 42,
                payment_token: "tok_live_secret".into(),
                ..OrderPlaced::default()
            })),
            ..EventEnvelope::default()
        }
    }

    #[test]
    fn payment_tokens_are_never_printed() {
        let shown = describe_payload(placed().payload.as_ref().unwrap());
        assert!(!shown.contains("tok_live_secret"), "{shown}");
        assert!(shown.contains(REDACTED) && shown.contains("o-1"), "{shown}");
    }

    #[test]
    fn a_payload_reads_as_its_type_and_its_json_fields_not_debug_text() {
        let shown = describe_payload(placed().payload.as_ref().unwrap());
        assert!(
            shown.starts_with(r#"OrderPlaced {"customerId":"42","orderId":"o-1""#),
            "{shown}"
        );
        assert!(
            !shown.contains("OrderPlaced(") && !shown.contains("customer_id:"),
            "{shown}"
        );
    }

    #[test]
    fn json_lines_use_the_proto3_mapping_with_the_token_redacted() {
        let coordinates = Coordinates {
            topic: "orders.events".into(),
            partition: 3,
            offset: 17,
            key: "o-1".into(),
            timestamp_ms: Some(1),
        };
        let line = json_line(&coordinates, &placed().encode_to_vec());
        let text = line.to_string();
        assert!(!text.contains("tok_live_secret"), "{text}");
        // lowerCamelCase names, int64 as a string, the oneof member by its JSON name.
        assert_eq!(line["messageId"], "0190c0de-0000-7000-8000-000000000001", "{text}");
        assert_eq!(line["schemaVersion"], 1, "{text}");
        assert_eq!(line["orderPlaced"]["customerId"], "42", "{text}");
        assert_eq!(line["orderPlaced"]["paymentToken"], REDACTED, "{text}");
        assert_eq!(line["kafka"]["offset"], 17, "{text}");
    }

    #[test]
    fn bytes_that_are_no_envelope_are_reported_not_dropped() {
        let coordinates = Coordinates {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: String::new(),
            timestamp_ms: None,
        };
        let line = json_line(&coordinates, &[0xff, 0xff, 0xff]);
        assert!(line["error"].is_string(), "{line}");
    }
}
