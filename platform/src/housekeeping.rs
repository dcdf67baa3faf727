//! Table hygiene: published outbox rows, old inbox rows and a service's own expired rows (its
//! idempotency keys: the service declares that [`Purge`]) are deleted in small batches, so
//! cleanup never holds long locks or fights live traffic.
//!
//! The inbox retention is the deduplication window: a redelivery (or a dead-letter redrive)
//! older than it would be processed again. Keep it longer than the longest redrive you
//! would ever do (default 7 days).
//!
//! Each job calls a function of the service's migrations (`purge_inbox`, ...) that runs with
//! the database owner's rights and enforces its own floor: the service roles hold no DELETE
//! on these tables (least privilege, deploy/postgres/grants/).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement.
pub const BATCH: i64 = 500;

/// One cleanup job: a purge function deleting at most `$2` rows older than `$1` seconds
/// (and, where it takes one, for consumer `$3`), returning how many it deleted.
#[derive(Debug, Clone)]
pub struct Purge {
    /// For logs.
    pub name: &'static str,
    /// The statement.
    pub sql: &'static str,
    /// Rows older than this go.
    pub retention: Duration,
    /// The consumer whose inbox rows these are, for inbox purges.
    pub consumer: Option<String>,
}

/// Published outbox rows, once the broker has had them for `retention`.
pub fn published_outbox(retention: Duration) -> Purge {
    Purge {
        name: "outbox",
        sql: "SELECT purge_published_outbox($1, $2::int)",
        retention,
        consumer: None,
    }
}

/// One consumer's inbox rows older than the deduplication window.
pub fn inbox(consumer: &str, retention: Duration) -> Purge {
    Purge {
        name: "inbox",
        sql: "SELECT purge_inbox($3, $1, $2::int)",
        retention,
        consumer: Some(consumer.to_owned()),
    }
}

/// How often housekeeping runs.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// Deletes in batches until fewer than a batch is left; returns the rows deleted.
pub async fn purge(pool: &PgPool, job: &Purge) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(job.sql))
            .bind(job.retention.as_secs_f64())
            .bind(BATCH);
        if let Some(consumer) = &job.consumer {
            query = query.bind(consumer);
        }
        let deleted = u64::try_from(query.fetch_one(pool).await?).unwrap_or(0);
        total += deleted;
        if deleted < u64::try_from(BATCH).unwrap_or(u64::MAX) {
            return Ok(total);
        }
    }
}

/// Starts the periodic cleanup of one consumer's inbox rows older than `retention_hours`.
pub fn spawn_inbox_cleanup(pool: &PgPool, consumer: &str, retention_hours: u64, shutdown: &CancellationToken) {
    let job = inbox(consumer, Duration::from_secs(retention_hours * 3600));
    tokio::spawn(run(pool.clone(), vec![job], INTERVAL, shutdown.clone()));
}

/// Runs `jobs` every `interval` until `shutdown`.
pub async fn run(pool: PgPool, jobs: Vec<Purge>, interval: Duration, shutdown: CancellationToken) {
    loop {
        for job in &jobs {
            match purge(&pool, job).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(table = job.name, deleted, "housekeeping"),
                Err(error) => tracing::warn!(table = job.name, %error, "housekeeping failed; next round retries"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
