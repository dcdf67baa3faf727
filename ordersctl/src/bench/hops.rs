//! Where an approved order's time goes, hop by hop, from the rows each service wrote (one
//! Postgres server, so one clock): PlaceOrder's transaction → OrderPlaced acknowledged by the
//! broker → payment-svc took the message → the gateway authorized → PaymentAuthorized
//! acknowledged → the order confirmed → the read model shows it.
//!
//! Each hop is a difference of two recorded instants, so it includes the waiting before the
//! work as well as the work (a relay's pass, a consumer's fetch, a commit). Postgres's
//! `now()` is the start of the writing transaction; where the later instant is a
//! transaction's start, the earlier hop absorbs that transaction's own duration.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::report::Percentiles;
use crate::verify::Stores;

/// The hops, in order, with what each one covers.
pub const HOPS: [(&str, &str); 6] = [
    (
        "place → OrderPlaced published",
        "PlaceOrder's transaction (orders.created_at) to the broker's ack of its outbox row (relay: NOTIFY, pass, produce, mark)",
    ),
    (
        "published → payment consumed",
        "broker ack to payment-svc's transaction taking the message (its inbox row): fetch, queue",
    ),
    (
        "payment consumed → gateway authorized",
        "payment-svc's transaction start to the gateway's ledger line (the gRPC call, TLS, the gateway's transaction start)",
    ),
    (
        "gateway authorized → PaymentAuthorized published",
        "the gateway's reply, payment-svc's commit, its relay's pass and the broker's ack",
    ),
    (
        "published → order confirmed",
        "broker ack to order-svc's compare-and-set (orders.settled_at): fetch, the saga transaction",
    ),
    (
        "confirmed → projected",
        "the confirmation to the projector's write of OrderConfirmed in the read model",
    ),
];

/// One hop's latency over a step's approved orders.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    /// Its name.
    pub name: String,
    /// What it covers.
    pub covers: String,
    /// Its percentiles.
    pub latency: Percentiles,
}

type Instants = HashMap<String, DateTime<Utc>>;

async fn instants(
    pool: &sqlx::PgPool,
    sql: &'static str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Instants, sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(sql).bind(from).bind(to).fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

/// The hops of the approved orders placed in [from, to).
pub async fn decompose(stores: &Stores, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Hop>, sqlx::Error> {
    // A margin after the window for the later instants of its orders.
    let later = to + chrono::Duration::minutes(5);
    let placed: Instants = sqlx::query_as::<_, (String, DateTime<Utc>)>(
        "SELECT order_id::text, created_at FROM orders
         WHERE created_at >= $1 AND created_at < $2 AND status = $3 AND payment_token = 'tok_visa'",
    )
    .bind(from)
    .bind(to)
    .bind(order_svc::domain::OrderStatus::Confirmed.as_str())
    .fetch_all(&stores.orders)
    .await?
    .into_iter()
    .collect();
    // Keyed by order id (the outbox row's partition key) throughout.
    let placed_published = instants(
        &stores.orders,
        "SELECT partition_key, published_at FROM outbox
         WHERE event_type = 'orderflow.events.v1.OrderPlaced' AND created_at >= $1 AND created_at < $2
           AND published_at IS NOT NULL",
        from,
        to,
    )
    .await?;
    let consumed = instants(
        &stores.payments,
        "SELECT order_id::text, created_at FROM payments WHERE created_at >= $1 AND created_at < $2",
        from,
        later,
    )
    .await?;
    let authorized = instants(
        &stores.gateway,
        "SELECT order_id, at FROM ledger WHERE operation = 'AUTHORIZE' AND at >= $1 AND at < $2",
        from,
        later,
    )
    .await?;
    let authorized_published = instants(
        &stores.payments,
        "SELECT partition_key, published_at FROM outbox
         WHERE event_type = 'orderflow.events.v1.PaymentAuthorized' AND created_at >= $1 AND created_at < $2
           AND published_at IS NOT NULL",
        from,
        later,
    )
    .await?;
    let confirmed = instants(
        &stores.orders,
        "SELECT order_id::text, settled_at FROM orders
         WHERE created_at >= $1 AND created_at < $2 AND settled_at IS NOT NULL",
        from,
        to,
    )
    .await?;
    let projected = instants(
        &stores.orders,
        "SELECT r.order_id::text, (h->>'projected_at')::timestamptz
         FROM order_read r JOIN orders o USING (order_id), jsonb_array_elements(r.history) h
         WHERE o.created_at >= $1 AND o.created_at < $2 AND h->>'event_type' = 'orderflow.events.v1.OrderConfirmed'",
        from,
        to,
    )
    .await?;
    let chain = [
        &placed,
        &placed_published,
        &consumed,
        &authorized,
        &authorized_published,
        &confirmed,
        &projected,
    ];
    let mut histograms: Vec<hdrhistogram::Histogram<u64>> = HOPS.iter().map(|_| super::histogram()).collect();
    for order in placed.keys() {
        let Some(times) = chain.iter().map(|m| m.get(order).copied()).collect::<Option<Vec<_>>>() else {
            continue;
        };
        for (hop, pair) in times.windows(2).enumerate() {
            let micros = (pair[1] - pair[0]).num_microseconds().unwrap_or(0).max(1);
            histograms[hop].saturating_record(u64::try_from(micros).unwrap_or(1));
        }
    }
    Ok(HOPS
        .iter()
        .zip(&histograms)
        .map(|((name, covers), h)| Hop {
            name: (*name).to_owned(),
            covers: (*covers).to_owned(),
            latency: super::percentiles(h),
        })
        .collect())
}
