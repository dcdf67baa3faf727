//! The read model: a projector consuming `orders.events` and `payments.events` (consumer
//! group `projector`) keeps one `order_read` row per order, idempotent per event (inbox).
//!
//! Events of one order arrive in order within a topic but not across the two topics (a
//! PaymentAuthorized may be projected before its OrderPlaced), so every update is
//! order-insensitive: a terminal status is never replaced, a settled payment state never
//! goes back to AUTHORIZED, and fields only ever fill in.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound as _, Utc};
use orderflow::envelope::{OpenedEvent, event_type_of};
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::Secret;
use orderflow_platform::consumer::{self, ConsumerSettings, Fresh, Handler, HandlerError};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::domain::{CancellationReason, OrderStatus, PaymentState, SagaState};

/// The name this consumer records in the inbox.
pub const INBOX: &str = "projector";

/// The projector's settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-projector", about = "orderflow's read-model projector")]
pub struct Config {
    /// Postgres URL of the orders database (which holds `order_read`).
    #[arg(long, env = "PROJECTOR_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Kafka bootstrap servers.
    #[arg(long, env = "PROJECTOR_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:19092")]
    pub bootstrap_servers: String,
    /// Consumer group.
    #[arg(long, env = "PROJECTOR_GROUP_ID", default_value = "projector")]
    pub group_id: String,
    /// Topics to project.
    #[arg(long, env = "PROJECTOR_TOPICS", value_delimiter = ',', default_values_t = [orderflow::topics::ORDERS_EVENTS.to_owned(), orderflow::topics::PAYMENTS_EVENTS.to_owned()])]
    pub topics: Vec<String>,
    /// This instance's static membership id in the consumer group (unique per instance).
    #[arg(long, env = "PROJECTOR_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Inbox rows are kept this long: the deduplication window (longer than any redrive).
    #[arg(long, env = "PROJECTOR_INBOX_RETENTION_HOURS", default_value_t = 168)]
    pub inbox_retention_hours: u64,
    /// Who this process is to Kafka (SASL/SCRAM).
    #[command(flatten)]
    pub kafka_auth: orderflow_platform::kafka::KafkaArgs,
    /// Its logs, spans and metrics (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `ORDERFLOW_METRICS_ADDR`).
    #[command(flatten)]
    pub telemetry: orderflow_platform::telemetry::TelemetryArgs,
    /// The consumer runtime's settings.
    #[command(flatten)]
    pub consumer: orderflow_platform::consumer::ConsumerArgs,
    /// The keys whose events it trusts (`EVENT_VERIFYING_KEYS`).
    #[command(flatten)]
    pub verifying: orderflow_platform::signing::VerifyingArgs,
}

/// Projects events into `order_read`.
pub struct Projector;

/// The columns one event sets (None: leave as is).
#[derive(Debug, Default, Clone, PartialEq)]
struct Change {
    customer_id: Option<i64>,
    currency_code: Option<String>,
    total_minor: Option<i64>,
    items: Option<serde_json::Value>,
    status: Option<OrderStatus>,
    saga_state: Option<SagaState>,
    cancellation_reason: Option<CancellationReason>,
    payment_state: Option<PaymentState>,
    /// The order's version as a settling event carries it.
    version: Option<i64>,
    /// When the order was placed: its OrderPlaced event's time.
    placed_at: Option<DateTime<Utc>>,
}

impl Change {
    /// The change of `self` then `later` (events of one order, in their order), by the rules
    /// the upsert applies between the stored row and a change: fields fill in (a later value
    /// replaces an earlier one), a terminal status is final, AUTHORIZED may be followed by a
    /// settled payment state and never the other way round, the version only grows, the
    /// placement time is kept.
    fn then(self, later: Change) -> Change {
        let settled = self.status.is_some();
        Change {
            customer_id: later.customer_id.or(self.customer_id),
            currency_code: later.currency_code.or(self.currency_code),
            total_minor: later.total_minor.or(self.total_minor),
            items: later.items.or(self.items),
            status: if settled { self.status } else { later.status },
            saga_state: if settled { self.saga_state } else { later.saga_state },
            cancellation_reason: self.cancellation_reason.or(later.cancellation_reason),
            payment_state: match (self.payment_state, later.payment_state) {
                (None | Some(PaymentState::Authorized), Some(next)) => Some(next),
                (current, _) => current,
            },
            version: self.version.max(later.version),
            placed_at: self.placed_at.or(later.placed_at),
        }
    }
}

/// What one event (which happened at `occurred_at`) sets.
fn change_of(payload: &Payload, occurred_at: DateTime<Utc>) -> Change {
    match payload {
        Payload::OrderPlaced(placed) => Change {
            customer_id: Some(placed.customer_id),
            currency_code: placed.total.as_ref().map(|m| m.currency_code.clone()),
            total_minor: placed.total.as_ref().map(|m| m.amount_minor),
            items: Some(serde_json::Value::Array(
                placed
                    .items
                    .iter()
                    .map(|item| {
                        serde_json::json!({
                            "sku": item.sku,
                            "quantity": item.quantity,
                            "unit_price_minor": item.unit_price.as_ref().map(|m| m.amount_minor).unwrap_or_default(),
                        })
                    })
                    .collect(),
            )),
            placed_at: Some(occurred_at),
            ..Change::default()
        },
        Payload::OrderConfirmed(confirmed) => Change {
            status: Some(OrderStatus::Confirmed),
            saga_state: Some(SagaState::Completed),
            version: settled_version(confirmed.order_version),
            ..Change::default()
        },
        Payload::OrderCancelled(cancelled) => Change {
            status: Some(OrderStatus::Cancelled),
            saga_state: Some(SagaState::Compensated),
            // UNSPECIFIED (or a reason this build does not know) is stored as no reason,
            // never as a guessed one.
            cancellation_reason: CancellationReason::try_from(cancelled.reason()).ok(),
            version: settled_version(cancelled.order_version),
            ..Change::default()
        },
        Payload::PaymentAuthorized(_) => Change {
            payment_state: Some(PaymentState::Authorized),
            ..Change::default()
        },
        Payload::PaymentFailed(_) => Change {
            payment_state: Some(PaymentState::Failed),
            ..Change::default()
        },
        Payload::PaymentCaptured(_) => Change {
            payment_state: Some(PaymentState::Captured),
            ..Change::default()
        },
        Payload::PaymentVoided(_) => Change {
            payment_state: Some(PaymentState::Voided),
            ..Change::default()
        },
        // Not on the topics the projector reads: the read model gains the stock's state when
        // the saga reserves stock (docs/adr/0007, "Where this stands").
        Payload::StockReserved(_)
        | Payload::StockRejected(_)
        | Payload::StockReleased(_)
        | Payload::StockCommitted(_)
        | Payload::StockCameShort(_) => Change::default(),
    }
}

/// The version a settling event carries; an event written before events carried one reads
/// 0, which no settled order has (placed is 0, each change adds one): None then, and the
/// row keeps what the migration gave it (migrations/orders/0011 and its note).
fn settled_version(carried: i64) -> Option<i64> {
    (carried > 0).then_some(carried)
}

/// One upsert for many events of different orders (one row each: a statement may not touch
/// a row twice). Every update is order-insensitive, so the rows of one batch may be written
/// in any order relative to each other; per order, events are written in their order.
/// The state names it compares with are parameters ($15 PENDING, $16 AWAITING_PAYMENT, $17
/// AUTHORIZED), bound from `domain`, where each is spelled.
const UPSERT: &str = "
    INSERT INTO order_read AS r (order_id, customer_id, currency_code, total_minor, items, placed_at,
        correlation_id, status, saga_state, cancellation_reason, payment_state, version, last_event_type, history)
    SELECT order_id, customer_id, currency_code, total_minor, items, placed_at,
        correlation_id, COALESCE(status, $15::text), COALESCE(saga_state, $16::text),
        cancellation_reason, payment_state, COALESCE(version, 0), last_event_type, entries
    FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::jsonb[], $6::timestamptz[], $7::uuid[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[], $14::jsonb[])
        AS u(order_id, customer_id, currency_code, total_minor, items, placed_at, correlation_id,
             status, saga_state, cancellation_reason, payment_state, version, last_event_type, entries)
    ORDER BY order_id
    ON CONFLICT (order_id) DO UPDATE SET
        customer_id = COALESCE(EXCLUDED.customer_id, r.customer_id),
        currency_code = COALESCE(EXCLUDED.currency_code, r.currency_code),
        total_minor = COALESCE(EXCLUDED.total_minor, r.total_minor),
        items = COALESCE(EXCLUDED.items, r.items),
        placed_at = COALESCE(r.placed_at, EXCLUDED.placed_at),
        correlation_id = COALESCE(r.correlation_id, EXCLUDED.correlation_id),
        -- a terminal status is final (an event that sets no status inserts PENDING, which
        -- never replaces anything; status and saga state are set together)
        status = CASE WHEN r.status = $15 AND EXCLUDED.status <> $15 THEN EXCLUDED.status ELSE r.status END,
        saga_state = CASE WHEN r.status = $15 AND EXCLUDED.status <> $15 THEN EXCLUDED.saga_state ELSE r.saga_state END,
        cancellation_reason = COALESCE(r.cancellation_reason, EXCLUDED.cancellation_reason),
        -- AUTHORIZED may be followed by a settled state, never the other way round
        payment_state = CASE WHEN EXCLUDED.payment_state IS NULL THEN r.payment_state
                             WHEN r.payment_state IS NULL OR r.payment_state = $17 THEN EXCLUDED.payment_state
                             ELSE r.payment_state END,
        version = GREATEST(r.version, EXCLUDED.version),
        last_event_type = EXCLUDED.last_event_type,
        history = CASE WHEN jsonb_array_length(r.history) >= 50 THEN r.history
                       ELSE r.history || EXCLUDED.history END,
        updated_at = now(),
        projected_at = now()";

/// The columns of [`UPSERT`], one element per order (its events of the unit folded).
#[derive(Default)]
struct Rows {
    order_id: Vec<uuid::Uuid>,
    customer_id: Vec<Option<i64>>,
    currency_code: Vec<Option<String>>,
    total_minor: Vec<Option<i64>>,
    items: Vec<Option<serde_json::Value>>,
    placed_at: Vec<Option<DateTime<Utc>>>,
    correlation_id: Vec<uuid::Uuid>,
    status: Vec<Option<&'static str>>,
    saga_state: Vec<Option<&'static str>>,
    cancellation_reason: Vec<Option<&'static str>>,
    payment_state: Vec<Option<&'static str>>,
    version: Vec<Option<i64>>,
    last_event_type: Vec<&'static str>,
    /// The history entries of the order's events, a JSON array each.
    entries: Vec<serde_json::Value>,
    /// When each event happened, for the lag histogram.
    occurred_at: Vec<chrono::DateTime<chrono::Utc>>,
}

impl Rows {
    /// One row for the events of one order, in their order.
    fn push(&mut self, events: &[&OpenedEvent]) {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return;
        };
        let projected_at = chrono::Utc::now();
        let mut change = Change::default();
        let mut entries = Vec::with_capacity(events.len());
        for event in events {
            // An envelope without a valid time (none is signed that way by this system's
            // producers) is placed in time when it is projected.
            let occurred_at = event
                .occurred_at
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
                .unwrap_or(projected_at)
                // Postgres keeps microseconds: the history's text and placed_at say the same.
                .trunc_subsecs(6);
            change = change.then(change_of(&event.payload, occurred_at));
            // Both times are kept: projected_at - occurred_at is the read model's lag for this
            // event (`ordersctl verify` reports its percentiles).
            entries.push(serde_json::json!({
                "event_type": event_type_of(&event.payload),
                "message_id": event.message_id.to_string(),
                "occurred_at": occurred_at.to_rfc3339(),
                "projected_at": projected_at.to_rfc3339(),
            }));
            self.occurred_at.push(occurred_at);
        }
        self.entries.push(serde_json::Value::Array(entries));
        self.order_id.push(first.aggregate_id);
        self.customer_id.push(change.customer_id);
        self.currency_code.push(change.currency_code);
        self.total_minor.push(change.total_minor);
        self.items.push(change.items);
        self.placed_at.push(change.placed_at);
        self.correlation_id.push(first.correlation_id);
        self.status.push(change.status.map(OrderStatus::as_str));
        self.saga_state.push(change.saga_state.map(SagaState::as_str));
        self.cancellation_reason
            .push(change.cancellation_reason.map(CancellationReason::as_str));
        self.payment_state.push(change.payment_state.map(PaymentState::as_str));
        self.version.push(change.version);
        self.last_event_type.push(event_type_of(&last.payload));
    }

    async fn upsert(self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query(UPSERT)
            .bind(&self.order_id)
            .bind(&self.customer_id)
            .bind(&self.currency_code)
            .bind(&self.total_minor)
            .bind(&self.items)
            .bind(&self.placed_at)
            .bind(&self.correlation_id)
            .bind(&self.status)
            .bind(&self.saga_state)
            .bind(&self.cancellation_reason)
            .bind(&self.payment_state)
            .bind(&self.version)
            .bind(&self.last_event_type)
            .bind(&self.entries)
            .bind(OrderStatus::Pending.as_str())
            .bind(SagaState::AwaitingPayment.as_str())
            .bind(PaymentState::Authorized.as_str())
            .execute(&mut **tx)
            .await?;
        // Measured before the runtime's commit: the lag up to the write, not its visibility.
        let now = chrono::Utc::now();
        for occurred_at in self.occurred_at {
            let lag = (now - occurred_at).to_std().unwrap_or_default();
            metrics::histogram!(orderflow_platform::telemetry::READ_MODEL_LAG).record(lag.as_secs_f64());
        }
        Ok(())
    }
}

impl Projector {
    /// Projects `events` (a unit's, each order's in their order): one check that every
    /// event's order exists, then one upsert writing each order once, its events folded.
    /// On failure, the index of the event that failed (`events.len()` when a statement for all
    /// of them failed).
    async fn project(
        tx: &mut Transaction<'static, Postgres>,
        events: &[&OpenedEvent],
    ) -> Result<(), (usize, HandlerError)> {
        // The read model answers GetOrder: it must never show an order this service did not
        // place. The order's row committed before any event of it left an outbox (its
        // OrderPlaced is written with it, and payment-svc acts only on that), so a genuine
        // event always finds it; one that does not was written by someone else (a forgery
        // that got past the signatures, a replay from another environment) and would
        // otherwise create a row of its own through the upsert.
        let ids: Vec<uuid::Uuid> = events.iter().map(|event| event.aggregate_id).collect();
        let known: HashSet<uuid::Uuid> = sqlx::query_scalar("SELECT order_id FROM orders WHERE order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await
            .map_err(|error| (events.len(), error.into()))?
            .into_iter()
            .collect();
        if let Some(at) = events.iter().position(|event| !known.contains(&event.aggregate_id)) {
            return Err((
                at,
                HandlerError::Permanent(format!(
                    "{} for order {} that the order service never placed",
                    orderflow::envelope::event_type_of(&events[at].payload),
                    events[at].aggregate_id
                )),
            ));
        }
        // Each order's events, in their order; the orders in the order of their first event.
        let mut by_order: Vec<(uuid::Uuid, Vec<&OpenedEvent>)> = Vec::new();
        let mut slot: std::collections::HashMap<uuid::Uuid, usize> = std::collections::HashMap::new();
        for event in events {
            let at = *slot.entry(event.aggregate_id).or_insert_with(|| {
                by_order.push((event.aggregate_id, Vec::new()));
                by_order.len() - 1
            });
            by_order[at].1.push(event);
        }
        let mut rows = Rows::default();
        for (_, order_events) in &by_order {
            rows.push(order_events);
        }
        rows.upsert(tx).await.map_err(|error| (events.len(), error))
    }
}

impl Handler for Projector {
    type Committed = ();

    /// The projector folds an order's events of a unit into one write itself.
    const ONE_PER_KEY: bool = false;

    fn inbox(&self) -> &'static str {
        INBOX
    }

    fn wants(&self, _event: &OpenedEvent) -> bool {
        true
    }

    /// The unit's events (each order's in their order): one check, one upsert.
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> Result<Vec<()>, (usize, HandlerError)> {
        let events: Vec<&OpenedEvent> = batch.iter().map(|fresh| fresh.event).collect();
        Self::project(tx, &events).await?;
        Ok(Vec::new())
    }
}

/// Projects until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = orderflow_platform::connect_postgres(&config.database_url, 8).await?;
    orderflow_platform::housekeeping::spawn_inbox_cleanup(&pool, INBOX, config.inbox_retention_hours, &shutdown);
    let settings = config.consumer.apply(ConsumerSettings {
        instance_id: config.instance_id,
        ..ConsumerSettings::new(
            orderflow_platform::kafka::Cluster::new(config.bootstrap_servers, &config.kafka_auth),
            config.group_id,
            config.topics,
            config.verifying.verifier()?,
        )
    });
    consumer::run_reconnecting(settings, pool.clone(), Arc::new(Projector), shutdown).await?;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> Change {
        Change {
            customer_id: Some(7),
            total_minor: Some(2500),
            placed_at: Some(DateTime::UNIX_EPOCH),
            ..Change::default()
        }
    }

    fn paid(state: PaymentState) -> Change {
        Change {
            payment_state: Some(state),
            ..Change::default()
        }
    }

    fn settled(status: OrderStatus, version: i64) -> Change {
        Change {
            status: Some(status),
            saga_state: Some(SagaState::Completed),
            version: Some(version),
            ..Change::default()
        }
    }

    #[test]
    fn events_folded_in_their_order_make_the_row_the_upsert_would() {
        let folded = placed()
            .then(paid(PaymentState::Authorized))
            .then(settled(OrderStatus::Confirmed, 1))
            .then(paid(PaymentState::Captured));
        assert_eq!(folded.customer_id, Some(7));
        assert_eq!(folded.placed_at, Some(DateTime::UNIX_EPOCH));
        assert_eq!(folded.status, Some(OrderStatus::Confirmed));
        assert_eq!(folded.version, Some(1));
        assert_eq!(folded.payment_state, Some(PaymentState::Captured));
    }

    #[test]
    fn a_terminal_status_and_a_settled_payment_are_final_within_a_fold_too() {
        let folded = settled(OrderStatus::Cancelled, 1).then(settled(OrderStatus::Confirmed, 1));
        assert_eq!(folded.status, Some(OrderStatus::Cancelled));
        let folded = paid(PaymentState::Voided).then(paid(PaymentState::Authorized));
        assert_eq!(folded.payment_state, Some(PaymentState::Voided));
    }

    #[test]
    fn the_placement_time_is_the_events_and_an_unspecified_reason_is_no_reason() {
        use orderflow::events::v1::{OrderCancelled, OrderPlaced};
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let change = change_of(&Payload::OrderPlaced(OrderPlaced::default()), at);
        assert_eq!(change.placed_at, Some(at));
        let change = change_of(
            &Payload::OrderCancelled(OrderCancelled {
                order_version: 1,
                ..OrderCancelled::default()
            }),
            at,
        );
        assert_eq!(change.cancellation_reason, None, "not a guessed PAYMENT_FAILED");
        assert_eq!(change.version, Some(1));
    }
}
