//! The gateway simulator: a card processor with its own database. Its ledger is the truth
//! about money; the invariant checker counts charges there.
//!
//! Every operation is guarded by its idempotency key: the first call with a key does the
//! work and stores the reply in the same transaction; a retry with the same key and the
//! same parameters gets the stored reply and moves no money; the same key with other
//! parameters is FAILED_PRECONDITION. Faults (latency, declines, late or lost replies)
//! are applied after the transaction committed: the money has moved, the reply has not.

pub mod faults;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use orderflow::gateway::v1::gateway_admin_service_server::{GatewayAdminService, GatewayAdminServiceServer};
use orderflow::gateway::v1::gateway_service_server::{GatewayService, GatewayServiceServer};
use orderflow::gateway::v1::{
    AuthorizationStatus, AuthorizeRequest, AuthorizeResponse, CaptureRequest, CaptureResponse, Faults,
    GetFaultsRequest, GetFaultsResponse, SetFaultsRequest, SetFaultsResponse, VoidRequest, VoidResponse,
};
use orderflow_platform::Secret;
use prost::Message as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

orderflow::stored_names! {
    /// An authorization's state at the gateway, as stored (the migration's CHECK lists the
    /// same names; a unit test holds them together).
    pub enum AuthorizationState {
        /// Money reserved.
        Authorized = "AUTHORIZED",
        /// Money taken.
        Captured = "CAPTURED",
        /// Reservation released.
        Voided = "VOIDED",
    }
}

/// Every call is answered within this (a hanging reply fault is a reply that never comes
/// within any caller's patience; the callers' own timeouts are far shorter).
const REQUEST_DEADLINE: Duration = Duration::from_secs(600);

/// The gateway database's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/gateway");

/// The simulator's settings (the initial faults can be changed at run time through
/// `GatewayAdminService`).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "gateway-sim", about = "orderflow's card-processor simulator")]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "GATEWAY_LISTEN_ADDR", default_value = "127.0.0.1:15061")]
    pub listen_addr: SocketAddr,
    /// Postgres URL of the gateway's own database.
    #[arg(long, env = "GATEWAY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// How long an idempotency key is honoured, in hours (at least 24).
    #[arg(long, env = "GATEWAY_KEY_RETENTION_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(24..))]
    pub key_retention_hours: u64,
    /// Fixed latency of every call, in milliseconds.
    #[arg(long, env = "GATEWAY_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u32,
    /// Uniform extra latency up to this many milliseconds.
    #[arg(long, env = "GATEWAY_LATENCY_JITTER_MS", default_value_t = 0)]
    pub latency_jitter_ms: u32,
    /// Share of authorizations declined.
    #[arg(long, env = "GATEWAY_DECLINE_RATE", default_value_t = 0.0)]
    pub decline_rate: f64,
    /// Share of first replies that come too late (the money moved).
    #[arg(long, env = "GATEWAY_TIMEOUT_RATE", default_value_t = 0.0)]
    pub timeout_rate: f64,
    /// Share of authorizations whose first replies never come.
    #[arg(long, env = "GATEWAY_HANG_RATE", default_value_t = 0.0)]
    pub hang_rate: f64,
    /// How many calls of a hanging key hang.
    #[arg(long, env = "GATEWAY_HANG_ATTEMPTS", default_value_t = 1)]
    pub hang_attempts: u32,
    /// How late a late reply is, in milliseconds.
    #[arg(long, env = "GATEWAY_TIMEOUT_REPLY_DELAY_MS", default_value_t = 10_000)]
    pub timeout_reply_delay_ms: u32,
    /// Seed of the fault decisions.
    #[arg(long, env = "GATEWAY_SEED", default_value_t = 1)]
    pub seed: u64,
    /// TLS, client certificates (payment-svc's, for the payment API) and bearer tokens (an
    /// operator's, for the admin API).
    #[command(flatten)]
    pub security: orderflow_platform::security::ServerSecurityArgs,
    /// What one connection and one socket may hold (`GRPC_*`; its one payment client,
    /// payment-svc, is not limited per caller).
    #[command(flatten)]
    pub fairness: orderflow_platform::fairness::FairnessArgs,
    /// Its logs, spans and metrics (`RUST_LOG`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `ORDERFLOW_METRICS_ADDR`).
    #[command(flatten)]
    pub telemetry: orderflow_platform::telemetry::TelemetryArgs,
    /// Apply the migrations at start-up.
    #[arg(long, env = "GATEWAY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}

impl Config {
    fn faults(&self) -> Faults {
        Faults {
            latency_ms: self.latency_ms,
            latency_jitter_ms: self.latency_jitter_ms,
            decline_rate: self.decline_rate,
            timeout_rate: self.timeout_rate,
            hang_rate: self.hang_rate,
            hang_attempts: self.hang_attempts,
            timeout_reply_delay_ms: self.timeout_reply_delay_ms,
            seed: self.seed,
        }
    }
}

/// The service state shared by both gRPC services.
#[derive(Clone)]
pub struct Gateway {
    pool: PgPool,
    faults: Arc<RwLock<Faults>>,
    key_retention: Duration,
    access: Access,
}

/// Who may call what. The payment API moves money: with mutual TLS configured, only a
/// client presenting a certificate of the payment CA may call it. The admin API changes how
/// the simulator misbehaves: with tokens configured, only an operator may call it.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Require a verified client certificate on the payment API.
    pub client_certificates: bool,
    /// Verify bearer tokens on the admin API.
    pub verifier: Option<orderflow_platform::auth::Verifier>,
}

impl Access {
    fn payment_call<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.client_certificates && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::unauthenticated(
                "the payment API requires a client certificate (mutual TLS)",
            ));
        }
        Ok(())
    }

    fn admin_call<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(verifier) = &self.verifier else { return Ok(()) };
        match verifier.verify_metadata(request.metadata()) {
            Ok(orderflow_platform::auth::Caller::Operator(_)) => Ok(()),
            Ok(_) => Err(Status::permission_denied("the admin API is for operators")),
            Err(error) => {
                tracing::info!(%error, "admin call refused: not authenticated");
                Err(Status::unauthenticated("a valid operator token is required"))
            }
        }
    }
}

/// The fingerprint stored with an Authorize key that a void closed before any Authorize
/// used it: any later Authorize with the key replays the stored decline.
const CLOSED_KEY: &[u8] = b"closed-by-void";

/// The decline a closed key replays.
const VOIDED_BEFORE_AUTHORIZATION: &str = "voided_before_authorization";

/// Outcome of claiming an idempotency key.
enum Claim {
    /// First use: do the work in this transaction.
    New(sqlx::Transaction<'static, sqlx::Postgres>),
    /// Seen before with the same parameters: the stored reply, and this call's attempt number.
    Replay(Vec<u8>, u32),
}

/// The gateway's one map from a database error to a gRPC status. The database refusing the
/// data itself (class 22, data exception: an invalid byte sequence, a value out of range;
/// class 23, a constraint) is the caller's request, and repeating it fails the same way:
/// INVALID_ARGUMENT, which callers treat as permanent. Anything else (no connection, a
/// serialization failure, a restart) may heal: UNAVAILABLE, which callers retry.
fn storage_error(error: sqlx::Error) -> Status {
    if let sqlx::Error::Database(db) = &error
        && db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
    {
        tracing::warn!(%error, "the gateway database refused the request's data");
        return Status::invalid_argument(format!("the request's data was refused: {}", db.message()));
    }
    tracing::warn!(%error, "gateway database error");
    Status::unavailable("gateway storage unavailable")
}

/// The longest free-text field (order id, token, idempotency key).
const MAX_TEXT_CHARS: usize = 200;

fn required(value: &str, field: &str) -> Result<(), Status> {
    orderflow::text::visible(value, MAX_TEXT_CHARS)
        .map_err(|error| Status::invalid_argument(format!("{field} {error}")))
}

fn positive_money(money: Option<&orderflow::orders::v1::Money>) -> Result<(i64, String), Status> {
    let money = money.ok_or_else(|| Status::invalid_argument("amount is required"))?;
    let money = orderflow::money::Money::from_wire(money)
        .map_err(|error| Status::invalid_argument(format!("amount {error}")))?;
    Ok((money.amount_minor(), money.currency().code().to_owned()))
}

fn parse_authorization(id: &str) -> Result<uuid::Uuid, Status> {
    uuid::Uuid::parse_str(id).map_err(|_| Status::invalid_argument("authorization_id must be a UUID"))
}

/// One ledger line, written in the transaction that moves the money.
struct LedgerLine<'a> {
    operation: &'static str,
    order_id: &'a str,
    authorization_id: Option<uuid::Uuid>,
    amount_minor: i64,
    currency_code: &'a str,
    idempotency_key: &'a str,
}

async fn append_ledger(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    line: LedgerLine<'_>,
) -> Result<(), Status> {
    sqlx::query(
        "INSERT INTO ledger (operation, order_id, authorization_id, amount_minor, currency_code, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(line.operation)
    .bind(line.order_id)
    .bind(line.authorization_id)
    .bind(line.amount_minor)
    .bind(line.currency_code.trim())
    .bind(line.idempotency_key)
    .execute(&mut **tx)
    .await
    .map_err(storage_error)?;
    Ok(())
}

/// An authorization, locked for the rest of the transaction.
struct LockedAuthorization {
    order_id: String,
    state: String,
    amount_minor: i64,
    currency_code: String,
}

async fn lock_authorization(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    authorization_id: uuid::Uuid,
) -> Result<LockedAuthorization, Status> {
    let row: Option<(String, String, i64, String)> = sqlx::query_as(
        "SELECT order_id, state, amount_minor, currency_code FROM authorizations WHERE authorization_id = $1 FOR UPDATE",
    )
    .bind(authorization_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(storage_error)?;
    let (order_id, state, amount_minor, currency_code) =
        row.ok_or_else(|| Status::not_found("no such authorization"))?;
    Ok(LockedAuthorization {
        order_id,
        state,
        amount_minor,
        currency_code: currency_code.trim().to_owned(),
    })
}

impl Gateway {
    /// A gateway on `pool` with initial `faults`.
    pub fn new(pool: PgPool, faults: Faults, key_retention: Duration, access: Access) -> Self {
        Self {
            pool,
            faults: Arc::new(RwLock::new(faults)),
            key_retention,
            access,
        }
    }

    /// Claims `key` for `operation`. A concurrent call with the same key waits on the
    /// primary key until the first one commits, then replays its reply.
    async fn claim(&self, key: &str, operation: &str, fingerprint: &[u8]) -> Result<Claim, Status> {
        let mut tx = self.pool.begin().await.map_err(storage_error)?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (idempotency_key, operation, fingerprint, response, expires_at)
             VALUES ($1, $2, $3, '', now() + make_interval(secs => $4))
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(key)
        .bind(operation)
        .bind(fingerprint)
        .bind(self.key_retention.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(storage_error)?
        .rows_affected();
        if inserted == 1 {
            return Ok(Claim::New(tx));
        }
        let (stored_operation, stored_fingerprint, response, attempts): (String, Vec<u8>, Vec<u8>, i32) =
            sqlx::query_as(
                "UPDATE idempotency_keys SET attempts = attempts + 1 WHERE idempotency_key = $1
             RETURNING operation, fingerprint, response, attempts",
            )
            .bind(key)
            .fetch_one(&mut *tx)
            .await
            .map_err(storage_error)?;
        if stored_operation != operation || (stored_fingerprint != fingerprint && stored_fingerprint != CLOSED_KEY) {
            return Err(Status::failed_precondition(
                "idempotency key reused with different parameters",
            ));
        }
        tx.commit().await.map_err(storage_error)?;
        Ok(Claim::Replay(response, u32::try_from(attempts).unwrap_or(u32::MAX)))
    }

    /// Stores the reply with the key and commits the work.
    async fn finish(
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        key: &str,
        response: &[u8],
    ) -> Result<(), Status> {
        sqlx::query("UPDATE idempotency_keys SET response = $2 WHERE idempotency_key = $1")
            .bind(key)
            .bind(response)
            .execute(&mut *tx)
            .await
            .map_err(storage_error)?;
        tx.commit().await.map_err(storage_error)
    }

    async fn faults(&self) -> Faults {
        *self.faults.read().await
    }

    /// Applies the reply faults of this attempt: the work is committed, the reply may be
    /// late or never come.
    async fn deliver<T>(&self, reply: T, key: &str, token: &str, attempt: u32) -> Result<Response<T>, Status> {
        match faults::reply(&self.faults().await, key, token, attempt) {
            faults::Reply::Now => {}
            faults::Reply::Late(ms) => {
                tracing::info!(key, attempt, ms, "fault: late reply");
                tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
            }
            faults::Reply::Never => {
                tracing::info!(key, attempt, "fault: this reply never comes");
                std::future::pending::<()>().await;
            }
        }
        Ok(Response::new(reply))
    }

    async fn latency(&self, key: &str) {
        let ms = faults::latency_ms(&self.faults().await, key, 0);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

#[tonic::async_trait]
impl GatewayService for Gateway {
    async fn authorize(&self, request: Request<AuthorizeRequest>) -> Result<Response<AuthorizeResponse>, Status> {
        self.access.payment_call(&request)?;
        let request = request.into_inner();
        let (amount, currency) = check_authorize(&request)?;
        self.latency(&request.idempotency_key).await;
        let key = request.idempotency_key.clone();
        let fingerprint = AuthorizeRequest {
            idempotency_key: String::new(),
            ..request.clone()
        }
        .encode_to_vec();
        let (reply, attempt) = match self.claim(&key, "AUTHORIZE", &fingerprint).await? {
            Claim::Replay(bytes, attempt) => (
                AuthorizeResponse::decode(bytes.as_slice()).map_err(|_| Status::internal("stored reply"))?,
                attempt,
            ),
            Claim::New(mut tx) => {
                let reply = if faults::declines(&self.faults().await, &key, &request.payment_token) {
                    let line = LedgerLine {
                        operation: "DECLINE",
                        order_id: &request.order_id,
                        authorization_id: None,
                        amount_minor: amount,
                        currency_code: &currency,
                        idempotency_key: &key,
                    };
                    append_ledger(&mut tx, line).await?;
                    AuthorizeResponse {
                        authorization_id: String::new(),
                        status: AuthorizationStatus::Declined as i32,
                        decline_reason: "insufficient_funds".into(),
                    }
                } else {
                    let authorization_id = uuid::Uuid::now_v7();
                    sqlx::query(
                        "INSERT INTO authorizations (authorization_id, order_id, amount_minor, currency_code, state)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(authorization_id)
                    .bind(&request.order_id)
                    .bind(amount)
                    .bind(&currency)
                    .bind(AuthorizationState::Authorized.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(storage_error)?;
                    let line = LedgerLine {
                        operation: "AUTHORIZE",
                        order_id: &request.order_id,
                        authorization_id: Some(authorization_id),
                        amount_minor: amount,
                        currency_code: &currency,
                        idempotency_key: &key,
                    };
                    append_ledger(&mut tx, line).await?;
                    AuthorizeResponse {
                        authorization_id: authorization_id.to_string(),
                        status: AuthorizationStatus::Approved as i32,
                        decline_reason: String::new(),
                    }
                };
                Self::finish(tx, &key, &reply.encode_to_vec()).await?;
                (reply, 1)
            }
        };
        self.deliver(reply, &key, &request.payment_token, attempt).await
    }

    async fn capture(&self, request: Request<CaptureRequest>) -> Result<Response<CaptureResponse>, Status> {
        self.access.payment_call(&request)?;
        let request = request.into_inner();
        let (authorization_id, amount, currency) = check_capture(&request)?;
        self.latency(&request.idempotency_key).await;
        let key = request.idempotency_key.clone();
        let fingerprint = CaptureRequest {
            idempotency_key: String::new(),
            ..request.clone()
        }
        .encode_to_vec();
        let (reply, attempt) = match self.claim(&key, "CAPTURE", &fingerprint).await? {
            Claim::Replay(bytes, attempt) => (
                CaptureResponse::decode(bytes.as_slice()).map_err(|_| Status::internal("stored reply"))?,
                attempt,
            ),
            Claim::New(mut tx) => {
                let authorization = lock_authorization(&mut tx, authorization_id).await?;
                if AuthorizationState::parse(&authorization.state) != Some(AuthorizationState::Authorized) {
                    return Err(Status::failed_precondition(format!(
                        "authorization is {}",
                        authorization.state
                    )));
                }
                if amount > authorization.amount_minor || currency != authorization.currency_code {
                    return Err(Status::invalid_argument("capture exceeds the authorization"));
                }
                sqlx::query(
                    "UPDATE authorizations SET state = $3, captured_minor = $2, updated_at = now()
                     WHERE authorization_id = $1",
                )
                .bind(authorization_id)
                .bind(amount)
                .bind(AuthorizationState::Captured.as_str())
                .execute(&mut *tx)
                .await
                .map_err(storage_error)?;
                let line = LedgerLine {
                    operation: "CAPTURE",
                    order_id: &authorization.order_id,
                    authorization_id: Some(authorization_id),
                    amount_minor: amount,
                    currency_code: &currency,
                    idempotency_key: &key,
                };
                append_ledger(&mut tx, line).await?;
                let reply = CaptureResponse {
                    capture_id: uuid::Uuid::now_v7().to_string(),
                };
                Self::finish(tx, &key, &reply.encode_to_vec()).await?;
                (reply, 1)
            }
        };
        self.deliver(reply, &key, "", attempt).await
    }

    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<VoidResponse>, Status> {
        self.access.payment_call(&request)?;
        let request = request.into_inner();
        let target = check_void(&request)?;
        self.latency(&request.idempotency_key).await;
        let key = request.idempotency_key.clone();
        let fingerprint = VoidRequest {
            idempotency_key: String::new(),
            ..request.clone()
        }
        .encode_to_vec();
        let attempt = match self.claim(&key, "VOID", &fingerprint).await? {
            Claim::Replay(_, attempt) => attempt,
            Claim::New(mut tx) => {
                let authorization_id = match target {
                    VoidTarget::Authorization(id) => Some(id),
                    VoidTarget::AuthorizeKey(authorize_key) => {
                        self.authorization_of_key(&mut tx, &authorize_key).await?
                    }
                };
                if let Some(authorization_id) = authorization_id {
                    void_authorization(&mut tx, authorization_id, &key).await?;
                }
                Self::finish(tx, &key, &VoidResponse {}.encode_to_vec()).await?;
                1
            }
        };
        self.deliver(VoidResponse {}, &key, "", attempt).await
    }
}

/// The checks of an Authorize request: its amount and currency, or INVALID_ARGUMENT.
fn check_authorize(request: &AuthorizeRequest) -> Result<(i64, String), Status> {
    required(&request.idempotency_key, "idempotency_key")?;
    required(&request.order_id, "order_id")?;
    required(&request.payment_token, "payment_token")?;
    positive_money(request.amount.as_ref())
}

/// The checks of a Capture request: the authorization, amount and currency, or
/// INVALID_ARGUMENT.
fn check_capture(request: &CaptureRequest) -> Result<(uuid::Uuid, i64, String), Status> {
    required(&request.idempotency_key, "idempotency_key")?;
    let authorization_id = parse_authorization(&request.authorization_id)?;
    let (amount, currency) = positive_money(request.amount.as_ref())?;
    Ok((authorization_id, amount, currency))
}

/// The checks of a Void request: what it releases, or INVALID_ARGUMENT.
fn check_void(request: &VoidRequest) -> Result<VoidTarget, Status> {
    required(&request.idempotency_key, "idempotency_key")?;
    match (
        request.authorization_id.as_str(),
        request.authorize_idempotency_key.as_str(),
    ) {
        (id, "") => Ok(VoidTarget::Authorization(parse_authorization(id)?)),
        ("", key) => {
            required(key, "authorize_idempotency_key")?;
            Ok(VoidTarget::AuthorizeKey(key.to_owned()))
        }
        _ => Err(Status::invalid_argument(
            "set authorization_id or authorize_idempotency_key, not both",
        )),
    }
}

/// What a void releases.
enum VoidTarget {
    /// A known authorization.
    Authorization(uuid::Uuid),
    /// Whatever the Authorize call with this key made.
    AuthorizeKey(String),
}

/// Voids an authorization (locked): releases it once; voiding a voided one changes nothing.
async fn void_authorization(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    authorization_id: uuid::Uuid,
    key: &str,
) -> Result<(), Status> {
    let authorization = lock_authorization(tx, authorization_id).await?;
    match AuthorizationState::parse(&authorization.state) {
        Some(AuthorizationState::Authorized) => {
            sqlx::query("UPDATE authorizations SET state = $2, updated_at = now() WHERE authorization_id = $1")
                .bind(authorization_id)
                .bind(AuthorizationState::Voided.as_str())
                .execute(&mut **tx)
                .await
                .map_err(storage_error)?;
            let line = LedgerLine {
                operation: "VOID",
                order_id: &authorization.order_id,
                authorization_id: Some(authorization_id),
                amount_minor: authorization.amount_minor,
                currency_code: &authorization.currency_code,
                idempotency_key: key,
            };
            append_ledger(tx, line).await
        }
        Some(AuthorizationState::Voided) => Ok(()),
        Some(AuthorizationState::Captured) | None => Err(Status::failed_precondition(format!(
            "authorization is {}",
            authorization.state
        ))),
    }
}

impl Gateway {
    /// The authorization an Authorize call with `authorize_key` made, if any. If the key was
    /// never used, closes it (in `tx`): a later Authorize with it replays a decline. An
    /// Authorize with the key still in flight holds the key's row; the insert below waits for
    /// it to commit, then finds its reply.
    async fn authorization_of_key(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        authorize_key: &str,
    ) -> Result<Option<uuid::Uuid>, Status> {
        let decline = AuthorizeResponse {
            authorization_id: String::new(),
            status: AuthorizationStatus::Declined as i32,
            decline_reason: VOIDED_BEFORE_AUTHORIZATION.into(),
        };
        let closed = sqlx::query(
            "INSERT INTO idempotency_keys (idempotency_key, operation, fingerprint, response, expires_at)
             VALUES ($1, 'AUTHORIZE', $2, $3, now() + make_interval(secs => $4))
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(authorize_key)
        .bind(CLOSED_KEY)
        .bind(decline.encode_to_vec())
        .bind(self.key_retention.as_secs_f64())
        .execute(&mut **tx)
        .await
        .map_err(storage_error)?
        .rows_affected();
        if closed == 1 {
            tracing::info!(authorize_key, "void before any authorization: the key is closed");
            return Ok(None);
        }
        let (operation, response): (String, Vec<u8>) =
            sqlx::query_as("SELECT operation, response FROM idempotency_keys WHERE idempotency_key = $1")
                .bind(authorize_key)
                .fetch_one(&mut **tx)
                .await
                .map_err(storage_error)?;
        if operation != "AUTHORIZE" {
            return Err(Status::failed_precondition(
                "authorize_idempotency_key is not an Authorize key",
            ));
        }
        let reply = AuthorizeResponse::decode(response.as_slice()).map_err(|_| Status::internal("stored reply"))?;
        if reply.status() == AuthorizationStatus::Approved {
            parse_authorization(&reply.authorization_id).map(Some)
        } else {
            Ok(None)
        }
    }
}

#[tonic::async_trait]
impl GatewayAdminService for Gateway {
    async fn set_faults(&self, request: Request<SetFaultsRequest>) -> Result<Response<SetFaultsResponse>, Status> {
        self.access.admin_call(&request)?;
        let faults = request.into_inner().faults.unwrap_or_default();
        let rates = [faults.decline_rate, faults.timeout_rate, faults.hang_rate];
        if rates.iter().any(|rate| !(0.0..=1.0).contains(rate)) {
            return Err(Status::invalid_argument("rates are between 0 and 1"));
        }
        tracing::info!(?faults, "faults changed");
        *self.faults.write().await = faults;
        Ok(Response::new(SetFaultsResponse { faults: Some(faults) }))
    }

    async fn get_faults(&self, request: Request<GetFaultsRequest>) -> Result<Response<GetFaultsResponse>, Status> {
        self.access.admin_call(&request)?;
        Ok(Response::new(GetFaultsResponse {
            faults: Some(self.faults().await),
        }))
    }
}

/// Runs the simulator on `listener` until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.fairness.check_no_per_caller_limits()?;
    let tls = config.security.server_tls()?;
    let access = Access {
        client_certificates: config.security.tls_client_ca.is_some() && tls.is_some(),
        verifier: config.security.verifier()?,
    };
    let pool = orderflow_platform::connect_postgres(&config.database_url, 16).await?;
    if config.migrate {
        MIGRATOR.run(&pool).await?;
    }
    tokio::spawn(orderflow_platform::housekeeping::run(
        pool.clone(),
        vec![orderflow_platform::housekeeping::Purge {
            name: "gateway idempotency_keys",
            sql: "SELECT purge_expired_keys($1, $2::int)",
            retention: Duration::ZERO,
            consumer: None,
        }],
        orderflow_platform::housekeeping::INTERVAL,
        shutdown.clone(),
    ));
    let gateway = Gateway::new(
        pool.clone(),
        config.faults(),
        Duration::from_secs(config.key_retention_hours * 3600),
        access,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GatewayServiceServer<Gateway>>().await;
    tokio::spawn(orderflow_platform::health::watch(
        health,
        vec![<GatewayServiceServer<Gateway> as tonic::server::NamedService>::NAME],
        pool.clone(),
        None,
        shutdown.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orderflow::GATEWAY_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc error details: grpcurl decodes an error's details through it.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    tracing::info!(local_addr = %listener.local_addr()?, "gateway-sim serving gRPC");
    let mut server =
        tonic::transport::Server::builder().max_concurrent_streams(config.fairness.max_streams_per_connection);
    if let Some(tls) = tls {
        server = server.tls_config(tls.timeout(config.fairness.tls_handshake_timeout()))?;
    }
    server
        .layer(
            orderflow_platform::grpc::EdgeLayer::new(REQUEST_DEADLINE)
                .with_body_timeout(config.fairness.body_timeout()),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(GatewayServiceServer::new(gateway.clone()))
        .add_service(GatewayAdminServiceServer::new(gateway))
        .serve_with_incoming_shutdown(config.fairness.incoming(listener), shutdown.cancelled())
        .await?;
    pool.close().await;
    Ok(())
}

/// Property tests of the gateway's request parsing with arbitrary requests (structured, and
/// decoded from arbitrary bytes): never a panic, and every refusal is INVALID_ARGUMENT (the
/// code callers never retry). `scripts/test` runs them with many more cases than the default.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z:0-9-]{1,40}",
            Just("E\0R".to_owned()),
            Just(uuid::Uuid::now_v7().to_string())
        ]
    }

    fn money() -> impl Strategy<Value = Option<orderflow::orders::v1::Money>> {
        proptest::option::of((any::<i64>(), prop_oneof![text(), Just("EUR".to_owned())]).prop_map(
            |(amount_minor, currency_code)| orderflow::orders::v1::Money {
                amount_minor,
                currency_code,
            },
        ))
    }

    fn refused_as_invalid<T>(result: Result<T, Status>) {
        if let Err(status) = result {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
    }

    proptest! {
        #[test]
        fn fuzz_structured_requests_are_parsed_or_invalid_argument(
            (key, order, token, other) in (text(), text(), text(), text()),
            amount in money(),
        ) {
            refused_as_invalid(check_authorize(&AuthorizeRequest {
                idempotency_key: key.clone(),
                order_id: order,
                amount: amount.clone(),
                payment_token: token,
            }));
            refused_as_invalid(check_capture(&CaptureRequest {
                idempotency_key: key.clone(),
                authorization_id: other.clone(),
                amount,
            }));
            refused_as_invalid(check_void(&VoidRequest {
                idempotency_key: key,
                authorization_id: other.clone(),
                authorize_idempotency_key: other,
            }));
        }

        #[test]
        fn fuzz_arbitrary_bytes_are_parsed_or_invalid_argument(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            if let Ok(request) = AuthorizeRequest::decode(bytes.as_slice()) {
                refused_as_invalid(check_authorize(&request));
            }
            if let Ok(request) = CaptureRequest::decode(bytes.as_slice()) {
                refused_as_invalid(check_capture(&request));
            }
            if let Ok(request) = VoidRequest::decode(bytes.as_slice()) {
                refused_as_invalid(check_void(&request));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authorization_states_are_the_migrations_names() {
        let migration = include_str!("../../migrations/gateway/0001_gateway.sql");
        let names: Vec<String> = AuthorizationState::ALL.iter().map(|s| format!("'{s}'")).collect();
        assert!(
            migration.contains(&format!("CHECK (state IN ({}))", names.join(", "))),
            "the migration's CHECK lists {names:?}"
        );
        for state in AuthorizationState::ALL {
            assert_eq!(AuthorizationState::parse(state.as_str()), Some(*state));
        }
    }
}
