//! Transport security and identity on the real servers: TLS with the stack's CA, bearer
//! tokens on the order API (a customer places and reads only its own orders; existence of
//! other customers' orders does not leak), mutual TLS on the gateway's payment API, an
//! operator's token on its admin API, and servers that refuse to start insecure unless told.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use orderflow::gateway::v1::gateway_admin_service_client::GatewayAdminServiceClient;
use orderflow::gateway::v1::gateway_service_client::GatewayServiceClient;
use orderflow::gateway::v1::{AuthorizeRequest, GetFaultsRequest};
use orderflow::orders::v1 as api;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use orderflow_platform::auth::{Caller, Issuer};
use orderflow_platform::security::{ClientSecurity, ServerSecurityArgs};
use orderflow_tests::{fresh_db, fresh_orders_db, fresh_pki as pki, start_order_svc_with, valid_order, with_token};
use ordersctl::pki::Pki;
use tonic::Code;

fn server_security(pki: &Pki, name: &str, client_ca: bool) -> ServerSecurityArgs {
    let (cert, key) = pki.identity(name);
    ServerSecurityArgs {
        tls_cert: Some(cert),
        tls_key: Some(key),
        tls_client_ca: client_ca.then(|| pki.ca()),
        auth_public_key: Some(pki.verification_key()),
        insecure_plaintext: false,
        insecure_no_auth: false,
    }
}

fn issuer(pki: &Pki) -> Issuer {
    Issuer::from_private_pem(&std::fs::read(pki.signing_key()).unwrap()).unwrap()
}

async fn tls_channel(pki: &Pki, addr: &str, identity: Option<(PathBuf, PathBuf)>) -> tonic::transport::Channel {
    ClientSecurity {
        ca: Some(pki.ca()),
        identity,
    }
    .endpoint(addr)
    .unwrap()
    .connect()
    .await
    .unwrap()
}

/// A token with exactly `claims`, signed with the stack's token key (what the issuer would
/// never sign: an expired or not-yet-valid token).
fn signed_claims(pki: &Pki, claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(pki.signing_key()).unwrap()).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &key,
    )
    .unwrap()
}

/// Tokens the order service must refuse: expired, signed with another key, and claims
/// that were edited after signing.
fn bad_tokens(pki: &Pki) -> Vec<(&'static str, String)> {
    let good = issuer(pki)
        .issue(&Caller::Customer(42), Duration::from_secs(300))
        .unwrap();
    let other_key = self::pki();
    let foreign = issuer(&other_key)
        .issue(&Caller::Customer(42), Duration::from_secs(300))
        .unwrap();
    let expired = signed_claims(
        pki,
        serde_json::json!({
            "sub": "customer:42", "role": "customer", "iss": "orderflow-local", "aud": "orderflow",
            "iat": 1_700_000_000u64, "exp": 1_700_000_060u64,
        }),
    );
    // Valid, but not before ten minutes from now (far past the 5 s leeway).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let not_yet = signed_claims(
        pki,
        serde_json::json!({
            "sub": "customer:42", "role": "customer", "iss": "orderflow-local", "aud": "orderflow",
            "iat": now, "exp": now + 1_200, "nbf": now + 600,
        }),
    );
    // The same signature over other claims (customer 43 instead of 42).
    let tampered = {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let claims = String::from_utf8(engine.decode(&parts[1]).unwrap()).unwrap();
        parts[1] = engine.encode(claims.replace("customer:42", "customer:43"));
        parts.join(".")
    };
    let unsigned = {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.", engine.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1])
    };
    vec![
        ("expired", expired),
        ("not yet valid", not_yet),
        ("signed by another key", foreign),
        ("tampered", tampered),
        ("alg none", unsigned),
        ("garbage", "not-a-token".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_place_and_read_only_their_own_orders_over_tls() {
    let pki = pki();
    let db = fresh_orders_db().await;
    let security = server_security(&pki, "order-svc", false);
    let svc = start_order_svc_with(&db, "orders.events", |config| config.security = security).await;
    let addr = svc.addr.to_string();
    let mut client = OrderServiceClient::new(tls_channel(&pki, &addr, None).await);
    let tokens = issuer(&pki);
    let alice = tokens.issue(&Caller::Customer(42), Duration::from_secs(300)).unwrap();
    let bob = tokens.issue(&Caller::Customer(43), Duration::from_secs(300)).unwrap();
    let operator = tokens
        .issue(&Caller::Operator("ops".into()), Duration::from_secs(300))
        .unwrap();

    let placed = client
        .place_order(with_token(valid_order(42), &alice))
        .await
        .expect("a customer places its own order")
        .into_inner();
    let for_someone_else = client
        .place_order(with_token(valid_order(43), &alice))
        .await
        .unwrap_err();
    assert_eq!(for_someone_else.code(), Code::PermissionDenied);
    let by_operator = client
        .place_order(with_token(valid_order(42), &operator))
        .await
        .unwrap_err();
    assert_eq!(by_operator.code(), Code::PermissionDenied);

    let get = |order_id: String| api::GetOrderRequest { order_id };
    client
        .get_order(with_token(get(placed.order_id.clone()), &alice))
        .await
        .expect("the customer reads its order");
    client
        .get_order(with_token(get(placed.order_id.clone()), &operator))
        .await
        .expect("an operator reads any order");
    let others = client
        .get_order(with_token(get(placed.order_id.clone()), &bob))
        .await
        .unwrap_err();
    let missing_id = uuid::Uuid::now_v7().to_string();
    let missing = client
        .get_order(with_token(get(missing_id.clone()), &bob))
        .await
        .unwrap_err();
    assert_eq!(others.code(), Code::NotFound);
    assert_eq!(
        others.message().replace(&placed.order_id, "ID"),
        missing.message().replace(&missing_id, "ID"),
        "another customer's order looks exactly like a missing one"
    );

    let anonymous = client.place_order(valid_order(42)).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    for (why, token) in bad_tokens(&pki) {
        let refused = client
            .place_order(with_token(valid_order(42), &token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{why}");
    }

    // Health answers over TLS without a token (probes carry none).
    let mut health = tonic_health::pb::health_client::HealthClient::new(tls_channel(&pki, &addr, None).await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no token");
    // A plaintext client gets nowhere.
    let plaintext = async {
        let mut client = OrderServiceClient::connect(format!("http://{addr}")).await?;
        client.place_order(with_token(valid_order(42), &alice)).await?;
        anyhow::Ok(())
    };
    assert!(plaintext.await.is_err(), "a plaintext call to a TLS server must fail");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_certificate_or_token_key_refuses_to_start_unless_told() {
    let db = fresh_orders_db().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = None;
    let _ = start_order_svc_with(&db, "orders.events", |c| {
        config = Some(c.clone());
    })
    .await
    .stop()
    .await;
    let mut config = config.unwrap();
    config.security = ServerSecurityArgs::default();
    let error = order_svc::run(config.clone(), listener, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("no certificate and no INSECURE_PLAINTEXT");
    assert!(error.to_string().contains("INSECURE_PLAINTEXT"), "{error:#}");
    config.security = ServerSecurityArgs {
        insecure_plaintext: true,
        ..ServerSecurityArgs::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = order_svc::run(config, listener, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("no token key and no INSECURE_NO_AUTH");
    assert!(error.to_string().contains("INSECURE_NO_AUTH"), "{error:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_moves_money_only_for_a_client_certificate_and_takes_faults_only_from_an_operator() {
    let pki = pki();
    let db = fresh_db(&gateway_sim::MIGRATOR).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = orderflow_tests::gateway_config(
        listener.local_addr().unwrap(),
        &db,
        orderflow::gateway::v1::Faults::default(),
        server_security(&pki, "gateway-sim", true),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(gateway_sim::run(config, listener, shutdown.clone()));

    let authorize = AuthorizeRequest {
        idempotency_key: "authorize:tls".into(),
        order_id: "order-tls".into(),
        amount: valid_order(1).total,
        payment_token: "tok_visa".into(),
    };
    let mut anonymous = GatewayServiceClient::new(tls_channel(&pki, &addr, None).await);
    let refused = anonymous.authorize(authorize.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut payment_svc = GatewayServiceClient::new(tls_channel(&pki, &addr, Some(pki.identity("payment-svc"))).await);
    payment_svc
        .authorize(authorize)
        .await
        .expect("payment-svc's certificate opens the payment API");

    let tokens = issuer(&pki);
    let customer = tokens.issue(&Caller::Customer(1), Duration::from_secs(60)).unwrap();
    let operator = tokens
        .issue(&Caller::Operator("ops".into()), Duration::from_secs(60))
        .unwrap();
    let mut admin = GatewayAdminServiceClient::new(tls_channel(&pki, &addr, None).await);
    assert_eq!(
        admin.get_faults(GetFaultsRequest {}).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        admin
            .get_faults(with_token(GetFaultsRequest {}, &customer))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    admin
        .get_faults(with_token(GetFaultsRequest {}, &operator))
        .await
        .expect("an operator reads the faults");
    shutdown.cancel();
}
