//! The order events' side of payment-svc (consumer group `payment`): each event records what
//! it asks of the gateway as a *pending* payment, in the message's unit of work, and nothing
//! else. No gateway call here: the executor ([`crate::executor`]) makes it once this commits.
//!
//! Failure windows: dying before the unit commits, nothing of it exists and the message is
//! redelivered; dying after, the pending payment is durable and the redelivery is a duplicate
//! (inbox): the executor of any instance finishes it (its claim is due at once).

use std::collections::HashMap;
use std::sync::Arc;

use orderflow::envelope::OpenedEvent;
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::consumer::{Fresh, Handler, HandlerError};
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;

use crate::domain::{self, Action, PaymentState};

/// The name this consumer records in its inbox.
pub const INBOX: &str = "payment";

type Tx = Transaction<'static, Postgres>;

/// Records the gateway calls the order events ask for.
pub struct PaymentHandler {
    limits: orderflow::money::TotalLimits,
    /// Wakes the executor once a unit with new pending payments committed.
    executor: Arc<Notify>,
}

impl PaymentHandler {
    /// A handler that refuses orders above `limits` and wakes `executor` after each commit.
    pub fn new(limits: orderflow::money::TotalLimits, executor: Arc<Notify>) -> Self {
        Self { limits, executor }
    }
}

/// Who asked for a pending call: the answer's event is caused by it.
struct Cause {
    correlation_id: uuid::Uuid,
    causation_id: uuid::Uuid,
    traceparent: Option<String>,
}

impl Cause {
    fn of(fresh: &Fresh<'_>) -> Self {
        Self {
            correlation_id: fresh.event.correlation_id,
            causation_id: fresh.event.message_id,
            // The consume span (a child of the producer's) continues the order's trace.
            traceparent: fresh
                .span
                .in_scope(orderflow_platform::telemetry::current_traceparent)
                .or_else(|| fresh.event.traceparent.clone()),
        }
    }
}

/// New payments, one element per order, for one insert.
#[derive(Default)]
struct NewPayments {
    order_id: Vec<uuid::Uuid>,
    payment_id: Vec<uuid::Uuid>,
    amount_minor: Vec<i64>,
    currency_code: Vec<String>,
    state: Vec<&'static str>,
    payment_token: Vec<Option<String>>,
    correlation_id: Vec<uuid::Uuid>,
    causation_id: Vec<uuid::Uuid>,
    traceparent: Vec<Option<String>>,
}

impl NewPayments {
    fn push(&mut self, order_id: uuid::Uuid, charge: Option<&domain::Charge>, state: PaymentState, cause: Cause) {
        self.order_id.push(order_id);
        self.payment_id.push(uuid::Uuid::now_v7());
        // No charge: the placeholder of a cancellation that came first ("XXX": no currency).
        self.amount_minor.push(charge.map_or(0, |c| c.total.amount_minor()));
        self.currency_code
            .push(charge.map_or_else(|| "XXX".to_owned(), |c| c.total.currency().code().to_owned()));
        self.state.push(state.as_str());
        self.payment_token.push(charge.map(|c| c.payment_token.clone()));
        self.correlation_id.push(cause.correlation_id);
        self.causation_id.push(cause.causation_id);
        self.traceparent.push(cause.traceparent);
    }

    async fn insert(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        if self.order_id.is_empty() {
            return Ok(());
        }
        let expected = self.order_id.len() as u64;
        let inserted = sqlx::query(
            "INSERT INTO payments (order_id, payment_id, amount_minor, currency_code, state, payment_token,
                                   correlation_id, causation_id, traceparent)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[], $6::text[],
                                  $7::uuid[], $8::uuid[], $9::text[])
             ORDER BY 1 ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&self.order_id)
        .bind(&self.payment_id)
        .bind(&self.amount_minor)
        .bind(&self.currency_code)
        .bind(&self.state)
        .bind(&self.payment_token)
        .bind(&self.correlation_id)
        .bind(&self.causation_id)
        .bind(&self.traceparent)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted != expected {
            // The rows were read as missing in this transaction: only a concurrent consumer
            // of the same orders (which the group never has) could have made them. Try again.
            return Err(sqlx::Error::Protocol(format!(
                "{inserted} of {expected} payments inserted: some appeared concurrently"
            )));
        }
        Ok(())
    }
}

/// Payments moved to a pending state, one element per order, for one update.
#[derive(Default)]
struct Pending {
    order_id: Vec<uuid::Uuid>,
    from: Vec<&'static str>,
    to: Vec<&'static str>,
    correlation_id: Vec<uuid::Uuid>,
    causation_id: Vec<uuid::Uuid>,
    traceparent: Vec<Option<String>>,
}

impl Pending {
    fn push(&mut self, order_id: uuid::Uuid, from: PaymentState, to: PaymentState, cause: Cause) {
        self.order_id.push(order_id);
        self.from.push(from.as_str());
        self.to.push(to.as_str());
        self.correlation_id.push(cause.correlation_id);
        self.causation_id.push(cause.causation_id);
        self.traceparent.push(cause.traceparent);
    }

    async fn update(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        if self.order_id.is_empty() {
            return Ok(());
        }
        let expected = self.order_id.len() as u64;
        // A new pending call is due at once (lease NULL): an authorization still in flight
        // for an order cancelled meanwhile finds VOIDING when it records, and is dropped.
        let changed = sqlx::query(
            "UPDATE payments p SET state = u.to_state, correlation_id = u.correlation_id,
                    causation_id = u.causation_id, traceparent = u.traceparent, payment_token = NULL,
                    lease_until = NULL, attempts = 0, last_error = NULL,
                    version = p.version + 1, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::text[])
                  AS u(order_id, from_state, to_state, correlation_id, causation_id, traceparent)
             WHERE p.order_id = u.order_id AND p.state = u.from_state",
        )
        .bind(&self.order_id)
        .bind(&self.from)
        .bind(&self.to)
        .bind(&self.correlation_id)
        .bind(&self.causation_id)
        .bind(&self.traceparent)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if changed != expected {
            // Locked since they were read: cannot happen unless the locking is broken.
            return Err(sqlx::Error::Protocol(format!(
                "{changed} of {expected} payments changed: some moved concurrently"
            )));
        }
        Ok(())
    }
}

/// The payments of `order_ids` as they stand, locked for the rest of the unit of work (the
/// executor's recording and the overdue sweeper take the same locks), in the order of their
/// ids so that two transactions never wait on each other in a cycle.
async fn states(tx: &mut Tx, order_ids: &[uuid::Uuid]) -> Result<HashMap<uuid::Uuid, PaymentState>, HandlerError> {
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT order_id, state FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE")
            .bind(order_ids)
            .fetch_all(&mut **tx)
            .await?;
    rows.into_iter()
        .map(|(order_id, state)| {
            let parsed = PaymentState::parse(&state)
                .ok_or_else(|| HandlerError::Permanent(format!("stored payment state {state:?} is unknown")))?;
            Ok((order_id, parsed))
        })
        .collect()
}

impl Handler for PaymentHandler {
    fn inbox(&self) -> &'static str {
        INBOX
    }

    fn wants(&self, event: &OpenedEvent) -> bool {
        matches!(
            event.payload,
            Payload::OrderPlaced(_) | Payload::OrderConfirmed(_) | Payload::OrderCancelled(_)
        )
    }

    /// One message of each order (the runtime's rounds): one statement reads and locks their
    /// payments, each event is decided on its payment, then one insert and one update record
    /// every pending call.
    async fn handle(&self, tx: &mut Tx, batch: &[Fresh<'_>]) -> Result<(), (usize, HandlerError)> {
        let whole = batch.len();
        let order_ids: Vec<uuid::Uuid> = batch.iter().map(|fresh| fresh.event.aggregate_id).collect();
        let states = states(tx, &order_ids).await.map_err(|error| (whole, error))?;
        let mut new = NewPayments::default();
        let mut pending = Pending::default();
        for (at, fresh) in batch.iter().enumerate() {
            let order_id = fresh.event.aggregate_id;
            let state = states.get(&order_id).copied();
            let _entered = fresh.span.enter();
            let (action, charge) = match &fresh.event.payload {
                Payload::OrderPlaced(placed) => {
                    let charge = domain::parse_order_placed(placed, order_id, &self.limits)
                        .map_err(|why| (at, HandlerError::Permanent(why)))?;
                    (domain::on_order_placed(state), Some(charge))
                }
                Payload::OrderConfirmed(_) => (domain::on_order_confirmed(state), None),
                Payload::OrderCancelled(_) => (domain::on_order_cancelled(state), None),
                // `wants` lets no other event through.
                _ => continue,
            };
            match (action, state) {
                (Action::Authorize, _) => {
                    new.push(order_id, charge.as_ref(), PaymentState::Authorizing, Cause::of(fresh));
                }
                (Action::VoidUnrecorded, _) => new.push(order_id, None, PaymentState::Voiding, Cause::of(fresh)),
                (Action::Capture, Some(from)) => {
                    pending.push(order_id, from, PaymentState::Capturing, Cause::of(fresh))
                }
                (Action::Void, Some(from)) => pending.push(order_id, from, PaymentState::Voiding, Cause::of(fresh)),
                (Action::Refuse(why), _) => return Err((at, HandlerError::Permanent(why.into()))),
                (Action::Nothing | Action::Capture | Action::Void, _) => continue,
            }
            tracing::info!(action = ?action, "payment call recorded as owed");
        }
        new.insert(tx).await.map_err(|error| (whole, error.into()))?;
        pending.update(tx).await.map_err(|error| (whole, error.into()))?;
        Ok(())
    }

    fn committed(&self) {
        self.executor.notify_one();
    }
}
