//! Wire ↔ domain conversion. Parsing collects every violation, so a client fixes its
//! request in one round trip.

use orderflow::orders::v1 as wire;

use super::{ApiError, FieldViolation};
use crate::domain::{
    CancellationReason, CustomerId, DomainError, LineItem, MAX_ITEMS, Money, OrderId, PaymentToken, PlaceOrder,
    Quantity, Sku, ValueError, parse_currency,
};
use crate::store::{OrderRecord, OrderView};
use orderflow::money::TotalLimits;
use orderflow_platform::outbox::timestamp;

/// The longest accepted request_id (a UUID is 36 characters).
const MAX_REQUEST_ID_CHARS: usize = 36;

/// Keeps the value, or records why it is invalid under `field`.
fn field<T>(
    violations: &mut Vec<FieldViolation>,
    field: impl Into<String>,
    result: Result<T, ValueError>,
) -> Option<T> {
    result
        .map_err(|error| violations.push(FieldViolation::new(field, error)))
        .ok()
}

/// Parses a PlaceOrder request into its idempotency key and the domain command.
pub(super) fn parse_place_order(
    request: &wire::PlaceOrderRequest,
    order_id: OrderId,
    limits: &TotalLimits,
) -> Result<(Option<uuid::Uuid>, PlaceOrder), ApiError> {
    let mut violations = Vec::new();
    let v = &mut violations;

    let request_id = match request.request_id.as_str() {
        "" => None,
        raw => field(v, "request_id", parse_request_id(raw)),
    };
    let customer_id = field(v, "customer_id", CustomerId::parse(request.customer_id));
    let payment_token = field(v, "payment_token", PaymentToken::parse(&request.payment_token));
    let total = parse_money(v, request.total.as_ref(), "total");

    let mut items = Vec::with_capacity(request.items.len().min(MAX_ITEMS));
    if request.items.is_empty() {
        field(v, "items", Err::<(), _>(ValueError::Missing));
    } else if request.items.len() > MAX_ITEMS {
        v.push(FieldViolation::new(
            "items",
            format!("must have at most {MAX_ITEMS} items"),
        ));
    } else {
        for (index, item) in request.items.iter().enumerate() {
            let sku = field(
                v,
                format!("items[{index}].sku"),
                Sku::parse(&item.sku).map_err(ValueError::from),
            );
            let quantity = field(v, format!("items[{index}].quantity"), Quantity::parse(item.quantity));
            let unit_price = parse_money(v, item.unit_price.as_ref(), &format!("items[{index}].unit_price"));
            if let (Some(sku), Some(quantity), Some(unit_price)) = (sku, quantity, unit_price) {
                items.push(LineItem {
                    sku,
                    quantity,
                    unit_price,
                });
            }
        }
    }

    match (customer_id, payment_token, total) {
        (Some(customer_id), Some(payment_token), Some(declared_total)) if violations.is_empty() => Ok((
            request_id,
            PlaceOrder {
                order_id,
                customer_id,
                items,
                declared_total,
                payment_token,
                max_total_minor: limits.max_minor(declared_total.currency()),
            },
        )),
        _ => Err(ApiError::InvalidArgument(violations)),
    }
}

/// AIP-155: a request_id is a UUID.
fn parse_request_id(raw: &str) -> Result<uuid::Uuid, ValueError> {
    if raw.chars().count() > MAX_REQUEST_ID_CHARS {
        return Err(ValueError::TooLong(MAX_REQUEST_ID_CHARS));
    }
    uuid::Uuid::parse_str(raw)
        .ok()
        .filter(|id| !id.is_nil())
        .ok_or(ValueError::NotUuid)
}

fn parse_money(violations: &mut Vec<FieldViolation>, money: Option<&wire::Money>, name: &str) -> Option<Money> {
    let Some(money) = money else {
        return field(violations, name, Err(ValueError::Missing));
    };
    let currency = field(
        violations,
        format!("{name}.currency_code"),
        parse_currency(&money.currency_code),
    )?;
    field(
        violations,
        format!("{name}.amount_minor"),
        Money::new(money.amount_minor, currency).map_err(ValueError::from),
    )
}

/// Business-rule refusals, as field violations (or ALREADY_EXISTS).
pub(super) fn domain_error(error: DomainError) -> ApiError {
    let field = match &error {
        DomainError::NoItems | DomainError::TooManyItems => "items".to_owned(),
        DomainError::CurrencyMismatch { index, .. } => {
            format!("items[{index}].unit_price.currency_code")
        }
        DomainError::TotalOverflow => "total.amount_minor".to_owned(),
        DomainError::TotalMismatch { .. } | DomainError::TotalTooLarge { .. } => "total.amount_minor".to_owned(),
        DomainError::AlreadyExists => return ApiError::AlreadyExists(error.to_string()),
        DomainError::NotFound => return ApiError::NotFound(error.to_string()),
    };
    ApiError::InvalidArgument(vec![FieldViolation::new(field, error)])
}

pub(super) fn wire_money(money: Money) -> wire::Money {
    money.to_wire()
}

pub(super) fn wire_item(item: &LineItem) -> wire::OrderItem {
    wire::OrderItem {
        sku: item.sku.as_str().to_owned(),
        quantity: item.quantity.get(),
        unit_price: Some(wire_money(item.unit_price)),
    }
}

pub(super) fn wire_order(record: &OrderRecord) -> wire::Order {
    let order = &record.order;
    wire::Order {
        order_id: order.id.to_string(),
        customer_id: order.customer_id.get(),
        items: order.items.iter().map(wire_item).collect(),
        total: Some(wire_money(order.total)),
        status: wire::OrderStatus::from(order.status) as i32,
        saga_state: wire::SagaState::from(order.saga_state) as i32,
        cancellation_reason: wire_reason(record.cancellation_reason) as i32,
        version: order.version,
        correlation_id: record.correlation_id.to_string(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        payment_state: wire::PaymentState::Unspecified as i32,
        last_event_type: String::new(),
        history: Vec::new(),
    }
}

/// A cancellation reason on the wire; none is UNSPECIFIED (the field's absent value).
fn wire_reason(reason: Option<CancellationReason>) -> wire::CancellationReason {
    reason.map_or(wire::CancellationReason::Unspecified, wire::CancellationReason::from)
}

/// The read model's view of an order, on the wire: what is stored, nothing defaulted
/// (the store refused a row it could not read).
pub(super) fn wire_order_view(view: &OrderView) -> wire::Order {
    let currency = view.currency_code.clone().unwrap_or_default();
    let money = |amount_minor: i64| {
        Some(wire::Money {
            amount_minor,
            currency_code: currency.clone(),
        })
    };
    let items = view
        .items
        .iter()
        .map(|item| wire::OrderItem {
            sku: item.sku.clone(),
            quantity: item.quantity,
            unit_price: money(item.unit_price_minor),
        })
        .collect();
    let history = view
        .history
        .iter()
        .map(|entry| wire::OrderHistoryEntry {
            event_type: entry.event_type.clone(),
            occurred_at: Some(timestamp(entry.occurred_at)),
            message_id: entry.message_id.clone(),
        })
        .collect();
    wire::Order {
        order_id: view.order_id.to_string(),
        customer_id: view.customer_id.unwrap_or_default(),
        items,
        total: view.total_minor.and_then(money),
        status: wire::OrderStatus::from(view.status) as i32,
        saga_state: wire::SagaState::from(view.saga_state) as i32,
        cancellation_reason: wire_reason(view.cancellation_reason) as i32,
        version: view.version,
        correlation_id: view.correlation_id.map(|id| id.to_string()).unwrap_or_default(),
        created_at: view.placed_at.map(timestamp),
        updated_at: Some(timestamp(view.updated_at)),
        payment_state: view
            .payment_state
            .map_or(wire::PaymentState::Unspecified, wire::PaymentState::from) as i32,
        last_event_type: view.last_event_type.clone(),
        history,
    }
}

/// Property tests of the PlaceOrder edge with arbitrary requests (structured, and decoded
/// from arbitrary bytes): never a panic; always either a command `decide` accepts or
/// refuses with a field violation, or INVALID_ARGUMENT naming fields of the request.
/// `scripts/test` runs them with many more cases than the default (`PROPTEST_CASES`).
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::domain::{Command, decide};
    use proptest::prelude::*;
    use prost::Message as _;

    const FIELDS: &[&str] = &["request_id", "customer_id", "payment_token", "total", "items"];

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[A-Z]{3}",
            "[a-zA-Z0-9_-]{1,70}",
            Just("EUR".to_owned()),
            Just("E\0R".to_owned()),
        ]
    }

    fn money() -> impl Strategy<Value = Option<wire::Money>> {
        proptest::option::of((prop_oneof![any::<i64>(), 1i64..100_000], text()).prop_map(
            |(amount_minor, currency_code)| wire::Money {
                amount_minor,
                currency_code,
            },
        ))
    }

    fn request() -> impl Strategy<Value = wire::PlaceOrderRequest> {
        let item = (text(), prop_oneof![any::<i32>(), 1i32..5], money()).prop_map(|(sku, quantity, unit_price)| {
            wire::OrderItem {
                sku,
                quantity,
                unit_price,
            }
        });
        (
            text(),
            any::<i64>(),
            proptest::collection::vec(item, 0..120),
            money(),
            text(),
        )
            .prop_map(
                |(request_id, customer_id, items, total, payment_token)| wire::PlaceOrderRequest {
                    request_id,
                    customer_id,
                    items,
                    total,
                    payment_token,
                },
            )
    }

    fn check(request: &wire::PlaceOrderRequest) {
        let limits = TotalLimits::default();
        match parse_place_order(request, OrderId::generate(), &limits) {
            Ok((_, command)) => {
                if let Err(error) = decide(None, Command::Place(command)) {
                    assert!(matches!(domain_error(error), ApiError::InvalidArgument(v) if !v.is_empty()));
                }
            }
            Err(ApiError::InvalidArgument(violations)) => {
                assert!(!violations.is_empty());
                for violation in violations {
                    assert!(
                        FIELDS.iter().any(|f| violation.field.starts_with(f)),
                        "unknown field path {:?}",
                        violation.field
                    );
                }
            }
            Err(other) => panic!("parsing answered {other:?}, not INVALID_ARGUMENT"),
        }
    }

    proptest! {
        #[test]
        fn fuzz_structured_requests_are_commands_or_invalid_argument(request in request()) {
            check(&request);
        }

        #[test]
        fn fuzz_arbitrary_bytes_decode_to_a_request_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(request) = wire::PlaceOrderRequest::decode(bytes.as_slice()) {
                check(&request);
            }
        }
    }
}
