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

orderflow::stored_names! {
    /// A payment's state, as stored. Three are *pending*: a call to the gateway is owed
    /// (recorded before it is made, finished by the executor); the others are settled for
    /// now. The migration's CHECK and the pending index list the same names (a unit test
    /// holds them together).
    pub enum PaymentState {
        /// An authorization is owed (the intent, committed before the call).
        Authorizing = "AUTHORIZING",
        /// Money reserved.
        Authorized = "AUTHORIZED",
        /// The gateway declined (or refused the request).
        Failed = "FAILED",
        /// A capture is owed.
        Capturing = "CAPTURING",
        /// Money taken.
        Captured = "CAPTURED",
        /// A void is owed: of the authorization on record, or (none on record) of whatever
        /// the order's authorize key made.
        Voiding = "VOIDING",
        /// Reservation released.
        Voided = "VOIDED",
        /// The order was cancelled before any payment was made: never charge it.
        CancelledBeforeAuthorization = "CANCELLED_BEFORE_AUTHORIZATION",
    }
}

impl PaymentState {
    /// Whether a gateway call is owed in this state.
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Authorizing | Self::Capturing | Self::Voiding)
    }

    /// The names of the pending states (for the executor's claim).
    pub fn pending_names() -> Vec<&'static str> {
        Self::ALL
            .iter()
            .copied()
            .filter(|state| state.is_pending())
            .map(Self::as_str)
            .collect()
    }
}

/// What an order event asks of the payment on record. Each is recorded in the message's
/// transaction; the gateway is called afterwards, outside any transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Record a new payment, AUTHORIZING: an authorization is owed.
    Authorize,
    /// AUTHORIZED → CAPTURING.
    Capture,
    /// AUTHORIZED or AUTHORIZING → VOIDING: release what is (or may be) reserved.
    Void,
    /// No payment on record for a cancelled order: record one, VOIDING, that releases whatever
    /// the authorize key made (nothing, usually) and closes the key.
    VoidUnrecorded,
    /// Nothing to do (already done, or nothing to undo).
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

/// OrderConfirmed: capture the authorization. (The order service confirms only after
/// PaymentAuthorized, which is written with AUTHORIZED: a confirmation finding the payment
/// still AUTHORIZING did not come from it.)
pub fn on_order_confirmed(payment: Option<PaymentState>) -> Action {
    match payment {
        Some(PaymentState::Authorized) => Action::Capture,
        Some(PaymentState::Capturing | PaymentState::Captured) => Action::Nothing,
        None | Some(PaymentState::Authorizing) => Action::Refuse("order confirmed without an authorization on record"),
        Some(PaymentState::Failed | PaymentState::CancelledBeforeAuthorization) => {
            Action::Refuse("order confirmed but its payment failed or was cancelled")
        }
        Some(PaymentState::Voiding | PaymentState::Voided) => {
            Action::Refuse("order confirmed after its authorization was voided")
        }
    }
}

/// OrderCancelled: release the money if any is (or may be) reserved; remember the
/// cancellation if no payment exists yet.
pub fn on_order_cancelled(payment: Option<PaymentState>) -> Action {
    match payment {
        None => Action::VoidUnrecorded,
        Some(PaymentState::Authorized | PaymentState::Authorizing) => Action::Void,
        Some(
            PaymentState::Failed
            | PaymentState::Voiding
            | PaymentState::Voided
            | PaymentState::CancelledBeforeAuthorization,
        ) => Action::Nothing,
        Some(PaymentState::Capturing | PaymentState::Captured) => {
            Action::Refuse("order cancelled after capture: a refund is needed")
        }
    }
}

/// What the gateway answered to a pending payment's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Authorize: the money is reserved.
    Approved {
        /// The gateway's id of the authorization.
        authorization_id: String,
    },
    /// Authorize: the issuer declined.
    Declined {
        /// Why.
        reason: String,
    },
    /// Capture or void: done.
    Done,
    /// The gateway refused the request itself (invalid, or impossible in its state).
    Refused {
        /// Why.
        reason: String,
    },
}

/// The event a settled payment tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// PaymentAuthorized.
    Authorized,
    /// PaymentFailed, declined.
    Declined,
    /// PaymentFailed, the gateway refused the request.
    Refused,
    /// PaymentCaptured.
    Captured,
    /// PaymentVoided.
    Voided,
}

/// Where an answer takes a pending payment: its new state and the event that tells it, if
/// any. None: the answer settles nothing (a capture or void the gateway refuses needs an
/// operator; the payment stays pending, parked). `charged` says whether the payment was an
/// order's charge (false for the placeholder of a cancellation that came first).
pub fn settle(from: PaymentState, answer: &Answer, charged: bool) -> Option<(PaymentState, Option<Told>)> {
    use PaymentState::{
        Authorized, Authorizing, CancelledBeforeAuthorization, Captured, Capturing, Failed, Voided, Voiding,
    };
    match (from, answer) {
        (Authorizing, Answer::Approved { .. }) => Some((Authorized, Some(Told::Authorized))),
        (Authorizing, Answer::Declined { .. }) => Some((Failed, Some(Told::Declined))),
        (Authorizing, Answer::Refused { .. }) => Some((Failed, Some(Told::Refused))),
        (Capturing, Answer::Done) => Some((Captured, Some(Told::Captured))),
        (Voiding, Answer::Done) if charged => Some((Voided, Some(Told::Voided))),
        (Voiding, Answer::Done) => Some((CancelledBeforeAuthorization, None)),
        _ => None,
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
        for &state in PaymentState::ALL {
            assert_eq!(on_order_placed(Some(state)), Action::Nothing, "{state:?}");
        }
    }

    #[test]
    fn a_cancellation_voids_reserved_money_and_remembers_itself() {
        assert_eq!(on_order_cancelled(None), Action::VoidUnrecorded);
        assert_eq!(on_order_cancelled(Some(PaymentState::Authorized)), Action::Void);
        // An authorization still owed may be made by a call in flight: voided by its key.
        assert_eq!(on_order_cancelled(Some(PaymentState::Authorizing)), Action::Void);
        assert_eq!(on_order_cancelled(Some(PaymentState::Voided)), Action::Nothing);
        assert_eq!(on_order_cancelled(Some(PaymentState::Voiding)), Action::Nothing);
        assert!(matches!(
            on_order_cancelled(Some(PaymentState::Capturing)),
            Action::Refuse(_)
        ));
        assert!(matches!(
            on_order_cancelled(Some(PaymentState::Captured)),
            Action::Refuse(_)
        ));
    }

    #[test]
    fn a_confirmation_captures_only_an_authorization() {
        assert_eq!(on_order_confirmed(Some(PaymentState::Authorized)), Action::Capture);
        assert_eq!(on_order_confirmed(Some(PaymentState::Captured)), Action::Nothing);
        assert_eq!(on_order_confirmed(Some(PaymentState::Capturing)), Action::Nothing);
        assert!(matches!(on_order_confirmed(None), Action::Refuse(_)));
        assert!(matches!(
            on_order_confirmed(Some(PaymentState::Authorizing)),
            Action::Refuse(_)
        ));
        assert!(matches!(
            on_order_confirmed(Some(PaymentState::Voided)),
            Action::Refuse(_)
        ));
    }

    #[test]
    fn an_answer_settles_only_the_call_it_answers() {
        let approved = Answer::Approved {
            authorization_id: "a".into(),
        };
        assert_eq!(
            settle(PaymentState::Authorizing, &approved, true),
            Some((PaymentState::Authorized, Some(Told::Authorized)))
        );
        assert_eq!(
            settle(PaymentState::Capturing, &Answer::Done, true),
            Some((PaymentState::Captured, Some(Told::Captured)))
        );
        assert_eq!(
            settle(PaymentState::Voiding, &Answer::Done, true),
            Some((PaymentState::Voided, Some(Told::Voided)))
        );
        // The placeholder of a cancellation that came before any OrderPlaced tells nothing.
        assert_eq!(
            settle(PaymentState::Voiding, &Answer::Done, false),
            Some((PaymentState::CancelledBeforeAuthorization, None))
        );
        let refused = Answer::Refused { reason: "no".into() };
        assert_eq!(
            settle(PaymentState::Authorizing, &refused, true),
            Some((PaymentState::Failed, Some(Told::Refused)))
        );
        // A capture or void the gateway refuses is left for an operator.
        assert_eq!(settle(PaymentState::Capturing, &refused, true), None);
        assert_eq!(settle(PaymentState::Voiding, &refused, true), None);
        // An answer for a payment that is not pending any more changes nothing.
        assert_eq!(settle(PaymentState::Authorized, &approved, true), None);
    }

    #[test]
    fn the_stored_names_are_the_migrations_names() {
        let check = include_str!("../../migrations/payments/0008_payment_intents.sql");
        for &state in PaymentState::ALL {
            assert!(
                check.contains(&format!("'{}'", state.as_str())),
                "{state:?} missing from the migration"
            );
            assert_eq!(PaymentState::parse(state.as_str()), Some(state));
        }
        assert_eq!(PaymentState::pending_names(), ["AUTHORIZING", "CAPTURING", "VOIDING"]);
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
