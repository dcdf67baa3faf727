//! The checkout saga end to end, on the real Postgres, broker and processes: every accepted
//! order reaches CONFIRMED or CANCELLED on its own, a card is never charged twice, money is
//! never kept for a cancelled order, a confirmed order ships exactly once. Money is counted
//! where it is counted: in the gateway's ledger.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use orderflow::gateway::v1::Faults;
use orderflow::orders::v1 as api;
use orderflow_tests::saga::{Saga, SagaOptions};
use orderflow_tests::{Record, eventually, read_topic, stack, valid_order};

const SETTLE: Duration = Duration::from_secs(60);

/// Ledger operations of one order at the gateway, e.g. ["AUTHORIZE", "CAPTURE"].
async fn ledger(saga: &Saga, order_id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT operation FROM ledger WHERE order_id = $1 ORDER BY id")
        .bind(order_id)
        .fetch_all(&saga.gateway.pool)
        .await
        .unwrap()
}

async fn place(saga: &Saga, token: &str) -> String {
    let request = api::PlaceOrderRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        payment_token: token.into(),
        ..valid_order(42)
    };
    saga.client()
        .await
        .place_order(request)
        .await
        .expect("accepted")
        .into_inner()
        .order_id
}

async fn get(saga: &Saga, order_id: &str) -> api::Order {
    saga.client()
        .await
        .get_order(api::GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .expect("found")
        .into_inner()
        .order
        .expect("order")
}

fn event_types(records: &[Record], key: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.key == key)
        .map(|r| r.headers["event_type"].replace("orderflow.events.v1.", ""))
        .collect()
}

async fn assert_no_violations(saga: &Saga) {
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_order_is_confirmed_captured_once_and_shipped_once() {
    let saga = Saga::start(SagaOptions::default()).await;
    let order_id = place(&saga, "tok_visa").await;
    assert!(saga.settled(SETTLE).await, "the order settles on its own");
    assert!(
        eventually(SETTLE, || async { ledger(&saga, &order_id).await.len() == 2 }).await,
        "authorized then captured"
    );
    assert_eq!(ledger(&saga, &order_id).await, ["AUTHORIZE", "CAPTURE"]);
    let order = get(&saga, &order_id).await;
    assert_eq!(order.status(), api::OrderStatus::Confirmed);
    assert_eq!(order.saga_state(), api::SagaState::Completed);
    assert!(
        eventually(SETTLE, || async {
            get(&saga, &order_id).await.payment_state() == api::PaymentState::Captured
        })
        .await,
        "the read model shows the capture"
    );
    let history: Vec<String> = get(&saga, &order_id)
        .await
        .history
        .iter()
        .map(|h| h.event_type.clone())
        .collect();
    for event in ["OrderPlaced", "PaymentAuthorized", "OrderConfirmed", "PaymentCaptured"] {
        assert!(
            history.iter().any(|h| h.ends_with(event)),
            "history has {event}: {history:?}"
        );
    }
    let shipments: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments WHERE order_id = $1::uuid")
        .bind(&order_id)
        .fetch_one(&saga.fulfilment.pool)
        .await
        .unwrap();
    assert_eq!(shipments, 1);
    assert_no_violations(&saga).await;
    saga.stop().await;
}
