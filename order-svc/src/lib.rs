//! The order service: accepts orders over gRPC and records each with its `OrderPlaced`
//! event in one transaction (the transactional outbox). The relay publishes the event.

pub mod admission;
pub mod api;
pub mod domain;
#[cfg(feature = "naive")]
mod naive;
pub mod placing;
pub mod projector;
pub mod saga;
pub mod store;
pub mod wire_states;

use std::net::SocketAddr;
use std::time::Duration;

use orderflow::orders::v1::order_service_server::OrderServiceServer;
use orderflow_platform::Secret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The order database's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orders");

/// Largest decoded request: 100 items of bounded strings fit in well under 64 KiB.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The order service's settings: defaults, overridden by environment variables, overridden
/// by flags. The database URL is a [`Secret`] and never appears in logs or `--help`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-svc", about = "orderflow's order service (gRPC)")]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "ORDER_SVC_LISTEN_ADDR", default_value = "127.0.0.1:15051")]
    pub listen_addr: SocketAddr,
    /// Postgres URL of the orders database.
    #[arg(long, env = "ORDER_SVC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Most open database connections.
    #[arg(long, env = "ORDER_SVC_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Topic the order events are published to (by the relay, from the outbox).
    #[arg(long, env = "ORDER_SVC_ORDERS_TOPIC", default_value = orderflow::topics::ORDERS_EVENTS)]
    pub orders_topic: String,
    /// How long a PlaceOrder request_id is honoured, in hours (at least 24).
    #[arg(long, env = "ORDER_SVC_IDEMPOTENCY_RETENTION_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u64).range(24..))]
    pub idempotency_retention_hours: u64,
    /// Deadline of one request, in milliseconds; a slower one is cancelled.
    #[arg(long, env = "ORDER_SVC_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// Requests served at once, once they have arrived; further ones wait for a slot (until
    /// their deadline).
    #[arg(long, env = "ORDER_SVC_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// What one connection, one caller and one socket may hold (`GRPC_*`).
    #[command(flatten)]
    pub fairness: orderflow_platform::fairness::FairnessArgs,
    /// Apply the database migrations at start-up.
    #[arg(long, env = "ORDER_SVC_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Kafka bootstrap servers. Without them the service only serves gRPC (no payment
    /// events consumed, no sweeper).
    #[arg(long, env = "ORDER_SVC_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// Topic of the payment events (consumed).
    #[arg(long, env = "ORDER_SVC_PAYMENTS_TOPIC", default_value = orderflow::topics::PAYMENTS_EVENTS)]
    pub payments_topic: String,
    /// Consumer group of the payment events.
    #[arg(long, env = "ORDER_SVC_GROUP_ID", default_value = "order")]
    pub group_id: String,
    /// This instance's static membership id in the payment events' consumer group.
    #[arg(long, env = "ORDER_SVC_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// An order still PENDING this long after it was placed is cancelled (PAYMENT_TIMEOUT).
    #[arg(long, env = "ORDER_SVC_SAGA_DEADLINE_MS", default_value_t = 90_000)]
    pub saga_deadline_ms: u64,
    /// Inbox rows are kept this long: the deduplication window (longer than any redrive).
    #[arg(long, env = "ORDER_SVC_INBOX_RETENTION_HOURS", default_value_t = 168)]
    pub inbox_retention_hours: u64,
    /// The largest order total: `DEFAULT[,CODE=LIMIT...]` in major units of each currency
    /// (e.g. `1000000,JPY=150000000`); a larger order is refused.
    #[arg(long, env = "ORDER_SVC_MAX_ORDER_TOTAL", default_value = "1000000",
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
    /// TLS and bearer tokens on the API.
    #[command(flatten)]
    pub security: orderflow_platform::security::ServerSecurityArgs,
    /// How often the sweeper looks for overdue orders.
    #[arg(long, env = "ORDER_SVC_SWEEP_INTERVAL_MS", default_value_t = 1_000)]
    pub sweep_interval_ms: u64,
    /// Group commit and admission of PlaceOrder.
    #[command(flatten)]
    pub placing: PlacingArgs,
}

/// How PlaceOrder writes (group commit) and what it admits.
#[derive(Debug, Clone, clap::Args)]
pub struct PlacingArgs {
    /// Most orders written in one transaction.
    #[arg(long, env = "ORDER_SVC_GROUP_COMMIT_MAX_BATCH", default_value_t = placing::DEFAULT_MAX_BATCH)]
    pub group_commit_max_batch: usize,
    /// Transactions of orders in flight at once (while one commits, the next gathers).
    #[arg(long, env = "ORDER_SVC_GROUP_COMMITTERS", default_value_t = placing::DEFAULT_COMMITTERS)]
    pub group_committers: usize,
    /// How long an order admitted now may expect to wait behind the orders in flight, in
    /// milliseconds: beyond it PlaceOrder answers RESOURCE_EXHAUSTED with a retry hint
    /// (0: admit everything).
    #[arg(long, env = "ORDER_SVC_ADMISSION_TARGET_MS", default_value_t = admission::DEFAULT_TARGET_MS)]
    pub admission_target_ms: u64,
    /// Orders in flight that are always admitted, whatever the completion rate.
    #[arg(long, env = "ORDER_SVC_ADMISSION_FLOOR", default_value_t = admission::DEFAULT_FLOOR)]
    pub admission_floor: u64,
    /// PlaceOrder's own latency (milliseconds) that at most 1% of calls may exceed before
    /// admission admits fewer orders (0: not watched).
    #[arg(long, env = "ORDER_SVC_ADMISSION_LATENCY_MS", default_value_t = admission::DEFAULT_LATENCY_TARGET_MS)]
    pub admission_latency_ms: u64,
}

impl Default for PlacingArgs {
    fn default() -> Self {
        Self {
            group_commit_max_batch: placing::DEFAULT_MAX_BATCH,
            group_committers: placing::DEFAULT_COMMITTERS,
            admission_target_ms: admission::DEFAULT_TARGET_MS,
            admission_floor: admission::DEFAULT_FLOOR,
            admission_latency_ms: admission::DEFAULT_LATENCY_TARGET_MS,
        }
    }
}

/// PlaceOrder idempotency keys past their expiry (purged by the migrations' function, which
/// keeps a live key's retention: migrations/orders/0010).
pub fn expired_request_ids() -> orderflow_platform::housekeeping::Purge {
    orderflow_platform::housekeeping::Purge {
        name: "idempotency_keys",
        sql: "SELECT purge_expired_request_ids($1, $2::int)",
        retention: Duration::ZERO,
        consumer: None,
    }
}

/// Runs the service on `listener` until `shutdown` is cancelled, then stops accepting,
/// lets requests in flight finish and returns. If the payment events' consumer dies, the
/// service stops too and returns its error: a process that no longer settles orders must not
/// go on answering SERVING (its supervisor restarts it).
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Refused before anything starts: a server with no certificate or no token key (and no
    // explicit development flag) never serves.
    let tls = config
        .security
        .server_tls()?
        .map(|tls| tls.timeout(config.fairness.tls_handshake_timeout()));
    let verifier = config.security.verifier()?;
    let pool = orderflow_platform::connect_postgres(&config.database_url, config.db_max_connections).await?;
    // Everything below stops on `stop`: the caller's shutdown, or the consumer's death.
    let stop = shutdown.child_token();
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    let signer = config.signing.signer(orderflow_platform::signing::ORDER_SVC)?;
    let outbox = orderflow_platform::outbox::Outbox::new(config.outbox.mode, signer.clone());
    #[cfg(feature = "naive")]
    let dual_write = naive::DualWrite::from_config(&config, &signer)?;
    let (placer, committers) = placing::Placer::start(
        pool.clone(),
        placing::Committers {
            count: config.placing.group_committers,
            max_batch: config.placing.group_commit_max_batch,
            outbox: outbox.clone(),
            #[cfg(feature = "naive")]
            dual_write: dual_write.is_some(),
        },
        stop.clone(),
    );
    let (admission, admission_task) = admission::Admission::start(
        pool.clone(),
        admission::Settings {
            target: Duration::from_millis(config.placing.admission_target_ms),
            floor: config.placing.admission_floor,
            saga_deadline: Duration::from_millis(config.saga_deadline_ms),
            latency_target: Duration::from_millis(config.placing.admission_latency_ms),
            ..admission::Settings::default()
        },
        stop.clone(),
    );
    let api = api::OrderApi::new(
        pool.clone(),
        config.orders_topic.clone(),
        Duration::from_secs(config.idempotency_retention_hours * 3600),
        config.max_order_total.clone(),
        placer,
        admission,
        config.fairness.callers(config.max_concurrent_requests),
    );
    #[cfg(feature = "naive")]
    let api = match dual_write {
        Some(dual_write) => api.with_dual_write(dual_write),
        None => api,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<OrderServiceServer<api::OrderApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(orderflow::ORDERS_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details (BadRequest): grpcurl decodes an error's details through it.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    // grpcurl up to 1.8 speaks only the v1alpha reflection protocol.
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Housekeeping: expired idempotency keys, and this consumer's old inbox rows.
    let mut background = committers;
    background.push(admission_task);
    background.push(tokio::spawn(orderflow_platform::housekeeping::run(
        pool.clone(),
        vec![
            expired_request_ids(),
            orderflow_platform::housekeeping::inbox(
                saga::INBOX,
                Duration::from_secs(config.inbox_retention_hours * 3600),
            ),
        ],
        orderflow_platform::housekeeping::INTERVAL,
        stop.clone(),
    )));
    // Readiness: NOT_SERVING while the database does not answer. Not the broker: the outbox
    // exists so that PlaceOrder works while Kafka is away.
    background.push(tokio::spawn(orderflow_platform::health::watch(
        health,
        vec![<OrderServiceServer<api::OrderApi> as tonic::server::NamedService>::NAME],
        pool.clone(),
        None,
        stop.clone(),
    )));
    // The saga: the payment events consumer and the sweeper, stopped with the server.
    let mut consumer = None;
    if let Some(bootstrap_servers) = config.bootstrap_servers.clone() {
        let cluster = orderflow_platform::kafka::Cluster::new(bootstrap_servers, &config.kafka_auth);
        let settings = config.consumer.apply(orderflow_platform::consumer::ConsumerSettings {
            instance_id: config.instance_id.clone(),
            ..orderflow_platform::consumer::ConsumerSettings::new(
                cluster,
                config.group_id.clone(),
                vec![config.payments_topic.clone()],
                config.verifying.verifier()?,
            )
        });
        let handler = std::sync::Arc::new(saga::PaymentEventsHandler::new(
            config.orders_topic.clone(),
            outbox.clone(),
        ));
        let (consumer_pool, consumer_stop) = (pool.clone(), stop.clone());
        consumer = Some(tokio::spawn(async move {
            // A consumer that holds no partition or stalls gets a new client in this process,
            // which goes on taking orders meanwhile (they wait in the outbox).
            let result =
                orderflow_platform::consumer::run_reconnecting(settings, consumer_pool, handler, consumer_stop.clone())
                    .await;
            // Stops the server (and so the process) when the consumer dies.
            consumer_stop.cancel();
            result
        }));
        background.push(tokio::spawn(saga::sweep(
            pool.clone(),
            config.orders_topic.clone(),
            outbox.clone(),
            Duration::from_millis(config.saga_deadline_ms),
            Duration::from_millis(config.sweep_interval_ms),
            stop.clone(),
        )));
    }

    let local_addr = listener.local_addr()?;
    tracing::info!(%local_addr, "order-svc serving gRPC");
    let incoming = config.fairness.incoming(listener);
    let mut server =
        tonic::transport::Server::builder().max_concurrent_streams(config.fairness.max_streams_per_connection);
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let orders = tonic::service::interceptor::InterceptedService::new(
        OrderServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES),
        api::authenticate(verifier),
    );
    server
        // Outermost: one deadline (the wait for a slot included), a body that must arrive in
        // time, one code map, every answer counted, the caller's trace continued. The
        // concurrency slots are taken by the handlers once the request has arrived
        // (OrderApi::enter), each caller within its share.
        .layer(
            orderflow_platform::grpc::EdgeLayer::new(Duration::from_millis(config.request_timeout_ms))
                .with_body_timeout(config.fairness.body_timeout()),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(orders)
        .serve_with_incoming_shutdown(incoming, stop.cancelled())
        .await?;
    stop.cancel();
    for task in background {
        let _ = task.await;
    }
    let consumed = match consumer {
        Some(task) => task.await.unwrap_or_else(|error| Err(error.into())),
        None => Ok(()),
    };
    pool.close().await;
    tracing::info!("order-svc stopped");
    consumed.map_err(|error| error.context("the payment events consumer died"))
}
