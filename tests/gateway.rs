//! The gateway simulator's own promises, against its real database: a retry with the same
//! key returns the original result and moves no money; the same key with other parameters
//! is refused; the faults do what they say, and the money moves even when the reply is lost.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use orderflow::gateway::v1::gateway_admin_service_client::GatewayAdminServiceClient;
use orderflow::gateway::v1::gateway_service_client::GatewayServiceClient;
use orderflow::gateway::v1::{
    AuthorizationStatus, AuthorizeRequest, CaptureRequest, Faults, SetFaultsRequest, VoidRequest,
};
use orderflow::orders::v1::Money;
use orderflow_tests::{TestDb, fresh_db};
use tokio_util::sync::CancellationToken;
use tonic::Code;

async fn start() -> (TestDb, String, CancellationToken) {
    let db = fresh_db(&gateway_sim::MIGRATOR).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let faults = Faults {
        hang_attempts: 1,
        timeout_reply_delay_ms: 2_000,
        seed: 1,
        ..Faults::default()
    };
    let config = orderflow_tests::gateway_config(
        listener.local_addr().unwrap(),
        &db,
        faults,
        orderflow_platform::security::ServerSecurityArgs::insecure(),
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(gateway_sim::run(config, listener, shutdown.clone()));
    (db, addr, shutdown)
}

fn eur(amount_minor: i64) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency_code: "EUR".into(),
    })
}

fn authorize(key: &str, amount: i64, token: &str) -> AuthorizeRequest {
    AuthorizeRequest {
        idempotency_key: key.into(),
        order_id: "order-1".into(),
        amount: eur(amount),
        payment_token: token.into(),
    }
}

async fn ledger(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT operation FROM ledger ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_replay_and_move_no_money_and_reused_keys_are_refused() {
    let (db, addr, shutdown) = start().await;
    let mut gateway = GatewayServiceClient::connect(addr).await.unwrap();

    let first = gateway
        .authorize(authorize("authorize:1", 500, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.status(), AuthorizationStatus::Approved);
    let again = gateway
        .authorize(authorize("authorize:1", 500, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first, "a retry returns the original result");
    let reused = gateway
        .authorize(authorize("authorize:1", 900, "tok_visa"))
        .await
        .expect_err("other parameters");
    assert_eq!(reused.code(), Code::FailedPrecondition);

    let capture = |key: &str, amount| CaptureRequest {
        idempotency_key: key.into(),
        authorization_id: first.authorization_id.clone(),
        amount: eur(amount),
    };
    let too_much = gateway
        .capture(capture("capture:1", 501))
        .await
        .expect_err("more than authorized");
    assert_eq!(too_much.code(), Code::InvalidArgument);
    let captured = gateway.capture(capture("capture:1", 500)).await.unwrap().into_inner();
    let recaptured = gateway.capture(capture("capture:1", 500)).await.unwrap().into_inner();
    assert_eq!(captured, recaptured);
    let second_capture = gateway
        .capture(capture("capture:2", 500))
        .await
        .expect_err("already captured");
    assert_eq!(second_capture.code(), Code::FailedPrecondition);
    let void = VoidRequest {
        idempotency_key: "void:1".into(),
        authorization_id: first.authorization_id.clone(),
        ..VoidRequest::default()
    };
    assert_eq!(
        gateway
            .void(void)
            .await
            .expect_err("captured money is not voided")
            .code(),
        Code::FailedPrecondition
    );

    assert_eq!(ledger(&db).await, ["AUTHORIZE", "CAPTURE"], "retries moved no money");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_and_lost_replies_follow_the_faults() {
    let (db, addr, shutdown) = start().await;
    let mut gateway = GatewayServiceClient::connect(addr.clone()).await.unwrap();
    let mut admin = GatewayAdminServiceClient::connect(addr).await.unwrap();

    let declined = gateway
        .authorize(authorize("authorize:d", 500, "tok_decline"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(declined.status(), AuthorizationStatus::Declined);

    // A lost reply: the caller gives up, but the money moved; the retry gets the result.
    let lost = tokio::time::timeout(
        Duration::from_millis(300),
        gateway.authorize(authorize("authorize:t", 500, "tok_timeout")),
    );
    assert!(lost.await.is_err(), "the first reply does not come in time");
    assert_eq!(
        ledger(&db).await,
        ["DECLINE", "AUTHORIZE"],
        "the authorization happened"
    );
    let retried = gateway
        .authorize(authorize("authorize:t", 500, "tok_timeout"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.status(), AuthorizationStatus::Approved);
    assert_eq!(ledger(&db).await, ["DECLINE", "AUTHORIZE"], "and only once");

    // Faults change at run time.
    admin
        .set_faults(SetFaultsRequest {
            faults: Some(Faults {
                decline_rate: 1.0,
                ..Faults::default()
            }),
        })
        .await
        .unwrap();
    let all_declined = gateway
        .authorize(authorize("authorize:x", 500, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all_declined.status(), AuthorizationStatus::Declined);
    let invalid = admin
        .set_faults(SetFaultsRequest {
            faults: Some(Faults {
                decline_rate: 2.0,
                ..Faults::default()
            }),
        })
        .await;
    assert_eq!(invalid.expect_err("a rate above 1").code(), Code::InvalidArgument);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_the_gateway_cannot_take_is_invalid_argument_never_unavailable() {
    // UNAVAILABLE is retried by callers: a request refused for its data must not be.
    let (db, addr, shutdown) = start().await;
    let mut gateway = GatewayServiceClient::connect(addr).await.unwrap();
    let mut nul_currency = authorize("authorize:nul", 500, "tok_visa");
    nul_currency.amount = Some(Money {
        amount_minor: 500,
        currency_code: "E\0R".into(),
    });
    let mut invisible_token = authorize("authorize:bidi", 500, "tok\u{2067}visa");
    invisible_token.order_id = "order-2".into();
    let mut nul_order = authorize("authorize:nul-order", 500, "tok_visa");
    nul_order.order_id = "order\0".into();
    for request in [
        nul_currency,
        invisible_token,
        nul_order,
        authorize("authorize:neg", -1, "tok"),
    ] {
        let status = gateway.authorize(request.clone()).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
    }
    assert!(ledger(&db).await.is_empty());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_by_authorize_key_releases_what_the_key_made_or_closes_the_key() {
    let (db, addr, shutdown) = start().await;
    let mut gateway = GatewayServiceClient::connect(addr).await.unwrap();
    let void_by_key = |void_key: &str, authorize_key: &str| VoidRequest {
        idempotency_key: void_key.into(),
        authorize_idempotency_key: authorize_key.into(),
        ..VoidRequest::default()
    };

    // An authorization whose caller lost the reply: voided through its key.
    let made = gateway
        .authorize(authorize("authorize:lost", 700, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.status(), AuthorizationStatus::Approved);
    gateway.void(void_by_key("void:lost", "authorize:lost")).await.unwrap();
    gateway.void(void_by_key("void:lost", "authorize:lost")).await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM authorizations WHERE authorization_id = $1::uuid")
        .bind(&made.authorization_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "VOIDED");

    // A void before any authorization: the key is closed, a late authorize holds nothing.
    gateway
        .void(void_by_key("void:early", "authorize:early"))
        .await
        .unwrap();
    let late = gateway
        .authorize(authorize("authorize:early", 700, "tok_visa"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.status(), AuthorizationStatus::Declined);
    assert_eq!(late.decline_reason, "voided_before_authorization");

    let both = VoidRequest {
        authorization_id: made.authorization_id.clone(),
        ..void_by_key("void:both", "authorize:lost")
    };
    assert_eq!(gateway.void(both).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        ledger(&db).await,
        ["AUTHORIZE", "VOID"],
        "one authorization, released once"
    );
    shutdown.cancel();
}
