//! The fulfilment hand-off: consumes `OrderConfirmed` (consumer group `fulfilment`) and
//! records exactly one shipment request per confirmed order, in its own database.
//! `shipments.order_id` is UNIQUE and the inbox row commits with the shipment, so a
//! redelivered or duplicated confirmation changes nothing.

use std::sync::Arc;

use orderflow::events::v1::event_envelope::Payload;
use orderflow_platform::consumer::{self, ConsumerSettings, Handler, HandlerError, Incoming, Outcome};
use orderflow_platform::{Secret, inbox};
use sqlx::PgPool;
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
    /// Inbox rows are kept this long: the deduplication window (longer than any redrive).
    #[arg(long, env = "FULFILMENT_INBOX_RETENTION_HOURS", default_value_t = 168)]
    pub inbox_retention_hours: u64,
    /// Apply the migrations at start-up.
    #[arg(long, env = "FULFILMENT_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

/// Records shipment requests.
pub struct Fulfilment {
    pool: PgPool,
}

impl Handler for Fulfilment {
    async fn handle(&self, message: &Incoming) -> Result<Outcome, HandlerError> {
        let event = message.open()?;
        let Payload::OrderConfirmed(_) = event.payload else {
            return Ok(Outcome::Ignored);
        };
        let mut tx = self.pool.begin().await?;
        if !inbox::record(&mut tx, INBOX, event.message_id).await? {
            return Ok(Outcome::Duplicate);
        }
        let created = sqlx::query(
            "INSERT INTO shipments (shipment_id, order_id) VALUES ($1, $2) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(event.aggregate_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if created == 1 {
            tracing::info!("shipment requested");
        }
        Ok(Outcome::Processed)
    }
}

/// Consumes until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = orderflow_platform::connect_postgres(&config.database_url, 8).await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    orderflow_platform::housekeeping::spawn_inbox_cleanup(&pool, INBOX, config.inbox_retention_hours, &shutdown);
    let settings = ConsumerSettings {
        bootstrap_servers: config.bootstrap_servers,
        group_id: config.group_id,
        topics: vec![config.orders_topic],
        workers: 4,
    };
    consumer::run(settings, Arc::new(Fulfilment { pool: pool.clone() }), shutdown).await?;
    pool.close().await;
    Ok(())
}
