//! Contract tests of the published language: the wire encoding of every event is frozen in
//! `tests/golden/` (a wire change fails here, on purpose), envelopes round-trip, and a
//! consumer copes with what a newer producer may send.
//!
//! To accept an intended change: `ORDERFLOW_UPDATE_GOLDEN=1 cargo test -p orderflow-tests --test contracts`,
//! and say in the commit why the wire changed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use orderflow::envelope::{self, ContractError, EventMeta, SUPPORTED_SCHEMA_VERSION};
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{self as events, EventEnvelope};
use orderflow::orders::v1::{CancellationReason, Money, OrderItem};
use prost::Message as _;

fn id(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

fn meta() -> EventMeta {
    EventMeta {
        message_id: id(1),
        aggregate_id: id(2),
        correlation_id: id(3),
        causation_id: Some(id(4)),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        occurred_at: prost_types::Timestamp {
            seconds: 1_764_000_000,
            nanos: 123_000_000,
        },
    }
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency_code: "EUR".into(),
    })
}

fn book(quantity: i64) -> events::StockLine {
    events::StockLine {
        sku: "BOOK-1".into(),
        quantity,
    }
}

/// One fixed example of every event type, with the name of its golden file.
fn every_event() -> Vec<(&'static str, Payload)> {
    let order_id = id(2).to_string();
    let payment_id = id(5).to_string();
    vec![
        (
            "order_placed",
            Payload::OrderPlaced(events::OrderPlaced {
                order_id: order_id.clone(),
                customer_id: 42,
                items: vec![OrderItem {
                    sku: "BOOK-1".into(),
                    quantity: 3,
                    unit_price: eur(1_250),
                }],
                total: eur(3_750),
                payment_token: "tok_visa".into(),
            }),
        ),
        (
            "order_confirmed",
            Payload::OrderConfirmed(events::OrderConfirmed {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                total: eur(3_750),
                order_version: 1,
            }),
        ),
        (
            "order_cancelled",
            Payload::OrderCancelled(events::OrderCancelled {
                order_id: order_id.clone(),
                reason: CancellationReason::PaymentFailed as i32,
                detail: "card declined".into(),
                order_version: 1,
            }),
        ),
        (
            "payment_authorized",
            Payload::PaymentAuthorized(events::PaymentAuthorized {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                authorization_id: "auth_0001".into(),
                amount: eur(3_750),
            }),
        ),
        (
            "payment_failed",
            Payload::PaymentFailed(events::PaymentFailed {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                reason: events::PaymentFailureReason::Declined as i32,
                detail: "insufficient funds".into(),
            }),
        ),
        (
            "payment_captured",
            Payload::PaymentCaptured(events::PaymentCaptured {
                order_id: order_id.clone(),
                payment_id: payment_id.clone(),
                amount: eur(3_750),
            }),
        ),
        (
            "payment_voided",
            Payload::PaymentVoided(events::PaymentVoided {
                order_id: order_id.clone(),
                payment_id,
                amount: eur(3_750),
            }),
        ),
        (
            "stock_reserved",
            Payload::StockReserved(events::StockReserved {
                order_id: order_id.clone(),
                lines: vec![book(3)],
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1_764_000_900,
                    nanos: 0,
                }),
            }),
        ),
        (
            "stock_rejected",
            Payload::StockRejected(events::StockRejected {
                order_id: order_id.clone(),
                shortages: vec![events::StockShortage {
                    sku: "BOOK-1".into(),
                    requested: 3,
                    available: 1,
                }],
            }),
        ),
        (
            "stock_released",
            Payload::StockReleased(events::StockReleased {
                order_id: order_id.clone(),
                reason: events::StockReleaseReason::OrderCancelled as i32,
                lines: vec![book(3)],
                sold: true,
            }),
        ),
        (
            "stock_committed",
            Payload::StockCommitted(events::StockCommitted {
                order_id: order_id.clone(),
                lines: vec![book(3)],
                after_expiry: false,
            }),
        ),
        (
            "stock_came_short",
            Payload::StockCameShort(events::StockCameShort {
                order_id,
                shortages: vec![events::StockShortage {
                    sku: "BOOK-1".into(),
                    requested: 3,
                    available: 0,
                }],
            }),
        ),
    ]
}

/// The committed encoding of `name` (rewritten from `payload` first in update mode).
fn golden_hex(name: &str, payload: &Payload) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.hex"));
    if std::env::var_os("ORDERFLOW_UPDATE_GOLDEN").is_some() {
        let encoded = hex::encode(envelope::seal(meta(), payload.clone()).encode_to_vec());
        std::fs::write(&path, format!("{encoded}\n")).expect("write golden file");
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing golden file {}", path.display()));
    text.trim().to_owned()
}

#[test]
fn every_event_encodes_exactly_as_its_golden_file() {
    let mut mismatches = Vec::new();
    for (name, payload) in every_event() {
        let golden = golden_hex(name, &payload);
        let encoded = hex::encode(envelope::seal(meta(), payload).encode_to_vec());
        if golden != encoded {
            mismatches.push(format!("{name}:\n  golden {golden}\n  now    {encoded}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "the wire encoding changed:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn golden_files_decode_to_the_events_they_were_made_from() {
    // The other direction: bytes written by a producer built from the golden contract are
    // read back by this build.
    for (name, payload) in every_event() {
        let bytes = hex::decode(golden_hex(name, &payload)).expect("hex");
        let opened = envelope::open(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(opened.payload, payload, "{name}");
        assert_eq!(opened.message_id, id(1));
        assert_eq!(opened.aggregate_id, id(2));
        assert_eq!(opened.correlation_id, id(3));
        assert_eq!(opened.causation_id, Some(id(4)));
    }
}

#[test]
fn an_envelope_round_trips_with_every_field() {
    for (name, payload) in every_event() {
        let sealed = envelope::seal(meta(), payload.clone());
        assert_eq!(sealed.event_type, envelope::event_type_of(&payload));
        assert!(sealed.event_type.starts_with("orderflow.events.v1."), "{name}");
        assert_eq!(sealed.schema_version, SUPPORTED_SCHEMA_VERSION);
        let decoded = EventEnvelope::decode(sealed.encode_to_vec().as_slice()).expect("decode");
        assert_eq!(decoded, sealed, "{name}");
        let opened = envelope::open(&sealed.encode_to_vec()).expect("open");
        assert_eq!(opened.traceparent.as_deref(), meta().traceparent.as_deref());
        assert_eq!(opened.schema_version, 1);
        assert_eq!(opened.payload, payload);
    }
}

/// Appends a length-delimited field `tag` holding `bytes` to `buf`.
fn append_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

#[test]
fn an_event_from_a_newer_schema_with_unknown_fields_decodes() {
    // A newer producer added field 50 to OrderPlaced and field 99 to the envelope
    // (additive changes keep schema_version 1). This build must read what it knows.
    let (_, payload) = every_event().remove(0);
    let Payload::OrderPlaced(placed) = payload.clone() else {
        unreachable!("the first example is OrderPlaced")
    };
    let mut placed_bytes = placed.encode_to_vec();
    append_field(&mut placed_bytes, 50, b"gift wrap, please");
    let mut bytes = EventEnvelope {
        payload: None,
        ..envelope::seal(meta(), payload.clone())
    }
    .encode_to_vec();
    append_field(&mut bytes, 20, &placed_bytes);
    append_field(&mut bytes, 99, b"a field from the future");

    let opened = envelope::open(&bytes).expect("a newer, additive schema still decodes");
    assert_eq!(opened.payload, payload);
    assert_eq!(opened.message_id, id(1));
}

#[test]
fn an_unknown_event_type_is_reported_by_name_not_dropped() {
    // A newer producer added `OrderShipped` as a payload field this build does not define.
    let mut bytes = EventEnvelope {
        event_type: "orderflow.events.v1.OrderShipped".into(),
        payload: None,
        ..envelope::seal(meta(), every_event().remove(0).1)
    }
    .encode_to_vec();
    append_field(&mut bytes, orderflow_tests::UNDEFINED_PAYLOAD_FIELD, b"\x0a\x05order");
    assert_eq!(
        envelope::open(&bytes),
        Err(ContractError::UnknownEventType {
            event_type: "orderflow.events.v1.OrderShipped".into()
        })
    );
}

#[test]
fn a_newer_major_schema_version_is_refused_not_guessed() {
    let mut sealed = envelope::seal(meta(), every_event().remove(0).1);
    sealed.schema_version = SUPPORTED_SCHEMA_VERSION + 1;
    assert_eq!(
        envelope::open(&sealed.encode_to_vec()),
        Err(ContractError::UnsupportedSchemaVersion {
            event_type: sealed.event_type.clone(),
            version: 2
        })
    );
    sealed.schema_version = 0;
    assert!(matches!(
        envelope::open(&sealed.encode_to_vec()),
        Err(ContractError::UnsupportedSchemaVersion { .. })
    ));
}

#[test]
fn malformed_envelopes_are_refused_with_a_reason() {
    assert!(matches!(
        envelope::open(b"\xff\xff\xff not protobuf"),
        Err(ContractError::Undecodable(_))
    ));

    let mut wrong_type = envelope::seal(meta(), every_event().remove(0).1);
    wrong_type.event_type = "orderflow.events.v1.PaymentFailed".into();
    assert!(matches!(
        envelope::open(&wrong_type.encode_to_vec()),
        Err(ContractError::EventTypeMismatch { .. })
    ));

    let mut no_id = envelope::seal(meta(), every_event().remove(0).1);
    no_id.message_id = String::new();
    assert_eq!(
        envelope::open(&no_id.encode_to_vec()),
        Err(ContractError::InvalidField("message_id"))
    );

    let mut nil_order = envelope::seal(meta(), every_event().remove(0).1);
    nil_order.aggregate_id = uuid::Uuid::nil().to_string();
    assert_eq!(
        envelope::open(&nil_order.encode_to_vec()),
        Err(ContractError::InvalidField("aggregate_id"))
    );
}
