//! The outbox relay against the real Postgres and broker: what it publishes, and that it
//! loses nothing when it is killed at the worst moments or when the broker is away.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use orderflow::envelope::{self, EventMeta};
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{OrderCancelled, OrderConfirmed};
use orderflow_platform::kafka;
use orderflow_platform::outbox::{self, OutboxMessage};
use orderflow_tests::{
    PrivateKafka, TestDb, count_by_message_id, eventually, fresh_topic, kill_9, read_topic, stack, start_order_svc,
    valid_order,
};
use rdkafka::producer::FutureProducer;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A fresh orders database with the stack's grants: every relay here runs as `orders_relay`,
/// with exactly the rights it has in production (a write the relay needs and lacks fails
/// here, not first on the stack).
async fn fresh_orders_db() -> TestDb {
    let db = orderflow_tests::fresh_orders_db().await;
    db.grant("orders").await;
    db
}

/// A pool on `db` as the relay's role.
fn relay_pool(db: &TestDb) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&db.url_as("orders_relay"))
        .expect("a valid URL")
}

async fn unpublished(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn outbox_message_ids(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT message_id::text FROM outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Places `n` orders through the real gRPC API; returns their ids.
async fn place_orders(db: &TestDb, topic: &str, n: usize) -> Vec<String> {
    let svc = start_order_svc(db, topic).await;
    let mut client = svc.client().await;
    let mut ids = Vec::new();
    for customer in 1..=n {
        let response = client
            .place_order(valid_order(customer as i64))
            .await
            .expect("order accepted");
        ids.push(response.into_inner().order_id);
    }
    svc.stop().await;
    ids
}

/// Runs a relay inside the test process until the returned token is cancelled.
fn spawn_relay(
    db: &TestDb,
    cluster: &kafka::Cluster,
    batch_size: i64,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    spawn_relay_polling_every(db, cluster, batch_size, Duration::from_millis(200))
}

fn spawn_relay_polling_every(
    db: &TestDb,
    cluster: &kafka::Cluster,
    batch_size: i64,
    poll_interval: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    spawn_configured_relay(db, cluster, batch_size, poll_interval, |relay| relay)
}

fn spawn_configured_relay(
    db: &TestDb,
    cluster: &kafka::Cluster,
    batch_size: i64,
    poll_interval: Duration,
    configure: impl FnOnce(relay::Relay) -> relay::Relay,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let producer: FutureProducer = kafka::producer_config(cluster, "relay-test", Duration::from_secs(2))
        .create()
        .expect("producer");
    let relay = configure(
        relay::Relay::new(relay_pool(db), producer, batch_size).with_delivery_timeout(Duration::from_secs(2)),
    );
    let token = CancellationToken::new();
    let task = tokio::spawn(relay.run(poll_interval, token.clone()));
    (token, task)
}

/// Starts the relay binary (failpoints compiled in) as its own process.
fn spawn_relay_process(db: &TestDb, failpoints: Option<&str>) -> Child {
    spawn_relay_process_with(db, failpoints, &[])
}

/// [`spawn_relay_process`] with more settings.
fn spawn_relay_process_with(db: &TestDb, failpoints: Option<&str>, settings: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_relay-with-failpoints"));
    command.envs(settings.iter().copied());
    command
        .env("RELAY_DATABASE_URL", db.url_as("orders_relay"))
        .env("RELAY_BOOTSTRAP_SERVERS", &stack().bootstrap_servers)
        .env("KAFKA_USERNAME", stack().kafka.principal().unwrap_or_default())
        .env("KAFKA_PASSWORD", &stack().vars["ORDERFLOW_KAFKA_PASSWORD"])
        .env("RELAY_POLL_INTERVAL_MS", "200")
        .env("RUST_LOG", "warn")
        .env_remove("FAILPOINTS")
        .kill_on_drop(true);
    if let Some(failpoints) = failpoints {
        command.env("FAILPOINTS", failpoints);
    }
    command.spawn().expect("start the relay binary")
}

/// Graceful stop (SIGTERM).
async fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("stops within 30 s")
        .unwrap();
    assert!(status.success(), "the relay stops cleanly on SIGTERM: {status:?}");
}

/// Waits for a relay process to die at a failpoint set to `panic` (the claim wrote nothing to
/// the database, so a process stopped inside its batch shows nowhere there: its own end is
/// the sign it got that far).
async fn died_at_its_failpoint(child: &mut Child) {
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the relay reaches its failpoint within 30 s")
        .unwrap();
    assert!(!status.success(), "the relay died at its failpoint: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_orders_reach_kafka_keyed_by_order_id_with_mirrored_headers() {
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    let order_ids = place_orders(&db, &topic, 5).await;
    let (stop, relay) = spawn_relay(&db, &stack().kafka, 100);

    assert!(
        eventually(WAIT, || async { unpublished(&db).await == 0 }).await,
        "the relay marks every row published"
    );
    let records = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 5).await;
    assert_eq!(records.len(), 5, "one record per order");
    for record in &records {
        assert!(order_ids.contains(&record.key), "key {} is an order id", record.key);
        let event = envelope::open(&record.payload).expect("a consumer decodes the record");
        assert_eq!(event.aggregate_id.to_string(), record.key);
        assert_eq!(record.headers["message_id"], event.message_id.to_string());
        assert_eq!(record.headers["event_type"], "orderflow.events.v1.OrderPlaced");
        assert_eq!(record.headers["schema_version"], "1");
        let Payload::OrderPlaced(placed) = event.payload else {
            panic!("expected OrderPlaced")
        };
        assert_eq!(placed.order_id, record.key);
    }
    let published: Vec<String> = records.iter().map(|r| r.headers["message_id"].clone()).collect();
    let mut expected = outbox_message_ids(&db).await;
    let mut published_sorted = published.clone();
    published_sorted.sort();
    expected.sort();
    assert_eq!(published_sorted, expected, "exactly the outbox rows were published");

    stop.cancel();
    relay.await.unwrap().expect("the relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_after_the_broker_acknowledged_but_before_marking_republishes() {
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    place_orders(&db, &topic, 3).await;
    let expected = outbox_message_ids(&db).await;

    let mut relay = spawn_relay_process(&db, Some("relay::after_ack_before_mark=pause"));
    let first = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 3).await;
    assert_eq!(first.len(), 3, "the broker acknowledged the batch");
    assert_eq!(
        unpublished(&db).await,
        3,
        "paused before marking: nothing is marked yet"
    );

    kill_9(&mut relay).await;
    assert_eq!(unpublished(&db).await, 3, "the kill rolled the marking back");

    let restarted = spawn_relay_process(&db, None);
    assert!(
        eventually(WAIT, || async { unpublished(&db).await == 0 }).await,
        "the restarted relay publishes the rows again"
    );
    let all = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 6).await;
    let counts = count_by_message_id(&all);
    assert_eq!(counts.len(), 3, "nothing lost, nothing invented: {counts:?}");
    for id in &expected {
        assert_eq!(
            counts.get(id),
            Some(&2),
            "{id} was published twice: at least once, never lost"
        );
    }
    terminate(restarted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_before_publishing_loses_nothing() {
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    place_orders(&db, &topic, 3).await;
    let expected = outbox_message_ids(&db).await;

    let mut relay = spawn_relay_process(&db, Some("relay::before_publish=panic"));
    died_at_its_failpoint(&mut relay).await;
    let nothing = read_topic(&stack().kafka, &topic, Duration::from_secs(2), |r| !r.is_empty()).await;
    assert!(nothing.is_empty(), "died before publishing: nothing on the topic");
    assert_eq!(unpublished(&db).await, 3);

    let restarted = spawn_relay_process(&db, None);
    assert!(eventually(WAIT, || async { unpublished(&db).await == 0 }).await);
    let all = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 3).await;
    // Give a duplicate, if there were one, the time to arrive.
    let all = if all.len() == 3 {
        read_topic(&stack().kafka, &topic, Duration::from_secs(2), |r| r.len() > 3).await
    } else {
        all
    };
    let counts = count_by_message_id(&all);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for id in &expected {
        assert_eq!(counts.get(id), Some(&1), "{id} published exactly once");
    }
    terminate(restarted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stay_pending_while_the_broker_is_down_and_drain_when_it_returns() {
    let db = fresh_orders_db().await;
    // A broker of this test's own, on ports where nothing listens yet (below the ephemeral
    // range, kept for this test).
    let broker = PrivateKafka::new(1);
    let bootstrap = broker.cluster.clone();
    let topic = "orders.events";
    place_orders(&db, topic, 3).await;
    // The relay's records fail after 2 s (spawn_configured_relay's delivery timeout).
    let (stop, relay) = spawn_relay(&db, &bootstrap, 100);

    // A failed delivery is the broker's failure, not the database's: the relay keeps its key
    // slots' leases (the session that holds them) through it, rather than handing the slots
    // to another relay at every backoff while its producer may still deliver what it gave up.
    assert!(
        eventually(WAIT, || async { min_failed_attempts(&db).await >= 1 }).await,
        "the first delivery failed"
    );
    let leaseholders = advisory_lock_holders(&db).await;
    assert!(!leaseholders.is_empty(), "the relay holds its slots' leases");

    // For 8 s without a broker: the rows stay pending, and no transaction of the relay lives
    // longer than the delivery timeout (plus a margin for the rollback): it is not holding
    // row locks and the database's xmin horizon for the length of the outage.
    let mut oldest = Duration::ZERO;
    let outage = std::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM max(clock_timestamp() - xact_start))::float8 FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        oldest = oldest.max(Duration::from_secs_f64(age.unwrap_or(0.0)));
        // Sampling through the outage, whose length is the subject.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(unpublished(&db).await, 3, "no broker: every row stays pending");
    // Each failed delivery is recorded on its row (what `scripts/stack status` and an operator
    // read), written by the relay's own role.
    let unrecorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL AND (failed_attempts = 0 OR last_error IS NULL)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(unrecorded, 0, "every pending row records its failed delivery");
    assert!(min_failed_attempts(&db).await >= 3, "several passes failed meanwhile");
    assert_eq!(
        advisory_lock_holders(&db).await,
        leaseholders,
        "the same session still holds the leases after failed deliveries"
    );
    assert!(
        oldest < Duration::from_secs(3),
        "a transaction stayed open {oldest:?} while the broker was away (delivery timeout 2 s)"
    );

    broker.start().await;
    kafka::ensure_topics(&bootstrap, &[topic], 3)
        .await
        .expect("create the topic on the new broker");

    assert!(
        eventually(Duration::from_secs(60), || async { unpublished(&db).await == 0 }).await,
        "the backlog drains"
    );
    // At least once: a record the relay gave up on may still have been stored by the broker
    // as it came up (a duplicate, for the inboxes), so the test counts distinct events.
    fn distinct(records: &[orderflow_tests::Record]) -> std::collections::BTreeSet<String> {
        records.iter().map(|r| r.headers["message_id"].clone()).collect()
    }
    let records = read_topic(&bootstrap, topic, WAIT, |r| distinct(r).len() >= 3).await;
    let expected: std::collections::BTreeSet<String> = outbox_message_ids(&db).await.into_iter().collect();
    assert_eq!(
        distinct(&records),
        expected,
        "every pending row arrived once the broker was back ({} records)",
        records.len()
    );

    stop.cancel();
    relay.await.unwrap().expect("the relay stops cleanly");
}

/// Writes four events for each of 40 orders, in order: one transaction per round, or
/// (`one_per_transaction`) a stream of 160 transactions of one event each.
async fn write_four_rounds(db: &TestDb, topic: &str, one_per_transaction: bool) {
    let orders: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::now_v7()).collect();
    for round in 0..4 {
        let mut tx = Some(db.pool.begin().await.unwrap());
        for &order in &orders {
            write_event(tx.as_mut().unwrap(), topic, order, round % 2 == 0).await;
            if one_per_transaction {
                tx.take().unwrap().commit().await.unwrap();
                tx = Some(db.pool.begin().await.unwrap());
            }
        }
        tx.take().unwrap().commit().await.unwrap();
    }
}

/// Writes one event of `order` (OrderConfirmed or OrderCancelled) to the outbox in `tx`.
async fn write_event(tx: &mut sqlx::PgConnection, topic: &str, order: uuid::Uuid, confirmed: bool) {
    let payload = if confirmed {
        Payload::OrderConfirmed(OrderConfirmed {
            order_id: order.to_string(),
            ..Default::default()
        })
    } else {
        Payload::OrderCancelled(OrderCancelled {
            order_id: order.to_string(),
            ..Default::default()
        })
    };
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id: order,
        correlation_id: order,
        causation_id: None,
        traceparent: None,
        occurred_at: prost_types::Timestamp::default(),
    };
    let message = OutboxMessage {
        topic: topic.to_owned(),
        envelope: envelope::seal(meta, payload),
    };
    outbox::Outbox::new(
        outbox::OutboxMode::Table,
        orderflow_tests::event_keys().order_svc.clone(),
    )
    .write(tx, &message)
    .await
    .unwrap();
}

/// One event in a transaction of its own.
/// The fewest failed deliveries recorded on a pending row.
async fn min_failed_attempts(db: &TestDb) -> i32 {
    sqlx::query_scalar("SELECT coalesce(min(failed_attempts), 0) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The sessions holding advisory locks (the relays' key-slot leases) in `db`'s database.
async fn advisory_lock_holders(db: &TestDb) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
          WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn commit_one_event(db: &TestDb, topic: &str) {
    let mut tx = db.pool.begin().await.unwrap();
    write_event(&mut tx, topic, uuid::Uuid::now_v7(), true).await;
    tx.commit().await.unwrap();
}

/// Asserts that every key's records arrived in the order its outbox rows were written.
async fn assert_each_key_in_outbox_order(db: &TestDb, records: &[orderflow_tests::Record]) {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT partition_key, message_id::text FROM outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for (key, message_id) in rows {
        expected.entry(key).or_default().push(message_id);
    }
    let mut sorted = records.to_vec();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for record in sorted {
        seen.entry(record.key.clone())
            .or_default()
            .push(record.headers["message_id"].clone());
    }
    assert_eq!(seen, expected, "every key's events in the order they were written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_keep_every_orders_events_in_order() {
    // Four events for each of 40 orders, written in order; two relays compete with small
    // batches. On every key the records must arrive in outbox order (pitfall: concurrent
    // relays reordering a key's events).
    let db = fresh_orders_db().await;
    let topic = fresh_topic(4).await;
    write_four_rounds(&db, &topic, false).await;
    let (stop_a, relay_a) = spawn_relay(&db, &stack().kafka, 7);
    let (stop_b, relay_b) = spawn_relay(&db, &stack().kafka, 7);
    assert!(eventually(WAIT, || async { unpublished(&db).await == 0 }).await);
    let records = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 160).await;
    assert_eq!(records.len(), 160, "each row published once");
    assert_each_key_in_outbox_order(&db, &records).await;

    stop_a.cancel();
    stop_b.cancel();
    relay_a.await.unwrap().unwrap();
    relay_b.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_keeps_batches_in_flight_and_still_publishes_each_row_once_in_order() {
    // A stream of 160 commits of one row each: the relay claims what has committed while the
    // broker still acknowledges the batches before it (up to its depth, 4), never claims a
    // row in flight twice, and settles the batches in order.
    let db = fresh_orders_db().await;
    let topic = fresh_topic(4).await;
    let mut peak = None;
    let (stop, relay) = spawn_configured_relay(&db, &stack().kafka, 500, Duration::from_millis(200), |relay| {
        let relay = relay.pipelining(4);
        peak = Some(relay.in_flight_peak());
        relay
    });
    write_four_rounds(&db, &topic, true).await;
    assert!(eventually(WAIT, || async { unpublished(&db).await == 0 }).await);
    // Stopped, the relay has settled every batch it sent: a second copy of a row, if there
    // were one, is on the topic, and reading for more than 160 records finds it.
    stop.cancel();
    relay.await.unwrap().unwrap();
    let records = read_topic(&stack().kafka, &topic, Duration::from_secs(5), |r| r.len() > 160).await;
    assert_eq!(records.len(), 160, "each row published once");
    assert_each_key_in_outbox_order(&db, &records).await;
    let peak = peak.unwrap().load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        peak > 1,
        "the next batch was claimed while one was in flight (peak {peak} batches)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_while_a_batch_is_in_flight_is_claimed_after_the_coalescing_delay() {
    // A batch stays in flight 300 ms (the producer's linger); a commit in that time wakes the
    // relay, which schedules its claim 600 ms later. The batch settles first: the scheduled
    // claim must still happen, not wait for the next poll (60 s, beyond the test's patience).
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    let mut producer = kafka::producer_config(&stack().kafka, "relay-test", Duration::from_secs(5));
    producer.set("linger.ms", "300");
    let relay = relay::Relay::new(relay_pool(&db), producer.create().unwrap(), 500)
        .with_delivery_timeout(Duration::from_secs(5))
        .coalescing(Duration::from_millis(600));
    let in_flight = relay.in_flight_peak();
    // The first row is there before the relay: its first pass claims it at once (its NOTIFY
    // went to nobody), so the only notification the relay gets is the second row's.
    commit_one_event(&db, &topic).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(Duration::from_secs(60), stop.clone()));
    assert!(
        eventually(WAIT, || async {
            in_flight.load(std::sync::atomic::Ordering::Relaxed) >= 1
        })
        .await,
        "the first row's batch is in flight"
    );
    // The relay listened before its first pass.
    commit_one_event(&db, &topic).await;
    assert_eq!(unpublished(&db).await, 2, "the first batch is still in flight");
    assert!(
        eventually(Duration::from_secs(10), || async { unpublished(&db).await == 0 }).await,
        "the second row was claimed once its coalescing delay passed"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// For each published outbox row, in the order they were written: when it was written and
/// when the relay published it.
async fn publication_times(db: &TestDb) -> Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> {
    sqlx::query_as("SELECT created_at, published_at FROM outbox WHERE published_at IS NOT NULL ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Whether a session of the relay's role on `db`'s database is listening for NOTIFY (its
/// last statement a LISTEN); None while the relay has no session at all. Asked as that role:
/// another role (but a superuser) sees `<insufficient privilege>` for its sessions'
/// statements, and would always answer no.
async fn relay_listens(db: &TestDb) -> Option<bool> {
    let relay = relay_pool(db);
    let (sessions, listening): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE query ILIKE 'LISTEN%') FROM pg_stat_activity
          WHERE datname = current_database() AND usename = current_user AND pid <> pg_backend_pid()",
    )
    .fetch_one(&relay)
    .await
    .unwrap();
    relay.close().await;
    (sessions > 0).then_some(listening > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_the_relay_at_once_without_waiting_for_the_poll() {
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    // The polling fallback would take a minute: only the NOTIFY sent at commit can be this fast.
    let (stop, relay) = spawn_relay_polling_every(&db, &stack().kafka, 100, Duration::from_secs(60));
    // A first order, published by the relay's first pass: the relay listens before that pass
    // (Relay::run), so once it is published the relay is listening, and the next row can
    // only be published in time by the NOTIFY of its commit.
    place_orders(&db, &topic, 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async { unpublished(&db).await == 0 }).await,
        "the relay's first pass published the first row"
    );
    assert_eq!(relay_listens(&db).await, Some(true), "the relay listens");
    place_orders(&db, &topic, 1).await;
    assert!(
        eventually(Duration::from_secs(5), || async { unpublished(&db).await == 0 }).await,
        "the relay published within 5 s of the commit"
    );
    stop.cancel();
    relay.await.unwrap().expect("the relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_only_relay_ignores_notify_and_publishes_on_its_poll() {
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    let poll = Duration::from_secs(6);
    let (stop, relay) = spawn_configured_relay(&db, &stack().kafka, 100, poll, relay::Relay::polling_only);
    // A first order, published by the relay's first pass; its next pass is a poll away. (A
    // pass ends with a query that finds nothing more: the second order, placed after the
    // first is seen published and an order service has started, comes well after it.)
    place_orders(&db, &topic, 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async { unpublished(&db).await == 0 }).await,
        "the relay's first pass published the first row"
    );
    assert_eq!(
        relay_listens(&db).await,
        Some(false),
        "a polling-only relay (whose sessions are visible) does not LISTEN"
    );
    place_orders(&db, &topic, 1).await;
    assert!(
        eventually(poll + Duration::from_secs(8), || async { unpublished(&db).await == 0 }).await,
        "the poll published the row"
    );
    // When it happened, as Postgres stamped it, rather than a wait and a look: a NOTIFY would
    // have published the second row within milliseconds of its commit; the poll did it at
    // least a poll interval after the first pass. The second commit came well before that
    // poll was due, or the times could not tell the two apart.
    let times = publication_times(&db).await;
    let [(_, first_published), (second_created, second_published)] = times[..] else {
        panic!("two rows published: {times:?}");
    };
    let poll_ms = i64::try_from(poll.as_millis()).unwrap();
    assert!(
        (second_created - first_published).num_milliseconds() < poll_ms - 2_000,
        "the second order was committed in time to tell a NOTIFY from the poll: {times:?}"
    );
    assert!(
        (second_published - first_published).num_milliseconds() >= poll_ms - 100,
        "the second row waited for the poll, not woken by its commit's NOTIFY: {times:?}"
    );
    stop.cancel();
    relay.await.unwrap().expect("the relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_passes_all_fail_gives_up_for_its_supervisor_to_restart_it() {
    // A producer whose connection wedged never heals in its process; a relay that keeps
    // failing would hold its outbox back for ever while looking alive. Here the broker never
    // answers at all (a private one, never started).
    let db = fresh_orders_db().await;
    let broker = PrivateKafka::new(1);
    place_orders(&db, "orders.events", 1).await;
    let (_stop, relay) = spawn_configured_relay(&db, &broker.cluster, 100, Duration::from_millis(200), |relay| {
        relay.with_stall_limit(Some(Duration::from_secs(3)))
    });
    let outcome = tokio::time::timeout(Duration::from_secs(60), relay)
        .await
        .expect("the relay gave up instead of failing for ever")
        .unwrap();
    let error = outcome.expect_err("giving up is an error");
    assert!(error.to_string().contains("every pass failed"), "{error:#}");
    assert_eq!(
        unpublished(&db).await,
        1,
        "the row waits in the outbox for the next relay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_passes_all_fail_replaces_its_producer_and_goes_on() {
    // The relay binary's way: a new producer (new broker connections) rather than an exit.
    let db = fresh_orders_db().await;
    let broker = PrivateKafka::new(1);
    place_orders(&db, "orders.events", 1).await;
    let made = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let factory: relay::ProducerFactory = {
        let (cluster, made) = (broker.cluster.clone(), made.clone());
        Box::new(move || {
            made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(kafka::producer_config(&cluster, "relay-test", Duration::from_secs(2)).create()?)
        })
    };
    let (stop, relay) = spawn_configured_relay(&db, &broker.cluster, 100, Duration::from_millis(200), |relay| {
        relay
            .with_stall_limit(Some(Duration::from_secs(3)))
            .reconnecting_with(factory)
    });
    assert!(
        eventually(Duration::from_secs(60), || async {
            made.load(std::sync::atomic::Ordering::SeqCst) >= 2
        })
        .await,
        "the relay made a new producer after its passes kept failing"
    );
    assert!(!relay.is_finished(), "and went on instead of giving up");
    // Once the broker answers, the new producer publishes the row.
    broker.start().await;
    assert!(
        eventually(Duration::from_secs(60), || async { unpublished(&db).await == 0 }).await,
        "the row was published"
    );
    stop.cancel();
    relay.await.unwrap().expect("the relay stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_transactions_hide_a_batch_that_died_before_its_commit_but_not_the_duplicate_after_it() {
    // What a Kafka transaction buys the relay, and what it does not. The relay is killed twice
    // with RELAY_KAFKA_TRANSACTIONS on, each time restarted with the same transactional.id.
    let db = fresh_orders_db().await;
    let topic = fresh_topic(3).await;
    let transactional_id = format!("relay-test-{}", uuid::Uuid::now_v7().simple());
    let settings = [
        ("RELAY_KAFKA_TRANSACTIONS", "true"),
        ("RELAY_TRANSACTIONAL_ID", transactional_id.as_str()),
    ];

    // 1. Killed after the broker acknowledged the records, before the Kafka commit: a
    //    read_committed reader (librdkafka's default) never sees them; the restarted relay's
    //    first transaction fences the dead one's, which the broker aborts, and publishes the
    //    rows once.
    place_orders(&db, &topic, 3).await;
    let first = outbox_message_ids(&db).await;
    let mut relay = spawn_relay_process_with(&db, Some("relay::before_kafka_commit=panic"), &settings);
    died_at_its_failpoint(&mut relay).await;
    let uncommitted = read_topic(&stack().kafka, &topic, Duration::from_secs(4), |r| !r.is_empty()).await;
    assert!(
        uncommitted.is_empty(),
        "records of an open transaction are not visible: {}",
        uncommitted.len()
    );
    let mut relay = spawn_relay_process_with(&db, None, &settings);
    assert!(eventually(WAIT, || async { unpublished(&db).await == 0 }).await);
    let records = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 3).await;
    let counts = count_by_message_id(&records);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        first.iter().all(|id| counts.get(id) == Some(&1)),
        "the aborted attempt left no duplicate: {counts:?}"
    );
    kill_9(&mut relay).await;

    // 2. Killed after the Kafka commit, before the outbox is marked: the transaction ended at
    //    the broker, the mark is in Postgres, outside it. The rows go out again: duplicates on
    //    the topic, for the consumers' inboxes to absorb, as without transactions.
    place_orders(&db, &topic, 3).await;
    let second: Vec<String> = outbox_message_ids(&db)
        .await
        .into_iter()
        .filter(|id| !first.contains(id))
        .collect();
    let mut relay = spawn_relay_process_with(&db, Some("relay::after_ack_before_mark=pause"), &settings);
    let committed = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 6).await;
    assert_eq!(committed.len(), 6, "the second batch was committed to Kafka");
    kill_9(&mut relay).await;
    let relay = spawn_relay_process_with(&db, None, &settings);
    assert!(eventually(WAIT, || async { unpublished(&db).await == 0 }).await);
    let records = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 9).await;
    let counts = count_by_message_id(&records);
    assert!(
        second.iter().all(|id| counts.get(id) == Some(&2)),
        "committed to Kafka, not marked: published twice despite the transaction: {counts:?}"
    );
    terminate(relay).await;
}

#[tokio::test]
async fn a_setting_that_cannot_be_used_stops_the_relay_at_start_up_naming_its_variable() {
    // Before the settings were typed, a tuning value that was not a number or a log filter
    // that did not parse fell back to the default without a word, and the metrics address
    // was read before the Config.
    for (variable, value) in [
        ("ORDERFLOW_KAFKA_LINGER_MS", "soon"),
        ("ORDERFLOW_KAFKA_FETCH_WAIT_MS", "-5"),
        ("ORDERFLOW_METRICS_ADDR", "localhost:metrics"),
        ("RUST_LOG", "relay=loud"),
    ] {
        let run = Command::new(env!("CARGO_BIN_EXE_relay-with-failpoints"))
            .env("RELAY_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("RELAY_BOOTSTRAP_SERVERS", "127.0.0.1:1")
            .env(variable, value)
            .env_remove("FAILPOINTS")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(WAIT, run)
            .await
            .unwrap_or_else(|_| panic!("{variable}={value}: the relay started instead of stopping"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{variable}={value}: {stderr}");
        assert!(
            stderr.contains(variable) && stderr.contains(value),
            "{variable}={value}: the message names the variable and the value: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_passes_fail_still_reads_its_notifications() {
    // A listening session whose client stops reading blocks in Postgres once its socket is
    // full, inside the transaction that reads the notification queue: an open transaction
    // holding back the xmin horizon for as long as the relay does not read (tests/outages.rs
    // once saw one 31 s old during a broker pause). Here every pass fails (a row to publish,
    // a broker that never answers) and 28 MB of notifications arrive at once (more than the
    // sockets between Postgres and the relay hold).
    let db = fresh_orders_db().await;
    let broker = PrivateKafka::new(1);
    place_orders(&db, "orders.events", 1).await;
    let (stop, relay) = spawn_configured_relay(&db, &broker.cluster, 100, Duration::from_secs(60), |relay| relay);
    assert!(
        eventually(Duration::from_secs(10), || async {
            relay_listens(&db).await == Some(true)
        })
        .await,
        "the relay listens"
    );
    sqlx::query("SELECT pg_notify('outbox', repeat(md5(i::text), 220)) FROM generate_series(1, 4000) AS i")
        .execute(&db.pool)
        .await
        .unwrap();
    // Time is the subject: how long the listening session stays inside a transaction.
    let relay_role = relay_pool(&db);
    let watched = std::time::Instant::now();
    let mut longest = 0.0_f64;
    while watched.elapsed() < Duration::from_secs(10) {
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT max(extract(epoch FROM clock_timestamp() - xact_start))::float8 FROM pg_stat_activity
              WHERE datname = current_database() AND usename = current_user AND query ILIKE 'LISTEN%'
                AND xact_start IS NOT NULL",
        )
        .fetch_one(&relay_role)
        .await
        .unwrap();
        longest = longest.max(age.unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("the listening session's longest transaction: {longest:.2} s");
    assert!(
        longest < 2.0,
        "the relay's listening session stayed {longest:.1} s inside a transaction: its notifications were not read"
    );
    stop.cancel();
    let _ = relay.await;
}
