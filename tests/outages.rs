//! Outages of the shared infrastructure under steady load: Postgres killed and restarted,
//! the broker paused for 60 s. Nothing is lost: every accepted order reaches a terminal
//! state and no invariant breaks. This binary disturbs the whole local stack, so its tests
//! run one after another (a lock), and cargo runs test binaries one at a time.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::orders::v1 as api;
use orderflow_tests::saga::{Saga, SagaOptions};
use orderflow_tests::{eventually, valid_order};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn stack_command(arg: &str) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack");
    let status = std::process::Command::new(script)
        .arg(arg)
        .status()
        .expect("run scripts/stack");
    assert!(status.success(), "scripts/stack {arg}");
}

/// Resumes the paused brokers when dropped: a failing assertion during the pause must not
/// leave the shared broker stopped for every test after this one.
struct ResumeBrokers;

impl Drop for ResumeBrokers {
    fn drop(&mut self) {
        stack_command("broker-resume");
    }
}

/// The orders a load had accepted so far, each with the moment it was accepted: what the
/// tests wait on (instead of a fixed time) before and after an outage.
type Accepted = Arc<std::sync::Mutex<Vec<(String, Instant)>>>;

fn accepted_since(accepted: &Accepted, since: Instant) -> usize {
    accepted.lock().unwrap().iter().filter(|(_, at)| *at >= since).count()
}

/// Places orders at about `per_second` until `stop` is cancelled; returns what it accepted
/// (each with the moment it was), and at the end the number of refused calls.
fn timed_load(saga: &Saga, per_second: u64, stop: CancellationToken) -> (Accepted, tokio::task::JoinHandle<usize>) {
    let addr = saga.order_svc_addr();
    let accepted = Accepted::default();
    let so_far = accepted.clone();
    let load = tokio::spawn(async move {
        let mut client = api::order_service_client::OrderServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut refused = 0;
        let mut n: i64 = 0;
        while !stop.is_cancelled() {
            n += 1;
            let request = api::PlaceOrderRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                ..valid_order(n)
            };
            match tokio::time::timeout(Duration::from_secs(5), client.place_order(request)).await {
                Ok(Ok(response)) => so_far
                    .lock()
                    .unwrap()
                    .push((response.into_inner().order_id, Instant::now())),
                _ => refused += 1,
            }
            // The load's pace: time is the subject.
            tokio::time::sleep(Duration::from_millis(1000 / per_second)).await;
        }
        refused
    });
    (accepted, load)
}

async fn assert_all_settled(saga: &Saga, accepted: &[String]) {
    // After a 60 s broker pause the consumers rejoin their groups and drain about 1,200
    // orders.
    assert!(
        saga.settled(Duration::from_secs(300)).await,
        "every accepted order reaches a terminal state"
    );
    let terminal: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status <> 'PENDING' AND order_id::text = ANY($1)")
            .bind(accepted)
            .fetch_one(&saga.orders.pool)
            .await
            .unwrap();
    assert_eq!(
        terminal,
        i64::try_from(accepted.len()).unwrap(),
        "no accepted order lost"
    );
    let report = saga.verify().await;
    println!("{}", ordersctl::verify::render(&report));
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_killed_and_restarted_mid_run_loses_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let saga = Saga::start(SagaOptions {
        deadline: Duration::from_secs(300),
        ..SagaOptions::default()
    })
    .await;
    let stop = CancellationToken::new();
    let (so_far, load) = timed_load(&saga, 20, stop.clone());
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(60), || async {
            accepted_since(&so_far, started) >= 20
        })
        .await,
        "the load's first orders were accepted"
    );
    let restart_began = Instant::now();
    stack_command("pg-restart");
    let restarted = Instant::now();
    // The load goes on until orders are accepted again after Postgres is back, however long
    // its crash recovery took (on a slow CI machine a load of fixed length was once outlasted
    // by the restart, and no call was left to show it).
    let again = eventually(Duration::from_secs(120), || async {
        accepted_since(&so_far, restarted) >= 10
    })
    .await;
    stop.cancel();
    let refused = load.await.unwrap();
    let accepted = so_far.lock().unwrap().clone();
    // Counted by when they were accepted, not in total: how many calls fit in the run depends
    // on how busy the machine is (CI once managed 98 where a quiet machine makes 200).
    let before = accepted.iter().filter(|(_, at)| *at < restart_began).count();
    let after = accepted.iter().filter(|(_, at)| *at > restarted).count();
    println!(
        "postgres restart: took {:?}; {} orders accepted ({before} before the restart, {after} after it), {refused} calls refused",
        restarted - restart_began,
        accepted.len()
    );
    assert!(before > 0, "orders were accepted before the restart");
    assert!(
        again && after >= 10,
        "orders are accepted again after the restart: {after}"
    );
    let accepted: Vec<String> = accepted.into_iter().map(|(id, _)| id).collect();
    assert_all_settled(&saga, &accepted).await;
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_paused_for_60_seconds_under_load_delays_but_loses_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let saga = Saga::start(SagaOptions {
        deadline: Duration::from_secs(600),
        ..SagaOptions::default()
    })
    .await;
    let started = Instant::now();
    let stop = CancellationToken::new();
    let (so_far, load) = timed_load(&saga, 20, stop.clone());
    assert!(
        eventually(Duration::from_secs(30), || async {
            accepted_since(&so_far, started) >= 20
        })
        .await,
        "the load's first orders were accepted"
    );
    stack_command("broker-pause");
    let resume = ResumeBrokers;
    let paused = Instant::now();
    // PlaceOrder needs only Postgres: orders keep being accepted, the outbox grows. Meanwhile
    // no transaction (a relay's batch waiting for acknowledgements, above all) lives longer
    // than the producers' delivery timeout: nothing pins row locks or the xmin horizon for
    // the length of the outage.
    let mut oldest = Duration::ZERO;
    let mut oldest_query = String::new();
    while paused.elapsed() < Duration::from_secs(55) {
        for pool in [&saga.orders.pool, &saga.payments.pool] {
            // The oldest open transaction, and what it last ran (said in the failure).
            let row: Option<(f64, String, String)> = sqlx::query_as(
                "SELECT extract(epoch FROM clock_timestamp() - xact_start)::float8, coalesce(state, ''), query
                 FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
                 ORDER BY xact_start LIMIT 1",
            )
            .fetch_optional(pool)
            .await
            .unwrap();
            if let Some((age, state, query)) = row
                && Duration::from_secs_f64(age) > oldest
            {
                oldest = Duration::from_secs_f64(age);
                oldest_query = format!("{state}: {query}");
            }
        }
        // Sampling through the outage, whose length is the subject.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&saga.orders.pool)
        .await
        .unwrap();
    // The outage lasts 60 s: time is the subject.
    tokio::time::sleep_until((paused + Duration::from_secs(60)).into()).await;
    drop(resume);
    let limit = orderflow_platform::kafka::DEFAULT_DELIVERY_TIMEOUT + Duration::from_secs(2);
    println!("broker pause: the oldest transaction seen during the outage was {oldest:?} old");
    assert!(
        oldest < limit,
        "a transaction stayed open {oldest:?} during the outage (delivery timeout {:?}); it last ran {oldest_query}",
        orderflow_platform::kafka::DEFAULT_DELIVERY_TIMEOUT
    );
    // The load goes on 10 s past the resume: orders accepted while the backlog drains.
    tokio::time::sleep_until((paused + Duration::from_secs(70)).into()).await;
    stop.cancel();
    let refused = load.await.unwrap();
    let accepted: Vec<String> = so_far.lock().unwrap().iter().map(|(id, _)| id.clone()).collect();
    println!(
        "broker pause: backlog {backlog} rows after 55 s; {} orders accepted, {refused} refused",
        accepted.len()
    );
    assert_eq!(refused, 0, "PlaceOrder keeps succeeding while the broker is away");
    assert!(backlog > 500, "the outbox grew during the pause: {backlog}");
    assert_all_settled(&saga, &accepted).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&saga.orders.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the outbox drained");
    saga.stop().await;
}
