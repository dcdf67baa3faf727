//! The payment service: consumes the order events (group `payment`) and moves money through
//! the gateway. One payment per order (`payments.order_id` is UNIQUE); every gateway call
//! carries an idempotency key derived from the order (`authorize:<order id>`, ...), never
//! from the Kafka message, so every redelivery and every retry after a crash replays the
//! same key and the gateway moves money at most once.
//!
//! No gateway call is made inside a database transaction (docs/adr/0005): an order event
//! records the call it asks for as a pending payment state in the message's unit of work
//! ([`intents`]); the [`executor`] then claims it, calls the gateway with nothing held, and
//! records the answer and its event in a short transaction of its own.

pub mod domain;
pub mod executor;
pub mod intents;
#[cfg(feature = "naive")]
mod naive;

use std::sync::Arc;
use std::time::Duration;

use orderflow_platform::consumer::{self, ConsumerSettings};
use orderflow_platform::{Secret, telemetry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use executor::Executor;
pub use intents::{INBOX, PaymentHandler};

/// The payments database's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payments");

/// The payment service's settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "payment-svc", about = "orderflow's payment service")]
pub struct Config {
    /// Postgres URL of the payments database.
    #[arg(long, env = "PAYMENT_SVC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Kafka bootstrap servers.
    #[arg(long, env = "PAYMENT_SVC_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:19092")]
    pub bootstrap_servers: String,
    /// Consumer group.
    #[arg(long, env = "PAYMENT_SVC_GROUP_ID", default_value = "payment")]
    pub group_id: String,
    /// Topic of the order events (consumed).
    #[arg(long, env = "PAYMENT_SVC_ORDERS_TOPIC", default_value = orderflow::topics::ORDERS_EVENTS)]
    pub orders_topic: String,
    /// Topic of the payment events (produced, through the outbox).
    #[arg(long, env = "PAYMENT_SVC_PAYMENTS_TOPIC", default_value = orderflow::topics::PAYMENTS_EVENTS)]
    pub payments_topic: String,
    /// The gateway's gRPC address.
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_ADDR", default_value = "127.0.0.1:15061")]
    pub gateway_addr: String,
    /// The CA of the gateway's certificate (TLS to the gateway).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CA")]
    pub gateway_ca: Option<std::path::PathBuf>,
    /// This service's client certificate for the gateway (mutual TLS: the gateway moves money
    /// only for a client it can identify).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CLIENT_CERT", requires = "gateway_client_key")]
    pub gateway_client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CLIENT_KEY", requires = "gateway_client_cert")]
    pub gateway_client_key: Option<std::path::PathBuf>,
    /// Talk to the gateway without TLS (development only).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_PLAINTEXT", default_value_t = false, action = clap::ArgAction::Set)]
    pub gateway_plaintext: bool,
    /// How long to wait for one gateway reply before trying again later (with the same key).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_TIMEOUT_MS", default_value_t = 1_000)]
    pub gateway_timeout_ms: u64,
    /// Most gateway calls in flight at once. More is not faster: calls beyond what the gateway
    /// serves at once queue there, outlast the timeout and are made again.
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CONCURRENCY", default_value_t = 64)]
    pub gateway_concurrency: usize,
    /// This instance's static membership id in the consumer group (unique per instance;
    /// a restart with the same id gets its partitions back without a rebalance).
    #[arg(long, env = "PAYMENT_SVC_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Most open database connections.
    #[arg(long, env = "PAYMENT_SVC_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Inbox rows are kept this long: the deduplication window (longer than any redrive).
    #[arg(long, env = "PAYMENT_SVC_INBOX_RETENTION_HOURS", default_value_t = 168)]
    pub inbox_retention_hours: u64,
    /// An authorization whose order has not settled (no OrderConfirmed or OrderCancelled
    /// handled) this long after it was made is voided: a forged or orphaned OrderPlaced, or
    /// lost order events, never hold a customer's money for good. Far longer than the saga
    /// deadline (90 s), after which the order service cancels any order still unpaid.
    #[arg(long, env = "PAYMENT_SVC_AUTHORIZATION_DEADLINE_MS", default_value_t = 900_000)]
    pub authorization_deadline_ms: u64,
    /// How often overdue authorizations are looked for.
    #[arg(long, env = "PAYMENT_SVC_SWEEP_INTERVAL_MS", default_value_t = 5_000)]
    pub sweep_interval_ms: u64,
    /// The largest order total ever authorized: `DEFAULT[,CODE=LIMIT...]` in major units
    /// (the order service's limit; a larger OrderPlaced is dead-lettered, never charged).
    #[arg(long, env = "PAYMENT_SVC_MAX_ORDER_TOTAL", default_value = "1000000",
          value_parser = orderflow::money::TotalLimits::from_setting)]
    pub max_order_total: orderflow::money::TotalLimits,
    /// Who this process is to Kafka (SASL/SCRAM).
    #[command(flatten)]
    pub kafka_auth: orderflow_platform::kafka::KafkaArgs,
    /// Its logs, spans and metrics (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `ORDERFLOW_METRICS_ADDR`).
    #[command(flatten)]
    pub telemetry: orderflow_platform::telemetry::TelemetryArgs,
    /// The consumer runtime's settings.
    #[command(flatten)]
    pub consumer: orderflow_platform::consumer::ConsumerArgs,
    /// How its events reach the relay (`OUTBOX_MODE`).
    #[command(flatten)]
    pub outbox: orderflow_platform::outbox::OutboxArgs,
    /// The key it signs its events with (`EVENT_SIGNING_KEY`).
    #[command(flatten)]
    pub signing: orderflow_platform::signing::SigningArgs,
    /// The keys whose events its consumer trusts (`EVENT_VERIFYING_KEYS`).
    #[command(flatten)]
    pub verifying: orderflow_platform::signing::VerifyingArgs,
    /// Apply the migrations at start-up.
    #[arg(long, env = "PAYMENT_SVC_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

/// Moves the authorizations made more than `deadline` ago whose order never settled here to
/// VOIDING (the executor voids them), and returns how many: a forged or orphaned OrderPlaced,
/// or lost order events, never hold a customer's money for good. One statement, which locks
/// each payment as the consumer does: a late OrderConfirmed either captured first (and the
/// payment is no longer AUTHORIZED) or finds it VOIDING and is dead-lettered for an operator
/// ("order confirmed after its authorization was voided"). The void tells a PaymentVoided
/// caused by nothing (a deadline, not a message).
pub async fn void_overdue(pool: &sqlx::PgPool, deadline: Duration) -> Result<u64, sqlx::Error> {
    let voided = sqlx::query(
        "UPDATE payments SET state = $1, correlation_id = gen_random_uuid(), causation_id = NULL, traceparent = NULL,
                lease_until = NULL, attempts = 0, last_error = NULL, version = version + 1, updated_at = now()
         WHERE order_id IN (
             SELECT order_id FROM payments WHERE state = $2 AND created_at < now() - make_interval(secs => $3)
             ORDER BY order_id LIMIT 100 FOR UPDATE SKIP LOCKED)",
    )
    .bind(domain::PaymentState::Voiding.as_str())
    .bind(domain::PaymentState::Authorized.as_str())
    .bind(deadline.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    if voided > 0 {
        tracing::warn!(
            voided,
            ?deadline,
            "authorizations to be voided: their orders never settled"
        );
        metrics::counter!(telemetry::OVERDUE_AUTHORIZATIONS_VOIDED).increment(voided);
    }
    Ok(voided)
}

/// Looks for overdue authorizations every `interval` until `shutdown`, waking the executor
/// when it found some, and counts the parked payments.
async fn sweep_overdue(
    pool: sqlx::PgPool,
    deadline: Duration,
    interval: Duration,
    executor: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        match void_overdue(&pool, deadline).await {
            Ok(0) => {}
            Ok(_) => executor.notify_one(),
            Err(error) => tracing::warn!(%error, "overdue authorizations not looked for; trying again next round"),
        }
        match executor::parked(&pool).await {
            Ok(parked) => metrics::gauge!(telemetry::PAYMENTS_PARKED).set(parked as f64),
            Err(error) => tracing::debug!(%error, "cannot count the parked payments"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The payment-svc binary: logging, metrics, failpoints (when compiled in), configuration
/// from flags and the environment, until SIGINT or SIGTERM. Shared by `payment-svc` and the
/// tests' `payment-svc-with-failpoints`, which differ only in the `failpoints` feature.
pub async fn main_from_env() -> anyhow::Result<()> {
    let config: Config = orderflow_platform::config::parse();
    let _telemetry = orderflow_platform::telemetry::init("payment-svc", &config.telemetry);
    config.telemetry.install()?;
    // Reads FAILPOINTS in a build with the `failpoints` feature (the chaos harness's and the
    // crash tests'); does nothing otherwise.
    let _failpoints = fail::FailScenario::setup();
    run(config, orderflow_platform::shutdown_on_signals()).await
}

/// Connects and consumes until `shutdown`: the consumer records the calls owed, the executor
/// makes them, the sweeper voids what was held too long.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = orderflow_platform::connect_postgres(&config.database_url, config.db_max_connections).await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    let security = match (&config.gateway_ca, config.gateway_plaintext) {
        (Some(ca), false) => orderflow_platform::security::ClientSecurity {
            ca: Some(ca.clone()),
            identity: config
                .gateway_client_cert
                .clone()
                .zip(config.gateway_client_key.clone()),
        },
        (None, true) => {
            tracing::warn!("calling the gateway in PLAINTEXT (PAYMENT_SVC_GATEWAY_PLAINTEXT=true): development only");
            orderflow_platform::security::ClientSecurity::default()
        }
        (Some(_), true) => anyhow::bail!("PAYMENT_SVC_GATEWAY_CA and PAYMENT_SVC_GATEWAY_PLAINTEXT are both set"),
        (None, false) => anyhow::bail!(
            "no CA for the gateway: set PAYMENT_SVC_GATEWAY_CA, or PAYMENT_SVC_GATEWAY_PLAINTEXT=true for development"
        ),
    };
    let channel = security.endpoint(&config.gateway_addr)?.connect_lazy();
    let wake = Arc::new(Notify::new());
    let gateway_timeout = Duration::from_millis(config.gateway_timeout_ms);
    let (handoff, handed) = executor::handoff();
    let executor = Arc::new(Executor::new(
        pool.clone(),
        channel,
        gateway_timeout,
        config.payments_topic.clone(),
        orderflow_platform::outbox::Outbox::new(
            config.outbox.mode,
            config.signing.signer(orderflow_platform::signing::PAYMENT_SVC)?,
        ),
        config.gateway_concurrency,
        handed,
        wake.clone(),
    ));
    let handler = Arc::new(PaymentHandler::new(
        config.max_order_total.clone(),
        executor::lease_for(gateway_timeout),
        handoff,
    ));
    orderflow_platform::housekeeping::spawn_inbox_cleanup(&pool, INBOX, config.inbox_retention_hours, &shutdown);
    let settings = config.consumer.apply(ConsumerSettings {
        instance_id: config.instance_id,
        ..ConsumerSettings::new(
            orderflow_platform::kafka::Cluster::new(config.bootstrap_servers, &config.kafka_auth),
            config.group_id,
            vec![config.orders_topic],
            config.verifying.verifier()?,
        )
    });
    // Everything stops on `stop`: the caller's shutdown, or the consumer's death (a process
    // whose consumer died exits whole, its executor and sweeper included).
    let stop = shutdown.child_token();
    let executing = tokio::spawn(executor.run(stop.clone()));
    let sweeper = tokio::spawn(sweep_overdue(
        pool.clone(),
        Duration::from_millis(config.authorization_deadline_ms),
        Duration::from_millis(config.sweep_interval_ms),
        wake,
        stop.clone(),
    ));
    let consumed = consumer::run_reconnecting(settings, pool.clone(), handler, stop.clone()).await;
    stop.cancel();
    let _ = sweeper.await;
    let _ = executing.await;
    consumed?;
    pool.close().await;
    Ok(())
}
