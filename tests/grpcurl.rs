//! End to end with the client our users reach for first: grpcurl, with no proto files
//! (server reflection), against a running order service on the real Postgres.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use orderflow_tests::{count, fresh_orders_db, start_order_svc};

async fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new("grpcurl")
        .args(args)
        .output()
        .await
        .expect("grpcurl is on PATH (scripts/stack install puts it there)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_checks_health_places_and_gets_an_order() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let addr = svc.addr.to_string();

    let (ok, listed, err) = grpcurl(&["-plaintext", &addr, "list"]).await;
    assert!(ok, "{err}");
    for service in ["orderflow.orders.v1.OrderService", "grpc.health.v1.Health"] {
        assert!(
            listed.lines().any(|l| l.trim() == service),
            "reflection lists {service}: {listed}"
        );
    }

    let (ok, health, err) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]).await;
    assert!(ok, "{err}");
    assert!(health.contains("SERVING"), "{health}");

    let request_id = uuid::Uuid::now_v7().to_string();
    let body = serde_json::json!({
        "request_id": request_id,
        "customer_id": 42,
        "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price": {"amount_minor": 1250, "currency_code": "EUR"}}],
        "total": {"amount_minor": 2500, "currency_code": "EUR"},
        "payment_token": "tok_visa"
    })
    .to_string();
    let place = [
        "-plaintext",
        "-d",
        body.as_str(),
        addr.as_str(),
        "orderflow.orders.v1.OrderService/PlaceOrder",
    ];
    let (ok, placed, err) = grpcurl(&place).await;
    assert!(ok, "{err}");
    let placed: serde_json::Value = serde_json::from_str(&placed).expect("grpcurl prints JSON");
    assert_eq!(placed["status"], "ORDER_STATUS_PENDING");
    let order_id = placed["orderId"].as_str().expect("orderId").to_owned();

    // The same call again is an idempotent replay.
    let (ok, replayed, err) = grpcurl(&place).await;
    assert!(ok, "{err}");
    let replayed: serde_json::Value = serde_json::from_str(&replayed).unwrap();
    assert_eq!(replayed["orderId"], order_id.as_str());
    assert_eq!(count(&db, "orders").await, 1);

    let get = serde_json::json!({ "order_id": order_id }).to_string();
    let (ok, got, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &get,
        &addr,
        "orderflow.orders.v1.OrderService/GetOrder",
    ])
    .await;
    assert!(ok, "{err}");
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["order"]["status"], "ORDER_STATUS_PENDING");
    assert_eq!(got["order"]["sagaState"], "SAGA_STATE_AWAITING_PAYMENT");
    assert_eq!(
        got["order"]["total"]["amountMinor"], "2500",
        "int64 is a string in JSON"
    );

    // A bad request is INVALID_ARGUMENT with the field named.
    let bad = r#"{"customer_id": 0}"#;
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        bad,
        &addr,
        "orderflow.orders.v1.OrderService/PlaceOrder",
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("InvalidArgument") && err.contains("customer_id"), "{err}");
    // Its google.rpc.BadRequest detail is decoded (reflection serves error_details.proto),
    // not "google.rpc.BadRequest is not recognized".
    assert!(
        err.contains("fieldViolations") && !err.contains("not recognized"),
        "{err}"
    );
    assert_eq!(count(&db, "orders").await, 1);
    svc.stop().await;
}
