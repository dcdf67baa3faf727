//! The consumer runtime against the real broker: one partition stuck behind a failing
//! dependency never stops the others, and the stuck one resumes in order once it heals.

// Tests: a failed step must stop the test at once with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use orderflow::envelope::{self, EventMeta, OpenedEvent};
use orderflow::events::v1::OrderConfirmed;
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::consumer::{self, ConsumerSettings, Fresh, Handler, HandlerError, Incoming};
use orderflow_platform::{kafka, outbox};
use orderflow_tests::{PrivateKafka, eventually, fresh_orders_db, fresh_topic, stack};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// Handles everything, except that messages of one key fail transiently (a dependency that
/// is away) until `healed`. Records each handled message's key and sequence number.
struct Flaky {
    stuck_key: String,
    healed: Arc<AtomicBool>,
}

impl Handler for Flaky {
    type Committed = ();

    fn inbox(&self) -> &'static str {
        "flaky"
    }

    fn wants(&self, _event: &OpenedEvent) -> bool {
        true
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> Result<Vec<()>, (usize, HandlerError)> {
        for (at, fresh) in batch.iter().enumerate() {
            if key_of(fresh.message) == self.stuck_key && !self.healed.load(Ordering::SeqCst) {
                return Err((at, HandlerError::Transient(anyhow::anyhow!("the dependency is away"))));
            }
            insert_handled(tx, fresh.message, fresh.event)
                .await
                .map_err(|error| (at, error))?;
        }
        Ok(Vec::new())
    }
}

/// Records `message` in the `handled` table: its key, its sequence number and its partition.
async fn insert_handled(
    tx: &mut Transaction<'static, Postgres>,
    message: &Incoming,
    event: &OpenedEvent,
) -> Result<(), HandlerError> {
    let Payload::OrderConfirmed(confirmed) = &event.payload else {
        return Ok(());
    };
    sqlx::query("INSERT INTO handled (key, seq, partition, handled_at) VALUES ($1, $2::int, $3, clock_timestamp())")
        .bind(key_of(message))
        .bind(&confirmed.payment_id)
        .bind(message.partition)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn key_of(message: &Incoming) -> String {
    String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()).into_owned()
}

impl Flaky {
    /// One whose dependency never fails.
    fn healthy() -> Self {
        Self {
            stuck_key: String::new(),
            healed: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// A fresh database with the table [`Flaky`] records each handled message in.
async fn db_with_handled_table() -> orderflow_tests::TestDb {
    let db = fresh_orders_db().await;
    sqlx::query("CREATE TABLE handled (key text NOT NULL, seq int NOT NULL, partition int NOT NULL, handled_at timestamptz NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    db
}

/// An envelope for `key` carrying `seq` (in the payment_id field: any string field would do).
fn record(key: uuid::Uuid, seq: usize) -> Vec<u8> {
    let meta = EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id: key,
        correlation_id: key,
        causation_id: None,
        traceparent: None,
        occurred_at: outbox::now_timestamp(),
    };
    let payload = Payload::OrderConfirmed(OrderConfirmed {
        order_id: key.to_string(),
        payment_id: seq.to_string(),
        total: None,
        order_version: 1,
    });
    orderflow_tests::event_keys().seal(&envelope::seal(meta, payload))
}

/// Sends one record per entry of `keys`, each carrying its key's next sequence number (kept
/// in `sent`); returns the partition each landed on, once all are acknowledged.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    keys: &[uuid::Uuid],
    sent: &mut HashMap<uuid::Uuid, usize>,
) -> Vec<i32> {
    let mut deliveries = Vec::new();
    for &key in keys {
        let n = sent.entry(key).or_default();
        let payload = record(key, *n);
        *n += 1;
        let key_text = key.to_string();
        deliveries.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key_text).payload(&payload))
                .map_err(|(error, _)| error)
                .unwrap(),
        );
    }
    let mut partitions = Vec::new();
    for delivery in deliveries {
        partitions.push(delivery.await.unwrap().map_err(|(error, _)| error).unwrap().partition);
    }
    partitions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stuck_behind_a_failing_dependency_does_not_stop_the_others() {
    let db = db_with_handled_table().await;
    let topic = fresh_topic(4).await;
    let bootstrap = stack().kafka.clone();

    // Keys spread over the 4 partitions; the stuck key has far more messages than its
    // partition's queue holds (64 here), so its queue fills and its partition must be paused.
    let keys: Vec<uuid::Uuid> = (0..40).map(|_| uuid::Uuid::now_v7()).collect();
    let stuck = keys[0];
    let producer: FutureProducer = kafka::producer_config(&bootstrap, "stall-test", kafka::DEFAULT_DELIVERY_TIMEOUT)
        .create()
        .unwrap();
    let mut sent: HashMap<uuid::Uuid, usize> = HashMap::new();
    // Two of every three messages are the stuck key's: 200 of them, the rest spread.
    let sent_keys: Vec<uuid::Uuid> = (0..300)
        .map(|i| if i % 3 < 2 { stuck } else { keys[1 + i % 39] })
        .collect();
    let partitions = send(&producer, &topic, &sent_keys, &mut sent).await;
    assert_eq!(sent[&stuck], 200);
    // Other keys on the stuck key's partition wait behind it (one partition, one order);
    // every message of the other partitions must get through.
    let partition_of: HashMap<uuid::Uuid, i32> = sent_keys.iter().copied().zip(partitions.iter().copied()).collect();
    let stuck_partition = partition_of[&stuck];
    let others = partitions.iter().filter(|&&p| p != stuck_partition).count();
    assert!(others > 0, "every key landed on the stuck key's partition");

    let healed = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(Flaky {
        stuck_key: stuck.to_string(),
        healed: healed.clone(),
    });
    let shutdown = CancellationToken::new();
    // No retry budget: this test is about a partition that waits for its dependency.
    let settings = ConsumerSettings {
        retry_budget: None,
        partition_queue: 64,
        ..ConsumerSettings::new(
            bootstrap,
            format!("stall-{}", uuid::Uuid::now_v7().simple()),
            vec![topic.clone()],
            orderflow_tests::event_keys().verifier.clone(),
        )
    };
    let consumer = tokio::spawn(consumer::run(settings, db.pool.clone(), handler, shutdown.clone()));

    let handled = |pool: sqlx::PgPool, key: Option<String>| async move {
        let count: i64 = match key {
            Some(key) => sqlx::query_scalar("SELECT count(*) FROM handled WHERE key = $1")
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap(),
            None => sqlx::query_scalar("SELECT count(*) FROM handled WHERE partition <> $1")
                .bind(stuck_partition)
                .fetch_one(&pool)
                .await
                .unwrap(),
        };
        usize::try_from(count).unwrap()
    };
    // Every message of the other partitions is handled while the stuck key retries.
    assert!(
        eventually(Duration::from_secs(60), || handled(db.pool.clone(), None)
            .map_eq(others))
        .await,
        "the other partitions stopped: {} of {others} handled",
        handled(db.pool.clone(), None).await
    );
    assert_eq!(handled(db.pool.clone(), Some(stuck.to_string())).await, 0);

    // A second wave, produced while the stuck partition's queue is full and the partition
    // paused: the poll loop must still be taking messages for everyone else.
    let elsewhere: Vec<uuid::Uuid> = partition_of
        .iter()
        .filter(|(_, partition)| **partition != stuck_partition)
        .map(|(key, _)| *key)
        .collect();
    let wave: Vec<uuid::Uuid> = (0..100).map(|i| elsewhere[i % elsewhere.len()]).collect();
    let wave_partitions = send(&producer, &topic, &wave, &mut sent).await;
    assert!(wave_partitions.iter().all(|&p| p != stuck_partition));
    let others = others + 100;
    assert!(
        eventually(Duration::from_secs(30), || handled(db.pool.clone(), None)
            .map_eq(others))
        .await,
        "the poll loop stopped behind the stuck partition: {} of {others} handled",
        handled(db.pool.clone(), None).await
    );

    // The dependency heals: the stuck key's messages are all handled, in order.
    healed.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(60), || handled(
            db.pool.clone(),
            Some(stuck.to_string())
        )
        .map_eq(200))
        .await,
        "the stuck partition did not resume"
    );
    let order: Vec<i32> = sqlx::query_scalar("SELECT seq FROM handled WHERE key = $1 ORDER BY handled_at")
        .bind(stuck.to_string())
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        order,
        (0..200).collect::<Vec<i32>>(),
        "the stuck key's messages in order"
    );

    shutdown.cancel();
    consumer.await.unwrap().expect("the consumer stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_fails_transiently_past_its_budget_is_dead_lettered_and_its_partition_flows() {
    let db = db_with_handled_table().await;
    // One partition: the failing key's messages sit in front of the others'.
    let topic = fresh_topic(1).await;
    let bootstrap = stack().kafka.clone();
    let producer: FutureProducer = kafka::producer_config(&bootstrap, "budget-test", kafka::DEFAULT_DELIVERY_TIMEOUT)
        .create()
        .unwrap();
    let (failing, healthy) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let mut sent = HashMap::new();
    send(
        &producer,
        &topic,
        &[failing, healthy, failing, healthy, healthy],
        &mut sent,
    )
    .await;

    // The failing key never heals: without a budget its partition would wait forever.
    let handler = Arc::new(Flaky {
        stuck_key: failing.to_string(),
        healed: Arc::new(AtomicBool::new(false)),
    });
    // The runtime's metrics, served as a process serves them: the message retrying must show.
    let metrics = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    orderflow_platform::telemetry::install_metrics(metrics).expect("install the recorder");
    let group = format!("budget-{}", uuid::Uuid::now_v7().simple());
    let gauge = |name: &'static str| {
        let (addr, label) = (metrics.to_string(), format!("group=\"{group}\""));
        async move {
            tokio::task::spawn_blocking(move || ordersctl::bench::probe::scrape_sum(&addr, name, &label))
                .await
                .unwrap()
                .unwrap_or(0.0)
        }
    };
    let shutdown = CancellationToken::new();
    let settings = ConsumerSettings {
        retry_budget: Some(Duration::from_secs(3)),
        ..ConsumerSettings::new(
            bootstrap.clone(),
            group.clone(),
            vec![topic.clone()],
            orderflow_tests::event_keys().verifier.clone(),
        )
    };
    let consumer = tokio::spawn(consumer::run(settings, db.pool.clone(), handler, shutdown.clone()));
    assert!(
        eventually(Duration::from_secs(30), || async {
            gauge(orderflow_platform::telemetry::CONSUMER_RETRYING).await == 1.0
        })
        .await,
        "the message failing over and over shows as retrying"
    );

    let healthy_handled = || async {
        sqlx::query_scalar::<_, i32>("SELECT seq FROM handled WHERE key = $1 ORDER BY handled_at")
            .bind(healthy.to_string())
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(30), || async { healthy_handled().await.len() == 3 }).await,
        "the partition stayed stuck behind the failing key: {:?} handled",
        healthy_handled().await
    );
    assert_eq!(healthy_handled().await, vec![0, 1, 2], "in order");
    assert_eq!(
        gauge(orderflow_platform::telemetry::CONSUMER_RETRYING).await,
        0.0,
        "nothing retries any more"
    );
    assert_eq!(
        gauge(orderflow_platform::telemetry::CONSUMER_BUDGET_EXHAUSTED).await,
        2.0
    );

    let letters = {
        let dlq = orderflow::topics::dead_letter(&topic);
        let cluster = bootstrap.clone();
        tokio::task::spawn_blocking(move || ordersctl::dlq::read_all(&cluster, &dlq))
            .await
            .unwrap()
            .unwrap()
    };
    let failing_key = failing.to_string();
    let dead: Vec<_> = letters
        .iter()
        .filter(|letter| letter.key.as_deref() == Some(failing_key.as_bytes()))
        .collect();
    assert_eq!(dead.len(), 2, "both of the failing key's messages are dead-lettered");
    for letter in dead {
        let reason = letter.header("dlq.error").unwrap_or_default();
        assert!(
            reason.contains("retry budget") && reason.contains("the dependency is away"),
            "the reason names the budget and the last error: {reason}"
        );
    }
    shutdown.cancel();
    consumer.await.unwrap().expect("the consumer stops cleanly");
}

/// `future.map_eq(n)`: whether the count it yields is `n`.
trait MapEq {
    fn map_eq(self, expected: usize) -> impl std::future::Future<Output = bool> + Send;
}

impl<F: std::future::Future<Output = usize> + Send> MapEq for F {
    async fn map_eq(self, expected: usize) -> bool {
        self.await == expected
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_holds_no_partition_for_too_long_gives_up() {
    // Nothing listens on port 9: the consumer can never join its group. Its supervisor must
    // learn of it (the process exits), instead of a process that looks alive and does nothing.
    let db = fresh_orders_db().await;
    let settings = ConsumerSettings {
        unassigned_limit: Some(Duration::from_secs(2)),
        ..ConsumerSettings::new(
            kafka::Cluster::anonymous("127.0.0.1:9"),
            "nobody".into(),
            vec!["orders.events".into()],
            orderflow_tests::event_keys().verifier.clone(),
        )
    };
    let handler = Arc::new(Flaky::healthy());
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        consumer::run(settings, db.pool.clone(), handler, CancellationToken::new()),
    )
    .await
    .expect("the consumer gave up instead of waiting forever");
    let error = outcome.expect_err("holding no partition is an error");
    assert!(error.to_string().contains("held no partition"), "{error:#}");
}

/// Never finishes handling anything: a dependency call without a timeout that never answers.
struct Hanging;

impl Handler for Hanging {
    type Committed = ();

    fn inbox(&self) -> &'static str {
        "hanging"
    }

    fn wants(&self, _event: &OpenedEvent) -> bool {
        true
    }

    async fn handle(
        &self,
        _tx: &mut Transaction<'static, Postgres>,
        _batch: &[Fresh<'_>],
    ) -> Result<Vec<()>, (usize, HandlerError)> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_making_progress_gives_up() {
    // It holds its partition, its records wait, and it neither receives nor attempts
    // anything: without the watchdog it would look alive for ever while its orders time out.
    let db = fresh_orders_db().await;
    let topic = fresh_topic(1).await;
    let bootstrap = stack().kafka.clone();
    let producer: FutureProducer = kafka::producer_config(&bootstrap, "stall-test", Duration::from_secs(10))
        .create()
        .unwrap();
    let keys: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    send(&producer, &topic, &keys, &mut HashMap::new()).await;
    let settings = ConsumerSettings {
        stall_limit: Some(Duration::from_secs(3)),
        statistics_interval: Duration::from_millis(500),
        ..ConsumerSettings::new(
            bootstrap,
            format!("stall-{topic}"),
            vec![topic.clone()],
            orderflow_tests::event_keys().verifier.clone(),
        )
    };
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        consumer::run(settings, db.pool.clone(), Arc::new(Hanging), CancellationToken::new()),
    )
    .await
    .expect("the consumer gave up instead of hanging for ever");
    let error = outcome.expect_err("a stall is an error");
    assert!(error.to_string().contains("stalled: 3 records"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stops_in_bounded_time_while_its_broker_does_not_answer() {
    // A consumer that decides to exit (shutdown, a stall, no partition for too long) must exit
    // even when its group coordinator never answers again: its supervisor restarts it only
    // then. A broker of this test's own, stopped with SIGSTOP (connections open, no answers).
    let broker = PrivateKafka::new(1);
    broker.start().await;
    let db = db_with_handled_table().await;
    let topic = orderflow::topics::ORDERS_EVENTS.to_owned();
    let settings = ConsumerSettings::new(
        broker.cluster.clone(),
        "closing".into(),
        vec![topic.clone()],
        orderflow_tests::event_keys().verifier.clone(),
    );
    let handler = Arc::new(Flaky::healthy());
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(settings, db.pool.clone(), handler, shutdown.clone()));
    let producer: FutureProducer = kafka::producer_config(&broker.cluster, "closing-test", Duration::from_secs(10))
        .create()
        .unwrap();
    send(&producer, &topic, &[uuid::Uuid::now_v7()], &mut HashMap::new()).await;
    let handled = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM handled")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(60), || async { handled().await == 1 }).await,
        "the consumer joined its group and handled a message"
    );

    broker.pause().await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(45), consumer).await;
    broker.resume().await;
    stopped
        .expect("the consumer stopped while its broker did not answer")
        .unwrap()
        .expect("a requested shutdown is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_consumer_starts_a_new_client_instead_of_giving_up() {
    // order-svc's consumer: holding no partition (nothing listens on port 9) makes `run` give
    // up after 1 s; `run_reconnecting` starts a new client each time, for as long as it runs,
    // and stops cleanly when asked.
    let db = fresh_orders_db().await;
    let settings = ConsumerSettings {
        unassigned_limit: Some(Duration::from_secs(1)),
        ..ConsumerSettings::new(
            kafka::Cluster::anonymous("127.0.0.1:9"),
            "reconnecting".into(),
            vec!["orders.events".into()],
            orderflow_tests::event_keys().verifier.clone(),
        )
    };
    let handler = Arc::new(Flaky::healthy());
    let shutdown = CancellationToken::new();
    let mut consumer = tokio::spawn(consumer::run_reconnecting(
        settings,
        db.pool.clone(),
        handler,
        shutdown.clone(),
    ));
    // Several give-ups' worth of time: `run` alone would have returned its error after 1 s.
    assert!(
        tokio::time::timeout(Duration::from_secs(6), &mut consumer)
            .await
            .is_err(),
        "the consumer kept reconnecting instead of returning"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), consumer)
        .await
        .expect("it stops when asked")
        .unwrap()
        .expect("a requested stop is not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_of_every_partition_share_a_transaction_and_a_bad_one_never_fails_its_neighbours() {
    let db = fresh_orders_db().await;
    // txid: rows written in one transaction share it, so the batches can be seen.
    sqlx::query(
        "CREATE TABLE handled (key text NOT NULL, seq int NOT NULL, partition int NOT NULL,
                               handled_at timestamptz NOT NULL, txid bigint NOT NULL DEFAULT txid_current())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let topic = fresh_topic(3).await;
    let bootstrap = stack().kafka.clone();
    let producer: FutureProducer = kafka::producer_config(&bootstrap, "batch-test", Duration::from_secs(10))
        .create()
        .unwrap();
    // Everything is on the topic before the consumer starts, so units of work form across
    // the partitions: 120 messages of six keys, one of them sent twice (a redelivery), and one
    // record that is not an envelope at all, in the middle.
    let keys: Vec<uuid::Uuid> = (0..6).map(|_| uuid::Uuid::now_v7()).collect();
    let mut records: Vec<(String, Vec<u8>)> = (0..120)
        .map(|n| (keys[n % 6].to_string(), record(keys[n % 6], n / 6)))
        .collect();
    records.insert(7, records[6].clone());
    records.insert(20, (keys[0].to_string(), b"not an envelope".to_vec()));
    for (key, payload) in &records {
        producer
            .send(
                FutureRecord::to(&topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .unwrap();
    }
    let settings = ConsumerSettings::new(
        bootstrap.clone(),
        format!("batch-{topic}"),
        vec![topic.clone()],
        orderflow_tests::event_keys().verifier.clone(),
    );
    let handler = Arc::new(Flaky::healthy());
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(settings, db.pool.clone(), handler, shutdown.clone()));
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM handled")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(60), || async { count().await == 120 }).await,
        "every good message was handled once (the repeated one is a duplicate)"
    );
    let per_key: Vec<(String, Vec<i32>)> =
        sqlx::query_as("SELECT key, array_agg(seq ORDER BY handled_at, seq) FROM handled GROUP BY key ORDER BY key")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (key, seqs) in per_key {
        assert_eq!(seqs, (0..20).collect::<Vec<i32>>(), "key {key}: in order, each once");
    }
    let (largest_unit, most_partitions): (i64, i64) = sqlx::query_as(
        "SELECT max(n), max(p) FROM (SELECT count(*) AS n, count(DISTINCT partition) AS p FROM handled GROUP BY txid) u",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(largest_unit > 1, "queued messages were committed together");
    assert!(most_partitions > 1, "a unit of work spans partitions");
    let letters = {
        let dlq = orderflow::topics::dead_letter(&topic);
        tokio::task::spawn_blocking(move || ordersctl::dlq::read_all(&bootstrap, &dlq))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(letters.len(), 1, "the bad record alone was dead-lettered");
    shutdown.cancel();
    consumer.await.unwrap().expect("the consumer stops cleanly");
}
