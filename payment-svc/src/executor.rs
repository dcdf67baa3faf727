//! The executor: makes the gateway calls that pending payments owe, with no database
//! transaction open and no connection held, and records each answer in a short transaction
//! of its own with the event that tells it.
//!
//! 1. **Hand-off or claim.** A payment the consumer made pending is written already leased to
//!    this process (for [`Executor::lease`]) and handed over in memory once its unit of work
//!    committed: no statement. Every 500 ms (and when woken) one statement claims the others:
//!    pending payments whose lease lapsed (their executor died, or their retry is due) or that
//!    have none (the overdue sweeper's voids). A payment that waited for room until its lease
//!    no longer holds a call and its recording is not called: it lapses and is claimed afresh,
//!    so two executors do not call it at once.
//! 2. **Call** (no transaction, no connection): each with the order's idempotency key, side by
//!    side, at most `concurrency` at once. A late reply holds up only its own order.
//! 3. **Record** (one transaction for every answer ready): one compare-and-set update moves on
//!    each payment still in the state its call was made for (any other answer is stale: a
//!    cancellation came meanwhile, or another executor recorded the same call), then one
//!    insert writes the events of those that moved. A call that failed transiently is due
//!    again after a backoff.
//!
//! Failure windows, each covered by `tests/payment_intents.rs`:
//! - dying after the claim, before the call: the lease lapses and any executor (this one
//!   restarted, or another instance) claims the payment again and calls;
//! - dying during the call, or after the gateway acted and before the answer is recorded:
//!   the same, and the gateway replays the first call's result for the same key (nothing is
//!   charged twice: the ledger says so);
//! - dying after the answer is recorded: the payment is settled and its event is in the
//!   outbox; nothing is left to do;
//! - two executors holding one payment (a lease outlived by a slow recording: a call starts
//!   only while the lease holds it and its recording): both call with the same key, the first
//!   to record an answer wins, the second finds the state moved and drops its answer. A retry
//!   is recorded only by the lease's holder (`attempts` fences it), so a late retry of the
//!   first never shortens the second's lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

// The key of each authorization call. The naive build's seam swaps in a fresh key per call
// (crate::naive), so that a retry there is a second charge.
#[cfg(feature = "naive")]
use crate::naive::authorization_key;
#[cfg(not(feature = "naive"))]
use stable_authorization_key as authorization_key;

use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{PaymentAuthorized, PaymentCaptured, PaymentFailed, PaymentFailureReason, PaymentVoided};
use orderflow::gateway::v1::gateway_service_client::GatewayServiceClient;
use orderflow::gateway::v1::{AuthorizationStatus, AuthorizeRequest, CaptureRequest, VoidRequest};
use orderflow::orders::v1::Money;
use orderflow_platform::grpc::TracedChannel;
use orderflow_platform::outbox::{self, Outbox, OutboxMessage};
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

/// Payments parked now ([`PARKED`]: a lease decades long), from the payments table: the
/// `orderflow_payments_parked` gauge, which stays up until an operator releases them.
pub async fn parked(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM payments WHERE state = ANY($1) AND lease_until > now() + interval '1 year'",
    )
    .bind(PaymentState::pending_names())
    .fetch_one(pool)
    .await
}

/// A payment owing a call, as the consumer wrote it (or a claim read it): everything the call
/// and the event telling its answer need.
#[derive(Debug, Clone)]
pub struct Owed {
    /// The order.
    pub order_id: uuid::Uuid,
    /// The payment.
    pub payment_id: uuid::Uuid,
    /// The pending state: which call is owed.
    pub state: PaymentState,
    /// The authorization to capture or void (None: void by the authorize key).
    pub authorization_id: Option<String>,
    /// The amount (0 for the placeholder of a cancellation that came first).
    pub amount_minor: i64,
    /// Its currency.
    pub currency_code: String,
    /// The card token, while an authorization is owed.
    pub payment_token: Option<String>,
    /// The correlation id of the event that asked for the call.
    pub correlation_id: uuid::Uuid,
    /// That event's message id (None: a deadline asked).
    pub causation_id: Option<uuid::Uuid>,
    /// The trace the call continues.
    pub traceparent: Option<String>,
    /// Leases taken for this pending state, this one included (1: the hand-off): each a call,
    /// unless it waited for room past its lease. Unique per lease, so it fences a recording.
    pub attempts: i32,
    /// When this process's lease lapses, at the earliest: the lease counted from an instant
    /// taken before the statement that wrote it, so the database's lapses no sooner.
    pub held_until: Instant,
}

/// Hands the payments a committed unit of work made pending to the executor of this process.
#[derive(Debug, Clone)]
pub struct Handoff(mpsc::UnboundedSender<Owed>);

impl Handoff {
    /// Gives `owed` to the executor; if it has stopped, their leases lapse and whoever runs
    /// next claims them.
    pub fn give(&self, owed: Vec<Owed>) {
        for payment in owed {
            if self.0.send(payment).is_err() {
                return;
            }
        }
    }
}

/// What a consumer hands over and what the executor takes from.
pub fn handoff() -> (Handoff, mpsc::UnboundedReceiver<Owed>) {
    let (give, take) = mpsc::unbounded_channel();
    (Handoff(give), take)
}

/// A pending payment this executor holds the lease of, with the span of its call and its
/// recording (in the order's trace).
struct Claimed {
    owed: Owed,
    span: tracing::Span,
}

impl std::ops::Deref for Claimed {
    type Target = Owed;

    fn deref(&self) -> &Owed {
        &self.owed
    }
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

impl From<Owed> for Claimed {
    fn from(mut owed: Owed) -> Self {
        let span = tracing::info_span!("payment_call", order_id = %owed.order_id, state = owed.state.as_str(),
            attempts = owed.attempts, trace_id = tracing::field::Empty);
        if let Some(traceparent) = &owed.traceparent {
            telemetry::continue_trace(&span, traceparent);
            if let Some(trace_id) = telemetry::trace_id_of(traceparent) {
                span.record("trace_id", trace_id);
            }
        }
        // A stored char(3) comes back padded.
        owed.currency_code = owed.currency_code.trim().to_owned();
        Self { owed, span }
    }
}

impl Claimed {
    fn from_row(row: ClaimedRow, held_until: Instant) -> Option<Self> {
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
        Some(Self::from(Owed {
            order_id,
            payment_id,
            state: PaymentState::parse(&state)?,
            authorization_id,
            amount_minor,
            currency_code,
            payment_token,
            correlation_id: correlation_id.unwrap_or(order_id),
            causation_id,
            traceparent,
            attempts,
            held_until,
        }))
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
    outbox: Outbox,
    concurrency: usize,
    wake: Arc<Notify>,
    /// Payments handed over by this process's consumer, already leased to it.
    handed: tokio::sync::Mutex<mpsc::UnboundedReceiver<Owed>>,
    /// Set when a claim stopped for want of room: a finished call then claims again.
    backlogged: AtomicBool,
}

impl Executor {
    /// An executor calling the gateway over `gateway`, at most `concurrency` calls at once,
    /// taking what this process's consumer hands over (`handed`) and claiming the rest when
    /// woken (`wake`: the overdue sweeper) and every half second.
    #[allow(clippy::too_many_arguments)] // Each is a setting of its own; a struct would only rename them.
    pub fn new(
        pool: PgPool,
        gateway: tonic::transport::Channel,
        gateway_timeout: Duration,
        payments_topic: String,
        outbox: Outbox,
        concurrency: usize,
        handed: mpsc::UnboundedReceiver<Owed>,
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
            handed: tokio::sync::Mutex::new(handed),
            backlogged: AtomicBool::new(false),
        }
    }

    /// How long a claim lasts: three gateway timeouts, so a wait for room, the call (bounded
    /// by one) and the recording of its answer fit in it; a claim that lapses is taken again.
    pub fn lease(&self) -> Duration {
        lease_for(self.gateway_timeout)
    }

    /// Claims, calls and records until `shutdown`. Calls in flight at shutdown are left to
    /// lapse: their payments are claimed again by the next executor.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (answers, answered) = mpsc::channel(self.concurrency * 2);
        let recorder = tokio::spawn(self.clone().record_answers(answered, shutdown.clone()));
        let room = Arc::new(Semaphore::new(self.concurrency));
        let mut scan = tokio::time::interval(SCAN_INTERVAL);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut handed = self.handed.lock().await;
        // Until no consumer hands over any more (it stopped): then claims alone.
        let mut handing = true;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                owed = handed.recv(), if handing => match owed {
                    Some(owed) => {
                        let mut ready = vec![Claimed::from(owed)];
                        while let Ok(more) = handed.try_recv() {
                            ready.push(Claimed::from(more));
                        }
                        self.call_all(ready, &room, &answers).await;
                    }
                    None => handing = false,
                },
                _ = self.wake.notified() => self.claim_and_call(&room, &answers).await,
                _ = scan.tick() => self.claim_and_call(&room, &answers).await,
            }
        }
        drop(answers);
        let _ = recorder.await;
    }

    /// Starts the calls of `payments`, each as soon as there is room.
    async fn call_all(
        self: &Arc<Self>,
        payments: Vec<Claimed>,
        room: &Arc<Semaphore>,
        answers: &mpsc::Sender<(Claimed, Called)>,
    ) {
        let mut left = 0;
        for payment in payments {
            let Ok(permit) = room.clone().acquire_owned().await else {
                return;
            };
            // A payment that waited for room so long that its lease could lapse during the
            // call or before the answer is recorded is not called here: once the lease lapses,
            // one claim (this instance's scan or another's) leases it afresh and calls it.
            // Calling it now would let that claim call it a second time meanwhile.
            if !lease_fits_a_call(payment.held_until, Instant::now(), self.gateway_timeout) {
                left += 1;
                continue;
            }
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
        if left > 0 {
            tracing::warn!(
                payments = left,
                concurrency = self.concurrency,
                "calls waited for room past their lease; left for a fresh claim (more gateway concurrency?)"
            );
        }
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
            self.call_all(claimed, room, answers).await;
            if !full {
                return;
            }
        }
    }

    /// Leases up to `limit` pending payments whose claim is free, due first.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, sqlx::Error> {
        let held_until = Instant::now() + self.lease();
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
        Ok(rows
            .into_iter()
            .filter_map(|row| Claimed::from_row(row, held_until))
            .collect())
    }

    /// The call `payment` owes, with the key every other call for it reuses: at most one
    /// authorization, capture and void per order, however often this runs.
    async fn call(&self, payment: &Claimed) -> Called {
        let order_id = payment.order_id;
        let mut gateway = self.gateway.clone();
        let (operation, reply) = match payment.state {
            PaymentState::Authorizing => {
                let request = AuthorizeRequest {
                    idempotency_key: authorization_key(order_id),
                    order_id: order_id.to_string(),
                    amount: Some(payment.amount()),
                    payment_token: payment.payment_token.clone().unwrap_or_default(),
                };
                let reply = self.timed("authorize", gateway.authorize(request)).await;
                (
                    "authorize",
                    reply.map(|reply| match reply.status() {
                        AuthorizationStatus::Approved => Answer::Approved {
                            authorization_id: from_gateway(&reply.authorization_id),
                        },
                        _ => Answer::Declined {
                            reason: from_gateway(&reply.decline_reason),
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
                        authorize_idempotency_key: stable_authorization_key(order_id),
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
                reason: format!(
                    "{operation} refused: {:?} {}",
                    status.code(),
                    from_gateway(status.message())
                ),
            }),
            Err(status) => Called::Retry(format!(
                "{operation}: {:?} {}",
                status.code(),
                from_gateway(status.message())
            )),
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
                // Data the database refuses (one answer it cannot store): the others are
                // recorded without it, and it is parked; retrying would refuse it for ever.
                Err(error) if refused(&error) => {
                    self.record_apart(&batch).await;
                    batch.clear();
                    backoff = None;
                }
                Err(error) => {
                    // Nothing of it committed: try the same answers again, for as long as it
                    // takes. An answer recorded after its lease lapsed is still right (the
                    // same key answers the same way); a retry then is dropped (fenced).
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

    /// Records `batch` in halves, down to the answer the database refuses, which is parked.
    async fn record_apart(&self, batch: &[(Claimed, Called)]) {
        let mut parts = vec![batch];
        while let Some(part) = parts.pop() {
            let error = match self.record(part).await {
                Ok(()) => continue,
                Err(error) => error,
            };
            let reason = error.to_string();
            match part {
                [(payment, _)] if refused(&error) => {
                    tracing::error!(parent: &payment.span, %reason, "a gateway answer the database refuses; the payment is parked");
                    let mut changes = Changes::default();
                    changes.stay(payment, PARKED, "the gateway's answer could not be recorded".to_owned());
                    let parked = async {
                        let mut tx = self.pool.begin().await?;
                        changes.write(&mut tx).await?;
                        tx.commit().await
                    };
                    if let Err(error) = parked.await {
                        tracing::warn!(%error, "cannot park the payment; its lease lapses and it is called again");
                    }
                }
                [_, ..] if refused(&error) => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.push(second);
                    parts.push(first);
                }
                // Transient: nothing of this part committed; its leases lapse and the calls
                // are made again with the same keys.
                _ => tracing::warn!(%reason, answers = part.len(), "cannot record gateway answers now"),
            }
        }
    }

    /// One transaction: a compare-and-set update moves on the payments still in the state
    /// their call was made for (and sets the retries' next claim), then one insert writes the
    /// events of those that moved.
    async fn record(&self, batch: &[(Claimed, Called)]) -> Result<(), sqlx::Error> {
        let mut changes = Changes::default();
        let mut events = std::collections::HashMap::new();
        for (payment, called) in one_answer_each(batch) {
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
                            events.insert(payment.order_id, span.in_scope(|| self.event(payment, told, answer)));
                        }
                        span.in_scope(|| tracing::info!("payment transition"));
                        changes.settle(payment, to, answer);
                    }
                    None => {
                        let reason = format!("{answer:?}");
                        tracing::error!(parent: &payment.span, %reason, state = payment.state.as_str(), "the gateway refuses a call only an operator can sort out; the payment is parked");
                        changes.stay(payment, PARKED, reason);
                    }
                },
            }
        }
        let mut tx = self.pool.begin().await?;
        let moved = changes.write(&mut tx).await?;
        // An answer for a payment that moved on meanwhile changed nothing and tells nothing.
        let events: Vec<OutboxMessage> = moved.iter().filter_map(|order_id| events.remove(order_id)).collect();
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
        // A deadline's void (no causation) begins a conversation of its own: its correlation
        // id was made when the void was decided.
        outbox::continuing(
            &self.payments_topic,
            payment.order_id,
            payment.correlation_id,
            payment.causation_id,
            None,
            payload,
        )
    }
}

/// One answer per payment and pending state (a payment claimed twice answers twice; one
/// update may change a row once): the answer if there is one, else a retry. Answers for
/// different states of one payment all stay: the compare-and-set applies the one for the state
/// the payment is in and drops the stale ones. In order of the payments.
fn one_answer_each(batch: &[(Claimed, Called)]) -> Vec<&(Claimed, Called)> {
    let mut chosen: Vec<&(Claimed, Called)> = Vec::with_capacity(batch.len());
    let mut seen = std::collections::HashSet::new();
    for answered in [true, false] {
        for item in batch {
            if matches!(item.1, Called::Answer(_)) == answered && seen.insert((item.0.order_id, item.0.state)) {
                chosen.push(item);
            }
        }
    }
    chosen.sort_by_key(|(payment, _)| payment.order_id);
    chosen
}

/// Whether the database refused the data itself (the consumer runtime's one classifier): the
/// same statement would be refused again.
fn refused(error: &sqlx::Error) -> bool {
    orderflow_platform::consumer::refused_by_database(error).is_some()
}

/// Text the gateway sent, as stored and told: printable, bounded (a reply is not trusted to
/// be either).
fn from_gateway(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// A refusal of the request itself: the same call would be refused again.
fn is_refusal(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::OutOfRange
    )
}

/// Whether a call started `now` under a lease held until `held_until` fits in it: the call
/// (bounded by `gateway_timeout`) and the recording of its answer (given as long). Pure.
fn lease_fits_a_call(held_until: Instant, now: Instant, gateway_timeout: Duration) -> bool {
    held_until.saturating_duration_since(now) >= gateway_timeout * 2
}

/// How long a claim lasts for a gateway timeout of `gateway_timeout` (see [`Executor::lease`]).
pub fn lease_for(gateway_timeout: Duration) -> Duration {
    gateway_timeout * 3
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
    /// The state each call was made for: a payment no longer in it is left alone.
    from: Vec<&'static str>,
    state: Vec<&'static str>,
    authorization_id: Vec<Option<String>>,
    failure_reason: Vec<Option<String>>,
    /// Seconds until the payment may be claimed again (None: settled, no claim).
    due_in: Vec<Option<f64>>,
    /// The lease the call was made under: a retry is recorded only while it is the payment's.
    attempts: Vec<i32>,
    last_error: Vec<Option<String>>,
    settled: Vec<bool>,
}

impl Changes {
    /// `payment` moves to `to` on `answer`: its claim, token and error are cleared.
    fn settle(&mut self, payment: &Claimed, to: PaymentState, answer: &Answer) {
        self.order_id.push(payment.order_id);
        self.from.push(payment.state.as_str());
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
        self.attempts.push(payment.attempts);
        self.last_error.push(None);
        self.settled.push(true);
    }

    /// `payment` stays pending, claimable again in `pause`.
    fn stay(&mut self, payment: &Claimed, pause: Duration, error: String) {
        self.order_id.push(payment.order_id);
        self.from.push(payment.state.as_str());
        self.state.push(payment.state.as_str());
        self.authorization_id.push(None);
        self.failure_reason.push(None);
        self.due_in.push(Some(pause.as_secs_f64()));
        self.attempts.push(payment.attempts);
        self.last_error.push(Some(error));
        self.settled.push(false);
    }

    /// The payments that moved (those still in their `from` state), or stayed for a retry
    /// (those still under the lease their call was made under).
    async fn write(self, tx: &mut sqlx::PgConnection) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
        if self.order_id.is_empty() {
            return Ok(Vec::new());
        }
        // The rows are locked in the order of their ids first (as the consumer's units lock
        // them), so a recording and a unit never wait on each other in a cycle.
        sqlx::query_scalar(
            "WITH locked AS MATERIALIZED (
                 SELECT order_id FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE)
             UPDATE payments p SET state = u.state,
                    authorization_id = COALESCE(u.authorization_id, p.authorization_id),
                    failure_reason = COALESCE(u.failure_reason, p.failure_reason),
                    payment_token = CASE WHEN u.settled THEN NULL ELSE p.payment_token END,
                    lease_until = CASE WHEN u.settled THEN NULL ELSE now() + make_interval(secs => u.due_in) END,
                    last_error = u.last_error,
                    attempts = CASE WHEN u.settled THEN 0 ELSE p.attempts END,
                    version = p.version + CASE WHEN u.settled THEN 1 ELSE 0 END,
                    -- Since when the call is owed, for an owed call: a retry leaves it.
                    updated_at = CASE WHEN u.settled THEN now() ELSE p.updated_at END
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::bool[],
                         $8::text[], $9::int4[])
                  AS u(order_id, state, authorization_id, failure_reason, due_in, last_error, settled, from_state,
                       attempts),
                  locked
             WHERE p.order_id = u.order_id AND p.state = u.from_state AND locked.order_id = u.order_id
               AND (u.settled OR p.attempts = u.attempts)
             RETURNING p.order_id",
        )
        .bind(&self.order_id)
        .bind(&self.state)
        .bind(&self.authorization_id)
        .bind(&self.failure_reason)
        .bind(&self.due_in)
        .bind(&self.last_error)
        .bind(&self.settled)
        .bind(&self.from)
        .bind(&self.attempts)
        .fetch_all(&mut *tx)
        .await
    }
}

/// The key of an order's authorization: the same for every call, so that a retry, a
/// redelivery or a second executor replays the first charge instead of making another.
pub(crate) fn stable_authorization_key(order_id: uuid::Uuid) -> String {
    format!("authorize:{order_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owed(order_id: uuid::Uuid) -> Claimed {
        Claimed::from(Owed {
            order_id,
            payment_id: uuid::Uuid::now_v7(),
            state: PaymentState::Authorizing,
            authorization_id: None,
            amount_minor: 100,
            currency_code: "EUR ".into(),
            payment_token: Some("tok".into()),
            correlation_id: order_id,
            causation_id: None,
            traceparent: None,
            attempts: 1,
            held_until: Instant::now() + Duration::from_secs(3),
        })
    }

    #[test]
    fn a_call_starts_only_while_its_lease_holds_the_call_and_its_recording() {
        let now = Instant::now();
        let timeout = Duration::from_millis(500);
        let lease = lease_for(timeout);
        assert!(lease_fits_a_call(now + lease, now, timeout), "a fresh lease");
        assert!(lease_fits_a_call(now + timeout * 2, now, timeout), "just enough left");
        assert!(!lease_fits_a_call(
            now + timeout * 2 - Duration::from_millis(1),
            now,
            timeout
        ));
        assert!(!lease_fits_a_call(now, now + timeout, timeout), "a lapsed lease");
    }

    #[test]
    fn a_payment_answered_twice_is_recorded_once_with_its_answer_in_order_of_the_payments() {
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let batch = vec![
            (owed(b), Called::Retry("timeout".into())),
            (owed(a), Called::Retry("timeout".into())),
            (owed(b), Called::Answer(Answer::Done)),
        ];
        let chosen = one_answer_each(&batch);
        assert_eq!(chosen.len(), 2);
        assert_eq!(chosen[0].0.order_id, a.min(b));
        let of_b = chosen
            .iter()
            .find(|(payment, _)| payment.order_id == b)
            .map(|(_, called)| called);
        assert!(matches!(of_b, Some(Called::Answer(_))), "the answer, not the retry");
        assert_eq!(chosen[0].0.currency_code, "EUR", "a stored char(3) is trimmed");
    }

    #[test]
    fn only_a_refusal_of_the_request_settles_an_authorization_as_failed() {
        assert!(is_refusal(&tonic::Status::invalid_argument("bad")));
        assert!(is_refusal(&tonic::Status::failed_precondition("key reused")));
        assert!(!is_refusal(&tonic::Status::unavailable("away")));
        assert!(!is_refusal(&tonic::Status::deadline_exceeded("late")));
        assert_eq!(lease_for(Duration::from_secs(1)), Duration::from_secs(3));
    }

    #[test]
    fn text_from_the_gateway_is_stored_printable_and_bounded() {
        assert_eq!(from_gateway("insufficient\0_funds\n"), "insufficient_funds");
        assert_eq!(from_gateway(&"x".repeat(1_000)).len(), 200);
    }

    #[test]
    fn answers_for_two_states_of_one_payment_both_reach_the_compare_and_set() {
        let order = uuid::Uuid::now_v7();
        let mut voiding = owed(order);
        voiding.owed.state = PaymentState::Voiding;
        let batch = vec![
            (
                owed(order),
                Called::Answer(Answer::Approved {
                    authorization_id: "a".into(),
                }),
            ),
            (voiding, Called::Answer(Answer::Done)),
        ];
        assert_eq!(
            one_answer_each(&batch).len(),
            2,
            "the stale one fails its compare-and-set alone"
        );
    }
}
