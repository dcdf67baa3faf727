//! payment-svc's failure windows, against the real Postgres, broker and gateway: the process
//! (payment-svc built with failpoints, run as a child process) dies at each line where dying
//! leaves different work done, and its successor finishes the order with no second charge.
//! Money is counted at the gateway: its ledger and its idempotency keys.
//!
//! - after the intent, before the call (`payment::before_gateway`, in the executor);
//! - after the gateway acted, before its answer is recorded (`payment::after_gateway_before_commit`);
//! - after the unit of work committed, before its offsets are stored
//!   (`consumer::after_commit_before_store`): the redelivery is a duplicate.
//!
//! And one window with nobody dying: a call that waited for room past its lease, while
//! another instance's executor claims the lapsed lease.
//!
//! The dead process is never restarted: its successor is another instance of the group,
//! whose executor finds the dead one's lapsed claim by itself (the recovery pass), before the
//! group has even given it the dead member's partitions.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orderflow_tests::eventually;
use orderflow_tests::saga::{Saga, SagaOptions};

/// How long an order may take to settle after its successor starts: far below the saga
/// deadline (60 s here), so an order finished by the recovery is never one the sweeper
/// cancelled for lack of a payment answer.
const RECOVERED_WITHIN: Duration = Duration::from_secs(20);

/// payment-svc (failpoints compiled in) of `saga`, dying at `failpoint`.
fn spawn_dying_at(saga: &Saga, failpoint: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_payment-svc-with-failpoints"))
        .envs(saga.payment_svc_env())
        .env("FAILPOINTS", format!("{failpoint}=return"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("payment-svc starts")
}

/// Waits for `child` to die (it aborts at its failpoint, as `kill -9` kills).
async fn died(mut child: Child) -> bool {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = child.try_wait() {
                return !status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        false
    })
    .await
    .unwrap()
}

/// What the gateway did for `order_id`: its ledger's operations, in order.
async fn ledger(saga: &Saga, order_id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT operation FROM ledger WHERE order_id = $1 ORDER BY id")
        .bind(order_id)
        .fetch_all(&saga.gateway.pool)
        .await
        .unwrap()
}

/// How many calls the gateway received with the order's authorize key.
async fn authorize_calls(saga: &Saga, order_id: &str) -> i32 {
    sqlx::query_scalar("SELECT attempts FROM idempotency_keys WHERE idempotency_key = $1")
        .bind(format!("authorize:{order_id}"))
        .fetch_optional(&saga.gateway.pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

async fn payment_state(saga: &Saga, order_id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM payments WHERE order_id = $1::uuid")
        .bind(order_id)
        .fetch_optional(&saga.payments.pool)
        .await
        .unwrap()
}

async fn order_status(saga: &Saga, order_id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1::uuid")
        .bind(order_id)
        .fetch_one(&saga.orders.pool)
        .await
        .unwrap()
}

/// The order was confirmed by its payment (not cancelled by the deadline), charged once and
/// captured once, soon after `since`; nothing in any store disagrees.
async fn settled_once(saga: &Saga, order_id: &str, since: Instant) {
    assert!(
        eventually(RECOVERED_WITHIN, || async {
            ledger(saga, order_id).await == ["AUTHORIZE", "CAPTURE"]
        })
        .await,
        "authorized and captured once: {:?}",
        ledger(saga, order_id).await
    );
    println!(
        "settled {:.1} s after the successor started",
        since.elapsed().as_secs_f64()
    );
    assert_eq!(order_status(saga, order_id).await, "CONFIRMED");
    assert!(saga.settled(RECOVERED_WITHIN).await, "the saga settles");
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dying_after_the_intent_and_before_the_call_leaves_the_call_to_the_successor() {
    let mut saga = Saga::start(SagaOptions::default()).await;
    saga.stop_payment_svc().await;
    let dying = spawn_dying_at(&saga, "payment::before_gateway");
    let order_id = saga.place(42, "tok_visa").await;
    assert!(died(dying).await, "payment-svc died at its failpoint");
    // The intent is committed and claimed; the gateway never heard of the order.
    assert_eq!(payment_state(&saga, &order_id).await.as_deref(), Some("AUTHORIZING"));
    assert_eq!(authorize_calls(&saga, &order_id).await, 0);
    assert!(ledger(&saga, &order_id).await.is_empty());

    let since = Instant::now();
    saga.start_payment_svc().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            ledger(&saga, &order_id).await == ["AUTHORIZE"]
        })
        .await,
        "the other instance authorized within seconds (the dead one's claim lapsed), not after a rebalance: {:?}",
        ledger(&saga, &order_id).await
    );
    settled_once(&saga, &order_id, since).await;
    assert_eq!(
        authorize_calls(&saga, &order_id).await,
        1,
        "called once, by the successor"
    );
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dying_after_the_gateway_acted_and_before_the_answer_is_recorded_charges_once() {
    let mut saga = Saga::start(SagaOptions::default()).await;
    saga.stop_payment_svc().await;
    let dying = spawn_dying_at(&saga, "payment::after_gateway_before_commit");
    let order_id = saga.place(42, "tok_visa").await;
    assert!(died(dying).await, "payment-svc died at its failpoint");
    // The gateway authorized; payment-svc recorded nothing of it.
    assert_eq!(ledger(&saga, &order_id).await, ["AUTHORIZE"]);
    assert_eq!(payment_state(&saga, &order_id).await.as_deref(), Some("AUTHORIZING"));

    let since = Instant::now();
    saga.start_payment_svc().await;
    settled_once(&saga, &order_id, since).await;
    // The successor asked again with the same key: the gateway replayed, moved no money.
    assert_eq!(
        authorize_calls(&saga, &order_id).await,
        2,
        "asked twice, authorized once"
    );
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dying_after_the_unit_commits_and_before_its_offsets_are_stored_is_a_duplicate() {
    let mut saga = Saga::start(SagaOptions::default()).await;
    saga.stop_payment_svc().await;
    let dying = spawn_dying_at(&saga, "consumer::after_commit_before_store");
    let order_id = saga.place(42, "tok_visa").await;
    assert!(died(dying).await, "payment-svc died at its failpoint");
    // The intent committed with its inbox row; the offset was never stored.
    assert_eq!(payment_state(&saga, &order_id).await.as_deref(), Some("AUTHORIZING"));

    let since = Instant::now();
    saga.start_payment_svc().await;
    settled_once(&saga, &order_id, since).await;
    // The dying process's executor may have called the gateway between the commit and the
    // failpoint (it got the call right after the commit): then its successor asked again with
    // the same key. Either way one authorization (settled_once counts the ledger).
    assert!((1..=2).contains(&authorize_calls(&saga, &order_id).await));
    let (payments, inbox_rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payments WHERE order_id = $1::uuid), (SELECT count(*) FROM inbox)",
    )
    .bind(&order_id)
    .fetch_one(&saga.payments.pool)
    .await
    .unwrap();
    assert_eq!(payments, 1);
    // OrderPlaced and OrderConfirmed, each recorded once although OrderPlaced came twice.
    assert_eq!(inbox_rows, 2, "the redelivered OrderPlaced was a duplicate");
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_that_waited_past_its_lease_is_left_to_the_instance_that_claimed_it() {
    // One partition; payment-svc A calls the gateway one at a time (concurrency 1). Eight
    // orders whose first reply comes after the 500 ms timeout are ahead of a good one in A's
    // unit of work, so the good one would wait about 4 s for its call: longer than its lease
    // (1.5 s). Instance B, started meanwhile, claims it once the lease lapses and calls.
    // Without the guard, A called it too when its turn came (the same key: two calls).
    let mut saga = Saga::start(SagaOptions {
        partitions: 1,
        ..SagaOptions::default()
    })
    .await;
    saga.stop_payment_svc().await;
    let mut late = Vec::new();
    for _ in 0..8 {
        late.push(saga.place(42, gateway_sim::faults::tokens::TIMEOUT).await);
    }
    let good = saga.place(42, "tok_visa").await;
    let mut a = Command::new(env!("CARGO_BIN_EXE_payment-svc-with-failpoints"))
        .envs(saga.payment_svc_env())
        .env("PAYMENT_SVC_GATEWAY_CONCURRENCY", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("payment-svc A starts");
    assert!(
        eventually(Duration::from_secs(30), || async {
            payment_state(&saga, &good).await.is_some()
        })
        .await,
        "A recorded the good order's intent"
    );
    saga.start_payment_svc().await;
    let since = Instant::now();
    for order_id in late.iter().chain([&good]) {
        assert!(
            eventually(RECOVERED_WITHIN, || async {
                order_status(&saga, order_id).await == "CONFIRMED"
            })
            .await,
            "{order_id} confirmed: {}",
            order_status(&saga, order_id).await
        );
    }
    println!("all confirmed {:.1} s after B started", since.elapsed().as_secs_f64());
    let _ = a.kill();
    let _ = a.wait();
    assert_eq!(
        authorize_calls(&saga, &good).await,
        1,
        "the good order was called once, by whoever claimed it afresh"
    );
    assert_eq!(ledger(&saga, &good).await, ["AUTHORIZE", "CAPTURE"]);
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
    saga.stop().await;
}
