//! The order service's database access. Every write that changes an order inserts its
//! event into the outbox in the same transaction: the event exists if and only if the
//! change does.

use std::time::Duration;

use orderflow::orders::v1::PlaceOrderResponse;
use orderflow_platform::outbox::{Outbox, OutboxMessage};
use sqlx::PgPool;

use crate::domain::{
    CancellationReason, Currency, CustomerId, LineItem, Money, Order, OrderId, OrderStatus, PaymentState, PaymentToken,
    Quantity, SagaState, Sku,
};

/// Why a database operation failed, in the terms the API needs to answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time: retry later.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A serialization failure or deadlock: the transaction can be retried.
    #[error("transaction aborted by a concurrent one")]
    Conflict(#[source] sqlx::Error),
    /// Every writer is busy with a full batch already: retry shortly.
    #[error("the order writers are busy")]
    Busy,
    /// An idempotency key reused with a different request.
    #[error("request_id was already used with a different request")]
    IdempotencyKeyReused,
    /// Stored data that this code cannot read (a bug or a manual edit).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// Anything else: a bug. The SQL error is logged, never sent to a client.
    #[error("unexpected database error")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                Self::Unavailable(error)
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // serialization_failure, deadlock_detected
                Some("40001" | "40P01") => Self::Conflict(error),
                // admin_shutdown, crash_shutdown, cannot_connect_now, connection failures
                Some(code) if code.starts_with("57P") || code.starts_with("08") => Self::Unavailable(error),
                _ => Self::Other(error),
            },
            _ => Self::Other(error),
        }
    }
}

impl StoreError {
    /// Whether one write of several may alone have caused it (data the database refuses, or
    /// a bug), rather than something every write shares (the database away, busy, a
    /// concurrent change).
    pub fn may_be_one_orders(&self) -> bool {
        matches!(self, Self::Other(_) | Self::Corrupt(_))
    }

    /// An error of the same kind, for each of the callers one failure answers (the cause is
    /// kept as text).
    pub fn same_kind(&self) -> Self {
        let cause = |error: &sqlx::Error| sqlx::Error::Protocol(error.to_string());
        match self {
            Self::Unavailable(error) => Self::Unavailable(cause(error)),
            Self::Conflict(error) => Self::Conflict(cause(error)),
            Self::Busy => Self::Busy,
            Self::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            Self::Corrupt(what) => Self::Corrupt(what.clone()),
            Self::Other(error) => Self::Other(cause(error)),
        }
    }
}

/// The idempotency key of a PlaceOrder call.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The client's request_id.
    pub request_id: uuid::Uuid,
    /// The encoded request without its request_id.
    pub fingerprint: Vec<u8>,
    /// How long the key is honoured.
    pub retention: Duration,
}

/// What PlaceOrder did.
#[derive(Debug, Clone, PartialEq)]
pub enum PlaceOutcome {
    /// A new order was written with its outbox event.
    Created(PlaceOrderResponse),
    /// The key was seen before with the same request: the original response, nothing written.
    Replayed(PlaceOrderResponse),
}

/// An order as stored, with what the API shows besides the aggregate.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    /// The aggregate.
    pub order: Order,
    /// Why it was cancelled, if it was.
    pub cancellation_reason: Option<CancellationReason>,
    /// The correlation id.
    pub correlation_id: uuid::Uuid,
    /// Placed at.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last changed at.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// The W3C trace context of the PlaceOrder call.
    pub traceparent: Option<String>,
}

/// Reads one order and its items; `None` if there is no such order.
pub async fn get_order(pool: &PgPool, id: OrderId) -> Result<Option<OrderRecord>, StoreError> {
    get_order_in(&mut *pool.acquire().await?, id).await
}

/// [`get_order`] on a connection (inside a caller's transaction).
pub async fn get_order_in(conn: &mut sqlx::PgConnection, id: OrderId) -> Result<Option<OrderRecord>, StoreError> {
    Ok(get_orders_in(conn, &[id]).await?.remove(&id))
}

/// Reads the orders `ids` and their items, in two statements whatever their number (a
/// consumer's round); an order that does not exist is missing from the answer.
pub async fn get_orders_in(
    conn: &mut sqlx::PgConnection,
    ids: &[OrderId],
) -> Result<std::collections::HashMap<OrderId, OrderRecord>, StoreError> {
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    let rows: Vec<StoredOrder> = sqlx::query_as(
        "SELECT order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state,
                cancellation_reason, version, correlation_id, created_at, updated_at, traceparent
         FROM orders WHERE order_id = ANY($1)",
    )
    .bind(&uuids)
    .fetch_all(&mut *conn)
    .await?;
    let mut items: std::collections::HashMap<uuid::Uuid, Vec<(String, i32, i64)>> = std::collections::HashMap::new();
    let item_rows: Vec<(uuid::Uuid, String, i32, i64)> = sqlx::query_as(
        "SELECT order_id, sku, quantity, unit_price_minor FROM order_items WHERE order_id = ANY($1)
         ORDER BY order_id, line_no",
    )
    .bind(&uuids)
    .fetch_all(&mut *conn)
    .await?;
    for (order_id, sku, quantity, price) in item_rows {
        items.entry(order_id).or_default().push((sku, quantity, price));
    }
    rows.into_iter()
        .map(|row| {
            let id = OrderId::from(row.order_id);
            let lines = items.remove(&row.order_id).unwrap_or_default();
            Ok((id, parse_order(id, row, lines)?))
        })
        .collect()
}

/// An order's row as stored.
#[derive(sqlx::FromRow)]
struct StoredOrder {
    order_id: uuid::Uuid,
    customer_id: i64,
    currency_code: String,
    total_minor: i64,
    payment_token: String,
    status: String,
    saga_state: String,
    cancellation_reason: Option<String>,
    version: i64,
    correlation_id: uuid::Uuid,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
    traceparent: Option<String>,
}

/// An order's stored row and items as the domain's values.
fn parse_order(id: OrderId, row: StoredOrder, items: Vec<(String, i32, i64)>) -> Result<OrderRecord, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("order {id}: {what}"));
    let currency = Currency::from_code(row.currency_code.trim()).ok_or_else(|| corrupt("currency"))?;
    let money = |amount| Money::new(amount, currency).map_err(|_| corrupt("amount"));
    let items = items
        .into_iter()
        .map(|(sku, quantity, price)| {
            Ok(LineItem {
                sku: Sku::parse(&sku).map_err(|_| corrupt("sku"))?,
                quantity: Quantity::parse(quantity).map_err(|_| corrupt("quantity"))?,
                unit_price: money(price)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let order = Order {
        id,
        customer_id: CustomerId::parse(row.customer_id).map_err(|_| corrupt("customer_id"))?,
        items,
        total: money(row.total_minor)?,
        payment_token: PaymentToken::parse(&row.payment_token).map_err(|_| corrupt("payment_token"))?,
        status: OrderStatus::parse(&row.status).ok_or_else(|| corrupt("status"))?,
        saga_state: SagaState::parse(&row.saga_state).ok_or_else(|| corrupt("saga_state"))?,
        version: row.version,
    };
    Ok(OrderRecord {
        order,
        cancellation_reason: parse_optional(row.cancellation_reason.as_deref(), CancellationReason::parse)
            .ok_or_else(|| corrupt("cancellation_reason"))?,
        correlation_id: row.correlation_id,
        created_at: row.created_at,
        updated_at: row.updated_at,
        traceparent: row.traceparent,
    })
}

/// What a compare-and-set transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    /// The change and its event are written.
    Applied,
    /// The order's version moved since it was read: nothing was written; decide again.
    Conflict,
}

/// Moves `before` to `after` if the stored version is still `before.version`, in one
/// transaction with the outbox event.
pub async fn transition(
    pool: &PgPool,
    before: &Order,
    after: &Order,
    cancellation_reason: Option<&str>,
    event: &OutboxMessage,
    outbox: &Outbox,
) -> Result<TransitionOutcome, StoreError> {
    let mut tx = pool.begin().await?;
    let outcome = transition_in(&mut tx, before, after, cancellation_reason, event, outbox).await?;
    if outcome == TransitionOutcome::Applied {
        tx.commit().await?;
    }
    Ok(outcome)
}

/// [`transition`] inside the caller's transaction.
pub async fn transition_in(
    tx: &mut sqlx::PgConnection,
    before: &Order,
    after: &Order,
    cancellation_reason: Option<&str>,
    event: &OutboxMessage,
    outbox: &Outbox,
) -> Result<TransitionOutcome, StoreError> {
    let change = Transition {
        before,
        after,
        cancellation_reason,
        event,
    };
    Ok(transition_all_in(tx, &[change], outbox).await?.remove(0))
}

/// One compare-and-set change of an order, with the event that tells it.
#[derive(Debug, Clone, Copy)]
pub struct Transition<'a> {
    /// The order as read.
    pub before: &'a Order,
    /// The order as it becomes.
    pub after: &'a Order,
    /// Why it was cancelled (stored name), if it is.
    pub cancellation_reason: Option<&'a str>,
    /// The event.
    pub event: &'a OutboxMessage,
}

/// Applies `changes` (of different orders) inside the caller's transaction (a consumer's,
/// which commits them with the messages' inbox rows): one compare-and-set update on the
/// orders' versions for all of them, one insert of the events of those applied. Each change's
/// outcome, in order. Each change has an `order_transition` span in its order's trace (the
/// trace its event continues), with how many orders shared the statement.
pub async fn transition_all_in(
    tx: &mut sqlx::PgConnection,
    changes: &[Transition<'_>],
    outbox: &Outbox,
) -> Result<Vec<TransitionOutcome>, StoreError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let _spans: Vec<tracing::Span> = changes
        .iter()
        .map(|change| {
            let span = tracing::info_span!("order_transition", order_id = %change.before.id,
                to = change.after.status.as_str(), orders = changes.len());
            orderflow_platform::telemetry::continue_trace_of(&span, &change.event.envelope.traceparent);
            span
        })
        .collect();
    let ids: Vec<uuid::Uuid> = changes.iter().map(|c| c.before.id.as_uuid()).collect();
    let applied: std::collections::HashSet<uuid::Uuid> = sqlx::query_scalar(
        "UPDATE orders o SET status = u.status, saga_state = u.saga_state, cancellation_reason = u.reason,
                             version = u.new_version, updated_at = now(), settled_at = clock_timestamp()
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::int8[])
              AS u(order_id, version, status, saga_state, reason, new_version)
         WHERE o.order_id = u.order_id AND o.version = u.version
         RETURNING o.order_id",
    )
    .bind(&ids)
    .bind(changes.iter().map(|c| c.before.version).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.after.status.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.after.saga_state.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.cancellation_reason).collect::<Vec<_>>())
    .bind(changes.iter().map(|c| c.after.version).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let events: Vec<OutboxMessage> = changes
        .iter()
        .filter(|c| applied.contains(&c.before.id.as_uuid()))
        .map(|c| c.event.clone())
        .collect();
    outbox.write_all(tx, &events).await?;
    // A change not applied: someone else (a payment event, another sweeper) changed the order
    // first; nothing of it was written.
    Ok(ids
        .iter()
        .map(|id| {
            if applied.contains(id) {
                TransitionOutcome::Applied
            } else {
                TransitionOutcome::Conflict
            }
        })
        .collect())
}

/// Orders still PENDING `deadline` after they were placed, by the database's clock,
/// oldest first, with how long they have waited.
pub async fn pending_past_deadline(
    pool: &PgPool,
    deadline: Duration,
    limit: i64,
) -> Result<Vec<(OrderId, u64)>, StoreError> {
    let rows: Vec<(uuid::Uuid, f64)> = sqlx::query_as(
        // 'PENDING' written out, not bound: the partial index orders_pending_by_age is
        // `WHERE status = 'PENDING'`, and a generic plan with a parameter cannot use it
        // (wire_states.rs checks every name written in this crate's SQL is a domain name).
        "SELECT order_id, extract(epoch FROM now() - created_at)::float8 FROM orders
         WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT $2",
    )
    .bind(deadline.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, waited)| (OrderId::from(id), waited.max(0.0) as u64))
        .collect())
}

/// A stored optional name: `Some(None)` for NULL, `Some(Some(v))` for a known name, `None`
/// for a name this build does not know (the caller reports it as corrupt, never defaults).
fn parse_optional<T>(name: Option<&str>, parse: impl Fn(&str) -> Option<T>) -> Option<Option<T>> {
    match name {
        None => Some(None),
        Some(name) => parse(name).map(Some),
    }
}

/// An order as the read model shows it: what is stored, typed, or an error.
#[derive(Debug, Clone)]
pub struct OrderView {
    /// The order.
    pub order_id: uuid::Uuid,
    /// The customer (unknown until OrderPlaced is projected).
    pub customer_id: Option<i64>,
    /// Currency (with the total and items, once OrderPlaced is projected).
    pub currency_code: Option<String>,
    /// Total.
    pub total_minor: Option<i64>,
    /// The items, once OrderPlaced is projected.
    pub items: Vec<ViewItem>,
    /// Business status.
    pub status: OrderStatus,
    /// Saga position.
    pub saga_state: SagaState,
    /// Why it was cancelled, if it was.
    pub cancellation_reason: Option<CancellationReason>,
    /// Where its money is, once a payment event is projected.
    pub payment_state: Option<PaymentState>,
    /// The order's version, as its last settling event carries it (0 when placed).
    pub version: i64,
    /// Correlation id.
    pub correlation_id: Option<uuid::Uuid>,
    /// The last event applied.
    pub last_event_type: String,
    /// The events applied, oldest first (at most the read model's bound).
    pub history: Vec<ViewEvent>,
    /// When the order was placed (its OrderPlaced event's time).
    pub placed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Last change.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// One line of an order in the read model.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ViewItem {
    /// Its SKU.
    pub sku: String,
    /// How many.
    pub quantity: i32,
    /// Price of one, minor units of the order's currency.
    pub unit_price_minor: i64,
}

/// One event of an order's history in the read model.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ViewEvent {
    /// Its type (`OrderPlaced`, ...).
    pub event_type: String,
    /// When it happened (its producing transaction).
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    /// Its message id.
    pub message_id: String,
}

/// The read model's row as stored.
#[derive(sqlx::FromRow)]
struct ViewRow {
    order_id: uuid::Uuid,
    customer_id: Option<i64>,
    currency_code: Option<String>,
    total_minor: Option<i64>,
    items: Option<serde_json::Value>,
    status: String,
    saga_state: String,
    cancellation_reason: Option<String>,
    payment_state: Option<String>,
    version: i64,
    correlation_id: Option<uuid::Uuid>,
    last_event_type: String,
    history: serde_json::Value,
    placed_at: Option<chrono::DateTime<chrono::Utc>>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl TryFrom<ViewRow> for OrderView {
    type Error = StoreError;

    fn try_from(row: ViewRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("order_read.{what} of order {}", row.order_id));
        let items = match row.items.clone() {
            None => Vec::new(),
            Some(items) => serde_json::from_value(items).map_err(|_| corrupt("items"))?,
        };
        Ok(Self {
            order_id: row.order_id,
            customer_id: row.customer_id,
            currency_code: row.currency_code.as_deref().map(|code| code.trim().to_owned()),
            total_minor: row.total_minor,
            items,
            status: OrderStatus::parse(&row.status).ok_or_else(|| corrupt("status"))?,
            saga_state: SagaState::parse(&row.saga_state).ok_or_else(|| corrupt("saga_state"))?,
            cancellation_reason: parse_optional(row.cancellation_reason.as_deref(), CancellationReason::parse)
                .ok_or_else(|| corrupt("cancellation_reason"))?,
            payment_state: parse_optional(row.payment_state.as_deref(), PaymentState::parse)
                .ok_or_else(|| corrupt("payment_state"))?,
            version: row.version,
            correlation_id: row.correlation_id,
            history: serde_json::from_value(row.history.clone()).map_err(|_| corrupt("history"))?,
            last_event_type: row.last_event_type,
            placed_at: row.placed_at,
            updated_at: row.updated_at,
        })
    }
}

/// Reads the read model's row of an order.
pub async fn get_order_view(pool: &PgPool, id: OrderId) -> Result<Option<OrderView>, StoreError> {
    let row: Option<ViewRow> = sqlx::query_as(
        "SELECT order_id, customer_id, currency_code, total_minor, items, status, saga_state, cancellation_reason,
                payment_state, version, correlation_id, last_event_type, history, placed_at, updated_at
         FROM order_read WHERE order_id = $1",
    )
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await?;
    row.map(OrderView::try_from).transpose()
}
