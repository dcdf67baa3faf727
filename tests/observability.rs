//! Observability on the real stack: after one order went through the saga, the Prometheus
//! endpoint shows every metric an operator needs (this test binary owns the process-wide
//! recorder, so it runs alone in its process).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use orderflow::orders::v1 as api;
use orderflow_tests::saga::{Saga, SagaOptions};
use orderflow_tests::{eventually, valid_order};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_cover_every_hop_and_each_order_is_one_trace_across_services() {
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    orderflow_platform::telemetry::install_metrics(addr).expect("install the recorder");
    // The same tracing setup as every binary (no OTLP endpoint: ids only, nothing exported).
    let _telemetry = orderflow_platform::telemetry::init("orderflow-tests", &Default::default());
    let saga = Saga::start(SagaOptions::default()).await;
    let request = api::PlaceOrderRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        ..valid_order(3)
    };
    saga.client().await.place_order(request).await.unwrap();
    let bad = api::PlaceOrderRequest {
        customer_id: 0,
        ..valid_order(3)
    };
    saga.client().await.place_order(bad).await.expect_err("invalid");
    // Refused by the codec, before any handler: counted all the same.
    let oversized = api::PlaceOrderRequest {
        payment_token: "t".repeat(100_000),
        ..valid_order(3)
    };
    saga.client().await.place_order(oversized).await.expect_err("too large");
    assert!(saga.settled(Duration::from_secs(60)).await);

    let expected = [
        r#"orderflow_grpc_requests_total{method="PlaceOrder",code="Ok"} 1"#,
        r#"orderflow_grpc_requests_total{method="PlaceOrder",code="InvalidArgument"} 1"#,
        r#"orderflow_grpc_requests_total{method="PlaceOrder",code="ResourceExhausted"} 1"#,
        "orderflow_grpc_request_duration_seconds_bucket",
        "orderflow_relay_lag_seconds_bucket",
        "orderflow_relay_published_total",
        "orderflow_outbox_pending_rows",
        "orderflow_outbox_oldest_pending_seconds",
        // Each consumer counts its dead-letter topics at start, then every 30 s.
        "orderflow_dead_letter_messages{topic=",
        r#"outcome="processed""#,
        "orderflow_saga_completion_seconds_bucket{status=\"CONFIRMED\"",
        r#"orderflow_gateway_call_duration_seconds_bucket{operation="authorize",outcome="ok""#,
        "orderflow_read_model_lag_seconds_bucket",
        // librdkafka's statistics arrive every 5 s
        "orderflow_consumer_lag_messages",
    ];
    let complete = eventually(Duration::from_secs(20), || async {
        let text = scrape(addr).await;
        expected.iter().all(|name| text.contains(name))
    })
    .await;
    let text = scrape(addr).await;
    let missing: Vec<_> = expected.iter().filter(|name| !text.contains(*name)).collect();
    assert!(complete, "missing {missing:?} in:\n{text}");

    // One trace per order: every event of the order, in both services, carries the trace id
    // of the PlaceOrder call, each from its own span.
    let placed: Vec<(String, String)> =
        sqlx::query_as("SELECT event_type, traceparent FROM outbox WHERE traceparent IS NOT NULL ORDER BY id")
            .fetch_all(&saga.orders.pool)
            .await
            .unwrap();
    let paid: Vec<(String, String)> =
        sqlx::query_as("SELECT event_type, traceparent FROM outbox WHERE traceparent IS NOT NULL ORDER BY id")
            .fetch_all(&saga.payments.pool)
            .await
            .unwrap();
    let chain: Vec<&(String, String)> = placed.iter().chain(paid.iter()).collect();
    let types: Vec<&str> = chain
        .iter()
        .map(|(t, _)| t.trim_start_matches("orderflow.events.v1."))
        .collect();
    assert_eq!(
        types,
        ["OrderPlaced", "OrderConfirmed", "PaymentAuthorized", "PaymentCaptured"],
        "every event has a traceparent"
    );
    let trace_ids: std::collections::HashSet<&str> = chain
        .iter()
        .map(|(_, tp)| orderflow_platform::telemetry::trace_id_of(tp).expect("W3C traceparent"))
        .collect();
    assert_eq!(trace_ids.len(), 1, "one trace across both services: {chain:?}");
    let span_ids: std::collections::HashSet<&str> = chain.iter().map(|(_, tp)| tp.split('-').nth(2).unwrap()).collect();
    assert_eq!(span_ids.len(), 4, "each event from its own span: {chain:?}");
    // The Kafka record carries the order's trace as a header: the relay's publication span,
    // a child of the span that wrote the event, so consumers continue from the publication.
    let records = orderflow_tests::read_topic(
        &orderflow_tests::stack().kafka,
        &saga.orders_topic,
        Duration::from_secs(10),
        |r| r.len() >= 2,
    )
    .await;
    for record in &records {
        let header = record.headers.get("traceparent").expect("traceparent header");
        let trace_id = orderflow_platform::telemetry::trace_id_of(header).expect("W3C traceparent");
        assert!(
            placed
                .iter()
                .any(|(_, tp)| orderflow_platform::telemetry::trace_id_of(tp) == Some(trace_id)),
            "header {header} continues the order's trace"
        );
        assert!(
            placed.iter().all(|(_, tp)| tp != header),
            "header {header} names the relay's span, not the writer's"
        );
    }

    // An order the sweeper cancels continues the trace of its PlaceOrder call too.
    let mut saga = saga;
    saga.stop_payment_svc().await;
    let overdue = saga.place(4, "tok_visa").await;
    let cancelled = order_svc::saga::sweep_once(
        &saga.orders.pool,
        &saga.orders_topic,
        &orderflow_platform::outbox::Outbox::new(Default::default(), orderflow_tests::event_keys().order_svc.clone()),
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(cancelled, 1);
    let events: Vec<(String, String)> =
        sqlx::query_as("SELECT event_type, traceparent FROM outbox WHERE partition_key = $1 ORDER BY id")
            .bind(&overdue)
            .fetch_all(&saga.orders.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    let ids: Vec<&str> = events
        .iter()
        .map(|(_, tp)| orderflow_platform::telemetry::trace_id_of(tp).unwrap())
        .collect();
    assert_eq!(
        ids[0], ids[1],
        "the sweeper's OrderCancelled is in the order's trace: {events:?}"
    );
    saga.stop().await;
}
