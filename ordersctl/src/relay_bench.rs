//! `ordersctl relay-bench`: every relay mode on the same Postgres and Kafka, in one run.
//!
//! Per mode, on a database and a topic of its own:
//! - **write**: `events` events written through the outbox API (transactions of
//!   `events_per_tx` events, four writers, `keys` orders), with the WAL bytes and Postgres CPU
//!   they cost per event;
//! - **drain**: the relay started on the whole backlog; events/s until the last one is on
//!   the topic, the relay's CPU (this process's, less the writers' idle time) and Postgres's
//!   per event;
//! - **order**: the topic read back; every key's events at their first appearance must be
//!   in commit order (0 violations);
//! - **lag**: events written at a fixed rate while the relay runs; commit → readable on the
//!   topic, p50/p99, measured by a consumer.
//!
//! The relay runs inside this process (the library the binary runs), as the stack's
//! superuser (the replication slot needs REPLICATION; a benchmark needs no least privilege).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use orderflow::envelope::{self, EventMeta};
use orderflow::events::v1::OrderConfirmed;
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::outbox::{OutboxMessage, OutboxMode};
use orderflow_platform::{Secret, kafka};
use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The benchmark's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayBenchArgs {
    /// Events pre-written for the drain.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Events drained through the polling relay first, unmeasured (warms the broker up).
    #[arg(long, default_value_t = 50_000)]
    pub warmup_events: usize,
    /// Distinct keys (orders) among them.
    #[arg(long, default_value_t = 2_000)]
    pub keys: usize,
    /// Events per writing transaction.
    #[arg(long, default_value_t = 10)]
    pub events_per_tx: usize,
    /// Rates of the lag measurements, events a second (repeatable).
    #[arg(long = "lag-rate", default_values_t = vec![1_000u32, 2_000, 5_000])]
    pub lag_rates: Vec<u32>,
    /// Seconds of each lag measurement.
    #[arg(long, default_value_t = 10)]
    pub lag_secs: u64,
    /// Modes to measure (repeatable; all by default).
    #[arg(long = "mode", value_enum)]
    pub modes: Vec<OutboxMode>,
    /// Variants to measure by their label (`table`, `table depth1`, `table x2`, `table+ktxn`,
    /// `wal-message`, `debezium`), in this order, each as often as given: alternated, so that
    /// no variant always runs first or last (repeatable; all, once each, by default).
    #[arg(long = "variant")]
    pub variants: Vec<String>,
    /// Also the table mode with this many relays side by side (key slots shared; 1: not).
    #[arg(long, default_value_t = 2)]
    pub table_relays: usize,
    /// Also the table mode with each batch in a Kafka transaction.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka_transactions: bool,
    /// Also Debezium's Postgres connector (Kafka Connect standalone) with the jars in this
    /// directory (scripts/relay-bench --debezium fetches them; deploy/debezium/pom.xml).
    #[arg(long, env = "ORDERFLOW_DEBEZIUM_LIBS")]
    pub debezium: Option<std::path::PathBuf>,
    /// The polling relay's batch size.
    #[arg(long, default_value_t = 500)]
    pub batch_size: i64,
    /// Partitions of each benchmark topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// The Postgres superuser's URL (scratch databases, the slot).
    #[arg(long, env = "ORDERFLOW_PG_ADMIN_URL", hide_env_values = true)]
    pub admin_db: Secret,
}

/// One mode's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeResult {
    /// The mode.
    pub mode: String,
    /// Events drained.
    pub events: usize,
    /// Drain rate, from the relay's start.
    pub drain_events_per_sec: f64,
    /// Seconds from the relay's start to the first record on the topic (Kafka Connect's JVM
    /// start and the connector's setup, for Debezium).
    pub first_record_secs: f64,
    /// Drain rate from the first record on.
    pub drain_after_first_events_per_sec: f64,
    /// WAL written per event by the writers (business transaction side).
    pub write_wal_bytes_per_event: f64,
    /// Postgres CPU per event while writing, microseconds.
    pub write_pg_cpu_us_per_event: f64,
    /// Postgres CPU per event while draining, microseconds.
    pub drain_pg_cpu_us_per_event: f64,
    /// WAL written per event while draining (the polling relay's marks; the slot's nothing).
    pub drain_wal_bytes_per_event: f64,
    /// This process's CPU per event while draining (the relay, and an idle watcher).
    pub relay_cpu_us_per_event: f64,
    /// Keys whose events are out of commit order on the topic (first appearances).
    pub order_violations: usize,
    /// Records on the topic beyond one per event.
    pub duplicates: usize,
    /// Lag (commit → readable) per offered rate: (rate, p50 ms, p99 ms, achieved rate).
    pub lag: Vec<(u32, f64, f64, f64)>,
}

/// Runs the benchmark and prints a table; returns the results.
pub async fn run(args: RelayBenchArgs, cluster: &kafka::Cluster) -> anyhow::Result<Vec<ModeResult>> {
    let variants = [
        Variant {
            mode: OutboxMode::Table,
            relays: 1,
            kafka_transactions: false,
            debezium: false,
            unpipelined: false,
        },
        Variant {
            mode: OutboxMode::Table,
            relays: 1,
            kafka_transactions: false,
            debezium: false,
            unpipelined: true,
        },
        Variant {
            mode: OutboxMode::Table,
            relays: args.table_relays.max(2),
            kafka_transactions: false,
            debezium: false,
            unpipelined: false,
        },
        Variant {
            mode: OutboxMode::Table,
            relays: 1,
            kafka_transactions: true,
            debezium: false,
            unpipelined: false,
        },
        Variant {
            mode: OutboxMode::WalMessage,
            relays: 1,
            kafka_transactions: false,
            debezium: false,
            unpipelined: false,
        },
        Variant {
            mode: OutboxMode::Table,
            relays: 1,
            kafka_transactions: false,
            debezium: true,
            unpipelined: false,
        },
    ];
    if args.warmup_events > 0 {
        // A broker just started runs its JIT compiler for the first minute or so (measured in
        // docs/performance.md: 10% of all CPU samples): whichever variant came first paid it.
        eprintln!(
            "[warm-up] {} events through the polling relay, not measured",
            args.warmup_events
        );
        let warmup = RelayBenchArgs {
            events: args.warmup_events,
            lag_rates: Vec::new(),
            ..args.clone()
        };
        run_mode(&warmup, cluster, variants[0]).await?;
    }
    let chosen: Vec<Variant> = if args.variants.is_empty() {
        variants.to_vec()
    } else {
        args.variants
            .iter()
            .map(|label| {
                variants
                    .iter()
                    .copied()
                    .find(|variant| variant.label() == *label)
                    .ok_or_else(|| anyhow::anyhow!("no variant is labelled {label:?}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let mut results = Vec::new();
    for variant in chosen {
        let wanted = args.modes.is_empty() || args.modes.contains(&variant.mode);
        let skipped = (variant.debezium && args.debezium.is_none())
            || (variant.relays > 1 && args.table_relays < 2)
            || (variant.kafka_transactions && !args.kafka_transactions);
        if !wanted || skipped {
            continue;
        }
        let result = run_mode(&args, cluster, variant).await?;
        println!("{}", serde_json::to_string(&result)?);
        results.push(result);
    }
    println!();
    println!(
        "{:<12} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>7} {:>6}  lag p50/p99 ms at rate",
        "mode", "drain ev/s", "write WAL B", "write PG us", "drain PG us", "drain WAL B", "relay us", "order", "dups"
    );
    for r in &results {
        let lag: Vec<String> = r
            .lag
            .iter()
            .map(|(rate, p50, p99, achieved)| format!("{rate}/s ({achieved:.0}): {p50:.1}/{p99:.1}"))
            .collect();
        println!(
            "{:<12} {:>10.0} {:>12.0} {:>12.1} {:>12.1} {:>12.0} {:>12.1} {:>7} {:>6}  {}",
            r.mode,
            r.drain_events_per_sec,
            r.write_wal_bytes_per_event,
            r.write_pg_cpu_us_per_event,
            r.drain_pg_cpu_us_per_event,
            r.drain_wal_bytes_per_event,
            r.relay_cpu_us_per_event,
            r.order_violations,
            r.duplicates,
            lag.join("; ")
        );
    }
    Ok(results)
}

/// A scratch database migrated like the orders database; returns its URL (as the superuser)
/// and a pool.
async fn scratch_database(admin: &Secret, name: &str) -> anyhow::Result<(Secret, PgPool)> {
    let admin_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin.expose())
        .await
        .context("connect with ORDERFLOW_PG_ADMIN_URL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin_pool)
        .await?;
    let mut url = url::Url::parse(admin.expose())?;
    url.set_path(&format!("/{name}"));
    let url = Secret::new(url.to_string());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(url.expose())
        .await?;
    order_svc::MIGRATOR.run(&pool).await?;
    Ok((url, pool))
}

async fn drop_database(admin: &Secret, name: &str) -> anyhow::Result<()> {
    let admin_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin.expose())
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&admin_pool)
        .await?;
    Ok(())
}

async fn wal_lsn(pool: &PgPool) -> anyhow::Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
            .fetch_one(pool)
            .await?,
    )
}

/// Postgres's CPU so far (every backend and background process), in clock ticks.
fn postgres_ticks() -> u64 {
    crate::bench::probe::CpuMeter::new(None)
        .ticks()
        .get("postgres")
        .copied()
        .unwrap_or(0)
}

/// This process's CPU so far, in clock ticks.
fn own_ticks() -> u64 {
    crate::bench::probe::CpuMeter::new(None)
        .ticks()
        .get("ordersctl-bench")
        .copied()
        .unwrap_or(0)
}

fn event(topic: &str, order: uuid::Uuid) -> OutboxMessage {
    let now = orderflow_platform::outbox::now_timestamp();
    OutboxMessage {
        topic: topic.to_owned(),
        envelope: envelope::seal(
            EventMeta {
                message_id: uuid::Uuid::now_v7(),
                aggregate_id: order,
                correlation_id: order,
                causation_id: None,
                traceparent: None,
                occurred_at: now,
            },
            Payload::OrderConfirmed(OrderConfirmed {
                order_id: order.to_string(),
                ..Default::default()
            }),
        ),
    }
}

/// Writes `count` events over `orders` from four writers, `per_tx` per transaction, at most
/// `rate` a second (None: as fast as they go); returns each key's message ids in commit order.
async fn write(
    pool: &PgPool,
    mode: OutboxMode,
    topic: &str,
    orders: &[uuid::Uuid],
    count: usize,
    per_tx: usize,
    rate: Option<u32>,
) -> anyhow::Result<HashMap<String, Vec<String>>> {
    const WRITERS: usize = 4;
    let transactions = count.div_ceil(per_tx);
    // Signed as order-svc signs its events (the signing is part of a writer's cost), with a
    // key of its own: the relay publishes what it holds without reading it.
    let outbox = orderflow_platform::outbox::Outbox::new(
        mode,
        orderflow_platform::signing::EventSigner::ephemeral(orderflow_platform::signing::ORDER_SVC)?,
    );
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (pool, topic, outbox) = (pool.clone(), topic.to_owned(), outbox.clone());
        // Each writer owns a disjoint set of keys: one key's events are committed one after
        // another, as one order's events are in the system.
        let keys: Vec<uuid::Uuid> = orders.iter().skip(writer).step_by(WRITERS).copied().collect();
        let mine = transactions / WRITERS + usize::from(writer < transactions % WRITERS);
        let interval = rate.map(|rate| Duration::from_secs_f64((WRITERS * per_tx) as f64 / f64::from(rate.max(1))));
        tasks.push(tokio::spawn(async move {
            let mut written: HashMap<String, Vec<String>> = HashMap::new();
            let mut ticker = interval.map(tokio::time::interval);
            let mut next_key = 0usize;
            for _ in 0..mine {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let mut tx = pool.begin().await?;
                for _ in 0..per_tx {
                    let order = keys[next_key % keys.len()];
                    next_key += 1;
                    let message = event(&topic, order);
                    written
                        .entry(order.to_string())
                        .or_default()
                        .push(message.envelope.message_id.clone());
                    outbox.write(&mut tx, &message).await?;
                }
                tx.commit().await?;
            }
            anyhow::Ok(written)
        }));
    }
    let mut all: HashMap<String, Vec<String>> = HashMap::new();
    for task in tasks {
        for (key, ids) in task.await?? {
            all.entry(key).or_default().extend(ids);
        }
    }
    Ok(all)
}

/// Records on `topic` so far (the sum of its partitions' high watermarks).
fn topic_size(consumer: &rdkafka::consumer::BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let mut total = 0;
    for partition in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5))?;
        total += high - low;
    }
    Ok(total)
}

/// One way of relaying, measured on its own.
#[derive(Debug, Clone, Copy)]
struct Variant {
    mode: OutboxMode,
    /// Polling relays side by side (key slots shared between them).
    relays: usize,
    /// Each batch in a Kafka transaction.
    kafka_transactions: bool,
    /// Debezium's Postgres connector on Kafka Connect standalone instead of our relay, on the
    /// outbox table (its outbox event router), from the jars in `--debezium`.
    debezium: bool,
    /// The polling relay one batch at a time (RELAY_PIPELINE_DEPTH=1): how it published
    /// before batches were pipelined, beside the default in the same run.
    unpipelined: bool,
}

impl Variant {
    fn label(self) -> String {
        match self.mode {
            OutboxMode::Table if self.debezium => "debezium".to_owned(),
            OutboxMode::WalMessage => "wal-message".to_owned(),
            OutboxMode::Table if self.kafka_transactions => "table+ktxn".to_owned(),
            OutboxMode::Table if self.relays > 1 => format!("table x{}", self.relays),
            OutboxMode::Table if self.unpipelined => "table depth1".to_owned(),
            OutboxMode::Table => "table".to_owned(),
        }
    }
}

/// Relays started: the token that stops them, their tasks, and the process id of a relay
/// that runs outside this process (Kafka Connect), for its CPU.
type Running = (
    CancellationToken,
    Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    Option<u32>,
);

/// Starts the relay(s) of `variant` on `url`'s database.
fn start_relay(
    variant: Variant,
    debezium_libs: Option<&std::path::Path>,
    url: &Secret,
    pool: &PgPool,
    cluster: &kafka::Cluster,
    batch_size: i64,
    slot: &str,
) -> anyhow::Result<Running> {
    let token = CancellationToken::new();
    let mut tasks = Vec::new();
    if variant.debezium {
        let libs = debezium_libs.ok_or_else(|| anyhow::anyhow!("--debezium names no jars"))?;
        let mut connect = debezium::start(libs, url, cluster, slot)?;
        let pid = connect.id();
        let stop = token.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {
                    debezium::stop(&mut connect).await;
                    Ok(())
                }
                status = connect.wait() => anyhow::bail!("Kafka Connect exited: {:?}", status?),
            }
        }));
        return Ok((token, tasks, pid));
    }
    for n in 0..variant.relays.max(1) {
        let mut config = kafka::producer_config(cluster, "relay-bench", kafka::DEFAULT_DELIVERY_TIMEOUT);
        if variant.kafka_transactions {
            config.set(
                "transactional.id",
                format!("relay-bench-{}-{n}", uuid::Uuid::now_v7().simple()),
            );
        }
        let producer = config.create()?;
        tasks.push(match variant.mode {
            OutboxMode::Table => {
                let relay = relay::Relay::new(pool.clone(), producer, batch_size).coalescing(Duration::from_millis(5));
                let relay = if variant.unpipelined {
                    relay.pipelining(1)
                } else {
                    relay
                };
                let relay = if variant.kafka_transactions {
                    relay.with_kafka_transactions()
                } else {
                    relay
                };
                tokio::spawn(relay.run(Duration::from_millis(1_000), token.clone()))
            }
            OutboxMode::WalMessage => {
                let replication =
                    relay::wal::replication_config(url, slot)?.with_status_interval(Duration::from_millis(1_000));
                tokio::spawn(relay::wal::WalRelay::new(pool.clone(), producer, replication).run(token.clone()))
            }
        });
    }
    Ok((token, tasks, None))
}

async fn run_mode(args: &RelayBenchArgs, cluster: &kafka::Cluster, variant: Variant) -> anyhow::Result<ModeResult> {
    let mode = variant.mode;
    let name = format!(
        "relaybench_{}_{}",
        variant.label().replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        uuid::Uuid::now_v7().simple()
    );
    eprintln!("[{}] scratch database {name}", variant.label());
    let (url, pool) = scratch_database(&args.admin_db, &name).await?;
    let slot = relay::wal::default_slot_name(&name);
    if mode == OutboxMode::WalMessage {
        relay::wal::ensure_slot(&pool, &slot).await?;
    }
    if variant.debezium {
        // Before the first event: the connector streams from the slot's start (no snapshot).
        debezium::prepare(&pool, &slot).await?;
    }
    let topic = format!("relaybench.{}", uuid::Uuid::now_v7().simple());
    kafka::ensure_topics(cluster, &[&topic], args.partitions).await?;
    let orders: Vec<uuid::Uuid> = (0..args.keys).map(|_| uuid::Uuid::now_v7()).collect();

    // Write the backlog.
    let (wal_before, pg_before, started) = (wal_lsn(&pool).await?, postgres_ticks(), Instant::now());
    let written = write(&pool, mode, &topic, &orders, args.events, args.events_per_tx, None).await?;
    let events: usize = written.values().map(Vec::len).sum();
    let (wal_written, pg_written) = (wal_lsn(&pool).await? - wal_before, postgres_ticks() - pg_before);
    eprintln!(
        "[{}] wrote {events} events in {:.1} s",
        variant.label(),
        started.elapsed().as_secs_f64()
    );

    // Drain it.
    let watcher: rdkafka::consumer::BaseConsumer = cluster.client_config().create()?;
    let (wal_before, pg_before, own_before) = (wal_lsn(&pool).await?, postgres_ticks(), own_ticks());
    let started = Instant::now();
    let (stop, relays, external_pid) = start_relay(
        variant,
        args.debezium.as_deref(),
        &url,
        &pool,
        cluster,
        args.batch_size,
        &slot,
    )?;
    let mut first_record: Option<Duration> = None;
    loop {
        let size = topic_size(&watcher, &topic, args.partitions)?;
        if size > 0 && first_record.is_none() {
            first_record = Some(started.elapsed());
        }
        if size >= events as i64 {
            break;
        }
        anyhow::ensure!(
            relays.iter().all(|relay| !relay.is_finished()),
            "a relay stopped while draining"
        );
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "not drained in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    let (pg_drain, mut own_drain) = (postgres_ticks() - pg_before, own_ticks() - own_before);
    // Kafka Connect is a process of its own: its CPU is the relay's.
    if let Some(pid) = external_pid {
        own_drain += crate::bench::probe::process_ticks(&pid.to_string()).unwrap_or(0);
    }
    // The polling relay marks what was acknowledged after the last ack: wait for its commit
    // before reading the WAL written.
    if mode == OutboxMode::Table && !variant.debezium {
        while sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)")
            .fetch_one(&pool)
            .await?
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let wal_drain = wal_lsn(&pool).await? - wal_before;
    eprintln!("[{}] drained in {:.2} s", variant.label(), drained.as_secs_f64());

    // Order on the topic.
    let (order_violations, duplicates) = check_order(cluster, &topic, &written).await?;

    // Lag at fixed rates, the relay running.
    let mut lag = Vec::new();
    for &rate in &args.lag_rates {
        lag.push(measure_lag(args, cluster, &pool, variant, rate, &orders).await?);
    }
    stop.cancel();
    for relay in relays {
        relay.await??;
    }
    if mode == OutboxMode::WalMessage || variant.debezium {
        // Kafka Connect lets go of the slot a moment after it stopped.
        tokio::time::sleep(Duration::from_secs(2)).await;
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    // Left behind, each variant's 100,000 rows were vacuumed and checkpointed during the
    // variants after it.
    drop_database(&args.admin_db, &name).await?;
    let per_event = |ticks: u64| ticks as f64 * crate::bench::probe::MILLIS_PER_TICK * 1000.0 / events as f64;
    Ok(ModeResult {
        mode: variant.label(),
        events,
        drain_events_per_sec: events as f64 / drained.as_secs_f64(),
        first_record_secs: first_record.unwrap_or(drained).as_secs_f64(),
        drain_after_first_events_per_sec: events as f64
            / drained
                .saturating_sub(first_record.unwrap_or_default())
                .as_secs_f64()
                .max(0.001),
        write_wal_bytes_per_event: wal_written / events as f64,
        write_pg_cpu_us_per_event: per_event(pg_written),
        drain_pg_cpu_us_per_event: per_event(pg_drain),
        drain_wal_bytes_per_event: wal_drain / events as f64,
        relay_cpu_us_per_event: per_event(own_drain),
        order_violations,
        duplicates,
        lag,
    })
}

/// Reads the whole topic; returns the keys out of commit order and the duplicate records.
async fn check_order(
    cluster: &kafka::Cluster,
    topic: &str,
    written: &HashMap<String, Vec<String>>,
) -> anyhow::Result<(usize, usize)> {
    let total: usize = written.values().map(Vec::len).sum();
    let (cluster, topic) = (cluster.clone(), topic.to_owned());
    let records = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(i32, i64, String, String)>> {
        let (consumer, _) = kafka::reader_from_start(&cluster, &topic)?;
        let mut records = Vec::with_capacity(total);
        let mut seen = HashSet::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen.len() < total && Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message?;
                let id = kafka::header_text(&kafka::headers_of(&message), orderflow::envelope::headers::MESSAGE_ID)
                    .unwrap_or_default();
                seen.insert(id.clone());
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                records.push((message.partition(), message.offset(), key, id));
            }
        }
        consumer.unsubscribe();
        Ok(records)
    })
    .await??;
    let mut sorted = records;
    sorted.sort_by_key(|(partition, offset, ..)| (*partition, *offset));
    let mut first = HashSet::new();
    let mut per_key: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut duplicates = 0;
    for (_, _, key, id) in &sorted {
        if first.insert(id.as_str()) {
            per_key.entry(key.as_str()).or_default().push(id.as_str());
        } else {
            duplicates += 1;
        }
    }
    let violations = written
        .iter()
        .filter(|(key, ids)| {
            per_key
                .get(key.as_str())
                .is_none_or(|seen| seen.iter().copied().ne(ids.iter().map(String::as_str)))
        })
        .count();
    Ok((violations, duplicates))
}

/// Writes at `rate` for the configured seconds while a consumer measures commit → readable.
async fn measure_lag(
    args: &RelayBenchArgs,
    cluster: &kafka::Cluster,
    pool: &PgPool,
    variant: Variant,
    rate: u32,
    orders: &[uuid::Uuid],
) -> anyhow::Result<(u32, f64, f64, f64)> {
    let mode = variant.mode;
    let topic = format!("relaybench.lag.{}", uuid::Uuid::now_v7().simple());
    kafka::ensure_topics(cluster, &[&topic], args.partitions).await?;
    let count = (u64::from(rate) * args.lag_secs) as usize;
    let reader = {
        let (cluster, topic) = (cluster.clone(), topic.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<hdrhistogram::Histogram<u64>> {
            let (consumer, _) = kafka::reader_from_start(&cluster, &topic)?;
            let mut histogram = crate::bench::histogram();
            let mut seen = 0usize;
            let deadline = Instant::now() + Duration::from_secs(300);
            while seen < count && Instant::now() < deadline {
                if let Some(message) = consumer.poll(Duration::from_millis(50)) {
                    let message = message?;
                    let Ok(opened) = envelope::open(message.payload().unwrap_or_default()) else {
                        continue;
                    };
                    let occurred = opened
                        .occurred_at
                        .map(|t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000)
                        .unwrap_or(0);
                    let lag_us = chrono::Utc::now().timestamp_micros() - occurred;
                    histogram.saturating_record(u64::try_from(lag_us).unwrap_or(0));
                    seen += 1;
                }
            }
            Ok(histogram)
        })
    };
    // Lets the reader join its partitions before the first event.
    let watcher: rdkafka::consumer::BaseConsumer = cluster.client_config().create()?;
    let _ = topic_size(&watcher, &topic, args.partitions)?;
    let started = Instant::now();
    write(pool, mode, &topic, orders, count, 1, Some(rate)).await?;
    let achieved = count as f64 / started.elapsed().as_secs_f64();
    let histogram = reader.await??;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "[{}] lag at {rate}/s (achieved {achieved:.0}/s): p50 {:.1} ms, p99 {:.1} ms over {} events",
        variant.label(),
        ms(0.5),
        ms(0.99),
        histogram.len()
    );
    Ok((rate, ms(0.5), ms(0.99), achieved))
}

/// Debezium's Postgres connector on Kafka Connect standalone, set up like our relays: the same
/// outbox table, topics, keys and headers (its outbox event router routes each row by its
/// `topic` column, keys it by `partition_key`, sends `payload` as the value and the envelope's
/// fields as headers). Tuned for latency as ours are: it hands batches to Kafka Connect every
/// 10 ms (`poll.interval.ms`, 500 by default: measured 434 ms p50 lag at 1,000 events/s with
/// it) in batches of up to 8,192 (2,048 by default); the producer lingers 5 ms like ours.
mod debezium {
    use std::path::Path;

    use orderflow_platform::{Secret, kafka};
    use sqlx::PgPool;

    /// The publication the connector reads (the outbox table only).
    const PUBLICATION: &str = "dbz_outbox";

    /// The publication and the slot, before the first event is written.
    pub async fn prepare(pool: &PgPool, slot: &str) -> anyhow::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE PUBLICATION {PUBLICATION} FOR TABLE outbox"
        )))
        .execute(pool)
        .await?;
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Starts Kafka Connect standalone with the connector, streaming `slot` of `url`'s database.
    pub fn start(
        libs: &Path,
        url: &Secret,
        cluster: &kafka::Cluster,
        slot: &str,
    ) -> anyhow::Result<tokio::process::Child> {
        let dir = std::env::temp_dir().join(format!("orderflow-debezium-{}", uuid::Uuid::now_v7().simple()));
        // Its properties hold the database's and the principal's passwords: this user's alone.
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        }
        // The same coordinates the WAL relay connects with (decoded from the URL in one place).
        let database = relay::wal::replication_config(url, slot)?;
        let client = cluster.client_config();
        let sasl = match (cluster.principal(), client.get("sasl.password")) {
            (Some(user), Some(password)) => {
                let jaas = format!(
                    "org.apache.kafka.common.security.scram.ScramLoginModule required username=\"{user}\" password=\"{password}\";"
                );
                ["", "producer.", "admin."]
                    .iter()
                    .map(|prefix| {
                        format!(
                            "{prefix}security.protocol=SASL_PLAINTEXT\n{prefix}sasl.mechanism=SCRAM-SHA-512\n{prefix}sasl.jaas.config={jaas}\n"
                        )
                    })
                    .collect::<String>()
            }
            _ => String::new(),
        };
        let worker = format!(
            "bootstrap.servers={servers}\n{sasl}\
             producer.linger.ms=5\nproducer.enable.idempotence=true\nproducer.acks=all\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.converters.ByteArrayConverter\n\
             offset.storage.file.filename={offsets}\noffset.flush.interval.ms=1000\n\
             listeners=http://127.0.0.1:0\n",
            servers = cluster.bootstrap_servers,
            offsets = dir.join("offsets").display(),
        );
        let connector = format!(
            "name=orderflow-outbox\nconnector.class=io.debezium.connector.postgresql.PostgresConnector\ntasks.max=1\n\
             plugin.name=pgoutput\ndatabase.hostname={host}\ndatabase.port={port}\ndatabase.user={user}\n\
             database.password={password}\ndatabase.dbname={dbname}\ntopic.prefix=dbz\nslot.name={slot}\n\
             publication.name={PUBLICATION}\npublication.autocreate.mode=disabled\ntable.include.list=public.outbox\n\
             snapshot.mode=no_data\nbinary.handling.mode=bytes\ntombstones.on.delete=false\n\
             poll.interval.ms=10\nmax.batch.size=8192\nmax.queue.size=32768\n\
             transforms=outbox\ntransforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
             transforms.outbox.table.field.event.id=message_id\ntransforms.outbox.table.field.event.key=partition_key\n\
             transforms.outbox.table.field.event.payload=payload\ntransforms.outbox.route.by.field=topic\n\
             transforms.outbox.route.topic.replacement=${{routedByValue}}\ntransforms.outbox.table.expand.json.payload=false\n\
             transforms.outbox.table.fields.additional.placement=message_id:header:message_id,event_type:header:event_type,schema_version:header:schema_version\n",
            host = database.host,
            port = database.port,
            user = database.user,
            password = database.password,
            dbname = database.database,
        );
        std::fs::write(dir.join("worker.properties"), worker)?;
        std::fs::write(dir.join("connector.properties"), connector)?;
        let log = std::fs::File::create(dir.join("connect.log"))?;
        eprintln!(
            "[debezium] Kafka Connect standalone, log in {}",
            dir.join("connect.log").display()
        );
        Ok(tokio::process::Command::new("java")
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.join("worker.properties"))
            .arg(dir.join("connector.properties"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?)
    }

    /// Stops Kafka Connect (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(connect: &mut tokio::process::Child) {
        // Gracefully first: Connect stores its offsets and lets go of the slot.
        if let Some(pid) = connect.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(std::time::Duration::from_secs(10), connect.wait())
            .await
            .is_err()
        {
            let _ = connect.kill().await;
        }
    }
}
