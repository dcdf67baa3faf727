//! What every orderflow process shares: the plumbing (secrets, logging, Postgres, Kafka
//! settings, the outbox, the consumer runtime, shutdown) that each service would otherwise
//! write again. Nothing here decides anything about orders or payments. One exception, on
//! purpose: the metric names of every process, the services' included, are declared together
//! in [`telemetry`], so that the alerts, the dashboard and the benchmark read one list.

pub mod auth;
#[cfg(feature = "failpoints")]
pub mod chaos;
pub mod config;
pub mod consumer;
pub mod fairness;
pub mod grpc;
pub mod health;
pub mod housekeeping;
pub mod inbox;
pub mod kafka;
#[cfg(feature = "naive")]
pub mod naive;
pub mod outbox;
pub mod retry;
pub mod secret;
pub mod security;
pub mod signing;
pub mod telemetry;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use secret::Secret;

/// Refuses settings a process would not read. `given` pairs each variable's name with whether
/// it was set to anything but its default; those set are named in the error, which says where
/// they apply (`only_for`). A setting silently ignored is one an operator believes in and
/// that does nothing.
pub fn refuse_unread_settings(given: &[(&str, bool)], only_for: &str) -> anyhow::Result<()> {
    let named: Vec<&str> = given.iter().filter(|(_, set)| *set).map(|(name, _)| *name).collect();
    anyhow::ensure!(named.is_empty(), "{} apply only to {only_for}", named.join(", "));
    Ok(())
}

/// A token cancelled by SIGINT or SIGTERM: the process then drains its work in flight.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops this process");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = terminate => {},
        }
        tracing::info!("shutdown requested; draining work in flight");
        cancel.cancel();
    });
    token
}

/// Opens a Postgres pool. The URL is a [`Secret`]: it carries the password and is never logged.
///
/// No ping before each acquire (sqlx's default `test_before_acquire`): it cost one round
/// trip per transaction, about a quarter of all round trips per order. A connection that
/// died meanwhile (Postgres restarted) fails its first statement instead; the pool drops
/// it, and the caller's error is transient (a consumer retries the message, an API call
/// answers UNAVAILABLE and the client retries with the same request id).
pub async fn connect_postgres(url: &Secret, max_connections: u32) -> Result<sqlx::PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url.expose())
        .await
}
