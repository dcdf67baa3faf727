//! What the payment service does for each order event, given the payment it has on record.
//! Pure: the handler loads the state, asks here, and carries the answer out.
//!
//! The order events are parsed here first, like every request at every edge: the order
//! service validated the order, but anyone able to write to the topic (a bug, a replay
//! tool, an attacker) is not the order service, so nothing reaches the gateway unparsed.

use orderflow::events::v1::OrderPlaced;
use orderflow::money::{Money, TotalLimits};

/// The longest payment token (the order service's limit).
const MAX_TOKEN_CHARS: usize = 128;

/// What an `OrderPlaced` asks this service to charge, parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct Charge {
    /// The amount to authorize.
    pub total: Money,
    /// The gateway's token for the card.
    pub payment_token: String,
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charge")
            .field("total", &self.total)
            .field("payment_token", &"[redacted]")
            .finish()
    }
}

/// Parses `placed` (the event of order `order_id`); the error says why it can never be
/// charged (the message is dead-lettered with it).
pub fn parse_order_placed(placed: &OrderPlaced, order_id: uuid::Uuid, limits: &TotalLimits) -> Result<Charge, String> {
    if placed.order_id != order_id.to_string() {
        return Err(format!(
            "OrderPlaced names order {:?} but its envelope order {order_id}",
            placed.order_id
        ));
    }
    let total = placed
        .total
        .as_ref()
        .ok_or_else(|| "OrderPlaced without a total".to_owned())?;
    let total = Money::from_wire(total).map_err(|error| format!("OrderPlaced total: {error}"))?;
    if !limits.allows(total) {
        return Err(format!(
            "OrderPlaced total {} {} is above the limit {}",
            total.amount_minor(),
            total.currency().code(),
            limits.max_minor(total.currency())
        ));
    }
    orderflow::text::visible(&placed.payment_token, MAX_TOKEN_CHARS)
        .map_err(|error| format!("OrderPlaced payment_token {error}"))?;
    Ok(Charge {
        total,
        payment_token: placed.payment_token.clone(),
    })
}

/// A payment's state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentState {
    /// Money reserved.
    Authorized,
    /// The gateway declined.
    Failed,
    /// Money taken.
    Captured,
    /// Reservation released.
    Voided,
    /// The order was cancelled before any payment was attempted: never charge it.
    CancelledBeforeAuthorization,
}

impl PaymentState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => "AUTHORIZED",
            Self::Failed => "FAILED",
            Self::Captured => "CAPTURED",
            Self::Voided => "VOIDED",
            Self::CancelledBeforeAuthorization => "CANCELLED_BEFORE_AUTHORIZATION",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Authorized,
            Self::Failed,
            Self::Captured,
            Self::Voided,
            Self::CancelledBeforeAuthorization,
        ]
        .into_iter()
        .find(|state| state.as_str() == name)
    }
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Call the gateway to authorize.
    Authorize,
    /// Call the gateway to capture.
    Capture,
    /// Call the gateway to void.
    Void,
    /// Record that the order was cancelled before payment, so it is never charged.
    RecordCancellation,
    /// Nothing to do (already done, or nothing to undo); record the message as processed.
    Nothing,
    /// The event cannot be honoured in this state (dead-letter it for an operator).
    Refuse(&'static str),
}

/// OrderPlaced: authorize unless a payment (or a cancellation) is already on record.
pub fn on_order_placed(payment: Option<PaymentState>) -> Action {
    match payment {
        None => Action::Authorize,
        Some(_) => Action::Nothing,
    }
}

/// OrderConfirmed: capture the authorization.
pub fn on_order_confirmed(payment: Option<PaymentState>) -> Action {
    match payment {
        Some(PaymentState::Authorized) => Action::Capture,
        Some(PaymentState::Captured) => Action::Nothing,
        None => Action::Refuse("order confirmed without a payment on record"),
        Some(PaymentState::Failed | PaymentState::CancelledBeforeAuthorization) => {
            Action::Refuse("order confirmed but its payment failed or was cancelled")
        }
        Some(PaymentState::Voided) => Action::Refuse("order confirmed after its authorization was voided"),
    }
}

/// OrderCancelled: release the money if any is reserved; remember the cancellation if no
/// payment exists yet.
pub fn on_order_cancelled(payment: Option<PaymentState>) -> Action {
    match payment {
        None => Action::RecordCancellation,
        Some(PaymentState::Authorized) => Action::Void,
        Some(PaymentState::Failed | PaymentState::Voided | PaymentState::CancelledBeforeAuthorization) => {
            Action::Nothing
        }
        Some(PaymentState::Captured) => Action::Refuse("order cancelled after capture: a refund is needed"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn placed(order_id: uuid::Uuid, amount_minor: i64, currency_code: &str, token: &str) -> OrderPlaced {
        OrderPlaced {
            order_id: order_id.to_string(),
            customer_id: 1,
            items: vec![],
            total: Some(orderflow::orders::v1::Money {
                amount_minor,
                currency_code: currency_code.into(),
            }),
            payment_token: token.into(),
        }
    }

    #[test]
    fn only_a_valid_order_within_the_limit_is_ever_charged() {
        let id = uuid::Uuid::now_v7();
        let limits = TotalLimits::parse(1_000, "").unwrap();
        assert!(parse_order_placed(&placed(id, 100_000, "EUR", "tok_visa"), id, &limits).is_ok());
        for (bad, why) in [
            (placed(id, 100, "E\0R", "tok"), "currency"),
            (placed(id, 100_001, "EUR", "tok"), "limit"),
            (placed(id, i64::MAX, "EUR", "tok"), "limit"),
            (placed(id, -5, "EUR", "tok"), "positive"),
            (placed(id, 100, "EUR", "tok\u{2067}"), "payment_token"),
            (placed(id, 100, "EUR", ""), "payment_token"),
            (placed(uuid::Uuid::now_v7(), 100, "EUR", "tok"), "envelope"),
            (
                OrderPlaced {
                    total: None,
                    ..placed(id, 1, "EUR", "tok")
                },
                "without a total",
            ),
        ] {
            let error = parse_order_placed(&bad, id, &limits).unwrap_err();
            assert!(error.contains(why), "{error:?} should mention {why:?}");
        }
    }

    #[test]
    fn an_order_is_authorized_once_and_never_after_a_cancellation() {
        assert_eq!(on_order_placed(None), Action::Authorize);
        for state in [
            PaymentState::Authorized,
            PaymentState::Failed,
            PaymentState::Captured,
            PaymentState::Voided,
            PaymentState::CancelledBeforeAuthorization,
        ] {
            assert_eq!(on_order_placed(Some(state)), Action::Nothing, "{state:?}");
        }
    }

    #[test]
    fn a_cancellation_voids_reserved_money_and_remembers_itself() {
        assert_eq!(on_order_cancelled(None), Action::RecordCancellation);
        assert_eq!(on_order_cancelled(Some(PaymentState::Authorized)), Action::Void);
        assert_eq!(on_order_cancelled(Some(PaymentState::Voided)), Action::Nothing);
        assert!(matches!(
            on_order_cancelled(Some(PaymentState::Captured)),
            Action::Refuse(_)
        ));
    }

    #[test]
    fn a_confirmation_captures_only_an_authorization() {
        assert_eq!(on_order_confirmed(Some(PaymentState::Authorized)), Action::Capture);
        assert_eq!(on_order_confirmed(Some(PaymentState::Captured)), Action::Nothing);
        assert!(matches!(on_order_confirmed(None), Action::Refuse(_)));
        assert!(matches!(
            on_order_confirmed(Some(PaymentState::Voided)),
            Action::Refuse(_)
        ));
    }

    proptest::proptest! {
        /// Arbitrary OrderPlaced events (the topic is writable by more than the order
        /// service): never a panic, and a charge only within the limit, in a real currency,
        /// with a visible token. `scripts/test` runs it with many more cases.
        #[test]
        fn fuzz_order_placed_is_a_valid_charge_or_refused(
            amount_minor in proptest::prelude::any::<i64>(),
            currency_code in proptest::prop_oneof!["[A-Z]{3}", proptest::prelude::any::<String>()],
            token in proptest::prelude::any::<String>(),
        ) {
            let id = uuid::Uuid::now_v7();
            let limits = TotalLimits::default();
            if let Ok(charge) = parse_order_placed(&placed(id, amount_minor, &currency_code, &token), id, &limits) {
                proptest::prop_assert!(charge.total.amount_minor() > 0 && limits.allows(charge.total));
                proptest::prop_assert!(orderflow::text::visible(&charge.payment_token, MAX_TOKEN_CHARS).is_ok());
            }
        }
    }
}
