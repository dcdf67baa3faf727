//! What the payment service does for each order event, given the payment it has on record.
//! Pure: the handler loads the state, asks here, and carries the answer out.

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
mod tests {
    use super::*;

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
}
