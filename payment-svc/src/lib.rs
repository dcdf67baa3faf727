//! The payment service: consumes the order events (group `payment`) and moves money through
//! the gateway. One payment per order (`payments.order_id` is UNIQUE); every gateway call
//! carries an idempotency key derived from the order (`authorize:<order id>`, ...), never
//! from the Kafka message, so every redelivery and every retry after a crash replays the
//! same key and the gateway moves money at most once.

pub mod domain;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use domain::{Action, PaymentState};
use orderflow::envelope::OpenedEvent;
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{PaymentAuthorized, PaymentCaptured, PaymentFailed, PaymentFailureReason, PaymentVoided};
use orderflow::gateway::v1::gateway_service_client::GatewayServiceClient;
use orderflow::gateway::v1::{AuthorizationStatus, AuthorizeRequest, AuthorizeResponse, CaptureRequest, VoidRequest};
use orderflow::orders::v1::Money;
use orderflow_platform::consumer::{self, ConsumerSettings, Fresh, HandlerError, Incoming, Outcome};
use orderflow_platform::{Secret, outbox, telemetry};
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The payments database's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payments");

/// The name this consumer records in its inbox.
const INBOX: &str = "payment";

/// Key lanes per partition unless configured (`CONSUMER_KEY_LANES`). Every message here may
/// wait on the gateway, up to its timeout and then its retries: with one lane, one late
/// reply held up every order of its partition behind it (the saga's p99 for good cards was
/// the gateway timeout). With eight, one in eight of its neighbours waits.
const KEY_LANES: usize = 8;

/// The payment service's settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "payment-svc", about = "orderflow's payment service")]
pub struct Config {
    /// Postgres URL of the payments database.
    #[arg(long, env = "PAYMENT_SVC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Kafka bootstrap servers.
    #[arg(long, env = "PAYMENT_SVC_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:19092")]
    pub bootstrap_servers: String,
    /// Consumer group.
    #[arg(long, env = "PAYMENT_SVC_GROUP_ID", default_value = "payment")]
    pub group_id: String,
    /// Topic of the order events (consumed).
    #[arg(long, env = "PAYMENT_SVC_ORDERS_TOPIC", default_value = orderflow::topics::ORDERS_EVENTS)]
    pub orders_topic: String,
    /// Topic of the payment events (produced, through the outbox).
    #[arg(long, env = "PAYMENT_SVC_PAYMENTS_TOPIC", default_value = orderflow::topics::PAYMENTS_EVENTS)]
    pub payments_topic: String,
    /// The gateway's gRPC address.
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_ADDR", default_value = "127.0.0.1:15061")]
    pub gateway_addr: String,
    /// The CA of the gateway's certificate (TLS to the gateway).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CA")]
    pub gateway_ca: Option<std::path::PathBuf>,
    /// This service's client certificate for the gateway (mutual TLS: the gateway moves money
    /// only for a client it can identify).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CLIENT_CERT", requires = "gateway_client_key")]
    pub gateway_client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_CLIENT_KEY", requires = "gateway_client_cert")]
    pub gateway_client_key: Option<std::path::PathBuf>,
    /// Talk to the gateway without TLS (development only).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_PLAINTEXT", default_value_t = false, action = clap::ArgAction::Set)]
    pub gateway_plaintext: bool,
    /// How long to wait for one gateway reply before retrying (with the same key).
    #[arg(long, env = "PAYMENT_SVC_GATEWAY_TIMEOUT_MS", default_value_t = 1_000)]
    pub gateway_timeout_ms: u64,
    /// The least time a batch's slowest gateway calls get once half of its calls have
    /// answered (they get as long again as the calls took so far, at least this); those still
    /// out then are made again alone, with the same key, after the batch commits. Above the
    /// gateway's usual latency, well below its timeout.
    #[arg(long, env = "PAYMENT_SVC_STRAGGLER_GRACE_MS", default_value_t = 100)]
    pub straggler_grace_ms: u64,
    /// This instance's static membership id in the consumer group (unique per instance;
    /// a restart with the same id gets its partitions back without a rebalance).
    #[arg(long, env = "PAYMENT_SVC_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Most open database connections.
    #[arg(long, env = "PAYMENT_SVC_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Inbox rows are kept this long: the deduplication window (longer than any redrive).
    #[arg(long, env = "PAYMENT_SVC_INBOX_RETENTION_HOURS", default_value_t = 168)]
    pub inbox_retention_hours: u64,
    /// An authorization whose order has not settled (no OrderConfirmed or OrderCancelled
    /// handled) this long after it was made is voided: a forged or orphaned OrderPlaced, or
    /// lost order events, never hold a customer's money for good. Far longer than the saga
    /// deadline (90 s), after which the order service cancels any order still unpaid.
    #[arg(long, env = "PAYMENT_SVC_AUTHORIZATION_DEADLINE_MS", default_value_t = 900_000)]
    pub authorization_deadline_ms: u64,
    /// How often overdue authorizations are looked for.
    #[arg(long, env = "PAYMENT_SVC_SWEEP_INTERVAL_MS", default_value_t = 5_000)]
    pub sweep_interval_ms: u64,
    /// The largest order total ever authorized: `DEFAULT[,CODE=LIMIT...]` in major units
    /// (the order service's limit; a larger OrderPlaced is dead-lettered, never charged).
    #[arg(long, env = "PAYMENT_SVC_MAX_ORDER_TOTAL", default_value = "1000000",
          value_parser = orderflow::money::TotalLimits::from_setting)]
    pub max_order_total: orderflow::money::TotalLimits,
    /// Who this process is to Kafka (SASL/SCRAM).
    #[command(flatten)]
    pub kafka_auth: orderflow_platform::kafka::KafkaAuthArgs,
    /// The consumer runtime's settings.
    #[command(flatten)]
    pub consumer: orderflow_platform::consumer::ConsumerArgs,
    /// How its events reach the relay (`OUTBOX_MODE`).
    #[command(flatten)]
    pub outbox: orderflow_platform::outbox::OutboxArgs,
    /// Apply the migrations at start-up.
    #[arg(long, env = "PAYMENT_SVC_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

/// Handles the order events.
pub struct PaymentHandler {
    gateway: GatewayServiceClient<orderflow_platform::grpc::TracedChannel>,
    gateway_timeout: Duration,
    straggler_grace: Duration,
    payments_topic: String,
    outbox: outbox::OutboxMode,
    limits: orderflow::money::TotalLimits,
}

/// Why a payment changes: an order event (the new event is caused by it), or the payment
/// deadline passing (no message caused it).
#[derive(Clone, Copy)]
enum Cause<'a> {
    Event(&'a OpenedEvent),
    Deadline,
}

/// A payment as stored.
struct PaymentRow {
    payment_id: uuid::Uuid,
    state: PaymentState,
    authorization_id: Option<String>,
    amount_minor: i64,
    currency_code: String,
}

type PaymentColumns = (uuid::Uuid, uuid::Uuid, String, Option<String>, i64, String);

impl PaymentRow {
    fn from_columns(
        (_, payment_id, state, authorization_id, amount_minor, currency_code): PaymentColumns,
    ) -> Result<Self, HandlerError> {
        let state = PaymentState::parse(&state)
            .ok_or_else(|| HandlerError::Permanent(format!("stored payment state {state:?} is unknown")))?;
        Ok(Self {
            payment_id,
            state,
            authorization_id,
            amount_minor,
            currency_code,
        })
    }

    fn amount(&self) -> Money {
        Money {
            amount_minor: self.amount_minor,
            currency_code: self.currency_code.trim().to_owned(),
        }
    }
}

/// What one order event asks of the gateway, decided on the payment as locked in the
/// transaction. Deciding, calling the gateway and recording are three steps, so that a batch
/// decides for all its orders, makes their calls side by side, then records them all.
enum Plan {
    /// Not an event this service acts on.
    Ignore,
    /// Settled already: the inbox row alone is committed.
    Nothing,
    /// Authorize the charge, then record the payment (AUTHORIZED or FAILED) and its event.
    Authorize(domain::Charge),
    /// Capture the authorized payment, then record it CAPTURED with its event.
    Capture(PaymentRow),
    /// Release the authorized payment, then record it VOIDED with its event.
    Void(PaymentRow),
    /// No payment on record for a cancelled order: release whatever the authorize key made,
    /// then remember the cancellation.
    VoidUnrecorded,
}

/// What the gateway answered that the record needs.
enum Answer {
    /// The call's success is all there is to know (or there was no call).
    Done,
    /// The authorization's outcome.
    Authorization(AuthorizeResponse),
}

type Tx = Transaction<'static, Postgres>;

impl PaymentHandler {
    /// A handler calling the gateway over `gateway` (each call in the order's trace).
    pub fn new(
        gateway: tonic::transport::Channel,
        gateway_timeout: Duration,
        payments_topic: String,
        limits: orderflow::money::TotalLimits,
    ) -> Self {
        Self {
            gateway: GatewayServiceClient::with_interceptor(gateway, orderflow_platform::grpc::PropagateTrace),
            gateway_timeout,
            straggler_grace: STRAGGLER_GRACE,
            payments_topic,
            outbox: outbox::OutboxMode::Table,
            limits,
        }
    }

    /// Gives a batch's slowest gateway calls at least `grace` once half have answered (100 ms
    /// by default).
    pub fn with_straggler_grace(self, grace: Duration) -> Self {
        Self {
            straggler_grace: grace,
            ..self
        }
    }

    /// Writes its events the `mode` way (the outbox table by default).
    pub fn with_outbox_mode(self, mode: outbox::OutboxMode) -> Self {
        Self { outbox: mode, ..self }
    }

    async fn load(tx: &mut Tx, order_id: uuid::Uuid) -> Result<Option<PaymentRow>, HandlerError> {
        Ok(Self::load_all(tx, &[order_id]).await?.remove(&order_id))
    }

    /// The payments of `order_ids`, in one statement. Locked for the rest of the message's
    /// transaction: the overdue-authorization sweeper takes the same lock, so a void and a
    /// capture of one payment never interleave (whichever comes second sees the other's
    /// result). Locked in the order of their ids, so two transactions never wait on each
    /// other in a cycle.
    async fn load_all(tx: &mut Tx, order_ids: &[uuid::Uuid]) -> Result<HashMap<uuid::Uuid, PaymentRow>, HandlerError> {
        let rows: Vec<PaymentColumns> = sqlx::query_as(
            "SELECT order_id, payment_id, state, authorization_id, amount_minor, currency_code
             FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        )
        .bind(order_ids)
        .fetch_all(&mut **tx)
        .await?;
        rows.into_iter()
            .map(|row| Ok((row.0, PaymentRow::from_columns(row)?)))
            .collect()
    }

    /// Calls the gateway with a deadline; a missing reply is transient (the retry reuses the key).
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, HandlerError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!("gateway_call", operation, outcome = tracing::field::Empty);
        let (outcome, result) = match tokio::time::timeout(self.gateway_timeout, call)
            .instrument(span.clone())
            .await
        {
            Ok(Ok(reply)) => ("ok", Ok(reply.into_inner())),
            Ok(Err(status)) => ("error", Err(HandlerError::from(status))),
            Err(_) => (
                "timeout",
                Err(HandlerError::Transient(anyhow::anyhow!(
                    "no gateway reply within {:?}",
                    self.gateway_timeout
                ))),
            ),
        };
        span.record("outcome", outcome);
        metrics::histogram!(telemetry::GATEWAY_CALL_DURATION, "operation" => operation, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Decides what `event` asks, given the payment on record for its order.
    fn plan(&self, event: &OpenedEvent, payment: Option<PaymentRow>) -> Result<Plan, HandlerError> {
        let state = payment.as_ref().map(|p| p.state);
        let action = match &event.payload {
            Payload::OrderPlaced(placed) => {
                let charge = domain::parse_order_placed(placed, event.aggregate_id, &self.limits)
                    .map_err(HandlerError::Permanent)?;
                match domain::on_order_placed(state) {
                    Action::Authorize => return Ok(Plan::Authorize(charge)),
                    action => action,
                }
            }
            Payload::OrderConfirmed(_) => domain::on_order_confirmed(state),
            Payload::OrderCancelled(_) => domain::on_order_cancelled(state),
            _ => return Ok(Plan::Ignore),
        };
        let recorded = || payment.ok_or_else(|| HandlerError::Permanent("no payment".into()));
        match action {
            Action::Capture => Ok(Plan::Capture(recorded()?)),
            Action::Void => Ok(Plan::Void(recorded()?)),
            Action::RecordCancellation => Ok(Plan::VoidUnrecorded),
            Action::Refuse(why) => Err(HandlerError::Permanent(why.into())),
            Action::Nothing | Action::Authorize => Ok(Plan::Nothing),
        }
    }

    /// The gateway call `plan` needs, with the key every retry of it reuses: at most one
    /// authorization, capture and void per order, however often this runs.
    async fn call_gateway(&self, order_id: uuid::Uuid, plan: &Plan) -> Result<Answer, HandlerError> {
        match plan {
            Plan::Ignore | Plan::Nothing => Ok(Answer::Done),
            Plan::Authorize(charge) => {
                // The gateway is called inside the message's transaction (its inbox row is
                // recorded and locked, so a concurrent redelivery waits instead of calling
                // too); the call is bounded by the gateway timeout. Dying during or after this
                // call leaves an authorization at the gateway that we have not recorded. The
                // message is redelivered (its offset was not stored), we call again with the
                // same key, and the gateway returns the same authorization: no second charge.
                fail::fail_point!("payment::before_gateway", |_| orderflow_platform::chaos::crash());
                let idempotency_key = if orderflow_platform::chaos::naive() {
                    // The textbook mistake: a fresh key per call, so a retry is a second charge.
                    format!("authorize:{order_id}:{}", uuid::Uuid::now_v7())
                } else {
                    format!("authorize:{order_id}")
                };
                let reply = self
                    .call(
                        "authorize",
                        self.gateway.clone().authorize(AuthorizeRequest {
                            idempotency_key,
                            order_id: order_id.to_string(),
                            amount: Some(charge.total.to_wire()),
                            payment_token: charge.payment_token.clone(),
                        }),
                    )
                    .await?;
                Ok(Answer::Authorization(reply))
            }
            Plan::Capture(payment) => {
                self.call(
                    "capture",
                    self.gateway.clone().capture(CaptureRequest {
                        idempotency_key: format!("capture:{order_id}"),
                        authorization_id: payment.authorization_id.clone().unwrap_or_default(),
                        amount: Some(payment.amount()),
                    }),
                )
                .await?;
                Ok(Answer::Done)
            }
            Plan::Void(payment) => {
                self.call(
                    "void",
                    self.gateway.clone().void(VoidRequest {
                        idempotency_key: format!("void:{order_id}"),
                        authorization_id: payment.authorization_id.clone().unwrap_or_default(),
                        authorize_idempotency_key: String::new(),
                    }),
                )
                .await?;
                Ok(Answer::Done)
            }
            Plan::VoidUnrecorded => {
                // Usually the order was cancelled before its OrderPlaced got here. But an
                // OrderPlaced that was dead-lettered after the gateway had authorized (its
                // reply lost, the retry budget spent) leaves money held that no row of ours
                // knows: release whatever the authorize key made, and close the key, so that
                // nothing authorized under it ever stays held.
                self.call(
                    "void",
                    self.gateway.clone().void(VoidRequest {
                        idempotency_key: format!("void:{order_id}"),
                        authorization_id: String::new(),
                        authorize_idempotency_key: format!("authorize:{order_id}"),
                    }),
                )
                .await?;
                Ok(Answer::Done)
            }
        }
    }

    /// Records in `tx` what the gateway did for `plan`, with the event that tells it.
    async fn record(
        &self,
        tx: &mut Tx,
        cause: Cause<'_>,
        order_id: uuid::Uuid,
        plan: Plan,
        answer: Answer,
    ) -> Result<Outcome, HandlerError> {
        match (plan, answer) {
            (Plan::Ignore, _) => Ok(Outcome::Ignored),
            (Plan::Nothing, _) => Ok(Outcome::Processed),
            (Plan::Authorize(charge), Answer::Authorization(reply)) => {
                let Cause::Event(event) = cause else {
                    return Err(HandlerError::Permanent(
                        "an authorization without its OrderPlaced".into(),
                    ));
                };
                self.record_authorization(tx, event, order_id, &charge, reply).await
            }
            (Plan::Authorize(_), Answer::Done) => {
                Err(HandlerError::Permanent("an authorization without its reply".into()))
            }
            (Plan::Capture(payment), _) => {
                self.settle(
                    tx,
                    cause,
                    order_id,
                    &payment,
                    PaymentState::Captured,
                    |order_id, payment_id, amount| {
                        Payload::PaymentCaptured(PaymentCaptured {
                            order_id,
                            payment_id,
                            amount,
                        })
                    },
                )
                .await
            }
            (Plan::Void(payment), _) => {
                self.settle(
                    tx,
                    cause,
                    order_id,
                    &payment,
                    PaymentState::Voided,
                    |order_id, payment_id, amount| {
                        Payload::PaymentVoided(PaymentVoided {
                            order_id,
                            payment_id,
                            amount,
                        })
                    },
                )
                .await
            }
            (Plan::VoidUnrecorded, _) => {
                // Remember the cancellation, so that a later OrderPlaced (a redrive, a replay)
                // never charges this order.
                sqlx::query(
                    "INSERT INTO payments (payment_id, order_id, amount_minor, currency_code, state)
                     VALUES ($1, $2, 0, 'XXX', 'CANCELLED_BEFORE_AUTHORIZATION') ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(uuid::Uuid::now_v7())
                .bind(order_id)
                .execute(&mut **tx)
                .await?;
                Ok(Outcome::Processed)
            }
        }
    }

    /// An AUTHORIZED payment captured or voided at the gateway: `to`, with the event `event`
    /// makes of the order id, the payment id and the amount.
    async fn settle(
        &self,
        tx: &mut Tx,
        cause: Cause<'_>,
        order_id: uuid::Uuid,
        payment: &PaymentRow,
        to: PaymentState,
        event: impl FnOnce(String, String, Option<Money>) -> Payload,
    ) -> Result<Outcome, HandlerError> {
        let payload = event(
            order_id.to_string(),
            payment.payment_id.to_string(),
            Some(payment.amount()),
        );
        self.transition(tx, cause, order_id, PaymentState::Authorized, to, payload)
            .await
    }

    async fn record_authorization(
        &self,
        tx: &mut Tx,
        event: &OpenedEvent,
        order_id: uuid::Uuid,
        charge: &domain::Charge,
        reply: AuthorizeResponse,
    ) -> Result<Outcome, HandlerError> {
        let total = charge.total.to_wire();
        let approved = reply.status() == AuthorizationStatus::Approved;
        let payment_id = uuid::Uuid::now_v7();
        let (state, authorization_id, failure) = if approved {
            (PaymentState::Authorized, Some(reply.authorization_id.clone()), None)
        } else {
            (PaymentState::Failed, None, Some(reply.decline_reason.clone()))
        };
        let inserted = sqlx::query(
            "INSERT INTO payments (payment_id, order_id, amount_minor, currency_code, state, authorization_id, failure_reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(payment_id)
        .bind(order_id)
        .bind(total.amount_minor)
        .bind(&total.currency_code)
        .bind(state.as_str())
        .bind(&authorization_id)
        .bind(&failure)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 0 && orderflow_platform::chaos::naive() {
            // Without an inbox a redelivery lands here after charging again; the textbook
            // handler shrugs and moves on.
            return Ok(Outcome::Processed);
        }
        if inserted == 0 {
            // Another message made a payment row for this order meanwhile (only possible if
            // order events of one order were handled concurrently): start over and decide again.
            return Err(HandlerError::Transient(anyhow::anyhow!(
                "payment row appeared concurrently"
            )));
        }
        let payload = if approved {
            Payload::PaymentAuthorized(PaymentAuthorized {
                order_id: order_id.to_string(),
                payment_id: payment_id.to_string(),
                authorization_id: reply.authorization_id,
                amount: Some(total),
            })
        } else {
            Payload::PaymentFailed(PaymentFailed {
                order_id: order_id.to_string(),
                payment_id: payment_id.to_string(),
                reason: PaymentFailureReason::Declined as i32,
                detail: reply.decline_reason,
            })
        };
        self.outbox
            .write(tx, &outbox::caused_by(&self.payments_topic, event, payload))
            .await?;
        // Dying here (the chaos harness's failpoint), before the runtime commits: nothing of
        // this transaction is committed, the authorization exists at the gateway only; the
        // redelivery calls again with the same key and gets the same authorization back.
        fail::fail_point!("payment::after_gateway_before_commit", |_| {
            orderflow_platform::chaos::crash()
        });
        tracing::info!(approved, "payment recorded");
        Ok(Outcome::Processed)
    }

    /// Compare-and-set `from` → `to` with the outbox event, in the message's transaction.
    #[tracing::instrument(name = "payment_transition", skip_all, fields(from = from.as_str(), to = to.as_str()))]
    async fn transition(
        &self,
        tx: &mut Tx,
        cause: Cause<'_>,
        order_id: uuid::Uuid,
        from: PaymentState,
        to: PaymentState,
        payload: Payload,
    ) -> Result<Outcome, HandlerError> {
        let changed = sqlx::query(
            "UPDATE payments SET state = $3, version = version + 1, updated_at = now() WHERE order_id = $1 AND state = $2",
        )
        .bind(order_id)
        .bind(from.as_str())
        .bind(to.as_str())
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if changed == 0 {
            return Err(HandlerError::Transient(anyhow::anyhow!(
                "payment changed concurrently; deciding again"
            )));
        }
        let message = match cause {
            Cause::Event(event) => outbox::caused_by(&self.payments_topic, event, payload),
            Cause::Deadline => outbox::spontaneous(&self.payments_topic, order_id, payload),
        };
        self.outbox.write(tx, &message).await?;
        tracing::info!(from = from.as_str(), to = to.as_str(), "payment transition");
        Ok(Outcome::Processed)
    }
}

impl PaymentHandler {
    /// Voids the authorizations made more than `deadline` ago whose order never settled
    /// here; returns how many. Each in its own transaction, with the payment row locked
    /// (as every message's handler locks it): a late OrderConfirmed either captures first
    /// (and this finds the payment CAPTURED) or finds it VOIDED and is dead-lettered for an
    /// operator ("order confirmed after its authorization was voided": the order service
    /// confirmed an order whose payment this deadline gave up on). Dying after the gateway
    /// voided, before the commit: the next pass voids again with the same key (a replay).
    pub async fn void_overdue(&self, pool: &sqlx::PgPool, deadline: Duration) -> anyhow::Result<usize> {
        let overdue: Vec<(uuid::Uuid,)> = sqlx::query_as(
            "SELECT order_id FROM payments WHERE state = 'AUTHORIZED' AND created_at < now() - make_interval(secs => $1)
             ORDER BY created_at LIMIT 100",
        )
        .bind(deadline.as_secs_f64())
        .fetch_all(pool)
        .await?;
        let mut voided = 0;
        for (order_id,) in overdue {
            let mut tx = pool.begin().await?;
            let Some(payment) = Self::load(&mut tx, order_id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
            else {
                continue;
            };
            if payment.state != PaymentState::Authorized {
                // Settled since the query above.
                continue;
            }
            let plan = Plan::Void(payment);
            let answer = self
                .call_gateway(order_id, &plan)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            self.record(&mut tx, Cause::Deadline, order_id, plan, answer)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tx.commit().await?;
            tracing::warn!(%order_id, ?deadline, "authorization voided: its order never settled");
            metrics::counter!(telemetry::OVERDUE_AUTHORIZATIONS_VOIDED).increment(1);
            voided += 1;
        }
        Ok(voided)
    }
}

/// Voids overdue authorizations every `interval` until `shutdown`.
async fn sweep_overdue(
    handler: Arc<PaymentHandler>,
    pool: sqlx::PgPool,
    deadline: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(error) = handler.void_overdue(&pool, deadline).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "overdue authorizations not voided yet; retrying"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

impl consumer::Handler for PaymentHandler {
    fn inbox(&self) -> &'static str {
        INBOX
    }

    fn wants(&self, event: &OpenedEvent) -> bool {
        matches!(
            event.payload,
            Payload::OrderPlaced(_) | Payload::OrderConfirmed(_) | Payload::OrderCancelled(_)
        )
    }

    async fn handle(&self, tx: &mut Tx, _message: &Incoming, event: &OpenedEvent) -> Result<Outcome, HandlerError> {
        let order_id = event.aggregate_id;
        let plan = self.plan(event, Self::load(tx, order_id).await?)?;
        let answer = self.call_gateway(order_id, &plan).await?;
        self.record(tx, Cause::Event(event), order_id, plan, answer).await
    }

    /// A batch in runs of messages of different orders: per run, one statement loads (and
    /// locks) their payments, the gateway calls are made side by side, then the effects are
    /// recorded in order. The transaction is held for the run's calls side by side, not for
    /// one call after another, and not for a straggler's whole timeout ([`side_by_side`]). A
    /// second message of an order starts the next run, so it is decided on the first one's
    /// effect.
    ///
    /// A gateway call that fails, times out or is cut off writes nothing: its message is
    /// deferred (the batch commits without it and the runtime handles it alone, with its own
    /// retries), as is every later message of its order here. Its neighbours' calls are not
    /// made twice and they do not wait behind its retries: rolling the batch back for it
    /// redid every other order of the batch after the timeout.
    async fn handle_batch(&self, tx: &mut Tx, batch: &[Fresh<'_>]) -> Result<Vec<Outcome>, (usize, HandlerError)> {
        let mut outcomes = Vec::with_capacity(batch.len());
        // Orders with a deferred message: their later messages wait for it.
        let mut deferred_orders = HashSet::new();
        for (start, run) in consumer::runs_of_distinct_keys(batch, |fresh| fresh.event.aggregate_id) {
            let mut run_outcomes = vec![Outcome::Deferred; run.len()];
            let active: Vec<usize> = (0..run.len())
                .filter(|&at| !deferred_orders.contains(&run[at].event.aggregate_id))
                .collect();
            let order_ids: Vec<uuid::Uuid> = active.iter().map(|&at| run[at].event.aggregate_id).collect();
            let mut payments = Self::load_all(tx, &order_ids).await.map_err(|error| (start, error))?;
            let plans = active
                .iter()
                .map(|&at| {
                    let fresh = &run[at];
                    let _entered = fresh.span.enter();
                    self.plan(fresh.event, payments.remove(&fresh.event.aggregate_id))
                        .map_err(|error| (start + at, error))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let answers = side_by_side(
                active
                    .iter()
                    .zip(&plans)
                    .map(|(&at, plan)| {
                        self.call_gateway(run[at].event.aggregate_id, plan)
                            .instrument(run[at].span.clone())
                    })
                    .collect(),
                self.straggler_grace,
            )
            .await;
            for ((&at, plan), answer) in active.iter().zip(plans).zip(answers) {
                let fresh = &run[at];
                match answer {
                    Some(Ok(answer)) => {
                        run_outcomes[at] = self
                            .record(tx, Cause::Event(fresh.event), fresh.event.aggregate_id, plan, answer)
                            .instrument(fresh.span.clone())
                            .await
                            .map_err(|error| (start + at, error))?;
                    }
                    Some(Err(error)) => {
                        tracing::info!(parent: &fresh.span, %error, "gateway call failed; handled alone after its batch");
                        deferred_orders.insert(fresh.event.aggregate_id);
                    }
                    None => {
                        tracing::info!(parent: &fresh.span, "gateway call outlasted its batch; handled alone after it");
                        deferred_orders.insert(fresh.event.aggregate_id);
                    }
                }
            }
            outcomes.extend(run_outcomes);
        }
        Ok(outcomes)
    }
}

/// The least time a batch's stragglers get once half of its gateway calls have answered,
/// unless configured (`PAYMENT_SVC_STRAGGLER_GRACE_MS`).
const STRAGGLER_GRACE: Duration = Duration::from_millis(100);

/// Runs `calls` side by side and returns their answers in order, `None` for a straggler: once
/// at least half of them have answered, the rest get as long again as the calls have taken so
/// far (at least `grace`), and those still out then are dropped (cancelled).
///
/// A batch commits its orders together, so without a cut-off every order of a batch waited
/// for its slowest call: one late gateway reply (up to the gateway timeout, 1 s) held up all
/// of its neighbours. A dropped call is safe to make again: it is deferred and made alone
/// with the same idempotency key, and the gateway replays whatever the first one did. A
/// single call is never cut off (nothing else waits for it).
async fn side_by_side<F: std::future::Future>(calls: Vec<F>, grace: Duration) -> Vec<Option<F::Output>> {
    use futures::StreamExt as _;
    let total = calls.len();
    let started = tokio::time::Instant::now();
    let mut answers: Vec<Option<F::Output>> = std::iter::repeat_with(|| None).take(total).collect();
    let mut pending: futures::stream::FuturesUnordered<_> = calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| async move { (index, call.await) })
        .collect();
    let mut answered = 0;
    let mut cut_off_at: Option<tokio::time::Instant> = None;
    loop {
        let next = match cut_off_at {
            None => pending.next().await,
            Some(at) => match tokio::time::timeout_at(at, pending.next()).await {
                Ok(next) => next,
                // Dropping `pending` below cancels the stragglers.
                Err(_) => break,
            },
        };
        let Some((index, answer)) = next else { break };
        answers[index] = Some(answer);
        answered += 1;
        if cut_off_at.is_none() && total > 1 && answered * 2 >= total {
            cut_off_at = Some(tokio::time::Instant::now() + started.elapsed().max(grace));
        }
    }
    answers
}

/// Connects and consumes until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = orderflow_platform::connect_postgres(&config.database_url, config.db_max_connections).await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    let security = match (&config.gateway_ca, config.gateway_plaintext) {
        (Some(ca), false) => orderflow_platform::security::ClientSecurity {
            ca: Some(ca.clone()),
            identity: config
                .gateway_client_cert
                .clone()
                .zip(config.gateway_client_key.clone()),
        },
        (None, true) => {
            tracing::warn!("calling the gateway in PLAINTEXT (PAYMENT_SVC_GATEWAY_PLAINTEXT=true): development only");
            orderflow_platform::security::ClientSecurity::default()
        }
        (Some(_), true) => anyhow::bail!("PAYMENT_SVC_GATEWAY_CA and PAYMENT_SVC_GATEWAY_PLAINTEXT are both set"),
        (None, false) => anyhow::bail!(
            "no CA for the gateway: set PAYMENT_SVC_GATEWAY_CA, or PAYMENT_SVC_GATEWAY_PLAINTEXT=true for development"
        ),
    };
    let channel = security.endpoint(&config.gateway_addr)?.connect_lazy();
    let handler = PaymentHandler::new(
        channel,
        Duration::from_millis(config.gateway_timeout_ms),
        config.payments_topic.clone(),
        config.max_order_total.clone(),
    )
    .with_straggler_grace(Duration::from_millis(config.straggler_grace_ms))
    .with_outbox_mode(config.outbox.mode);
    orderflow_platform::housekeeping::spawn_inbox_cleanup(&pool, INBOX, config.inbox_retention_hours, &shutdown);
    let settings = config.consumer.apply(ConsumerSettings {
        instance_id: config.instance_id,
        key_lanes: KEY_LANES,
        ..ConsumerSettings::new(
            orderflow_platform::kafka::Cluster::new(config.bootstrap_servers, &config.kafka_auth),
            config.group_id,
            vec![config.orders_topic],
        )
    });
    let handler = Arc::new(handler);
    // Everything stops on `stop`: the caller's shutdown, or the consumer's death (a process
    // whose consumer died exits whole, its sweeper included).
    let stop = shutdown.child_token();
    let sweeper = tokio::spawn(sweep_overdue(
        handler.clone(),
        pool.clone(),
        Duration::from_millis(config.authorization_deadline_ms),
        Duration::from_millis(config.sweep_interval_ms),
        stop.clone(),
    ));
    let consumed = consumer::run_reconnecting(settings, pool.clone(), handler, stop.clone()).await;
    stop.cancel();
    let _ = sweeper.await;
    consumed?;
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::side_by_side;

    async fn answer_after(ms: u64, answer: u32) -> u32 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        answer
    }

    #[tokio::test(start_paused = true)]
    async fn a_straggler_is_cut_off_once_half_have_answered_and_as_long_again_has_passed() {
        let started = tokio::time::Instant::now();
        let answers = side_by_side(
            vec![
                answer_after(30, 1),
                answer_after(1_000, 2),
                answer_after(40, 3),
                answer_after(150, 4),
            ],
            Duration::from_millis(100),
        )
        .await;
        // Half answered at 40 ms: the rest get until 40 + max(40, 100) = 140 ms.
        assert_eq!(answers, vec![Some(1), None, Some(3), None]);
        assert_eq!(started.elapsed(), Duration::from_millis(140));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_that_answer_within_the_grace_are_all_waited_for() {
        let answers = side_by_side(
            vec![answer_after(200, 1), answer_after(300, 2), answer_after(500, 3)],
            Duration::from_millis(100),
        )
        .await;
        // Two of three answered at 300 ms: the third gets until 600 ms, as long again.
        assert_eq!(answers, vec![Some(1), Some(2), Some(3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_call_is_never_cut_off() {
        let answers = side_by_side(vec![answer_after(5_000, 1)], Duration::from_millis(100)).await;
        assert_eq!(answers, vec![Some(1)]);
    }
}
