//! The fulfilment hand-off: consumes `OrderConfirmed` (consumer group `fulfilment`) and
//! records exactly one shipment request per confirmed order, in its own database.
//! `shipments.order_id` is UNIQUE and the inbox row commits with the shipment, so a
//! redelivered or duplicated confirmation changes nothing.

use std::sync::Arc;

use orderflow::envelope::OpenedEvent;
use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::Secret;
use orderflow_platform::consumer::{self, ConsumerSettings, Fresh, Handler, HandlerError};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// The fulfilment database's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/fulfilment");

const INBOX: &str = "fulfilment";

/// The fulfilment consumer's settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "fulfilment", about = "orderflow's fulfilment hand-off")]
pub struct Config {
    /// Postgres URL of the fulfilment database.
    #[arg(long, env = "FULFILMENT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Kafka bootstrap servers.
    #[arg(long, env = "FULFILMENT_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:19092")]
    pub bootstrap_servers: String,
    /// Consumer group.
    #[arg(long, env = "FULFILMENT_GROUP_ID", default_value = "fulfilment")]
    pub group_id: String,
    /// Topic of the order events.
    #[arg(long, env = "FULFILMENT_ORDERS_TOPIC", default_value = orderflow::topics::ORDERS_EVENTS)]
    pub orders_topic: String,
    /// This instance's static membership id in the consumer group (unique per instance).
    #[arg(long, env = "FULFILMENT_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Inbox rows are kept this long: the deduplication window (longer than any redrive).
    #[arg(long, env = "FULFILMENT_INBOX_RETENTION_HOURS", default_value_t = 168)]
    pub inbox_retention_hours: u64,
    /// Who this process is to Kafka (SASL/SCRAM).
    #[command(flatten)]
    pub kafka_auth: orderflow_platform::kafka::KafkaArgs,
    /// Its logs, spans and metrics (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `ORDERFLOW_METRICS_ADDR`).
    #[command(flatten)]
    pub telemetry: orderflow_platform::telemetry::TelemetryArgs,
    /// The consumer runtime's settings.
    #[command(flatten)]
    pub consumer: orderflow_platform::consumer::ConsumerArgs,
    /// The keys whose events it trusts (`EVENT_VERIFYING_KEYS`).
    #[command(flatten)]
    pub verifying: orderflow_platform::signing::VerifyingArgs,
    /// Apply the migrations at start-up.
    #[arg(long, env = "FULFILMENT_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

/// Records shipment requests.
pub struct Fulfilment;

impl Handler for Fulfilment {
    type Committed = ();

    fn inbox(&self) -> &'static str {
        INBOX
    }

    fn wants(&self, event: &OpenedEvent) -> bool {
        matches!(event.payload, Payload::OrderConfirmed(_))
    }

    /// One insert for every confirmed order of the batch; a confirmation of an order already
    /// shipped (a replay, a redrive) inserts nothing.
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> Result<Vec<()>, (usize, HandlerError)> {
        let order_ids: Vec<uuid::Uuid> = batch.iter().map(|fresh| fresh.event.aggregate_id).collect();
        let shipment_ids: Vec<uuid::Uuid> = batch.iter().map(|_| uuid::Uuid::now_v7()).collect();
        let created = sqlx::query(
            "INSERT INTO shipments (shipment_id, order_id) SELECT * FROM unnest($1::uuid[], $2::uuid[])
             ORDER BY 2 ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&shipment_ids)
        .bind(&order_ids)
        .execute(&mut **tx)
        .await
        .map_err(|error| (batch.len(), error.into()))?
        .rows_affected();
        tracing::info!(created, confirmations = batch.len(), "shipments requested");
        Ok(Vec::new())
    }
}

/// Consumes until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = orderflow_platform::connect_postgres(&config.database_url, 8).await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
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
    consumer::run_reconnecting(settings, pool.clone(), Arc::new(Fulfilment), shutdown).await?;
    pool.close().await;
    Ok(())
}
