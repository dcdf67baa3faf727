//! The order aggregate, pure and synchronous: no database, broker or gRPC types here.
//!
//! `decide(&state, command)` says which events a command causes (or why it is refused);
//! `apply(state, event)` is the state those events lead to. The edges (gRPC, the event
//! consumers) parse wire types into the newtypes below before anything reaches `decide`.

mod values;

pub use orderflow::money::{Currency, Money};
pub use values::{CustomerId, LineItem, OrderId, PaymentToken, Quantity, Sku, ValueError, parse_currency};

use orderflow::stored_names;

stored_names! {
    /// Business status of an order.
    pub enum OrderStatus {
        /// Accepted; payment not settled.
        Pending = "PENDING",
        /// Paid; handed to fulfilment.
        Confirmed = "CONFIRMED",
        /// Cancelled; nothing is charged.
        Cancelled = "CANCELLED",
    }
}

stored_names! {
    /// Where the order is in the checkout saga.
    pub enum SagaState {
        /// OrderPlaced emitted; waiting for the payment outcome.
        AwaitingPayment = "AWAITING_PAYMENT",
        /// Confirmed; capture requested.
        Completed = "COMPLETED",
        /// Cancelled and compensated.
        Compensated = "COMPENSATED",
    }
}

stored_names! {
    /// Why an order was cancelled.
    pub enum CancellationReason {
        /// The payment was declined or failed.
        PaymentFailed = "PAYMENT_FAILED",
        /// No payment outcome arrived before the saga deadline.
        PaymentTimeout = "PAYMENT_TIMEOUT",
        /// The customer asked (a reason of the published language; this service does not
        /// decide it yet, its read model records it from the events).
        CustomerRequest = "CUSTOMER_REQUEST",
    }
}

stored_names! {
    /// Where the order's money is, as the payment service's events tell (the read model's
    /// view; the payment service's own states are its own).
    pub enum PaymentState {
        /// Authorized, not yet settled.
        Authorized = "AUTHORIZED",
        /// The authorization failed or was declined.
        Failed = "FAILED",
        /// Captured: the money is taken.
        Captured = "CAPTURED",
        /// Voided: the authorization is released.
        Voided = "VOIDED",
    }
}

/// An order as the aggregate knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Identity.
    pub id: OrderId,
    /// Who ordered.
    pub customer_id: CustomerId,
    /// What.
    pub items: Vec<LineItem>,
    /// The sum of the items.
    pub total: Money,
    /// The card token to charge.
    pub payment_token: PaymentToken,
    /// Business status.
    pub status: OrderStatus,
    /// Saga position.
    pub saga_state: SagaState,
    /// Incremented by every state change; guards compare-and-set updates.
    pub version: i64,
}

/// The most lines one order may have: a bound on message size and on work per request.
pub const MAX_ITEMS: usize = 100;

/// A request to place an order, already parsed into domain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceOrder {
    /// The id the new order will have (chosen by the caller, UUIDv7).
    pub order_id: OrderId,
    /// Who orders.
    pub customer_id: CustomerId,
    /// What.
    pub items: Vec<LineItem>,
    /// The total the client expects to pay.
    pub declared_total: Money,
    /// The card token.
    pub payment_token: PaymentToken,
    /// The largest total allowed in the order's currency, in minor units (the operator's
    /// [`orderflow::money::TotalLimits`], resolved at the edge).
    pub max_total_minor: i64,
}

/// Commands the aggregate understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Place a new order.
    Place(PlaceOrder),
    /// The payment service authorized the order's money.
    RecordPaymentAuthorized {
        /// The payment.
        payment_id: String,
    },
    /// The payment service could not get the money.
    RecordPaymentFailed {
        /// The gateway's explanation.
        detail: String,
    },
    /// The saga deadline passed (the sweeper).
    Expire {
        /// How long the order waited.
        waited_secs: u64,
    },
}

/// Facts the aggregate records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An order was accepted and awaits payment.
    Placed {
        /// The order as placed.
        order: Order,
    },
    /// Payment authorized: the order is confirmed and goes to fulfilment.
    Confirmed {
        /// The payment.
        payment_id: String,
    },
    /// The order is cancelled; any authorization must be voided.
    Cancelled {
        /// Why.
        reason: CancellationReason,
        /// Detail for people.
        detail: String,
    },
}

/// Why a command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// An order needs at least one item.
    #[error("an order needs at least one item")]
    NoItems,
    /// Too many lines.
    #[error("an order has at most {MAX_ITEMS} items")]
    TooManyItems,
    /// An item is priced in another currency than the order total.
    #[error("item {index} is priced in {found}, the order in {expected}")]
    CurrencyMismatch {
        /// Which item.
        index: usize,
        /// The order's currency.
        expected: &'static str,
        /// The item's currency.
        found: &'static str,
    },
    /// A line or the total does not fit in 64 bits of minor units.
    #[error("the order total overflows")]
    TotalOverflow,
    /// The total is above the limit of its currency.
    #[error("the order total must be at most {max} minor units")]
    TotalTooLarge {
        /// The limit, in minor units.
        max: i64,
    },
    /// The client's total is not the sum of the items.
    #[error("declared total {declared} does not match the items' sum {computed}")]
    TotalMismatch {
        /// What the client said.
        declared: i64,
        /// What the items add up to.
        computed: i64,
    },
    /// The order exists already.
    #[error("the order already exists")]
    AlreadyExists,
    /// A command that needs an existing order found none.
    #[error("no such order")]
    NotFound,
}

/// Decides what a command does to an order (`None`: the order does not exist yet).
pub fn decide(state: Option<&Order>, command: Command) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::Place(place) => {
            if state.is_some() {
                return Err(DomainError::AlreadyExists);
            }
            let total = checked_total(&place.items, place.declared_total.currency())?;
            if total != place.declared_total {
                return Err(DomainError::TotalMismatch {
                    declared: place.declared_total.amount_minor(),
                    computed: total.amount_minor(),
                });
            }
            if total.amount_minor() > place.max_total_minor {
                return Err(DomainError::TotalTooLarge {
                    max: place.max_total_minor,
                });
            }
            Ok(vec![Event::Placed {
                order: Order {
                    id: place.order_id,
                    customer_id: place.customer_id,
                    items: place.items,
                    total,
                    payment_token: place.payment_token,
                    status: OrderStatus::Pending,
                    saga_state: SagaState::AwaitingPayment,
                    version: 0,
                },
            }])
        }
        // A payment outcome or the deadline only ever moves a PENDING order. Anything that
        // arrives once the order is terminal (a late, duplicate or out-of-order event, a
        // second sweeper) changes nothing: the caller records it and moves on. A late
        // authorization of a cancelled order is voided by the payment service, which sees
        // the OrderCancelled after it on the same partition.
        Command::RecordPaymentAuthorized { payment_id } => match state {
            None => Err(DomainError::NotFound),
            Some(order) if order.status == OrderStatus::Pending => Ok(vec![Event::Confirmed { payment_id }]),
            Some(_) => Ok(vec![]),
        },
        Command::RecordPaymentFailed { detail } => match state {
            None => Err(DomainError::NotFound),
            Some(order) if order.status == OrderStatus::Pending => Ok(vec![Event::Cancelled {
                reason: CancellationReason::PaymentFailed,
                detail,
            }]),
            Some(_) => Ok(vec![]),
        },
        Command::Expire { waited_secs } => match state {
            None => Err(DomainError::NotFound),
            Some(order) if order.status == OrderStatus::Pending => Ok(vec![Event::Cancelled {
                reason: CancellationReason::PaymentTimeout,
                detail: format!("no payment outcome after {waited_secs} s"),
            }]),
            Some(_) => Ok(vec![]),
        },
    }
}

/// The state after an event. Every change after placement bumps the version, which the
/// store uses for compare-and-set.
pub fn apply(state: Option<Order>, event: Event) -> Option<Order> {
    match (state, event) {
        (_, Event::Placed { order }) => Some(order),
        (Some(order), Event::Confirmed { .. }) => Some(Order {
            status: OrderStatus::Confirmed,
            saga_state: SagaState::Completed,
            version: order.version + 1,
            ..order
        }),
        (Some(order), Event::Cancelled { .. }) => Some(Order {
            status: OrderStatus::Cancelled,
            saga_state: SagaState::Compensated,
            version: order.version + 1,
            ..order
        }),
        (None, _) => None,
    }
}

/// Sums the items in `currency`, refusing empty, oversized, mixed-currency or overflowing orders.
fn checked_total(items: &[LineItem], currency: Currency) -> Result<Money, DomainError> {
    if items.is_empty() {
        return Err(DomainError::NoItems);
    }
    if items.len() > MAX_ITEMS {
        return Err(DomainError::TooManyItems);
    }
    let mut sum: i64 = 0;
    for (index, item) in items.iter().enumerate() {
        if item.unit_price.currency() != currency {
            return Err(DomainError::CurrencyMismatch {
                index,
                expected: currency.code(),
                found: item.unit_price.currency().code(),
            });
        }
        let line = item
            .unit_price
            .amount_minor()
            .checked_mul(i64::from(item.quantity.get()))
            .ok_or(DomainError::TotalOverflow)?;
        sum = sum.checked_add(line).ok_or(DomainError::TotalOverflow)?;
    }
    Money::new(sum, currency).map_err(|_| DomainError::TotalOverflow)
}

#[cfg(test)]
mod tests;
