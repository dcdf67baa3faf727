//! The read model's projector, in bulk and alone: whatever order an order's events arrive in
//! (across the two topics they may arrive in any order), and whether they are written one
//! per transaction or many orders per statement, every order ends in the same row.

// Tests: a failed step must stop the test at once with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use order_svc::projector::Projector;
use orderflow::envelope::{self, EventMeta, OpenedEvent};
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{
    OrderCancelled, OrderConfirmed, OrderPlaced, PaymentAuthorized, PaymentCaptured, PaymentVoided,
};
use orderflow::orders::v1::{CancellationReason, Money, OrderItem};
use orderflow_platform::consumer::{Fresh, Handler, Incoming};
use orderflow_platform::outbox;
use orderflow_tests::fresh_orders_db;

fn money(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency_code: "EUR".into(),
    })
}

/// An order's four events: placed, authorized, then confirmed and captured, or cancelled
/// and voided.
fn lifecycle(order_id: uuid::Uuid, confirmed: bool) -> Vec<Payload> {
    let id = order_id.to_string();
    let mut events = vec![
        Payload::OrderPlaced(OrderPlaced {
            order_id: id.clone(),
            customer_id: 7,
            items: vec![OrderItem {
                sku: "BOOK-1".into(),
                quantity: 2,
                unit_price: money(1250),
            }],
            total: money(2500),
            payment_token: "tok_visa".into(),
        }),
        Payload::PaymentAuthorized(PaymentAuthorized {
            order_id: id.clone(),
            payment_id: "p".into(),
            authorization_id: "a".into(),
            amount: money(2500),
        }),
    ];
    if confirmed {
        events.push(Payload::OrderConfirmed(OrderConfirmed {
            order_id: id.clone(),
            payment_id: "p".into(),
            total: money(2500),
            order_version: 1,
        }));
        events.push(Payload::PaymentCaptured(PaymentCaptured {
            order_id: id,
            payment_id: "p".into(),
            amount: money(2500),
        }));
    } else {
        events.push(Payload::OrderCancelled(OrderCancelled {
            order_id: id.clone(),
            reason: CancellationReason::PaymentTimeout as i32,
            detail: String::new(),
            order_version: 1,
        }));
        events.push(Payload::PaymentVoided(PaymentVoided {
            order_id: id,
            payment_id: "p".into(),
            amount: money(2500),
        }));
    }
    events
}

/// Every ordering of four things.
fn permutations() -> Vec<[usize; 4]> {
    let mut all = Vec::new();
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let p = [a, b, c, d];
                    if (0..4).all(|i| p.contains(&i)) {
                        all.push(p);
                    }
                }
            }
        }
    }
    all
}

/// A message carrying `payload` for `order_id`, as the consumer runtime hands it on.
fn message(order_id: uuid::Uuid, payload: Payload, offset: i64) -> (Incoming, OpenedEvent) {
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id: order_id,
        correlation_id: order_id,
        causation_id: None,
        traceparent: None,
        occurred_at: outbox::now_timestamp(),
    };
    let bytes = prost::Message::encode_to_vec(&envelope::seal(meta, payload));
    let event = envelope::open(&bytes).unwrap();
    let incoming = Incoming {
        topic: "test".into(),
        partition: 0,
        offset,
        key: Some(order_id.to_string().into_bytes()),
        payload: bytes,
        headers: Vec::new(),
    };
    (incoming, event)
}

/// The batch the runtime would hand on for `messages`.
fn fresh(messages: &[(Incoming, OpenedEvent)]) -> Vec<Fresh<'_>> {
    messages
        .iter()
        .map(|(message, event)| Fresh {
            message,
            event,
            span: tracing::Span::none(),
        })
        .collect()
}

/// Projects `messages` as one unit of work, in one transaction, as the runtime would.
async fn project(pool: &sqlx::PgPool, messages: &[(Incoming, OpenedEvent)]) {
    let mut tx = pool.begin().await.unwrap();
    Projector
        .handle(&mut tx, &fresh(messages))
        .await
        .map_err(|(at, e)| format!("{at}: {e}"))
        .unwrap();
    tx.commit().await.unwrap();
}

async fn place(pool: &sqlx::PgPool, order_id: uuid::Uuid) {
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state, correlation_id)
         VALUES ($1, 7, 'EUR', 2500, 'tok_visa', 'PENDING', 'AWAITING_PAYMENT', $1)",
    )
    .bind(order_id)
    .execute(pool)
    .await
    .unwrap();
}

/// (status, saga_state, payment_state, customer_id, total_minor, items present, history
/// length, version, placed_at is OrderPlaced's time)
type Row = (
    String,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    bool,
    i32,
    i64,
    bool,
);

async fn row(pool: &sqlx::PgPool, order_id: uuid::Uuid) -> Row {
    sqlx::query_as(
        "SELECT status, saga_state, payment_state, customer_id, total_minor, items IS NOT NULL, jsonb_array_length(history),
                version, placed_at = (SELECT (e->>'occurred_at')::timestamptz FROM jsonb_array_elements(history) e
                                      WHERE e->>'event_type' = 'orderflow.events.v1.OrderPlaced')
         FROM order_read WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn expected(confirmed: bool) -> Row {
    if confirmed {
        (
            "CONFIRMED".into(),
            "COMPLETED".into(),
            Some("CAPTURED".into()),
            Some(7),
            Some(2500),
            true,
            4,
            1,
            true,
        )
    } else {
        (
            "CANCELLED".into(),
            "COMPENSATED".into(),
            Some("VOIDED".into()),
            Some(7),
            Some(2500),
            true,
            4,
            1,
            true,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_arrival_order_in_bulk_or_alone_ends_in_the_same_row() {
    let db = fresh_orders_db().await;
    let orders_of = permutations();
    assert_eq!(orders_of.len(), 24);
    for confirmed in [true, false] {
        // In bulk: wave k is the k-th arriving event of each of 24 orders (each its own
        // permutation), projected as one batch: one statement for 24 rows.
        let bulk: Vec<uuid::Uuid> = (0..24).map(|_| uuid::Uuid::now_v7()).collect();
        // Alone: the same permutations, one event per transaction.
        let alone: Vec<uuid::Uuid> = (0..24).map(|_| uuid::Uuid::now_v7()).collect();
        for id in bulk.iter().chain(&alone) {
            place(&db.pool, *id).await;
        }
        for wave in 0..4 {
            let messages: Vec<(Incoming, OpenedEvent)> = bulk
                .iter()
                .zip(&orders_of)
                .map(|(id, order)| message(*id, lifecycle(*id, confirmed)[order[wave]].clone(), wave as i64))
                .collect();
            project(&db.pool, &messages).await;

            for (id, order) in alone.iter().zip(&orders_of) {
                let one = [message(
                    *id,
                    lifecycle(*id, confirmed)[order[wave]].clone(),
                    wave as i64,
                )];
                project(&db.pool, &one).await;
            }
        }
        for (id, order) in bulk.iter().chain(&alone).zip(orders_of.iter().cycle()) {
            assert_eq!(
                row(&db.pool, *id).await,
                expected(confirmed),
                "order {id}, arrival order {order:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_with_every_event_of_two_orders_writes_each_order_once() {
    // All four events of two orders, interleaved, in one unit: each order's events folded
    // into one row write, in their order.
    let db = fresh_orders_db().await;
    let (one, two) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    place(&db.pool, one).await;
    place(&db.pool, two).await;
    let messages: Vec<(Incoming, OpenedEvent)> = lifecycle(one, true)
        .into_iter()
        .zip(lifecycle(two, false))
        .enumerate()
        .flat_map(|(i, (a, b))| [message(one, a, 2 * i as i64), message(two, b, 2 * i as i64 + 1)])
        .collect();
    let fresh = fresh(&messages);
    let mut tx = db.pool.begin().await.unwrap();
    Projector
        .handle(&mut tx, &fresh)
        .await
        .map_err(|(at, e)| format!("{at}: {e}"))
        .unwrap();
    // Each row written once in this transaction: two inserts, no update (eight writes, one
    // per event, before the fold).
    let (inserted, updated): (i64, i64) =
        sqlx::query_as("SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'order_read'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!((inserted, updated), (2, 0));
    tx.commit().await.unwrap();
    assert_eq!(row(&db.pool, one).await, expected(true));
    assert_eq!(row(&db.pool, two).await, expected(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_order_never_placed_names_that_message() {
    // A forged OrderPlaced inside a batch fails at its own index, so the runtime commits its
    // neighbours and dead-letters it alone.
    let db = fresh_orders_db().await;
    let (real, forged) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    place(&db.pool, real).await;
    let messages = [
        message(real, lifecycle(real, true).remove(0), 0),
        message(forged, lifecycle(forged, true).remove(0), 1),
    ];
    let fresh = fresh(&messages);
    let mut tx = db.pool.begin().await.unwrap();
    let (at, error) = Projector.handle(&mut tx, &fresh).await.expect_err("a forged order");
    assert_eq!(at, 1, "{error}");
    assert!(error.to_string().contains("never placed"), "{error}");
    drop(tx);
    // Any event of an order never placed, not only its OrderPlaced: a payment event alone
    // would otherwise make a row of its own through the upsert.
    let stray = uuid::Uuid::now_v7();
    let messages = [
        message(real, lifecycle(real, true).remove(1), 2),
        message(stray, lifecycle(stray, true).remove(1), 3),
    ];
    let fresh = self::fresh(&messages);
    let mut tx = db.pool.begin().await.unwrap();
    let (at, error) = Projector
        .handle(&mut tx, &fresh)
        .await
        .expect_err("a stray payment event");
    assert_eq!(at, 1, "{error}");
    assert!(error.to_string().contains("PaymentAuthorized for order"), "{error}");
}

#[tokio::test]
async fn the_read_path_returns_what_is_stored_or_an_error() {
    // A stored state this build does not know is an error, never a PENDING or an
    // UNSPECIFIED made up on the way out.
    let db = fresh_orders_db().await;
    let id = uuid::Uuid::now_v7();
    place(&db.pool, id).await;
    let messages: Vec<(Incoming, OpenedEvent)> = lifecycle(id, true)
        .into_iter()
        .enumerate()
        .map(|(at, payload)| message(id, payload, at as i64))
        .collect();
    project(&db.pool, &messages).await;
    let order_id = order_svc::domain::OrderId::from(id);
    let view = order_svc::store::get_order_view(&db.pool, order_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.version, 1, "the version OrderConfirmed carries");
    assert_eq!(view.status, order_svc::domain::OrderStatus::Confirmed);
    for (column, value) in [("status", "ARCHIVED"), ("payment_state", "REFUNDED")] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE order_read SET {column} = $2 WHERE order_id = $1"
        )))
        .bind(id)
        .bind(value)
        .execute(&db.pool)
        .await
        .unwrap();
        let error = order_svc::store::get_order_view(&db.pool, order_id)
            .await
            .expect_err("an unknown stored name is an error");
        assert!(
            matches!(error, order_svc::store::StoreError::Corrupt(ref what) if what.contains(column)),
            "{error:?}"
        );
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE order_read SET {column} = $2 WHERE order_id = $1"
        )))
        .bind(id)
        .bind(if column == "status" { "CONFIRMED" } else { "CAPTURED" })
        .execute(&db.pool)
        .await
        .unwrap();
    }
}
