//! The order service's side of the checkout saga: it reacts to the payment events
//! (consumer group `order`) and cancels orders whose payment outcome is overdue (the sweeper).
//! Every change is a compare-and-set on the order's version, committed with its inbox row
//! and its outbox event.

use std::time::Duration;

use orderflow::envelope::{self, EventMeta, OpenedEvent};
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{OrderCancelled, OrderConfirmed};
use orderflow::orders::v1::CancellationReason as WireReason;
use orderflow_platform::consumer::{Fresh, Handler, HandlerError};
use orderflow_platform::outbox::{self, Outbox, OutboxMessage};
use orderflow_platform::telemetry;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::domain::{self, Command, Event, Order, OrderId};
use crate::store::{self, StoreError, TransitionOutcome};

/// The name this consumer records in the inbox.
pub const INBOX: &str = "order";

/// The store's errors, through the consumer runtime's one classifier.
fn store_error(error: StoreError) -> HandlerError {
    match error {
        StoreError::Corrupt(what) => HandlerError::Permanent(what),
        StoreError::Unavailable(error) | StoreError::Conflict(error) | StoreError::Other(error) => error.into(),
        StoreError::IdempotencyKeyReused => HandlerError::Permanent(error.to_string()),
        StoreError::Busy => HandlerError::Transient(anyhow::anyhow!("{error}")),
    }
}

/// The order event that records `event` (Confirmed or Cancelled) of `order` (its state once
/// changed: the event carries the version it leads to), as the wire payload.
fn payload_of(order: &Order, event: &Event) -> Option<(Payload, Option<&'static str>)> {
    match event {
        Event::Placed { .. } => None,
        Event::Confirmed { payment_id } => Some((
            Payload::OrderConfirmed(OrderConfirmed {
                order_id: order.id.to_string(),
                payment_id: payment_id.clone(),
                total: Some(orderflow::orders::v1::Money {
                    amount_minor: order.total.amount_minor(),
                    currency_code: order.total.currency().code().to_owned(),
                }),
                order_version: order.version,
            }),
            None,
        )),
        Event::Cancelled { reason, detail } => Some((
            Payload::OrderCancelled(OrderCancelled {
                order_id: order.id.to_string(),
                reason: WireReason::from(*reason) as i32,
                detail: detail.clone(),
                order_version: order.version,
            }),
            Some(reason.as_str()),
        )),
    }
}

/// Placed → terminal, for the saga completion histogram.
fn record_completion(placed_at: chrono::DateTime<chrono::Utc>, status: &'static str) {
    let elapsed = (chrono::Utc::now() - placed_at).to_std().unwrap_or_default();
    metrics::histogram!(telemetry::SAGA_COMPLETION, "status" => status).record(elapsed.as_secs_f64());
}

/// A change decided for a PENDING order: its new state, the event to emit, the stored reason.
struct Settlement {
    after: Order,
    payload: Payload,
    reason: Option<&'static str>,
}

/// Decides `command` on `before`: `Ok(None)` when nothing changes (the order is settled
/// already), `Err` when the command cannot be applied at all.
fn settle(before: &Order, command: Command) -> Result<Option<Settlement>, String> {
    let events = domain::decide(Some(before), command).map_err(|e| e.to_string())?;
    let Some(change) = events.into_iter().next() else {
        return Ok(None);
    };
    let after = domain::apply(Some(before.clone()), change.clone()).ok_or("order vanished")?;
    let (payload, reason) = payload_of(&after, &change).ok_or("unexpected event")?;
    Ok(Some(Settlement { after, payload, reason }))
}

/// Consumes `payments.events`.
pub struct PaymentEventsHandler {
    orders_topic: String,
    outbox: Outbox,
}

impl PaymentEventsHandler {
    /// A handler emitting order events for `orders_topic` through `outbox`.
    pub fn new(orders_topic: String, outbox: Outbox) -> Self {
        Self { orders_topic, outbox }
    }

    /// Applies one command per order (a round of distinct orders, each with its index in the
    /// batch of `whole` messages): the orders read in one statement (and their items in
    /// another), each decided on its state, every change written by one compare-and-set
    /// update and one outbox insert. On failure, the index of the command that failed
    /// (`whole`: a statement for all of them).
    async fn apply_all(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        whole: usize,
        commands: Vec<(usize, &Fresh<'_>, Command)>,
    ) -> Result<Vec<Settled>, (usize, HandlerError)> {
        let ids: Vec<OrderId> = commands
            .iter()
            .map(|(_, fresh, _)| OrderId::from(fresh.event.aggregate_id))
            .collect();
        let mut records = store::get_orders_in(tx, &ids)
            .await
            .map_err(|error| (whole, store_error(error)))?;
        let mut decided = Vec::with_capacity(commands.len());
        for ((at, fresh, command), id) in commands.into_iter().zip(&ids) {
            let _entered = fresh.span.enter();
            let Some(record) = records.remove(id) else {
                return Err((at, HandlerError::Permanent(format!("unknown order {id}"))));
            };
            let before = record.order;
            let Some(Settlement { after, payload, reason }) =
                settle(&before, command).map_err(|why| (at, HandlerError::Permanent(why)))?
            else {
                // Late, duplicate or out of order: never applied (only its inbox row commits).
                tracing::info!(
                    status = before.status.as_str(),
                    "payment event ignored: the order is already settled"
                );
                continue;
            };
            let message = outbox::caused_by(&self.orders_topic, fresh.event, payload);
            decided.push((at, fresh, record.created_at, before, after, reason, message));
        }
        let changes: Vec<store::Transition<'_>> = decided
            .iter()
            .map(|(_, _, _, before, after, reason, message)| store::Transition {
                before,
                after,
                cancellation_reason: *reason,
                event: message,
            })
            .collect();
        let outcomes = store::transition_all_in(tx, &changes, &self.outbox)
            .await
            .map_err(|error| (whole, store_error(error)))?;
        let mut settled = Vec::with_capacity(decided.len());
        for ((at, fresh, placed_at, _, after, _, _), outcome) in decided.iter().zip(outcomes) {
            match outcome {
                TransitionOutcome::Applied => {
                    fresh
                        .span
                        .in_scope(|| tracing::info!(status = after.status.as_str(), "order settled"));
                    settled.push(Settled {
                        placed_at: *placed_at,
                        status: after.status.as_str(),
                    });
                }
                // The sweeper (or a redelivery) won the race: decide again on the new state
                // (the runtime rolls this unit back and tries the order alone).
                TransitionOutcome::Conflict => {
                    return Err((
                        *at,
                        HandlerError::Transient(anyhow::anyhow!("order changed concurrently")),
                    ));
                }
            }
        }
        Ok(settled)
    }
}

/// An order the unit settled: counted in the saga completion histogram once it commits (a
/// unit rolled back and redone must not count it twice).
pub struct Settled {
    placed_at: chrono::DateTime<chrono::Utc>,
    status: &'static str,
}

impl Handler for PaymentEventsHandler {
    type Committed = Settled;

    fn inbox(&self) -> &'static str {
        INBOX
    }

    fn wants(&self, event: &OpenedEvent) -> bool {
        matches!(event.payload, Payload::PaymentAuthorized(_) | Payload::PaymentFailed(_))
    }

    /// One message of each order at a time (the runtime's rounds), all decided and written
    /// together.
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> Result<Vec<Settled>, (usize, HandlerError)> {
        let commands = batch
            .iter()
            .enumerate()
            .filter_map(|(at, fresh)| {
                let command = match &fresh.event.payload {
                    Payload::PaymentAuthorized(authorized) => Command::RecordPaymentAuthorized {
                        payment_id: authorized.payment_id.clone(),
                    },
                    Payload::PaymentFailed(failed) => Command::RecordPaymentFailed {
                        detail: failed.detail.clone(),
                    },
                    // `wants` lets no other event through.
                    _ => return None,
                };
                Some((at, fresh, command))
            })
            .collect();
        self.apply_all(tx, batch.len(), commands).await
    }

    fn committed(&self, settled: Vec<Settled>) {
        for order in settled {
            record_completion(order.placed_at, order.status);
        }
    }
}

/// Cancels orders whose payment outcome did not arrive within `deadline` (by the
/// database's clock), every `interval`, until `shutdown`. Any number of sweepers may run:
/// each cancellation is a compare-and-set, so two sweepers (or a sweeper and a late
/// payment event) never both change an order.
pub async fn sweep(
    pool: PgPool,
    orders_topic: String,
    outbox: Outbox,
    deadline: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match sweep_once(&pool, &orders_topic, &outbox, deadline).await {
            Ok(0) => {}
            Ok(cancelled) => tracing::info!(cancelled, "sweeper cancelled overdue orders"),
            Err(error) => tracing::warn!(%error, "sweep failed; trying again next round"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One sweep; returns how many orders it cancelled.
pub async fn sweep_once(
    pool: &PgPool,
    orders_topic: &str,
    outbox: &Outbox,
    deadline: Duration,
) -> Result<usize, StoreError> {
    let mut cancelled = 0;
    for (id, waited_secs) in store::pending_past_deadline(pool, deadline, 200).await? {
        let Some(record) = store::get_order(pool, id).await? else {
            continue;
        };
        let before = record.order;
        let Ok(Some(Settlement { after, payload, reason })) = settle(&before, Command::Expire { waited_secs }) else {
            continue;
        };
        // The cancellation continues the order's trace (started by its PlaceOrder call).
        let span = tracing::info_span!("sweeper_cancel", order_id = %id, correlation_id = %record.correlation_id);
        if let Some(traceparent) = &record.traceparent {
            telemetry::continue_trace(&span, traceparent);
        }
        let traceparent = span.in_scope(telemetry::current_traceparent);
        let meta = EventMeta {
            message_id: uuid::Uuid::now_v7(),
            aggregate_id: id.as_uuid(),
            correlation_id: record.correlation_id,
            causation_id: None,
            traceparent,
            occurred_at: outbox::now_timestamp(),
        };
        let message = OutboxMessage {
            topic: orders_topic.to_owned(),
            envelope: envelope::seal(meta, payload),
        };
        if store::transition(pool, &before, &after, reason, &message, outbox).await? == TransitionOutcome::Applied {
            tracing::info!(order_id = %id, waited_secs, "order cancelled: payment timeout");
            metrics::counter!(telemetry::SWEEPER_CANCELLATIONS).increment(1);
            record_completion(record.created_at, after.status.as_str());
            cancelled += 1;
        }
    }
    Ok(cancelled)
}
