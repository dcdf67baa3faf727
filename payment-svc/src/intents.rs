//! The order events' side of payment-svc (consumer group `payment`): each event records what
//! it asks of the gateway as a *pending* payment, in the message's unit of work, and nothing
//! else. No gateway call here: the executor ([`crate::executor`]) makes it once this commits.
//! A pending payment is written already leased to this process and handed to its executor in
//! memory after the commit (no claim statement on the way).
//!
//! Failure windows: dying before the unit commits, nothing of it exists and the message is
//! redelivered; dying after, the pending payment is durable and the redelivery is a duplicate
//! (inbox): its lease lapses and the executor of any instance finishes it.

use std::collections::HashMap;
use std::time::Duration;

use orderflow::envelope::OpenedEvent;
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::consumer::{Fresh, Handler, HandlerError};
use sqlx::{Postgres, Transaction};

use crate::domain::{self, Action, PaymentState};
use crate::executor::{Handoff, Owed};

/// The name this consumer records in its inbox.
pub const INBOX: &str = "payment";

type Tx = Transaction<'static, Postgres>;

/// Records the gateway calls the order events ask for.
pub struct PaymentHandler {
    limits: orderflow::money::TotalLimits,
    /// How long this process's executor holds the payments handed to it.
    lease: Duration,
    /// The executor of this process.
    executor: Handoff,
}

impl PaymentHandler {
    /// A handler that refuses orders above `limits` and hands the calls owed to `executor`
    /// (leased to it for `lease`) after each commit.
    pub fn new(limits: orderflow::money::TotalLimits, lease: Duration, executor: Handoff) -> Self {
        Self {
            limits,
            lease,
            executor,
        }
    }
}

/// Who asked for a pending call: the answer's event is caused by it.
struct Cause {
    correlation_id: uuid::Uuid,
    causation_id: uuid::Uuid,
    traceparent: Option<String>,
    /// When the lease of the call it asks for lapses, at the earliest.
    held_until: tokio::time::Instant,
}

impl Cause {
    /// The call `payment` owes, asked by this cause.
    fn owed(&self, payment: Payment, state: PaymentState, token: Option<String>) -> Owed {
        Owed {
            order_id: payment.order_id,
            payment_id: payment.payment_id,
            state,
            authorization_id: payment.authorization_id,
            amount_minor: payment.amount_minor,
            currency_code: payment.currency_code,
            payment_token: token,
            correlation_id: self.correlation_id,
            causation_id: Some(self.causation_id),
            traceparent: self.traceparent.clone(),
            attempts: 1,
            held_until: self.held_until,
        }
    }

    fn of(fresh: &Fresh<'_>, held_until: tokio::time::Instant) -> Self {
        Self {
            held_until,
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
    /// A new payment of `order_id`, owing the call of `state`; returns that call.
    fn push(
        &mut self,
        order_id: uuid::Uuid,
        charge: Option<&domain::Charge>,
        state: PaymentState,
        cause: Cause,
    ) -> Owed {
        let payment = Payment {
            order_id,
            payment_id: uuid::Uuid::now_v7(),
            state,
            authorization_id: None,
            // No charge: the placeholder of a cancellation that came first ("XXX": no currency).
            amount_minor: charge.map_or(0, |c| c.total.amount_minor()),
            currency_code: charge.map_or_else(|| "XXX".to_owned(), |c| c.total.currency().code().to_owned()),
        };
        let token = charge.map(|c| c.payment_token.clone());
        self.order_id.push(order_id);
        self.payment_id.push(payment.payment_id);
        self.amount_minor.push(payment.amount_minor);
        self.currency_code.push(payment.currency_code.clone());
        self.state.push(state.as_str());
        self.payment_token.push(token.clone());
        self.correlation_id.push(cause.correlation_id);
        self.causation_id.push(cause.causation_id);
        self.traceparent.push(cause.traceparent.clone());
        cause.owed(payment, state, token)
    }

    async fn insert(self, tx: &mut Tx, lease: Duration) -> Result<(), sqlx::Error> {
        if self.order_id.is_empty() {
            return Ok(());
        }
        let expected = self.order_id.len() as u64;
        // Leased to this process's executor, its first lease counted: it is handed over in
        // memory after the commit, and claimed by anyone only once the lease lapses (counted
        // from now, not from the transaction's start).
        let inserted = sqlx::query(
            "INSERT INTO payments (order_id, payment_id, amount_minor, currency_code, state, payment_token,
                                   correlation_id, causation_id, traceparent, lease_until, attempts)
             SELECT o, p, a, c, s, t, co, ca, tp, clock_timestamp() + make_interval(secs => $10), 1
             FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::text[], $5::text[], $6::text[],
                         $7::uuid[], $8::uuid[], $9::text[]) AS u(o, p, a, c, s, t, co, ca, tp)
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
        .bind(lease.as_secs_f64())
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
    /// `payment` moves to the pending state `to`; returns the call it now owes.
    fn push(&mut self, payment: Payment, to: PaymentState, cause: Cause) -> Owed {
        self.order_id.push(payment.order_id);
        self.from.push(payment.state.as_str());
        self.to.push(to.as_str());
        self.correlation_id.push(cause.correlation_id);
        self.causation_id.push(cause.causation_id);
        self.traceparent.push(cause.traceparent.clone());
        let authorization_id = payment.authorization_id.clone();
        Owed {
            // An authorization still owed has none on record: the void names the authorize key.
            authorization_id,
            ..cause.owed(payment, to, None)
        }
    }

    async fn update(self, tx: &mut Tx, lease: Duration) -> Result<(), sqlx::Error> {
        if self.order_id.is_empty() {
            return Ok(());
        }
        let expected = self.order_id.len() as u64;
        // The new call is leased to this process's executor, which gets it after the commit:
        // an authorization still in flight for an order cancelled meanwhile finds VOIDING
        // when it records, and is dropped.
        let changed = sqlx::query(
            "UPDATE payments p SET state = u.to_state, correlation_id = u.correlation_id,
                    causation_id = u.causation_id, traceparent = u.traceparent, payment_token = NULL,
                    lease_until = clock_timestamp() + make_interval(secs => $7), attempts = 1, last_error = NULL,
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
        .bind(lease.as_secs_f64())
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

/// A payment as stored, as far as a new call needs it.
struct Payment {
    order_id: uuid::Uuid,
    payment_id: uuid::Uuid,
    state: PaymentState,
    authorization_id: Option<String>,
    amount_minor: i64,
    currency_code: String,
}

/// The payments of `order_ids` as they stand, locked for the rest of the unit of work (the
/// executor's recording and the overdue sweeper take the same locks), in the order of their
/// ids so that two transactions never wait on each other in a cycle.
async fn load(tx: &mut Tx, order_ids: &[uuid::Uuid]) -> Result<HashMap<uuid::Uuid, Payment>, HandlerError> {
    type Row = (uuid::Uuid, uuid::Uuid, String, Option<String>, i64, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT order_id, payment_id, state, authorization_id, amount_minor, currency_code
         FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
    )
    .bind(order_ids)
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(
            |(order_id, payment_id, state, authorization_id, amount_minor, currency_code)| {
                let state = PaymentState::parse(&state)
                    .ok_or_else(|| HandlerError::Permanent(format!("stored payment state {state:?} is unknown")))?;
                let payment = Payment {
                    order_id,
                    payment_id,
                    state,
                    authorization_id,
                    amount_minor,
                    currency_code: currency_code.trim().to_owned(),
                };
                Ok((order_id, payment))
            },
        )
        .collect()
}

/// Of calls owed in turn, the last one of each order, in their order.
fn last_of_each_order(owed: Vec<Owed>) -> Vec<Owed> {
    let mut seen = std::collections::HashSet::new();
    let mut last: Vec<Owed> = owed
        .into_iter()
        .rev()
        .filter(|call| seen.insert(call.order_id))
        .collect();
    last.reverse();
    last
}

impl Handler for PaymentHandler {
    type Committed = Owed;

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
    async fn handle(&self, tx: &mut Tx, batch: &[Fresh<'_>]) -> Result<Vec<Owed>, (usize, HandlerError)> {
        let whole = batch.len();
        // Taken before the statements that lease the calls: the database's leases end later.
        let held_until = tokio::time::Instant::now() + self.lease;
        let order_ids: Vec<uuid::Uuid> = batch.iter().map(|fresh| fresh.event.aggregate_id).collect();
        let mut payments = load(tx, &order_ids).await.map_err(|error| (whole, error))?;
        let mut new = NewPayments::default();
        let mut pending = Pending::default();
        let mut owed = Vec::new();
        for (at, fresh) in batch.iter().enumerate() {
            let order_id = fresh.event.aggregate_id;
            let state = payments.get(&order_id).map(|p| p.state);
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
            let call = match (action, payments.remove(&order_id)) {
                (Action::Authorize, _) => new.push(
                    order_id,
                    charge.as_ref(),
                    PaymentState::Authorizing,
                    Cause::of(fresh, held_until),
                ),
                (Action::VoidUnrecorded, _) => {
                    new.push(order_id, None, PaymentState::Voiding, Cause::of(fresh, held_until))
                }
                (Action::Capture, Some(payment)) => {
                    pending.push(payment, PaymentState::Capturing, Cause::of(fresh, held_until))
                }
                (Action::Void, Some(payment)) => {
                    pending.push(payment, PaymentState::Voiding, Cause::of(fresh, held_until))
                }
                (Action::Refuse(why), _) => return Err((at, HandlerError::Permanent(why.into()))),
                (Action::Nothing | Action::Capture | Action::Void, _) => continue,
            };
            tracing::debug!(action = ?action, "payment call recorded as owed");
            owed.push(call);
        }
        new.insert(tx, self.lease)
            .await
            .map_err(|error| (whole, error.into()))?;
        pending
            .update(tx, self.lease)
            .await
            .map_err(|error| (whole, error.into()))?;
        Ok(owed)
    }

    /// Hands the committed calls to this process's executor (no statement: they are leased
    /// to it already). A unit holding two events of one order (OrderPlaced, then
    /// OrderCancelled) made two calls owed in turn; only the last one is owed now.
    fn committed(&self, owed: Vec<Owed>) {
        self.executor.give(last_of_each_order(owed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(order_id: uuid::Uuid, state: PaymentState) -> Owed {
        Owed {
            order_id,
            payment_id: order_id,
            state,
            authorization_id: None,
            amount_minor: 1,
            currency_code: "EUR".into(),
            payment_token: None,
            correlation_id: order_id,
            causation_id: None,
            traceparent: None,
            attempts: 1,
            held_until: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn of_two_calls_of_one_order_in_a_unit_only_the_last_is_owed() {
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let owed = last_of_each_order(vec![
            call(a, PaymentState::Authorizing),
            call(b, PaymentState::Authorizing),
            call(a, PaymentState::Voiding),
        ]);
        let states: Vec<(uuid::Uuid, PaymentState)> = owed.iter().map(|o| (o.order_id, o.state)).collect();
        assert_eq!(states, [(b, PaymentState::Authorizing), (a, PaymentState::Voiding)]);
    }
}
