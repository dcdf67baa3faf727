//! What a client sees at the gRPC edge, whichever part of the server refused its call: the
//! codes the contract lists (never INTERNAL for the client's own bytes), violations it can
//! read, a deadline answered as DEADLINE_EXCEEDED, and reflection that describes only what
//! this server serves.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use orderflow::orders::v1 as api;
use orderflow_tests::{count, fresh_orders_db, start_order_svc, start_order_svc_with, valid_order};
use tonic::Code;
use tonic_types::StatusExt as _;

/// A plaintext channel to a server of the test.
async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A message whose field 1 is a number where PlaceOrderRequest has a string: bytes that are
/// valid protobuf but not a PlaceOrderRequest.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAPlaceOrder {
    #[prost(int64, tag = "1")]
    request_id: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_the_message_is_invalid_argument() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut grpc = tonic::client::Grpc::new(channel(svc.addr).await);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(NotAPlaceOrder { request_id: 7 }),
            http::uri::PathAndQuery::from_static("/orderflow.orders.v1.OrderService/PlaceOrder"),
            tonic_prost::ProstCodec::<NotAPlaceOrder, api::PlaceOrderResponse>::default(),
        )
        .await
        .expect_err("not a PlaceOrderRequest");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(count(&db, "orders").await, 0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_resource_exhausted() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let request = api::PlaceOrderRequest {
        payment_token: "t".repeat(100_000),
        ..valid_order(1)
    };
    let status = svc
        .client()
        .await
        .place_order(request)
        .await
        .expect_err("over the decoding limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_bad_items_are_reported_in_metadata_any_client_accepts() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut request = valid_order(1);
    let bad_item = api::OrderItem {
        sku: "\u{2067}".repeat(64),
        quantity: -1,
        unit_price: Some(api::Money {
            amount_minor: -1,
            currency_code: "E\0R".into(),
        }),
    };
    request.items = vec![bad_item; 100];
    let status = svc.client().await.place_order(request).await.expect_err("invalid");
    assert_eq!(status.code(), Code::InvalidArgument);
    let metadata: usize = status
        .metadata()
        .clone()
        .into_headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum::<usize>()
        + status.message().len()
        + status.details().len() * 4 / 3;
    assert!(metadata < 8 * 1024, "{metadata} bytes of error metadata");
    let violations = status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations;
    assert_eq!(violations.len(), 20, "the first 19 and a count of the rest");
    assert!(
        violations[19].description.contains("more violations"),
        "{:?}",
        violations[19]
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_server_deadline_is_deadline_exceeded() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc_with(&db, "orders.events", |config| config.request_timeout_ms = 300).await;
    // The orders table is locked: PlaceOrder waits for it past the server's deadline.
    let mut lock = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let status = svc
        .client()
        .await
        .place_order(valid_order(1))
        .await
        .expect_err("the table stays locked");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    lock.rollback().await.unwrap();
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_order_api_and_nothing_the_server_does_not_serve() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = ServerReflectionClient::new(channel(svc.addr).await);
    let ask = |request: MessageRequest| {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        }])
    };
    let mut replies = client
        .server_reflection_info(ask(MessageRequest::ListServices(String::new())))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("a list of services")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"orderflow.orders.v1.OrderService".to_owned()),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("gateway")), "{names:?}");
    // Not even by name.
    let mut replies = client
        .server_reflection_info(ask(MessageRequest::FileContainingSymbol(
            "orderflow.gateway.v1.GatewayAdminService".into(),
        )))
        .await
        .unwrap()
        .into_inner();
    match replies.message().await {
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        Ok(reply) => {
            let reply = reply.and_then(|r| r.message_response);
            assert!(
                matches!(reply, Some(MessageResponse::ErrorResponse(_))),
                "the admin API is unknown here: {reply:?}"
            );
        }
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_traceparent_is_continued_by_the_order_and_its_event() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let _telemetry = orderflow_platform::telemetry::init("orderflow-tests", &Default::default());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(valid_order(1));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    svc.client().await.place_order(request).await.unwrap();
    let traceparent: String = sqlx::query_scalar("SELECT traceparent FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        orderflow_platform::telemetry::trace_id_of(&traceparent),
        Some(trace_id),
        "{traceparent}"
    );
    svc.stop().await;
}
