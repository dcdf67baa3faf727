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

/// A child process killed when dropped, so a failing assertion leaves no payment-svc behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_that_waited_past_its_lease_is_left_to_the_instance_that_claimed_it() {
    // One partition; payment-svc A calls the gateway one at a time (concurrency 1). Eight
    // orders whose first reply comes after the 1 s timeout are ahead of a good one in A's
    // unit of work: without the guard A would call the good one about 8 s later, long after
    // its lease (3 s) lapsed and instance B, started meanwhile, claimed and called it: the
    // same key twice. With it, A finds after the first late call that the others' leases no
    // longer hold a call and its recording, and leaves them to a fresh claim.
    let mut saga = Saga::start(SagaOptions {
        partitions: 1,
        gateway_timeout: Duration::from_secs(1),
        ..SagaOptions::default()
    })
    .await;
    saga.stop_payment_svc().await;
    let mut late = Vec::new();
    for _ in 0..8 {
        late.push(saga.place(42, gateway_sim::faults::tokens::TIMEOUT).await);
    }
    let good = saga.place(42, "tok_visa").await;
    let log = std::env::temp_dir().join(format!("payment-svc-a-{good}.log"));
    let log_file = std::fs::File::create(&log).unwrap();
    let _a = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_payment-svc-with-failpoints"))
            .envs(saga.payment_svc_env())
            .env("PAYMENT_SVC_GATEWAY_CONCURRENCY", "1")
            .env("RUST_LOG", "warn")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("payment-svc A starts"),
    );
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
    assert_eq!(
        authorize_calls(&saga, &good).await,
        1,
        "the good order was called once, by whoever claimed it afresh"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        logged.contains("left for a fresh claim"),
        "A left calls to a fresh claim: {logged}"
    );
    // Confirmed is not the end: captures and shipments follow, and the checker reads them.
    assert!(saga.settled(RECOVERED_WITHIN).await, "the saga settles");
    assert_eq!(ledger(&saga, &good).await, ["AUTHORIZE", "CAPTURE"]);
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_retry_never_shortens_the_lease_another_executor_holds() {
    // An executor's call times out, and by the time it records the retry another executor
    // holds the payment (the first lease lapsed and was claimed again: here, `attempts` 2 and
    // a 30 s lease set by hand). The stale retry must not replace that lease by its 50 ms
    // backoff, or a third claim would call while the second holder still is. A control
    // payment handed after it to the same executor (one call at a time) is recorded after
    // it: once the control's answer is in, the fenced one's was recorded or dropped.
    let mut saga = Saga::start(SagaOptions::default()).await;
    saga.stop_payment_svc().await;
    let pool = saga.payments.pool.clone();
    let (fenced, control) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let token = gateway_sim::faults::tokens::TIMEOUT;
    for (order_id, attempts) in [(fenced, 2), (control, 1)] {
        sqlx::query(
            "INSERT INTO payments (payment_id, order_id, amount_minor, currency_code, state, payment_token,
                                   correlation_id, lease_until, attempts)
             VALUES ($1, $1, 100, 'EUR', 'AUTHORIZING', $2, $1, now() + interval '30 seconds', $3)",
        )
        .bind(order_id)
        .bind(token)
        .bind(attempts)
        .execute(&pool)
        .await
        .unwrap();
    }
    let owed = |order_id| payment_svc::executor::Owed {
        order_id,
        payment_id: order_id,
        state: payment_svc::domain::PaymentState::Authorizing,
        authorization_id: None,
        amount_minor: 100,
        currency_code: "EUR".into(),
        payment_token: Some(token.into()),
        correlation_id: order_id,
        causation_id: None,
        traceparent: None,
        attempts: 1,
        held_until: tokio::time::Instant::now() + Duration::from_secs(30),
    };
    let (give, take) = payment_svc::executor::handoff();
    let gateway = tonic::transport::Endpoint::from_shared(format!("http://{}", saga.gateway_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let executor = std::sync::Arc::new(payment_svc::executor::Executor::new(
        pool.clone(),
        gateway,
        Duration::from_millis(500),
        saga.payments_topic.clone(),
        orderflow_platform::outbox::Outbox::new(
            orderflow_platform::outbox::OutboxMode::Table,
            orderflow_tests::event_keys().payment_svc.clone(),
        ),
        1,
        take,
        std::sync::Arc::new(tokio::sync::Notify::new()),
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(executor.run(shutdown.clone()));
    give.give(vec![owed(fenced), owed(control)]);
    let answered = |order_id: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT last_error IS NOT NULL OR state <> 'AUTHORIZING' FROM payments WHERE order_id = $1",
            )
            .bind(order_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || answered(control)).await,
        "the control's answer was recorded"
    );
    let (state, lease_left, attempts, last_error): (String, f64, i32, Option<String>) = sqlx::query_as(
        "SELECT state, coalesce(extract(epoch FROM lease_until - now()), 0)::float8, attempts, last_error
         FROM payments WHERE order_id = $1",
    )
    .bind(fenced)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        state == "AUTHORIZING" && lease_left > 20.0 && attempts == 2 && last_error.is_none(),
        "the second holder's lease is untouched: {state}, {lease_left:.1} s left, attempts {attempts}, last error {last_error:?}"
    );
    shutdown.cancel();
    running.await.unwrap();
    saga.stop().await;
}
