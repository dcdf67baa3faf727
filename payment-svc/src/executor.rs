//! The executor: makes the gateway calls that pending payments owe, with no database
//! transaction open and no connection held, and records each answer in a short transaction
//! of its own with the event that tells it.
//!
//! 1. **Claim** (one statement): pending payments whose claim is free (new ones, lapsed ones,
//!    those whose retry is due) are leased to this executor for [`Executor::lease`].
//! 2. **Call** (no transaction, no connection): each with the order's idempotency key, side by
//!    side, at most `concurrency` at once. A late reply holds up only its own order.
//! 3. **Record** (one transaction for every answer ready): each payment is locked; an answer
//!    for a payment that is still in the state the call was made for moves it on and writes
//!    its event to the outbox; any other answer is stale (a cancellation came meanwhile) and
//!    is dropped. A call that failed transiently is due again after a backoff.
//!
//! Failure windows, each covered by `tests/payment_intents.rs`:
//! - dying after the claim, before the call: the lease lapses and any executor (this one
//!   restarted, or another instance) claims the payment again and calls;
//! - dying during the call, or after the gateway acted and before the answer is recorded:
//!   the same, and the gateway replays the first call's result for the same key (nothing is
//!   charged twice: the ledger says so);
//! - dying after the answer is recorded: the payment is settled and its event is in the
//!   outbox; nothing is left to do;
//! - two executors holding one payment (a lease outlived by a slow call): both call with the
//!   same key, the first to record wins, the second finds the state moved and drops its
//!   answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{PaymentAuthorized, PaymentCaptured, PaymentFailed, PaymentFailureReason, PaymentVoided};
use orderflow::gateway::v1::gateway_service_client::GatewayServiceClient;
use orderflow::gateway::v1::{AuthorizationStatus, AuthorizeRequest, CaptureRequest, VoidRequest};
use orderflow::orders::v1::Money;
use orderflow_platform::grpc::TracedChannel;
use orderflow_platform::outbox::{self, OutboxMessage, OutboxMode};
use orderflow_platform::telemetry;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::domain::{self, Answer, PaymentState, Told};

/// Most payments claimed by one statement.
const CLAIM_BATCH: usize = 256;

/// Most answers recorded by one transaction.
const RECORD_BATCH: usize = 512;

/// How often pending payments are looked for without being woken: lapsed claims, retries
/// that are due, and payments another instance recorded.
const SCAN_INTERVAL: Duration = Duration::from_millis(500);

/// How long a payment whose call the gateway refuses (a capture or void only an operator can
/// sort out) stays unclaimed: in effect, until an operator releases it.
const PARKED: Duration = Duration::from_secs(1_000_000_000);

/// A pending payment as claimed.
struct Claimed {
    order_id: uuid::Uuid,
    payment_id: uuid::Uuid,
    state: PaymentState,
    authorization_id: Option<String>,
    amount_minor: i64,
    currency_code: String,
    payment_token: Option<String>,
    correlation_id: uuid::Uuid,
    causation_id: Option<uuid::Uuid>,
    attempts: i32,
    /// The span of this call and its recording, in the order's trace.
    span: tracing::Span,
}

type ClaimedRow = (
    uuid::Uuid,
    uuid::Uuid,
    String,
    Option<String>,
    i64,
    String,
    Option<String>,
    Option<uuid::Uuid>,
    Option<uuid::Uuid>,
    Option<String>,
    i32,
);

impl Claimed {
    fn from_row(row: ClaimedRow) -> Option<Self> {
        let (
            order_id,
            payment_id,
            state,
            authorization_id,
            amount_minor,
            currency_code,
            payment_token,
            correlation_id,
            causation_id,
            traceparent,
            attempts,
        ) = row;
        let state = PaymentState::parse(&state)?;
        let span = tracing::info_span!("payment_call", %order_id, state = state.as_str(), attempts, trace_id = tracing::field::Empty);
        if let Some(traceparent) = &traceparent {
            telemetry::continue_trace(&span, traceparent);
            if let Some(trace_id) = telemetry::trace_id_of(traceparent) {
                span.record("trace_id", trace_id);
            }
        }
        Some(Self {
            order_id,
            payment_id,
            state,
            authorization_id,
            amount_minor,
            currency_code: currency_code.trim().to_owned(),
            payment_token,
            correlation_id: correlation_id.unwrap_or(order_id),
            causation_id,
            attempts,
            span,
        })
    }

    /// Whether this payment is an order's charge (not the placeholder of a cancellation that
    /// came first).
    fn charged(&self) -> bool {
        self.amount_minor > 0
    }

    fn amount(&self) -> Money {
        Money {
            amount_minor: self.amount_minor,
            currency_code: self.currency_code.clone(),
        }
    }
}

/// What became of a call.
enum Called {
    /// The gateway answered.
    Answer(Answer),
    /// No answer worth recording (no reply in time, the gateway away): due again later.
    Retry(String),
}

/// Makes the gateway calls pending payments owe.
pub struct Executor {
    pool: PgPool,
    gateway: GatewayServiceClient<TracedChannel>,
    gateway_timeout: Duration,
    payments_topic: String,
    outbox: OutboxMode,
    concurrency: usize,
    wake: Arc<Notify>,
    /// Set when a claim stopped for want of room: a finished call then claims again.
    backlogged: AtomicBool,
}

impl Executor {
    /// An executor calling the gateway over `gateway`, at most `concurrency` calls at once,
    /// woken by `wake` (the consumer's commits, the overdue sweeper).
    pub fn new(
        pool: PgPool,
        gateway: tonic::transport::Channel,
        gateway_timeout: Duration,
        payments_topic: String,
        outbox: OutboxMode,
        concurrency: usize,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            pool,
            gateway: GatewayServiceClient::with_interceptor(gateway, orderflow_platform::grpc::PropagateTrace),
            gateway_timeout,
            payments_topic,
            outbox,
            concurrency: concurrency.max(1),
            wake,
            backlogged: AtomicBool::new(false),
        }
    }

    /// How long a claim lasts: three gateway timeouts, so a call (bounded by one) and the
    /// recording of its answer fit in it; a claim that lapses is taken again.
    pub fn lease(&self) -> Duration {
        self.gateway_timeout * 3
    }

    /// Claims, calls and records until `shutdown`. Calls in flight at shutdown are left to
    /// lapse: their payments are claimed again by the next executor.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (answers, answered) = mpsc::channel(self.concurrency * 2);
        let recorder = tokio::spawn(self.clone().record_answers(answered, shutdown.clone()));
        let room = Arc::new(Semaphore::new(self.concurrency));
        let mut scan = tokio::time::interval(SCAN_INTERVAL);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = scan.tick() => {}
            }
            self.claim_and_call(&room, &answers).await;
        }
        drop(answers);
        let _ = recorder.await;
    }

    /// Claims as many pending payments as there is room for calls, and starts their calls.
    async fn claim_and_call(self: &Arc<Self>, room: &Arc<Semaphore>, answers: &mpsc::Sender<(Claimed, Called)>) {
        loop {
            let free = room.available_permits().min(CLAIM_BATCH);
            if free == 0 {
                self.backlogged.store(true, Ordering::Relaxed);
                return;
            }
            let claimed = match self.claim(free).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(%error, "cannot claim pending payments; trying again later");
                    return;
                }
            };
            let full = claimed.len() == free;
            for payment in claimed {
                let Ok(permit) = room.clone().acquire_owned().await else {
                    return;
                };
                let (executor, answers) = (self.clone(), answers.clone());
                tokio::spawn(async move {
                    fail::fail_point!("payment::before_gateway", |_| orderflow_platform::chaos::crash());
                    let called = executor.call(&payment).instrument(payment.span.clone()).await;
                    drop(permit);
                    if executor.backlogged.swap(false, Ordering::Relaxed) {
                        executor.wake.notify_one();
                    }
                    // A recorder gone (shutdown) leaves the claim to lapse.
                    let _ = answers.send((payment, called)).await;
                });
            }
            if !full {
                return;
            }
        }
    }

    /// Leases up to `limit` pending payments whose claim is free, due first.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "UPDATE payments p SET lease_until = now() + make_interval(secs => $1), attempts = p.attempts + 1
             WHERE p.order_id IN (
                 SELECT order_id FROM payments
                 WHERE state = ANY($3) AND (lease_until IS NULL OR lease_until < now())
                 ORDER BY lease_until NULLS FIRST LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING p.order_id, p.payment_id, p.state, p.authorization_id, p.amount_minor, p.currency_code,
                       p.payment_token, p.correlation_id, p.causation_id, p.traceparent, p.attempts",
        )
        .bind(self.lease().as_secs_f64())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(PaymentState::pending_names())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(Claimed::from_row).collect())
    }

    /// The call `payment` owes, with the key every other call for it reuses: at most one
    /// authorization, capture and void per order, however often this runs.
    async fn call(&self, payment: &Claimed) -> Called {
        let order_id = payment.order_id;
        let mut gateway = self.gateway.clone();
        let (operation, reply) = match payment.state {
            PaymentState::Authorizing => {
                let idempotency_key = if orderflow_platform::chaos::naive() {
                    // The textbook mistake: a fresh key per call, so a retry is a second charge.
                    format!("authorize:{order_id}:{}", uuid::Uuid::now_v7())
                } else {
                    format!("authorize:{order_id}")
                };
                let request = AuthorizeRequest {
                    idempotency_key,
                    order_id: order_id.to_string(),
                    amount: Some(payment.amount()),
                    payment_token: payment.payment_token.clone().unwrap_or_default(),
                };
                let reply = self.timed("authorize", gateway.authorize(request)).await;
                (
                    "authorize",
                    reply.map(|reply| match reply.status() {
                        AuthorizationStatus::Approved => Answer::Approved {
                            authorization_id: reply.authorization_id,
                        },
                        _ => Answer::Declined {
                            reason: reply.decline_reason,
                        },
                    }),
                )
            }
            PaymentState::Capturing => {
                let request = CaptureRequest {
                    idempotency_key: format!("capture:{order_id}"),
                    authorization_id: payment.authorization_id.clone().unwrap_or_default(),
                    amount: Some(payment.amount()),
                };
                let reply = self.timed("capture", gateway.capture(request)).await;
                ("capture", reply.map(|_| Answer::Done))
            }
            PaymentState::Voiding => {
                // With no authorization on record (the order was cancelled before or while its
                // authorization was owed) the void names the authorize key: whatever it made
                // is released, and if it made nothing yet the key is closed, so a call still
                // in flight is declined instead of holding money.
                let request = match &payment.authorization_id {
                    Some(authorization_id) => VoidRequest {
                        idempotency_key: format!("void:{order_id}"),
                        authorization_id: authorization_id.clone(),
                        authorize_idempotency_key: String::new(),
                    },
                    None => VoidRequest {
                        idempotency_key: format!("void:{order_id}"),
                        authorization_id: String::new(),
                        authorize_idempotency_key: format!("authorize:{order_id}"),
                    },
                };
                let reply = self.timed("void", gateway.void(request)).await;
                ("void", reply.map(|_| Answer::Done))
            }
            settled => return Called::Retry(format!("claimed a payment that owes nothing ({})", settled.as_str())),
        };
        match reply {
            Ok(answer) => Called::Answer(answer),
            Err(status) if is_refusal(&status) => Called::Answer(Answer::Refused {
                reason: format!("{operation} refused: {:?} {}", status.code(), status.message()),
            }),
            Err(status) => Called::Retry(format!("{operation}: {:?} {}", status.code(), status.message())),
        }
    }

    /// Runs a gateway call in its `gateway_call` span, bounded by the gateway timeout.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!("gateway_call", operation, outcome = tracing::field::Empty);
        let result = match tokio::time::timeout(self.gateway_timeout, call)
            .instrument(span.clone())
            .await
        {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no gateway reply within {:?}",
                self.gateway_timeout
            ))),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => "timeout",
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        metrics::histogram!(telemetry::GATEWAY_CALL_DURATION, "operation" => operation, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Records answers as they come, every answer ready in one transaction, until the
    /// calls are all done (their sender dropped) or `shutdown`.
    async fn record_answers(
        self: Arc<Self>,
        mut answered: mpsc::Receiver<(Claimed, Called)>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = None;
        let mut batch = Vec::new();
        loop {
            if batch.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = answered.recv() => match next {
                        Some(next) => batch.push(next),
                        None => return,
                    },
                }
            }
            while batch.len() < RECORD_BATCH {
                match answered.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            match self.record(&batch).await {
                Ok(()) => {
                    batch.clear();
                    backoff = None;
                }
                Err(error) => {
                    // Nothing of it committed: try the same answers again (until their claims
                    // lapse, after which another call answers the same way anyway).
                    tracing::warn!(%error, answers = batch.len(), "cannot record gateway answers; retrying");
                    let pause = backoff
                        .get_or_insert_with(retry_backoff)
                        .next()
                        .unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// One transaction: locks the payments, moves on those still in the state their call was
    /// made for, writes their events, and sets the retries' next claim.
    async fn record(&self, batch: &[(Claimed, Called)]) -> Result<(), sqlx::Error> {
        let order_ids: Vec<uuid::Uuid> = batch.iter().map(|(payment, _)| payment.order_id).collect();
        let mut tx = self.pool.begin().await?;
        let mut current: std::collections::HashMap<uuid::Uuid, String> = sqlx::query_as(
            "SELECT order_id, state FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        )
        .bind(&order_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let mut changes = Changes::default();
        let mut events = Vec::new();
        for (payment, called) in batch {
            if current.get(&payment.order_id).map(String::as_str) != Some(payment.state.as_str()) {
                // Stale: the payment moved on meanwhile (a cancellation voided it, another
                // executor recorded the same call). The answer changes nothing.
                tracing::info!(parent: &payment.span, "a gateway answer for a payment that moved on meanwhile; dropped");
                continue;
            }
            match called {
                Called::Retry(error) => {
                    let pause = retry_backoff()
                        .nth(usize::try_from(payment.attempts.max(1) - 1).unwrap_or(0))
                        .unwrap_or(Duration::from_secs(5));
                    tracing::warn!(parent: &payment.span, %error, attempts = payment.attempts, ?pause, "gateway call failed; trying again later with the same key");
                    changes.stay(payment, pause, error.clone());
                }
                Called::Answer(answer) => match domain::settle(payment.state, answer, payment.charged()) {
                    Some((to, told)) => {
                        let span = tracing::info_span!(parent: &payment.span, "payment_transition", from = payment.state.as_str(), to = to.as_str());
                        if let Some(told) = told {
                            events.push(span.in_scope(|| self.event(payment, told, answer)));
                        }
                        span.in_scope(|| tracing::info!("payment transition"));
                        changes.settle(payment, to, answer);
                        // A second answer for it in this batch (claimed twice) is stale.
                        current.insert(payment.order_id, to.as_str().to_owned());
                    }
                    None => {
                        let reason = format!("{answer:?}");
                        tracing::error!(parent: &payment.span, %reason, state = payment.state.as_str(), "the gateway refuses a call only an operator can sort out; the payment is parked");
                        metrics::counter!(telemetry::PAYMENTS_PARKED).increment(1);
                        changes.stay(payment, PARKED, reason);
                    }
                },
            }
        }
        changes.write(&mut tx).await?;
        self.outbox.write_all(&mut tx, &events).await?;
        // Dying here, before the commit: nothing of this is recorded; the claims lapse and the
        // calls are made again with the same keys (the gateway replays them).
        fail::fail_point!("payment::after_gateway_before_commit", |_| {
            orderflow_platform::chaos::crash()
        });
        tx.commit().await
    }

    /// The event telling what `answer` did to `payment`, caused by the event that asked for
    /// the call (a deadline's void is caused by nothing).
    fn event(&self, payment: &Claimed, told: Told, answer: &Answer) -> OutboxMessage {
        let (order_id, payment_id) = (payment.order_id.to_string(), payment.payment_id.to_string());
        let payload = match (told, answer) {
            (Told::Authorized, Answer::Approved { authorization_id }) => {
                Payload::PaymentAuthorized(PaymentAuthorized {
                    order_id,
                    payment_id,
                    authorization_id: authorization_id.clone(),
                    amount: Some(payment.amount()),
                })
            }
            (Told::Declined | Told::Refused, Answer::Declined { reason } | Answer::Refused { reason }) => {
                let why = if told == Told::Declined {
                    PaymentFailureReason::Declined
                } else {
                    PaymentFailureReason::InvalidRequest
                };
                Payload::PaymentFailed(PaymentFailed {
                    order_id,
                    payment_id,
                    reason: why as i32,
                    detail: reason.clone(),
                })
            }
            (Told::Captured, _) => Payload::PaymentCaptured(PaymentCaptured {
                order_id,
                payment_id,
                amount: Some(payment.amount()),
            }),
            (_, _) => Payload::PaymentVoided(PaymentVoided {
                order_id,
                payment_id,
                amount: Some(payment.amount()),
            }),
        };
        let meta = orderflow::envelope::EventMeta {
            message_id: uuid::Uuid::now_v7(),
            aggregate_id: payment.order_id,
            correlation_id: payment.correlation_id,
            causation_id: payment.causation_id,
            traceparent: telemetry::current_traceparent(),
            occurred_at: outbox::now_timestamp(),
        };
        OutboxMessage {
            topic: self.payments_topic.clone(),
            envelope: orderflow::envelope::seal(meta, payload),
        }
    }
}

/// A refusal of the request itself: the same call would be refused again.
fn is_refusal(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::OutOfRange
    )
}

/// The pauses before a failed call is made again: from 50 ms, doubling, up to 5 s, jittered.
fn retry_backoff() -> impl Iterator<Item = Duration> {
    orderflow_platform::retry::RetryPolicy {
        budget: None,
        first: Duration::from_millis(50),
        max: Duration::from_secs(5),
    }
    .backoff()
}

/// What one recording does to the payments, one element per payment, for one update.
#[derive(Default)]
struct Changes {
    order_id: Vec<uuid::Uuid>,
    state: Vec<&'static str>,
    authorization_id: Vec<Option<String>>,
    failure_reason: Vec<Option<String>>,
    /// Seconds until the payment may be claimed again (None: settled, no claim).
    due_in: Vec<Option<f64>>,
    last_error: Vec<Option<String>>,
    settled: Vec<bool>,
}

impl Changes {
    /// `payment` moves to `to` on `answer`: its claim, token and error are cleared.
    fn settle(&mut self, payment: &Claimed, to: PaymentState, answer: &Answer) {
        self.order_id.push(payment.order_id);
        self.state.push(to.as_str());
        self.authorization_id.push(match answer {
            Answer::Approved { authorization_id } => Some(authorization_id.clone()),
            _ => None,
        });
        self.failure_reason.push(match answer {
            Answer::Declined { reason } | Answer::Refused { reason } => Some(reason.clone()),
            _ => None,
        });
        self.due_in.push(None);
        self.last_error.push(None);
        self.settled.push(true);
    }

    /// `payment` stays pending, claimable again in `pause`.
    fn stay(&mut self, payment: &Claimed, pause: Duration, error: String) {
        self.order_id.push(payment.order_id);
        self.state.push(payment.state.as_str());
        self.authorization_id.push(None);
        self.failure_reason.push(None);
        self.due_in.push(Some(pause.as_secs_f64()));
        self.last_error.push(Some(error));
        self.settled.push(false);
    }

    async fn write(self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        if self.order_id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE payments p SET state = u.state,
                    authorization_id = COALESCE(u.authorization_id, p.authorization_id),
                    failure_reason = COALESCE(u.failure_reason, p.failure_reason),
                    payment_token = CASE WHEN u.settled THEN NULL ELSE p.payment_token END,
                    lease_until = CASE WHEN u.settled THEN NULL ELSE now() + make_interval(secs => u.due_in) END,
                    last_error = u.last_error,
                    attempts = CASE WHEN u.settled THEN 0 ELSE p.attempts END,
                    version = p.version + CASE WHEN u.settled THEN 1 ELSE 0 END,
                    -- Since when the call is owed, for an owed call: a retry leaves it.
                    updated_at = CASE WHEN u.settled THEN now() ELSE p.updated_at END
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::bool[])
                  AS u(order_id, state, authorization_id, failure_reason, due_in, last_error, settled)
             WHERE p.order_id = u.order_id",
        )
        .bind(&self.order_id)
        .bind(&self.state)
        .bind(&self.authorization_id)
        .bind(&self.failure_reason)
        .bind(&self.due_in)
        .bind(&self.last_error)
        .bind(&self.settled)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
