//! Prometheus metrics. Every process serves the Prometheus text format over HTTP at
//! `ORDERFLOW_METRICS_ADDR` (e.g. `127.0.0.1:9101`; any path, `/metrics` by convention).
//! Names follow the Prometheus conventions: a unit suffix, `_total` for counters.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// gRPC requests, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "orderflow_grpc_requests_total";
/// gRPC request duration, by `method`.
pub const GRPC_DURATION: &str = "orderflow_grpc_request_duration_seconds";
/// Outbox rows not yet published.
pub const OUTBOX_PENDING: &str = "orderflow_outbox_pending_rows";
/// Outbox commit → broker acknowledgement.
pub const RELAY_LAG: &str = "orderflow_relay_lag_seconds";
/// Rows published.
pub const RELAY_PUBLISHED: &str = "orderflow_relay_published_total";
/// Rows the broker refused.
pub const RELAY_PUBLISH_ERRORS: &str = "orderflow_relay_publish_errors_total";
/// Messages handled, by `group`, `topic` and `outcome` (processed, duplicate, ignored, dead_lettered).
pub const CONSUMER_MESSAGES: &str = "orderflow_consumer_messages_total";
/// Transient failures retried, by `group`.
pub const CONSUMER_RETRIES: &str = "orderflow_consumer_retries_total";
/// Messages behind the high watermark, by `group`, `topic` and `partition`.
pub const CONSUMER_LAG: &str = "orderflow_consumer_lag_messages";
/// Placed → CONFIRMED or CANCELLED, by `status`.
pub const SAGA_COMPLETION: &str = "orderflow_saga_completion_seconds";
/// Orders the sweeper cancelled.
pub const SWEEPER_CANCELLATIONS: &str = "orderflow_sweeper_cancellations_total";
/// Gateway calls, by `operation` and `outcome`.
pub const GATEWAY_CALL_DURATION: &str = "orderflow_gateway_call_duration_seconds";
/// Event occurred → visible in the read model.
pub const READ_MODEL_LAG: &str = "orderflow_read_model_lag_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Serves metrics at `ORDERFLOW_METRICS_ADDR` if it is set. Called once, from `main`.
pub fn install_metrics_from_env() -> anyhow::Result<Option<SocketAddr>> {
    let Ok(addr) = std::env::var("ORDERFLOW_METRICS_ADDR") else {
        return Ok(None);
    };
    let addr: SocketAddr = addr.parse()?;
    install_metrics(addr)?;
    Ok(Some(addr))
}

/// Serves metrics at `addr` (the process-wide recorder: install it once).
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)?
        .install()?;
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}
