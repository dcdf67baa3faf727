//! The relay's WAL-message mode: publishes the events a service wrote as logical decoding
//! messages (`OUTBOX_MODE=wal-message`, `orderflow_platform::outbox::emit`), read from a
//! logical replication slot with pgoutput, instead of polling the outbox table.
//!
//! How it stays correct:
//! - pgoutput sends a transaction's messages only once it committed, whole, in commit
//!   order. The relay hands them to the idempotent producer in that order, so one key's
//!   events (written by transactions that follow each other) reach its partition in order.
//! - The slot's confirmed position is raised to a transaction's end only after the broker
//!   acknowledged every record of it and of every transaction before it (`in_flight` is
//!   drained in commit order). Postgres resends everything after the confirmed position on
//!   the next connection, so nothing is skipped.
//! - A slot is created once (first start, recorded in `outbox_wal_slot`). A slot that later
//!   disappears or is invalidated is reported and the relay stops: a new slot would start
//!   at the current WAL position, after the events the old one still held (they are gone;
//!   the operator's procedure is in docs/runbook.md).
//!
//! Failure windows:
//! - dies before publishing a transaction's messages (`relay::before_publish`): its end was
//!   never confirmed; the next connection receives it again;
//! - dies after the broker acknowledged and before the confirmation reached Postgres
//!   (`relay::after_ack_before_mark`, and the up to `status_interval` the confirmation waits
//!   to be sent): the transactions are resent and published again; consumers' inboxes
//!   absorb the duplicates (same message ids);
//! - broker down: records fail after the delivery timeout; the relay drops the stream and
//!   reconnects from the confirmed position after a backoff, publishing again what it had
//!   not confirmed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use orderflow::events::v1::EventEnvelope;
use orderflow_platform::{Secret, outbox, telemetry};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The publication every pgoutput stream of the relay names (migrations: it publishes no
/// table; logical decoding messages are sent whatever it holds).
pub const PUBLICATION: &str = "orderflow_outbox";
/// Microseconds between the Unix epoch and Postgres's (2000-01-01), for commit times.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// How often the slot's lag is measured and its confirmed position recorded.
const SLOT_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the relay cannot go on with its slot: never healed by retrying.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The slot the relay created is gone (dropped by someone).
    #[error(
        "replication slot {slot} (created {created_at}) no longer exists: events it had not confirmed are lost \
         from the WAL; refusing to create a new one silently (docs/runbook.md, \"A lost replication slot\")"
    )]
    Missing {
        /// The slot's name.
        slot: String,
        /// When the relay created it.
        created_at: chrono::DateTime<chrono::Utc>,
    },
    /// Postgres invalidated the slot: it fell further behind than `max_slot_wal_keep_size`.
    #[error(
        "replication slot {slot} was invalidated (wal_status = lost: it fell behind by more than \
         max_slot_wal_keep_size); events in the removed WAL are gone (docs/runbook.md, \"A lost replication slot\")"
    )]
    Invalidated {
        /// The slot's name.
        slot: String,
    },
    /// A slot of that name exists but is not one this relay can read.
    #[error("replication slot {slot} is not a pgoutput slot of this database ({detail})")]
    Foreign {
        /// The slot's name.
        slot: String,
        /// What is wrong with it.
        detail: String,
    },
}

/// The slot as Postgres reports it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SlotStatus {
    /// The slot's name.
    pub slot_name: String,
    /// Whether a relay is streaming it now.
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (pg_replication_slots).
    pub wal_status: Option<String>,
    /// WAL between the current position and the confirmed one.
    pub lag_bytes: Option<f64>,
    /// WAL it may still fall behind before invalidation (None: no limit set).
    pub safe_wal_size: Option<i64>,
    /// When the relay last recorded a confirmed position.
    pub confirmed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The state of `slot` in the database of `pool`, joined with what the relay recorded about
/// it (`ordersctl verify` and the stack's status read it too). None: no such slot and none
/// ever recorded.
pub async fn slot_status(pool: &PgPool, slot: &str) -> Result<Option<Result<SlotStatus, SlotError>>, sqlx::Error> {
    let status: Option<SlotStatus> = sqlx::query_as(
        "SELECT s.slot_name::text AS slot_name, s.active, s.wal_status,
                pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8 AS lag_bytes,
                s.safe_wal_size, r.confirmed_at
         FROM pg_replication_slots s LEFT JOIN outbox_wal_slot r ON r.slot_name = s.slot_name
         WHERE s.slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    if let Some(status) = status {
        if status.wal_status.as_deref() == Some("lost") {
            return Ok(Some(Err(SlotError::Invalidated { slot: slot.to_owned() })));
        }
        return Ok(Some(Ok(status)));
    }
    let created_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT created_at FROM outbox_wal_slot WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?;
    Ok(created_at.map(|created_at| {
        Err(SlotError::Missing {
            slot: slot.to_owned(),
            created_at,
        })
    }))
}

/// Makes sure `slot` exists and is usable: creates it on the very first start (and records
/// that), adopts one an operator created, refuses one that was lost.
pub async fn ensure_slot(pool: &PgPool, slot: &str) -> anyhow::Result<()> {
    match slot_status(pool, slot).await? {
        Some(Err(lost)) => Err(lost.into()),
        Some(Ok(_)) => {
            let (plugin, database): (Option<String>, Option<String>) =
                sqlx::query_as("SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1")
                    .bind(slot)
                    .fetch_one(pool)
                    .await?;
            let here: String = sqlx::query_scalar("SELECT current_database()::text")
                .fetch_one(pool)
                .await?;
            if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(here.as_str()) {
                return Err(SlotError::Foreign {
                    slot: slot.to_owned(),
                    detail: format!("plugin {plugin:?}, database {database:?}"),
                }
                .into());
            }
            // Created by an operator, or by a relay that died before recording it.
            sqlx::query(
                "INSERT INTO outbox_wal_slot (slot_name, created_lsn)
                 SELECT slot_name, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1
                 ON CONFLICT (slot_name) DO NOTHING",
            )
            .bind(slot)
            .execute(pool)
            .await?;
            Ok(())
        }
        None => {
            // The first start. Events written before this moment (by services already in
            // wal-message mode) are not in the slot: start the relay before the services.
            // Outside any transaction: a slot cannot be created by one that wrote.
            let lsn: String =
                sqlx::query_scalar("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')")
                    .bind(slot)
                    .fetch_one(pool)
                    .await?;
            // Dying here leaves an unrecorded slot, adopted on the next start (above).
            sqlx::query("INSERT INTO outbox_wal_slot (slot_name, created_lsn) VALUES ($1, $2::pg_lsn)")
                .bind(slot)
                .bind(&lsn)
                .execute(pool)
                .await?;
            tracing::info!(slot, %lsn, "replication slot created");
            Ok(())
        }
    }
}

/// The default slot of a database: one relay (at a time) per service database.
pub fn default_slot_name(database: &str) -> String {
    format!("{database}_outbox")
}

/// The replication connection's settings from the relay's database URL (same host, role,
/// password and database).
pub fn replication_config(database_url: &Secret, slot: &str) -> anyhow::Result<ReplicationConfig> {
    let url = url::Url::parse(database_url.expose())?;
    let decode = |part: &str| -> anyhow::Result<String> {
        Ok(url::form_urlencoded::parse(format!("x={part}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default())
    };
    let host = url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("the database URL names no host"))?;
    let database = url.path().trim_start_matches('/');
    anyhow::ensure!(!database.is_empty(), "the database URL names no database");
    Ok(ReplicationConfig::new(
        host,
        decode(url.username())?,
        decode(url.password().unwrap_or_default())?,
        decode(database)?,
        slot,
        PUBLICATION,
    )
    .with_port(url.port().unwrap_or(5432))
    // Loopback, like every other connection of the local stack (docs/security.md).
    .with_tls(TlsConfig::disabled())
    .with_application_name(format!("orderflow-relay {slot}")))
}

/// One committed transaction's records, on their way to the broker.
struct Committed {
    /// Where the transaction ends in the WAL: the position to confirm once it is published.
    end_lsn: Lsn,
    /// Its commit time, microseconds since the Unix epoch.
    commit_unix_micros: i64,
    /// Records acknowledged.
    published: usize,
}

/// The relay over one database's replication slot.
/// Records waiting for acknowledgements before the relay stops reading the slot, unless
/// configured (`RELAY_WAL_MAX_IN_FLIGHT`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 20_000;

pub struct WalRelay {
    pool: PgPool,
    producer: FutureProducer,
    replication: ReplicationConfig,
    delivery_timeout: Duration,
    max_in_flight: usize,
    copies: crate::Copies,
}

impl WalRelay {
    /// A relay reading `replication`'s slot (on `pool`'s database) and publishing with `producer`.
    pub fn new(pool: PgPool, producer: FutureProducer, replication: ReplicationConfig) -> Self {
        Self {
            pool,
            producer,
            replication,
            delivery_timeout: orderflow_platform::kafka::DEFAULT_DELIVERY_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            copies: crate::Copies::default(),
        }
    }

    /// How long the broker may take to acknowledge a record before the stream is restarted
    /// from the confirmed position.
    pub fn with_delivery_timeout(self, timeout: Duration) -> Self {
        Self {
            delivery_timeout: timeout,
            ..self
        }
    }

    /// How many records may wait for acknowledgements before the relay stops reading the
    /// slot (bounds memory; the producer's own queue is bounded too).
    pub fn with_max_in_flight(self, records: usize) -> Self {
        Self {
            max_in_flight: records.max(1),
            ..self
        }
    }

    /// Publishes every event twice (the duplicate-delivery fault of the tests).
    #[cfg(feature = "failpoints")]
    pub fn publishing_twice(self) -> Self {
        Self {
            copies: crate::Copies { twice: true },
            ..self
        }
    }

    /// Streams the slot until `shutdown`, reconnecting after failures from the confirmed
    /// position. Returns an error only for a slot that cannot be used any more.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let slot = self.replication.slot.clone();
        let oldest_unconfirmed = Arc::new(AtomicU64::new(0));
        let watch = tokio::spawn(watch_slot(
            self.pool.clone(),
            slot.clone(),
            oldest_unconfirmed.clone(),
            shutdown.clone(),
        ));
        let mut backoff = Duration::from_millis(100);
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if let Err(error) = ensure_slot(&self.pool, &slot).await {
                if error.downcast_ref::<SlotError>().is_some() {
                    tracing::error!(
                        error = format!("{error:#}"),
                        slot,
                        "the relay's replication slot is unusable"
                    );
                    break Err(error);
                }
                tracing::warn!(error = format!("{error:#}"), "cannot check the replication slot");
            } else {
                match self.stream(&oldest_unconfirmed, &shutdown).await {
                    Ok(()) => break Ok(()),
                    Err(error) => {
                        metrics::counter!(telemetry::RELAY_PUBLISH_ERRORS).increment(1);
                        tracing::warn!(
                            error = format!("{error:#}"),
                            retry_in_ms = backoff.as_millis() as u64,
                            "replication stream failed; resuming from the confirmed position"
                        );
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        watch.abort();
        let _ = self.producer.flush(Duration::from_secs(5));
        tracing::info!("relay stopped");
        result
    }

    /// One replication session: publishes committed transactions in commit order and
    /// confirms each once it and every one before it are acknowledged.
    async fn stream(&self, oldest_unconfirmed: &AtomicU64, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut client = ReplicationClient::connect(self.replication.clone()).await?;
        tracing::info!(slot = %self.replication.slot, "streaming the replication slot");
        let mut in_flight = FuturesOrdered::new();
        // Commit times of the transactions in flight, oldest first (the slot's lag in seconds).
        let mut commit_times: VecDeque<i64> = VecDeque::new();
        let mut records_in_flight = 0usize;
        // The messages of the transaction being received (between Begin and Commit).
        let mut open: Option<Vec<(String, EventEnvelope, Vec<u8>)>> = None;
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let done: Result<Committed, String> = done;
                    let committed = match done {
                        Ok(committed) => committed,
                        // Unconfirmed from here on: the next session resends it all.
                        Err(error) => break Err(anyhow::anyhow!("a record was not acknowledged: {error}")),
                    };
                    // Dying here: the broker has the records, the slot still holds them; they
                    // are published again after a restart (the inboxes absorb them).
                    fail::fail_point!("relay::after_ack_before_mark");
                    client.update_applied_lsn(committed.end_lsn);
                    records_in_flight -= committed.published.min(records_in_flight);
                    commit_times.pop_front();
                    oldest_unconfirmed.store(commit_times.front().copied().unwrap_or(0) as u64, Ordering::Relaxed);
                    let lag_micros = chrono::Utc::now().timestamp_micros() - committed.commit_unix_micros;
                    if committed.published > 0 {
                        let lag = Duration::from_micros(u64::try_from(lag_micros).unwrap_or(0));
                        for _ in 0..committed.published {
                            metrics::histogram!(telemetry::RELAY_LAG).record(lag.as_secs_f64());
                        }
                        metrics::counter!(telemetry::RELAY_PUBLISHED).increment(committed.published as u64);
                    }
                }
                event = client.recv(), if records_in_flight < self.max_in_flight => {
                    let Some(event) = event? else { break Ok(()) };
                    match event {
                        ReplicationEvent::Begin { .. } => open = Some(Vec::new()),
                        ReplicationEvent::Message { transactional, prefix, content, lsn } => {
                            let Some(topic) = prefix.strip_prefix(outbox::WAL_MESSAGE_PREFIX) else {
                                continue;
                            };
                            if !transactional {
                                // Not written by the outbox API (which is transactional): it
                                // was not part of any business change.
                                tracing::warn!(%lsn, topic, "ignoring a non-transactional outbox message");
                                continue;
                            }
                            let payload = content.to_vec();
                            match EventEnvelope::decode(payload.as_slice()) {
                                Ok(envelope) => open.get_or_insert_with(Vec::new).push((topic.to_owned(), envelope, payload)),
                                // Written by the outbox API, so never; a forged one must not
                                // stop the stream for everybody.
                                Err(error) => tracing::error!(%lsn, topic, %error, "an outbox message is not an envelope; skipped"),
                            }
                        }
                        ReplicationEvent::Commit { end_lsn, commit_time_micros, .. } => {
                            let messages = open.take().unwrap_or_default();
                            // Dying here (or anywhere before the confirmation): resent.
                            fail::fail_point!("relay::before_publish");
                            let commit_unix_micros = commit_time_micros + PG_EPOCH_OFFSET_MICROS;
                            let deliveries = self.enqueue_all(&messages).await;
                            records_in_flight += messages.len();
                            commit_times.push_back(commit_unix_micros);
                            if commit_times.len() == 1 {
                                oldest_unconfirmed.store(commit_unix_micros as u64, Ordering::Relaxed);
                            }
                            let deadline = tokio::time::Instant::now() + self.delivery_timeout;
                            let published = messages.len();
                            in_flight.push_back(async move {
                                for (delivery, span) in deliveries {
                                    crate::acknowledged(delivery, deadline).instrument(span).await?;
                                }
                                Ok(Committed { end_lsn, commit_unix_micros, published })
                            });
                        }
                        // Nothing received is unconfirmed: everything up to the server's
                        // position is done (transactions still open there are sent when they
                        // commit, after it). Keeps the slot of a database that writes no
                        // events advancing with the rest of the cluster's WAL.
                        ReplicationEvent::KeepAlive { wal_end, .. } if in_flight.is_empty() && open.is_none() => {
                            client.update_applied_lsn(wal_end);
                        }
                        ReplicationEvent::StoppedAt { .. } => break Ok(()),
                        // Row changes: the publication has no table, so none arrive.
                        _ => {}
                    }
                }
            }
        };
        oldest_unconfirmed.store(0, Ordering::Relaxed);
        let _ = client.shutdown().await;
        result
    }

    /// Hands the records of one transaction to the producer, in order.
    async fn enqueue_all(
        &self,
        messages: &[(String, EventEnvelope, Vec<u8>)],
    ) -> Vec<(Result<rdkafka::producer::DeliveryFuture, String>, tracing::Span)> {
        let mut deliveries = Vec::with_capacity(messages.len() * self.copies.per_row());
        for (topic, envelope, payload) in messages {
            let version = envelope.schema_version.to_string();
            let traceparent = (!envelope.traceparent.is_empty()).then_some(envelope.traceparent.as_str());
            let (span, headers) = crate::publication(
                &envelope.message_id,
                &envelope.event_type,
                &version,
                &envelope.aggregate_id,
                traceparent,
            );
            for _ in 0..self.copies.per_row() {
                let record = FutureRecord::to(topic)
                    .key(&envelope.aggregate_id)
                    .payload(payload)
                    .headers(headers.clone());
                deliveries.push((crate::enqueue(&self.producer, record).await, span.clone()));
            }
        }
        deliveries
    }
}

/// Measures the slot every second (lag in bytes, room before invalidation, the age of the
/// oldest unconfirmed event) and records its confirmed position in `outbox_wal_slot`, so
/// that the lag in seconds is known also while no relay runs.
async fn watch_slot(pool: PgPool, slot: String, oldest_unconfirmed: Arc<AtomicU64>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SLOT_WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let oldest = oldest_unconfirmed.load(Ordering::Relaxed) as i64;
        let seconds = if oldest == 0 {
            0.0
        } else {
            (chrono::Utc::now().timestamp_micros() - oldest).max(0) as f64 / 1e6
        };
        metrics::gauge!(telemetry::RELAY_SLOT_LAG_SECONDS).set(seconds);
        match slot_status(&pool, &slot).await {
            Ok(Some(Ok(status))) => {
                metrics::gauge!(telemetry::RELAY_SLOT_LAG_BYTES).set(status.lag_bytes.unwrap_or(0.0));
                if let Some(safe) = status.safe_wal_size {
                    metrics::gauge!(telemetry::RELAY_SLOT_SAFE_BYTES).set(safe as f64);
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "cannot measure the replication slot"),
        }
        let recorded = sqlx::query(
            "UPDATE outbox_wal_slot r SET confirmed_lsn = s.confirmed_flush_lsn, confirmed_at = now()
             FROM pg_replication_slots s
             WHERE s.slot_name = r.slot_name AND r.slot_name = $1
               AND r.confirmed_lsn IS DISTINCT FROM s.confirmed_flush_lsn",
        )
        .bind(&slot)
        .execute(&pool)
        .await;
        if let Err(error) = recorded {
            tracing::debug!(%error, "cannot record the slot's confirmed position");
        }
    }
}
