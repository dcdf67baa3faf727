//! One relay test-suite, run against every way an event can leave a service database
//! (`OutboxMode`): the outbox table with the polling relay, and logical decoding messages
//! read from a replication slot. Each scenario is written once, against the outbox API and
//! the topic only, and run for both modes: a kill before publishing, a kill after the
//! broker acknowledged and before the relay marked or confirmed, the broker away and back,
//! and per-key order across a kill with ten thousand events. Also the WAL mode's own
//! hazards: a lost slot is refused loudly, and an idle database's slot keeps advancing; and
//! the polling mode's own: several relays sharing the key slots keep each key in order.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use orderflow::envelope::{self, EventMeta};
use orderflow::events::v1::OrderConfirmed;
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::outbox::{OutboxMessage, OutboxMode};
use orderflow_platform::{Secret, kafka};
use orderflow_tests::{
    PrivateKafka, Record, TestDb, count_by_message_id, eventually, fresh_topic, kill_9, read_topic, stack,
};
use rdkafka::producer::FutureProducer;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const MODES: [OutboxMode; 2] = [OutboxMode::Table, OutboxMode::WalMessage];

/// A fresh orders database with the stack's grants, ready for `mode`: in the WAL mode its
/// slot exists before the first event is written (as the relay's first start makes it).
async fn database_for(mode: OutboxMode) -> TestDb {
    let db = orderflow_tests::fresh_orders_db().await;
    db.grant("orders").await;
    if mode == OutboxMode::WalMessage {
        make_wal_relay_role().await;
        relay::wal::ensure_slot(&relay_pool(&db, mode), &slot_of(&db))
            .await
            .expect("create the slot");
    }
    db
}

fn slot_of(db: &TestDb) -> String {
    relay::wal::default_slot_name(&db.name)
}

/// An outbox writing the `mode` way, signed as order-svc signs (the relay publishes what it
/// holds without reading it).
fn outbox_of(mode: OutboxMode) -> orderflow_platform::outbox::Outbox {
    orderflow_platform::outbox::Outbox::new(mode, orderflow_tests::event_keys().order_svc.clone())
}

/// The role the WAL mode's relay runs as. The stack runs in the `table` mode, where no role
/// holds REPLICATION (a right that follows the mode: docs/security.md); this one is a member of
/// `orders_relay` (exactly its rights in every table) with the REPLICATION attribute the
/// relays get in the `wal-message` mode. Made by the first WAL test of this process, with
/// `orders_relay`'s password; scripts/test drops it once the tests are done, so the rights
/// matrix of the stack it checks afterwards has no extra role.
const WAL_RELAY_ROLE: &str = "test_wal_relay";

async fn make_wal_relay_role() {
    static MADE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    MADE.get_or_init(|| async {
        let url = url::Url::parse(&orderflow_tests::database_url_as("orders_relay", "orders")).unwrap();
        let password = url
            .password()
            .expect("the stack gives orders_relay a password")
            .to_owned();
        assert!(
            password.chars().all(|c| c.is_ascii_alphanumeric()),
            "a password the SQL below can quote"
        );
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&stack().admin_url)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN
                 CREATE ROLE {WAL_RELAY_ROLE} LOGIN REPLICATION IN ROLE orders_relay;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
             END $$;
             ALTER ROLE {WAL_RELAY_ROLE} LOGIN REPLICATION PASSWORD '{password}';"
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    })
    .await;
}

/// `db`'s URL as the relay of `mode` connects.
fn relay_url(db: &TestDb, mode: OutboxMode) -> String {
    let url = db.url_as("orders_relay");
    match mode {
        OutboxMode::Table => url,
        OutboxMode::WalMessage => url.replacen("//orders_relay:", &format!("//{WAL_RELAY_ROLE}:"), 1),
    }
}

/// A pool on `db` as the relay of `mode`.
fn relay_pool(db: &TestDb, mode: OutboxMode) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&relay_url(db, mode))
        .expect("a valid URL")
}

/// Drops the test's slot once no relay streams it (as the relay's role: it takes the
/// REPLICATION attribute): a slot left behind would hold WAL back (up to
/// max_slot_wal_keep_size) and take one of the cluster's max_replication_slots.
async fn drop_slot(db: &TestDb) {
    let slot = slot_of(db);
    let dropped = eventually(WAIT, || async {
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
        )
        .bind(&slot)
        .execute(&relay_pool(db, OutboxMode::WalMessage))
        .await
        .is_ok_and(|done| done.rows_affected() == 1)
    })
    .await;
    assert!(dropped, "the slot {slot} is released by its relay and dropped");
}

/// An event of `order` for `topic`.
fn event(topic: &str, order: uuid::Uuid) -> OutboxMessage {
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id: order,
        correlation_id: order,
        causation_id: None,
        traceparent: None,
        occurred_at: prost_types::Timestamp::default(),
    };
    OutboxMessage {
        topic: topic.to_owned(),
        envelope: envelope::seal(
            meta,
            Payload::OrderConfirmed(OrderConfirmed {
                order_id: order.to_string(),
                ..Default::default()
            }),
        ),
    }
}

/// Writes one event per order in `orders`, in one transaction, through the outbox API;
/// returns their message ids.
async fn write_events(db: &TestDb, mode: OutboxMode, topic: &str, orders: &[uuid::Uuid]) -> Vec<String> {
    let mut tx = db.pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for &order in orders {
        let message = event(topic, order);
        ids.push(message.envelope.message_id.clone());
        outbox_of(mode).write(&mut tx, &message).await.unwrap();
    }
    tx.commit().await.unwrap();
    ids
}

/// A database ready for `mode`, a fresh topic, and one event for each of `orders` orders
/// written in one transaction (their message ids).
async fn with_events(mode: OutboxMode, orders: usize) -> (TestDb, String, Vec<String>) {
    let db = database_for(mode).await;
    let topic = fresh_topic(3).await;
    let orders: Vec<uuid::Uuid> = (0..orders).map(|_| uuid::Uuid::now_v7()).collect();
    let ids = write_events(&db, mode, &topic, &orders).await;
    (db, topic, ids)
}

/// What a test of `mode` leaves behind, once its relays are stopped: the WAL mode's slot.
async fn release(db: &TestDb, mode: OutboxMode) {
    if mode == OutboxMode::WalMessage {
        drop_slot(db).await;
    }
}

/// Starts the relay binary (failpoints compiled in) in `mode`.
fn spawn_relay_process(db: &TestDb, mode: OutboxMode, failpoints: Option<&str>) -> Child {
    spawn_relay_process_with(db, mode, failpoints, 100)
}

/// [`spawn_relay_process`] with batches of at most `batch_size` rows.
fn spawn_relay_process_with(db: &TestDb, mode: OutboxMode, failpoints: Option<&str>, batch_size: u32) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_relay-with-failpoints"));
    command
        .env("RELAY_DATABASE_URL", relay_url(db, mode))
        .env("RELAY_BOOTSTRAP_SERVERS", &stack().bootstrap_servers)
        .env("KAFKA_USERNAME", stack().kafka.principal().unwrap_or_default())
        .env("KAFKA_PASSWORD", &stack().vars["ORDERFLOW_KAFKA_PASSWORD"])
        .env("RELAY_MODE", mode.name())
        .env(
            "RUST_LOG",
            std::env::var("ORDERFLOW_TEST_RELAY_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .env_remove("FAILPOINTS")
        .kill_on_drop(true);
    // The table mode's own settings: the WAL mode refuses them (relay::Config::check_mode).
    if mode == OutboxMode::Table {
        command
            .env("RELAY_POLL_INTERVAL_MS", "200")
            .env("RELAY_BATCH_SIZE", batch_size.to_string());
    }
    if let Some(failpoints) = failpoints {
        command.env("FAILPOINTS", failpoints);
    }
    command.spawn().expect("start the relay binary")
}

/// Runs a relay of `mode` inside the test process against `cluster` until the token is
/// cancelled.
fn spawn_relay(
    db: &TestDb,
    mode: OutboxMode,
    cluster: &kafka::Cluster,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let producer: FutureProducer = kafka::producer_config(cluster, "relay-test", Duration::from_secs(2))
        .create()
        .expect("producer");
    let token = CancellationToken::new();
    let task = match mode {
        OutboxMode::Table => tokio::spawn(
            relay::Relay::new(relay_pool(db, mode), producer, 100)
                .with_delivery_timeout(Duration::from_secs(2))
                .run(Duration::from_millis(200), token.clone()),
        ),
        OutboxMode::WalMessage => {
            let replication = relay::wal::replication_config(&Secret::new(relay_url(db, mode)), &slot_of(db))
                .unwrap()
                .with_status_interval(Duration::from_millis(200));
            tokio::spawn(
                relay::wal::WalRelay::new(relay_pool(db, mode), producer, replication)
                    .with_delivery_timeout(Duration::from_secs(2))
                    .run(token.clone()),
            )
        }
    };
    (token, task)
}

/// How many of `expected` are on the topic (each counted once).
fn distinct_of(records: &[Record], expected: &HashSet<String>) -> usize {
    records
        .iter()
        .filter_map(|r| r.headers.get("message_id"))
        .filter(|id| expected.contains(*id))
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_publishes_each_event_keyed_by_its_order_with_mirrored_headers() {
    for mode in MODES {
        let db = database_for(mode).await;
        let topic = fresh_topic(3).await;
        let orders: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::now_v7()).collect();
        let ids = write_events(&db, mode, &topic, &orders).await;
        // A rolled-back transaction's event never leaves, in either mode.
        let mut rolled_back = db.pool.begin().await.unwrap();
        outbox_of(mode)
            .write(&mut rolled_back, &event(&topic, uuid::Uuid::now_v7()))
            .await
            .unwrap();
        rolled_back.rollback().await.unwrap();
        let (stop, relay) = spawn_relay(&db, mode, &stack().kafka);
        // One more, after the relay started: it is woken (NOTIFY, or the stream).
        let later = write_events(&db, mode, &topic, &orders[..1]).await;
        let records = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 6).await;
        let counts = count_by_message_id(&records);
        let expected: HashSet<String> = ids.iter().chain(&later).cloned().collect();
        assert_eq!(
            counts.keys().cloned().collect::<HashSet<_>>(),
            expected,
            "{mode:?}: exactly the committed events"
        );
        for record in &records {
            let opened = envelope::open(&record.payload).expect("a consumer decodes the record");
            assert_eq!(opened.aggregate_id.to_string(), record.key, "{mode:?}: keyed by order");
            assert_eq!(record.headers["message_id"], opened.message_id.to_string());
            assert_eq!(record.headers["event_type"], "orderflow.events.v1.OrderConfirmed");
            assert_eq!(record.headers["schema_version"], "1");
        }
        stop.cancel();
        relay.await.unwrap().expect("the relay stops cleanly");
        release(&db, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_killed_before_publishing_loses_nothing() {
    for mode in MODES {
        let (db, topic, ids) = with_events(mode, 3).await;

        let mut relay = spawn_relay_process(&db, mode, Some("relay::before_publish=pause"));
        // Paused before its first publish: nothing reaches the topic meanwhile.
        let early = read_topic(&stack().kafka, &topic, Duration::from_secs(3), |r| !r.is_empty()).await;
        assert!(
            early.is_empty(),
            "{mode:?}: paused before publishing, yet {} records",
            early.len()
        );
        kill_9(&mut relay).await;

        let mut restarted = spawn_relay_process(&db, mode, None);
        let records = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 3).await;
        let counts = count_by_message_id(&records);
        assert_eq!(
            counts.keys().cloned().collect::<HashSet<_>>(),
            ids.iter().cloned().collect(),
            "{mode:?}: every event published after the restart"
        );
        kill_9(&mut restarted).await;
        release(&db, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_killed_after_the_ack_and_before_marking_publishes_again() {
    for mode in MODES {
        let (db, topic, ids) = with_events(mode, 3).await;

        let mut relay = spawn_relay_process(&db, mode, Some("relay::after_ack_before_mark=pause"));
        let first = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 3).await;
        assert_eq!(first.len(), 3, "{mode:?}: the broker acknowledged the events");
        kill_9(&mut relay).await;

        let mut restarted = spawn_relay_process(&db, mode, None);
        let all = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 6).await;
        let counts = count_by_message_id(&all);
        assert_eq!(counts.len(), 3, "{mode:?}: nothing lost, nothing invented: {counts:?}");
        for id in &ids {
            assert_eq!(
                counts.get(id),
                Some(&2),
                "{mode:?}: {id} published again (the mark or the confirmation died with the relay)"
            );
        }
        kill_9(&mut restarted).await;
        release(&db, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_holds_events_while_the_broker_is_away_and_publishes_them_when_it_returns() {
    for mode in MODES {
        let db = database_for(mode).await;
        // A broker of this test's own, not started yet.
        let broker = PrivateKafka::new(1);
        let topic = "orders.events";
        let orders: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
        let ids = write_events(&db, mode, topic, &orders).await;
        let (stop, relay) = spawn_relay(&db, mode, &broker.cluster);
        // Several delivery timeouts (2 s) without a broker: time is the subject (a relay
        // that gave up after its first failed delivery would have finished by now).
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(!relay.is_finished(), "{mode:?}: the relay keeps trying");

        broker.start().await;
        kafka::ensure_topics(&broker.cluster, &[topic], 3)
            .await
            .expect("create the topic on the new broker");
        let expected: HashSet<String> = ids.iter().cloned().collect();
        let records = read_topic(&broker.cluster, topic, WAIT, move |r| distinct_of(r, &expected) == 3).await;
        let got: HashSet<String> = count_by_message_id(&records).into_keys().collect();
        assert_eq!(
            got,
            ids.iter().cloned().collect(),
            "{mode:?}: every event arrived once the broker was back"
        );
        stop.cancel();
        relay.await.unwrap().expect("the relay stops cleanly");
        release(&db, mode).await;
    }
}

/// Writes `rounds` events for each of `keys` orders from four writers at once; returns each
/// key's message ids in the order they were committed. Each transaction holds one event for
/// each of `keys_per_tx` keys, and a group of keys gets `burst` such transactions in a row
/// (so one key's events sit next to each other in the outbox).
async fn write_many(
    pool: &sqlx::PgPool,
    mode: OutboxMode,
    topic: &str,
    keys: usize,
    rounds: usize,
    (keys_per_tx, burst): (usize, usize),
) -> HashMap<String, Vec<String>> {
    let orders: Vec<uuid::Uuid> = (0..keys).map(|_| uuid::Uuid::now_v7()).collect();
    let writers: Vec<_> = orders
        .chunks(keys.div_ceil(4))
        .map(|group| {
            let (pool, topic, group) = (pool.clone(), topic.to_owned(), group.to_vec());
            tokio::spawn(async move {
                let mut written: HashMap<String, Vec<String>> = HashMap::new();
                for _ in 0..rounds / burst {
                    for chunk in group.chunks(keys_per_tx) {
                        for _ in 0..burst {
                            let mut tx = pool.begin().await.unwrap();
                            for &order in chunk {
                                let message = event(&topic, order);
                                written
                                    .entry(order.to_string())
                                    .or_default()
                                    .push(message.envelope.message_id.clone());
                                outbox_of(mode).write(&mut tx, &message).await.unwrap();
                            }
                            tx.commit().await.unwrap();
                        }
                    }
                }
                written
            })
        })
        .collect();
    let mut all = HashMap::new();
    for writer in writers {
        all.extend(writer.await.unwrap());
    }
    all
}

/// Every key's records in topic order, each message id at its first appearance only
/// (a republished duplicate later on is what the inboxes absorb).
fn first_appearances(records: &[Record]) -> HashMap<String, Vec<String>> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = HashSet::new();
    let mut per_key: HashMap<String, Vec<String>> = HashMap::new();
    for record in sorted {
        let id = record.headers["message_id"].clone();
        if seen.insert(id.clone()) {
            per_key.entry(record.key.clone()).or_default().push(id);
        }
    }
    per_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_mode_keeps_each_keys_events_in_commit_order_across_a_kill() {
    for mode in MODES {
        let db = database_for(mode).await;
        let topic = fresh_topic(6).await;
        // 200 orders with 50 events each, written while the relay runs, which is killed
        // midway (while the writers go on) and started again.
        let mut relay = spawn_relay_process(&db, mode, None);
        let writers = {
            let (db_pool, topic) = (db.pool.clone(), topic.clone());
            tokio::spawn(async move { write_many(&db_pool, mode, &topic, 200, 50, (5, 1)).await })
        };
        let some = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 2_000).await;
        assert!(some.len() >= 2_000, "{mode:?}: the relay was publishing when killed");
        kill_9(&mut relay).await;
        let unfinished = !writers.is_finished();
        let mut restarted = spawn_relay_process(&db, mode, None);
        let written = writers.await.unwrap();
        let total: usize = written.values().map(Vec::len).sum();
        assert_eq!(total, 10_000);
        assert!(
            unfinished,
            "{mode:?}: the kill came while events were still being written"
        );
        let expected: HashSet<String> = written.values().flatten().cloned().collect();
        let records = read_topic(&stack().kafka, &topic, Duration::from_secs(120), move |r| {
            distinct_of(r, &expected) == total
        })
        .await;
        let seen = first_appearances(&records);
        let out_of_order = written.iter().filter(|(key, ids)| seen.get(*key) != Some(ids)).count();
        println!(
            "{mode:?}: {} records on the topic for {total} events ({} republished after the kill); {out_of_order} keys out of order",
            records.len(),
            records.len() - total.min(records.len()),
        );
        assert_eq!(
            seen.values().map(Vec::len).sum::<usize>(),
            total,
            "{mode:?}: every event on the topic"
        );
        assert_eq!(out_of_order, 0, "{mode:?}: every key's events in commit order");
        kill_9(&mut restarted).await;
        release(&db, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_stops_the_relay_loudly_and_is_never_replaced_silently() {
    let db = database_for(OutboxMode::WalMessage).await;
    let slot = slot_of(&db);
    // The slot disappears while no relay runs (an operator drops it, or Postgres invalidates
    // it past max_slot_wal_keep_size): the events it held are gone from the WAL.
    drop_slot(&db).await;
    write_events(&db, OutboxMode::WalMessage, "orders.events", &[uuid::Uuid::now_v7()]).await;
    let (_stop, relay) = spawn_relay(&db, OutboxMode::WalMessage, &stack().kafka);
    let error = tokio::time::timeout(WAIT, relay)
        .await
        .expect("the relay stops instead of retrying")
        .unwrap()
        .expect_err("the relay refuses to go on");
    let error = format!("{error:#}");
    assert!(error.contains("no longer exists") && error.contains(&slot), "{error}");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
        .bind(&slot)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(slots, 0, "no new slot was created in its place");
    // And the stack's checks say so without a relay running.
    let status = relay::wal::slot_status(&db.pool, &slot).await.unwrap();
    assert!(
        matches!(status, Some(Err(relay::wal::SlotError::Missing { .. }))),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_databases_slot_advances_with_the_clusters_wal() {
    let db = database_for(OutboxMode::WalMessage).await;
    let slot = slot_of(&db);
    let (stop, relay) = spawn_relay(&db, OutboxMode::WalMessage, &stack().kafka);
    let confirmed = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let before = confirmed().await;
    // WAL written elsewhere in the cluster (another database), none of it events of this one.
    let other = orderflow_tests::fresh_orders_db().await;
    for _ in 0..20 {
        sqlx::query("SELECT pg_logical_emit_message(true, 'elsewhere', repeat('x', 10000))")
            .execute(&other.pool)
            .await
            .unwrap();
    }
    let advanced = eventually(WAIT, || async { confirmed().await != before }).await;
    assert!(
        advanced,
        "the slot's confirmed position moved past {before} without an event of its own"
    );
    let lag: f64 = sqlx::query_scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    println!(
        "idle slot: confirmed {before} -> {}, {lag} bytes behind",
        confirmed().await
    );
    stop.cancel();
    relay.await.unwrap().expect("the relay stops cleanly");
    drop_slot(&db).await;
}

/// Relays holding key-slot leases on `db`, and the slots they hold together.
async fn slot_holders(db: &TestDb) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(DISTINCT l.pid), count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = $2::int4::oid AND d.datname = $1",
    )
    .bind(&db.name)
    .bind(relay::SLOT_LOCK_CLASS)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_polling_relays_share_the_key_slots_and_keep_each_keys_order_across_a_kill() {
    // Three relays with small batches publish one database's outbox side by side while four
    // writers add 10,000 events (200 orders, 50 each); one relay is killed midway. Each key
    // must still have one publisher at a time: its events on the topic in commit order.
    let mode = OutboxMode::Table;
    let db = database_for(mode).await;
    let topic = fresh_topic(6).await;
    let mut relays: Vec<Child> = (0..3).map(|_| spawn_relay_process_with(&db, mode, None, 7)).collect();
    let writers = {
        let (pool, topic) = (db.pool.clone(), topic.clone());
        // One event per transaction, ten of a key in a row: a key's events are neighbours
        // in the outbox, so relays that did not own their keys would publish them in
        // concurrent batches (measured: without the key-slot leases this test fails).
        tokio::spawn(async move { write_many(&pool, mode, &topic, 200, 50, (1, 10)).await })
    };
    // The slots are shared out: every relay holds some, all 64 are held.
    let shared = eventually(WAIT, || async { slot_holders(&db).await == (3, 64) }).await;
    assert!(
        shared,
        "three relays share the 64 key slots: {:?}",
        slot_holders(&db).await
    );
    let some = read_topic(&stack().kafka, &topic, WAIT, |r| r.len() >= 2_000).await;
    assert!(some.len() >= 2_000, "the relays were publishing when one was killed");
    kill_9(&mut relays[0]).await;
    let unfinished = !writers.is_finished();
    // The dead relay's slots are taken over by the two others.
    let taken_over = eventually(WAIT, || async { slot_holders(&db).await == (2, 64) }).await;
    assert!(
        taken_over,
        "the survivors hold every slot: {:?}",
        slot_holders(&db).await
    );
    let written = writers.await.unwrap();
    let total: usize = written.values().map(Vec::len).sum();
    assert_eq!(total, 10_000);
    assert!(unfinished, "the kill came while events were still being written");
    let expected: HashSet<String> = written.values().flatten().cloned().collect();
    let records = read_topic(&stack().kafka, &topic, Duration::from_secs(120), move |r| {
        distinct_of(r, &expected) == total
    })
    .await;
    let seen = first_appearances(&records);
    let out_of_order = written.iter().filter(|(key, ids)| seen.get(*key) != Some(ids)).count();
    println!(
        "three relays, one killed: {} records for {total} events; {out_of_order} of {} keys out of order",
        records.len(),
        written.len()
    );
    assert_eq!(
        seen.values().map(Vec::len).sum::<usize>(),
        total,
        "every event on the topic"
    );
    assert_eq!(out_of_order, 0, "every key's events in commit order");
    for relay in &mut relays[1..] {
        kill_9(relay).await;
    }
}
