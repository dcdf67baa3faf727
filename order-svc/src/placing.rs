//! Group commit for PlaceOrder: concurrent calls share one transaction.
//!
//! Each call hands its order to a committer and waits. A committer takes every order waiting
//! (at most `max_batch`), writes them all in one transaction (one multi-row insert per table:
//! idempotency keys, orders, items, outbox), commits once, and only then answers each caller.
//! While one batch commits, the next gathers: the busier the service, the bigger the batch and
//! the fewer commits per order, with no timer and no added latency when it is idle.
//!
//! Idempotency is unchanged: the same key with the same request answers the first response
//! and writes nothing; with another request, FAILED_PRECONDITION; racing calls with one key
//! make one order (within a batch, the first call with a key leads and the others compare
//! against it; across batches, the key's unique index makes the later insert wait for the
//! earlier transaction and then see its row).
//!
//! One bad request never fails its neighbours: a batch whose transaction the database refuses
//! is written again in halves, each in its own transaction, down to the call at fault, which
//! alone gets the error. A batch that fails because the database is away fails at once.
//!
//! Failure windows: dying before the commit, nothing of the batch exists and every caller sees
//! an error (or a dropped connection) and retries with its request id; dying after it and
//! before the answers, the orders exist and each retry is answered from its idempotency key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use orderflow::orders::v1::PlaceOrderResponse;
use orderflow_platform::outbox::{Outbox, OutboxMessage};
use prost::Message as _;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::domain::Order;
use crate::store::{IdempotencyKey, PlaceOutcome, StoreError};

/// An order to write, with what its caller is answered.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The order.
    pub order: Order,
    /// Its correlation id.
    pub correlation_id: uuid::Uuid,
    /// The call's idempotency key, if it has one.
    pub key: Option<IdempotencyKey>,
    /// Its `OrderPlaced` event.
    pub event: OutboxMessage,
    /// The answer when it is created.
    pub response: PlaceOrderResponse,
}

type Job = (Placement, oneshot::Sender<Result<PlaceOutcome, StoreError>>);

/// Most orders in one transaction unless configured (`ORDER_SVC_GROUP_COMMIT_MAX_BATCH`).
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Transactions in flight at once unless configured (`ORDER_SVC_GROUP_COMMITTERS`).
pub const DEFAULT_COMMITTERS: usize = 2;

/// Hands placements to the committers.
#[derive(Debug, Clone)]
pub struct Placer {
    jobs: mpsc::Sender<Job>,
}

/// How the committers write.
#[derive(Debug, Clone)]
pub struct Committers {
    /// How many transactions may be in flight at once (while one commits, another gathers).
    pub count: usize,
    /// Most orders in one transaction.
    pub max_batch: usize,
    /// How the events reach the relay.
    pub outbox: Outbox,
    /// The naive build's dual write (`crate::naive`) runs: no outbox row is written.
    #[cfg(feature = "naive")]
    pub dual_write: bool,
}

impl Committers {
    /// Whether the events go into the outbox in the orders' transaction: always, but in the
    /// naive build's dual write.
    fn writes_outbox(&self) -> bool {
        #[cfg(feature = "naive")]
        let writes = !self.dual_write;
        #[cfg(not(feature = "naive"))]
        let writes = true;
        writes
    }
}

impl Placer {
    /// Starts `committers.count` committers on `pool` until `shutdown` (or until every
    /// [`Placer`] is dropped); returns the placer and the committers' tasks.
    pub fn start(
        pool: PgPool,
        committers: Committers,
        shutdown: CancellationToken,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        // Room for one batch per committer waiting: a call finding it full is refused at once
        // (overloaded) instead of queueing behind more than the committers can take next.
        let (jobs, waiting) = mpsc::channel::<Job>(committers.max_batch.max(1) * committers.count.max(1));
        let waiting = Arc::new(Mutex::new(waiting));
        let tasks = (0..committers.count.max(1))
            .map(|_| {
                tokio::spawn(commit_loop(
                    pool.clone(),
                    waiting.clone(),
                    committers.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        (Self { jobs }, tasks)
    }

    /// Writes `placement` with whatever else is waiting, and answers once it is committed;
    /// [`StoreError::Busy`] at once when a batch's worth waits for every committer already.
    pub async fn place(&self, placement: Placement) -> Result<PlaceOutcome, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.jobs.try_send((placement, answer)).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!(orderflow_platform::telemetry::PLACE_ORDER_REFUSED, "reason" => "writers_busy")
                    .increment(1);
                StoreError::Busy
            }
            mpsc::error::TrySendError::Closed(_) => StoreError::Unavailable(sqlx::Error::PoolClosed),
        })?;
        answered
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?
    }
}

/// Takes every job waiting (at most `max_batch`) and commits them together, until shutdown.
async fn commit_loop(
    pool: PgPool,
    waiting: Arc<Mutex<mpsc::Receiver<Job>>>,
    committers: Committers,
    shutdown: CancellationToken,
) {
    loop {
        let batch = {
            let mut waiting = waiting.lock().await;
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = waiting.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut batch = vec![first];
            while batch.len() < committers.max_batch.max(1) {
                match waiting.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        commit(&pool, &committers, batch).await;
    }
}

/// Commits `batch` in one transaction and answers each caller. If that transaction fails for
/// a reason one order can cause (data the database refuses), its halves are written apart,
/// down to the placement at fault, which alone gets the error; if it fails for a reason every
/// order shares (the database away), every caller gets it at once.
async fn commit(pool: &PgPool, committers: &Committers, batch: Vec<Job>) {
    metrics::histogram!(orderflow_platform::telemetry::PLACE_ORDER_BATCH_SIZE).record(batch.len() as f64);
    let mut parts = vec![batch];
    while let Some(mut part) = parts.pop() {
        // A caller that gave up (its deadline passed, its connection dropped) saw an error: its
        // order is not written (a retry with its request id places it; one without places a
        // new one, which must then be the only one).
        part.retain(|(_, answer)| !answer.is_closed());
        if part.is_empty() {
            continue;
        }
        let placements: Vec<Placement> = part.iter().map(|(placement, _)| placement.clone()).collect();
        match write(pool, committers, &placements).await {
            Ok(outcomes) => {
                for ((_, answer), outcome) in part.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
            }
            Err(error) if part.len() > 1 && error.may_be_one_orders() => {
                tracing::debug!(%error, orders = part.len(), "a batch of orders failed; writing its halves apart");
                let second = part.split_off(part.len() / 2);
                // The first half next, then the second: callers are answered in arrival order.
                parts.push(second);
                parts.push(part);
            }
            Err(error) => {
                for (_, answer) in part {
                    let _ = answer.send(Err(error.same_kind()));
                }
            }
        }
    }
}

/// What a placement comes to, decided before anything is written.
enum Fate {
    /// A new order.
    Create,
    /// Answered from the key's stored response (or refused), nothing written.
    Settled(Result<PlaceOutcome, StoreError>),
}

/// The idempotency keys of `placements`: claims those that are new or expired (one insert),
/// and decides what each placement comes to.
async fn claim_keys(tx: &mut sqlx::PgConnection, placements: &[Placement]) -> Result<Vec<Fate>, StoreError> {
    // The first placement with each key leads; the others with that key follow it.
    let mut leader: HashMap<uuid::Uuid, usize> = HashMap::new();
    for (at, placement) in placements.iter().enumerate() {
        if let Some(key) = &placement.key {
            leader.entry(key.request_id).or_insert(at);
        }
    }
    let mut leaders: Vec<usize> = leader.values().copied().collect();
    // In key order: two batches claiming overlapping keys lock them in the same order.
    leaders.sort_by_key(|&at| placements[at].key.as_ref().map(|k| k.request_id));
    let mut claimed: HashSet<uuid::Uuid> = HashSet::new();
    if !leaders.is_empty() {
        let keys: Vec<&IdempotencyKey> = leaders.iter().filter_map(|&at| placements[at].key.as_ref()).collect();
        let ids: Vec<String> = keys.iter().map(|k| k.request_id.to_string()).collect();
        let fingerprints: Vec<&[u8]> = keys.iter().map(|k| k.fingerprint.as_slice()).collect();
        let order_ids: Vec<uuid::Uuid> = leaders.iter().map(|&at| placements[at].order.id.as_uuid()).collect();
        let responses: Vec<Vec<u8>> = leaders
            .iter()
            .map(|&at| placements[at].response.encode_to_vec())
            .collect();
        let retention: Vec<f64> = keys.iter().map(|k| k.retention.as_secs_f64()).collect();
        // A concurrent transaction with one of these keys makes this insert wait for it, then
        // see its committed row: N racing retries create exactly one order. An expired key
        // (not yet cleaned up) is reclaimed.
        let rows: Vec<(String,)> = sqlx::query_as(
            "INSERT INTO idempotency_keys (request_id, request_fingerprint, order_id, response, expires_at)
             SELECT id, fp, o, r, now() + make_interval(secs => s)
             FROM unnest($1::text[], $2::bytea[], $3::uuid[], $4::bytea[], $5::float8[])
                  WITH ORDINALITY AS u(id, fp, o, r, s, n)
             ORDER BY n
             ON CONFLICT (request_id) DO UPDATE
                SET request_fingerprint = EXCLUDED.request_fingerprint, order_id = EXCLUDED.order_id,
                    response = EXCLUDED.response, created_at = now(), expires_at = EXCLUDED.expires_at
                WHERE idempotency_keys.expires_at < now()
             RETURNING request_id",
        )
        .bind(&ids)
        .bind(&fingerprints)
        .bind(&order_ids)
        .bind(&responses)
        .bind(&retention)
        .fetch_all(&mut *tx)
        .await?;
        for (id,) in rows {
            if let Ok(id) = id.parse() {
                claimed.insert(id);
            }
        }
    }
    // The keys seen before: what they answered, and for which request.
    let stored_ids: Vec<String> = leader
        .keys()
        .filter(|id| !claimed.contains(id))
        .map(ToString::to_string)
        .collect();
    let mut stored: HashMap<String, (Vec<u8>, Vec<u8>)> = HashMap::new();
    if !stored_ids.is_empty() {
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT request_id, request_fingerprint, response FROM idempotency_keys WHERE request_id = ANY($1)",
        )
        .bind(&stored_ids)
        .fetch_all(&mut *tx)
        .await?;
        stored = rows
            .into_iter()
            .map(|(id, fp, response)| (id, (fp, response)))
            .collect();
    }
    placements
        .iter()
        .enumerate()
        .map(|(at, placement)| {
            let Some(key) = &placement.key else {
                return Ok(Fate::Create);
            };
            let first = leader.get(&key.request_id).copied().unwrap_or(at);
            let (fingerprint, response) = if claimed.contains(&key.request_id) {
                if first == at {
                    return Ok(Fate::Create);
                }
                // A follower of a leader creating the order in this very batch.
                let led = &placements[first];
                let fingerprint = led.key.as_ref().map(|k| k.fingerprint.clone()).unwrap_or_default();
                (fingerprint, led.response.clone())
            } else {
                let (fingerprint, response) = stored
                    .get(&key.request_id.to_string())
                    .ok_or_else(|| StoreError::Corrupt(format!("idempotency key {} vanished", key.request_id)))?;
                let response = PlaceOrderResponse::decode(response.as_slice())
                    .map_err(|error| StoreError::Corrupt(format!("stored response: {error}")))?;
                (fingerprint.clone(), response)
            };
            Ok(Fate::Settled(if fingerprint == key.fingerprint {
                Ok(PlaceOutcome::Replayed(response))
            } else {
                Err(StoreError::IdempotencyKeyReused)
            }))
        })
        .collect()
}

/// Writes `placements` in one transaction; each one's outcome, or the error that failed it
/// as a whole (nothing of it committed).
async fn write(
    pool: &PgPool,
    committers: &Committers,
    placements: &[Placement],
) -> Result<Vec<Result<PlaceOutcome, StoreError>>, StoreError> {
    let mut tx = pool.begin().await?;
    let fates = claim_keys(&mut tx, placements).await?;
    let created: Vec<&Placement> = placements
        .iter()
        .zip(&fates)
        .filter(|(_, fate)| matches!(fate, Fate::Create))
        .map(|(placement, _)| placement)
        .collect();
    if !created.is_empty() {
        insert_orders(&mut tx, &created).await?;
        if committers.writes_outbox() {
            let events: Vec<OutboxMessage> = created.iter().map(|p| p.event.clone()).collect();
            committers.outbox.write_all(&mut tx, &events).await?;
        }
        // If the process dies before this commit, nothing above exists: each caller sees an
        // error (or a dropped connection) and retries with the same request_id.
        tx.commit().await?;
    }
    // Nothing created: nothing was written, dropping the transaction rolls back.
    Ok(placements
        .iter()
        .zip(fates)
        .map(|(placement, fate)| match fate {
            Fate::Create => Ok(PlaceOutcome::Created(placement.response.clone())),
            Fate::Settled(outcome) => outcome,
        })
        .collect())
}

/// The orders and their items, one insert each.
async fn insert_orders(tx: &mut sqlx::PgConnection, created: &[&Placement]) -> Result<(), sqlx::Error> {
    let orders: Vec<&Order> = created.iter().map(|p| &p.order).collect();
    let ids: Vec<uuid::Uuid> = orders.iter().map(|o| o.id.as_uuid()).collect();
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state,
                             version, correlation_id, traceparent)
         SELECT id, c, cur, t, tok, st, sg, v, corr, NULLIF(tp, '')
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[],
                     $8::int8[], $9::uuid[], $10::text[]) AS u(id, c, cur, t, tok, st, sg, v, corr, tp)",
    )
    .bind(&ids)
    .bind(orders.iter().map(|o| o.customer_id.get()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.total.currency().code()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.total.amount_minor()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.payment_token.as_str()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.status.as_str()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.saga_state.as_str()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.version).collect::<Vec<_>>())
    .bind(created.iter().map(|p| p.correlation_id).collect::<Vec<_>>())
    .bind(
        created
            .iter()
            .map(|p| p.event.envelope.traceparent.as_str())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    let mut item_order = Vec::new();
    let mut line_numbers = Vec::new();
    let mut skus = Vec::new();
    let mut quantities = Vec::new();
    let mut prices = Vec::new();
    for order in &orders {
        for (line, item) in order.items.iter().enumerate() {
            item_order.push(order.id.as_uuid());
            line_numbers.push(i32::try_from(line).unwrap_or(i32::MAX));
            skus.push(item.sku.as_str());
            quantities.push(item.quantity.get());
            prices.push(item.unit_price.amount_minor());
        }
    }
    sqlx::query(
        "INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price_minor)
         SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::bigint[])",
    )
    .bind(&item_order)
    .bind(&line_numbers)
    .bind(&skus)
    .bind(&quantities)
    .bind(&prices)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
