//! Readiness as gRPC health: a service is SERVING only while its database answers and, if
//! it uses Kafka, the broker answers a metadata request. Liveness is simply that the process
//! answers the health RPC at all (NOT_SERVING included): restart on no answer, stop routing
//! on NOT_SERVING.

use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer as _};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// How often the dependencies are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn database_ok(pool: &PgPool) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(pool)).await,
        Ok(Ok(_))
    )
}

fn broker_ok(client: &BaseProducer) -> bool {
    client.client().fetch_metadata(None, PROBE_TIMEOUT).is_ok()
}

/// Keeps `services` (and the server's overall status, "") SERVING while the dependencies
/// answer, NOT_SERVING otherwise, until `shutdown`.
pub async fn watch(
    reporter: HealthReporter,
    services: Vec<&'static str>,
    pool: PgPool,
    cluster: Option<crate::kafka::Cluster>,
    shutdown: CancellationToken,
) {
    let broker: Option<std::sync::Arc<BaseProducer>> = cluster.and_then(|cluster| {
        cluster
            .client_config()
            .set("client.id", "health-probe")
            .create()
            .map_err(|error| tracing::warn!(%error, "cannot create the broker probe"))
            .ok()
            .map(std::sync::Arc::new)
    });
    let mut last = None;
    loop {
        let database = database_ok(&pool).await;
        let kafka = match &broker {
            Some(client) => {
                let client = client.clone();
                tokio::task::spawn_blocking(move || broker_ok(&client))
                    .await
                    .unwrap_or(false)
            }
            None => true,
        };
        let status = if database && kafka {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            tracing::info!(database, broker = kafka, ?status, "readiness changed");
            for service in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
