//! PlaceOrder and GetOrder against a real Postgres: the order and its outbox event in one
//! transaction, idempotency keys (including 20 concurrent retries), and validation that
//! refuses bad requests without writing anything.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use orderflow::envelope;
use orderflow::events::v1::event_envelope::Payload;
use orderflow::orders::v1 as api;
use orderflow_tests::{TestDb, count, fresh_orders_db, start_order_svc, valid_order};
use tonic::Code;
use tonic_types::StatusExt as _;

fn new_key() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn assert_nothing_written(db: &TestDb) {
    for table in ["orders", "order_items", "outbox", "idempotency_keys"] {
        assert_eq!(count(db, table).await, 0, "{table} must stay empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placed_order_is_one_orders_row_and_one_outbox_row_from_one_transaction() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;

    let request = api::PlaceOrderRequest {
        request_id: new_key(),
        ..valid_order(42)
    };
    let response = client
        .place_order(request.clone())
        .await
        .expect("a valid order is accepted")
        .into_inner();
    assert_eq!(response.status(), api::OrderStatus::Pending);
    let order_id = uuid::Uuid::parse_str(&response.order_id).expect("the order id is a UUID");
    assert_eq!(order_id.get_version_num(), 7, "order ids are UUIDv7");

    assert_eq!(count(&db, "orders").await, 1);
    assert_eq!(count(&db, "order_items").await, 2);
    assert_eq!(count(&db, "outbox").await, 1);
    // Same transaction: both rows carry the id of the transaction that wrote them.
    let (same_transaction, topic, key, published): (bool, String, String, bool) = sqlx::query_as(
        "SELECT o.xmin::text = ob.xmin::text, ob.topic, ob.partition_key, ob.published_at IS NOT NULL
         FROM orders o, outbox ob WHERE o.order_id = $1",
    )
    .bind(order_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(same_transaction, "the order and its event must commit together");
    assert_eq!(
        (topic.as_str(), key.as_str(), published),
        ("orders.events", response.order_id.as_str(), false)
    );

    let (status, saga_state, version): (String, String, i64) =
        sqlx::query_as("SELECT status, saga_state, version FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), saga_state.as_str(), version),
        ("PENDING", "AWAITING_PAYMENT", 0)
    );

    // The stored event is the OrderPlaced envelope of this order.
    let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let event = envelope::open(&payload).expect("the outbox holds a valid envelope");
    assert_eq!(event.aggregate_id, order_id);
    assert_eq!(event.correlation_id.to_string(), response.correlation_id);
    assert_eq!(event.causation_id, None);
    let Payload::OrderPlaced(placed) = event.payload else {
        panic!("expected OrderPlaced, got {:?}", event.payload)
    };
    assert_eq!(placed.order_id, response.order_id);
    assert_eq!(placed.customer_id, 42);
    assert_eq!(placed.items, request.items);
    assert_eq!(placed.total, request.total);
    assert_eq!(placed.payment_token, "tok_visa");

    // GetOrder reads it back.
    let order = client
        .get_order(api::GetOrderRequest {
            order_id: response.order_id.clone(),
        })
        .await
        .expect("the order exists")
        .into_inner()
        .order
        .expect("an order");
    assert_eq!(order.status(), api::OrderStatus::Pending);
    assert_eq!(order.saga_state(), api::SagaState::AwaitingPayment);
    assert_eq!(order.items, request.items);
    assert_eq!(order.total, request.total);
    assert_eq!(order.correlation_id, response.correlation_id);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_returns_the_original_response_and_writes_nothing() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    let request = api::PlaceOrderRequest {
        request_id: new_key(),
        ..valid_order(7)
    };

    let first = client.place_order(request.clone()).await.unwrap().into_inner();
    let second = client
        .place_order(request.clone())
        .await
        .expect("a retry succeeds")
        .into_inner();
    assert_eq!(first, second, "same order id, status and correlation id");
    assert_eq!(count(&db, "orders").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);

    // Another key is another order.
    let other = client
        .place_order(api::PlaceOrderRequest {
            request_id: new_key(),
            ..request.clone()
        })
        .await
        .unwrap();
    assert_ne!(other.into_inner().order_id, first.order_id);
    // No key: no protection, a new order each time.
    let keyless = api::PlaceOrderRequest {
        request_id: String::new(),
        ..request
    };
    let a = client.place_order(keyless.clone()).await.unwrap().into_inner();
    let b = client.place_order(keyless).await.unwrap().into_inner();
    assert_ne!(a.order_id, b.order_id);
    assert_eq!(count(&db, "orders").await, 4);
    assert_eq!(count(&db, "outbox").await, 4);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_a_different_request_is_a_failed_precondition() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    let key = new_key();
    client
        .place_order(api::PlaceOrderRequest {
            request_id: key.clone(),
            ..valid_order(7)
        })
        .await
        .unwrap();

    let different = api::PlaceOrderRequest {
        request_id: key,
        ..valid_order(8)
    };
    let status = client
        .place_order(different)
        .await
        .expect_err("a reused key with another request is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("request_id"), "{status:?}");
    assert_eq!(count(&db, "orders").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_calls_with_one_key_create_exactly_one_order() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let request = api::PlaceOrderRequest {
        request_id: new_key(),
        ..valid_order(99)
    };

    let mut calls = Vec::new();
    for _ in 0..50 {
        // One connection each, so the calls really race on the server (in one batch of the
        // group commit, or in several).
        let mut client = svc.client().await;
        let request = request.clone();
        calls.push(tokio::spawn(async move { client.place_order(request).await }));
    }
    let mut order_ids = std::collections::HashSet::new();
    for call in calls {
        let response = call.await.unwrap().expect("every racing retry succeeds").into_inner();
        order_ids.insert(response.order_id);
    }
    assert_eq!(order_ids.len(), 1, "every caller sees the same order: {order_ids:?}");
    assert_eq!(count(&db, "orders").await, 1);
    assert_eq!(count(&db, "outbox").await, 1);
    assert_eq!(count(&db, "idempotency_keys").await, 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_a_transaction_and_a_bad_one_fails_alone() {
    let db = fresh_orders_db().await;
    // A fault at the database that refuses one customer's orders (a trigger an operator got
    // wrong): any transaction holding one of them fails.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_666() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.customer_id = 666 THEN RAISE EXCEPTION 'refused by a broken trigger'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_666 BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION refuse_666();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let svc = start_order_svc(&db, "orders.events").await;
    let taken = new_key();
    svc.client()
        .await
        .place_order(api::PlaceOrderRequest {
            request_id: taken.clone(),
            ..valid_order(7)
        })
        .await
        .unwrap();

    // 60 calls at once over 10 connections: 50 good ones, 5 of the refused customer, 5 that
    // reuse a key with another request.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(svc.client().await);
    }
    let mut calls = Vec::new();
    for n in 0..60 {
        let request = match n % 12 {
            3 => api::PlaceOrderRequest {
                request_id: new_key(),
                ..valid_order(666)
            },
            9 => api::PlaceOrderRequest {
                request_id: taken.clone(),
                ..valid_order(8)
            },
            _ => api::PlaceOrderRequest {
                request_id: new_key(),
                ..valid_order(1_000 + n)
            },
        };
        let mut client = clients[usize::try_from(n).unwrap() % clients.len()].clone();
        calls.push(tokio::spawn(async move {
            (request.customer_id, client.place_order(request).await)
        }));
    }
    let mut answers: std::collections::BTreeMap<(i64, String), usize> = Default::default();
    for call in calls {
        let (customer, result) = call.await.unwrap();
        let code = match result {
            Ok(_) => "ok".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        let kind = match customer {
            666 => 666,
            8 => 8,
            _ => 0,
        };
        *answers.entry((kind, code)).or_default() += 1;
    }
    assert_eq!(
        answers,
        [
            ((0, "ok".to_owned()), 50),
            ((8, "FailedPrecondition".to_owned()), 5),
            ((666, "Internal".to_owned()), 5),
        ]
        .into_iter()
        .collect(),
        "each bad call failed alone, every good one was placed"
    );
    assert_eq!(count(&db, "orders").await, 51);
    assert_eq!(count(&db, "outbox").await, 51);
    // Rows inserted by one transaction share its xmin: calls were committed together.
    let largest_batch: i64 =
        sqlx::query_scalar("SELECT max(n) FROM (SELECT count(*) AS n FROM orders GROUP BY xmin::text) b")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(largest_batch > 1, "concurrent calls shared a transaction");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_kept_for_at_least_24_hours() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    client
        .place_order(api::PlaceOrderRequest {
            request_id: new_key(),
            ..valid_order(1)
        })
        .await
        .unwrap();
    let kept_for_hours: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM expires_at - created_at)::float8 / 3600 FROM idempotency_keys")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(kept_for_hours >= 24.0, "kept for {kept_for_hours} h");
    svc.stop().await;
}

/// A request that must be refused, the field the refusal must name, and why.
struct Invalid {
    why: &'static str,
    field: &'static str,
    request: api::PlaceOrderRequest,
}

fn invalid_requests() -> Vec<Invalid> {
    let base = valid_order(5);
    let eur = |amount_minor| {
        Some(api::Money {
            amount_minor,
            currency_code: "EUR".into(),
        })
    };
    let with_item = |change: &dyn Fn(&mut api::OrderItem)| {
        let mut request = valid_order(5);
        change(&mut request.items[0]);
        request
    };
    vec![
        Invalid {
            why: "missing customer id",
            field: "customer_id",
            request: api::PlaceOrderRequest {
                customer_id: 0,
                ..base.clone()
            },
        },
        Invalid {
            why: "negative customer id",
            field: "customer_id",
            request: api::PlaceOrderRequest {
                customer_id: -1,
                ..base.clone()
            },
        },
        Invalid {
            why: "no items",
            field: "items",
            request: api::PlaceOrderRequest {
                items: vec![],
                ..base.clone()
            },
        },
        Invalid {
            why: "too many items",
            field: "items",
            request: api::PlaceOrderRequest {
                items: vec![base.items[1].clone(); 101],
                total: eur(101 * 500),
                ..base.clone()
            },
        },
        Invalid {
            why: "zero quantity",
            field: "items[0].quantity",
            request: with_item(&|i| i.quantity = 0),
        },
        Invalid {
            why: "negative quantity",
            field: "items[0].quantity",
            request: with_item(&|i| i.quantity = -2),
        },
        Invalid {
            why: "zero unit price",
            field: "items[0].unit_price.amount_minor",
            request: with_item(&|i| i.unit_price = eur(0)),
        },
        Invalid {
            why: "negative unit price",
            field: "items[0].unit_price.amount_minor",
            request: with_item(&|i| i.unit_price = eur(-1)),
        },
        Invalid {
            why: "missing unit price",
            field: "items[0].unit_price",
            request: with_item(&|i| i.unit_price = None),
        },
        Invalid {
            why: "overflowing total",
            field: "total.amount_minor",
            request: api::PlaceOrderRequest {
                items: vec![api::OrderItem {
                    sku: "X".into(),
                    quantity: 1_000,
                    unit_price: eur(i64::MAX / 100),
                }],
                total: eur(1),
                ..base.clone()
            },
        },
        Invalid {
            why: "total not the sum",
            field: "total.amount_minor",
            request: api::PlaceOrderRequest {
                total: eur(4_251),
                ..base.clone()
            },
        },
        Invalid {
            why: "missing total",
            field: "total",
            request: api::PlaceOrderRequest {
                total: None,
                ..base.clone()
            },
        },
        Invalid {
            why: "unknown currency",
            field: "total.currency_code",
            request: api::PlaceOrderRequest {
                total: Some(api::Money {
                    amount_minor: 4_250,
                    currency_code: "XYZ".into(),
                }),
                ..base.clone()
            },
        },
        Invalid {
            why: "lower-case currency",
            field: "items[0].unit_price.currency_code",
            request: with_item(&|i| {
                i.unit_price = Some(api::Money {
                    amount_minor: 1_250,
                    currency_code: "eur".into(),
                })
            }),
        },
        Invalid {
            why: "mixed currencies",
            field: "items[1].unit_price.currency_code",
            request: {
                let mut r = base.clone();
                r.items[1].unit_price = Some(api::Money {
                    amount_minor: 500,
                    currency_code: "USD".into(),
                });
                r
            },
        },
        Invalid {
            why: "oversized sku",
            field: "items[0].sku",
            request: with_item(&|i| i.sku = "S".repeat(65)),
        },
        Invalid {
            why: "empty sku",
            field: "items[0].sku",
            request: with_item(&|i| i.sku = String::new()),
        },
        Invalid {
            why: "control character in sku",
            field: "items[0].sku",
            request: with_item(&|i| i.sku = "BOOK\u{7}1".into()),
        },
        Invalid {
            why: "missing payment token",
            field: "payment_token",
            request: api::PlaceOrderRequest {
                payment_token: String::new(),
                ..base.clone()
            },
        },
        Invalid {
            why: "oversized payment token",
            field: "payment_token",
            request: api::PlaceOrderRequest {
                payment_token: "t".repeat(129),
                ..base.clone()
            },
        },
        Invalid {
            why: "newline in payment token",
            field: "payment_token",
            request: api::PlaceOrderRequest {
                payment_token: "tok\nvisa".into(),
                ..base.clone()
            },
        },
        Invalid {
            why: "request id not a UUID",
            field: "request_id",
            request: api::PlaceOrderRequest {
                request_id: "retry-1".into(),
                ..base.clone()
            },
        },
        Invalid {
            why: "oversized request id",
            field: "request_id",
            request: api::PlaceOrderRequest {
                request_id: "r".repeat(1_000),
                ..base
            },
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_request_is_invalid_argument_naming_the_field_and_writes_nothing() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    for case in invalid_requests() {
        let status = client.place_order(case.request).await.expect_err(case.why);
        assert_eq!(status.code(), Code::InvalidArgument, "{}: {status:?}", case.why);
        let details = status.get_error_details();
        let bad_request = details
            .bad_request()
            .unwrap_or_else(|| panic!("{}: no BadRequest detail in {status:?}", case.why));
        let fields: Vec<&str> = bad_request.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert!(
            fields.contains(&case.field),
            "{}: expected a violation of {}, got {fields:?}",
            case.why,
            case.field
        );
        assert!(
            !status.message().to_lowercase().contains("sql"),
            "{}: {}",
            case.why,
            status.message()
        );
    }
    assert_nothing_written(&db).await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_violations_of_a_request_are_reported_at_once() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    let request = api::PlaceOrderRequest {
        customer_id: 0,
        payment_token: String::new(),
        items: vec![api::OrderItem {
            sku: String::new(),
            quantity: 0,
            unit_price: None,
        }],
        ..valid_order(1)
    };
    let status = client.place_order(request).await.expect_err("invalid");
    let details = status.get_error_details();
    let mut fields: Vec<String> = details
        .bad_request()
        .expect("BadRequest")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "customer_id",
            "items[0].quantity",
            "items[0].sku",
            "items[0].unit_price",
            "payment_token"
        ]
    );
    assert_nothing_written(&db).await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_before_it_is_decoded() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    let request = api::PlaceOrderRequest {
        payment_token: "t".repeat(100_000),
        ..valid_order(1)
    };
    let status = client.place_order(request).await.expect_err("over the decoding limit");
    assert_ne!(status.code(), Code::Ok);
    assert_nothing_written(&db).await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_order_answers_not_found_and_invalid_argument() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    let missing = client
        .get_order(api::GetOrderRequest {
            order_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("no such order");
    assert_eq!(missing.code(), Code::NotFound);
    for bad in ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"] {
        let status = client
            .get_order(api::GetOrderRequest { order_id: bad.into() })
            .await
            .expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sweepers_at_once_cancel_each_overdue_order_exactly_once() {
    let db = fresh_orders_db().await;
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    for customer in 1..=30 {
        client.place_order(valid_order(customer)).await.unwrap();
    }
    svc.stop().await;
    // Deadline zero: every order is overdue. Two sweepers race over the same orders.
    let deadline = std::time::Duration::ZERO;
    let outbox =
        orderflow_platform::outbox::Outbox::new(Default::default(), orderflow_tests::event_keys().order_svc.clone());
    let (a, b, c) = tokio::join!(
        order_svc::saga::sweep_once(&db.pool, "orders.events", &outbox, deadline),
        order_svc::saga::sweep_once(&db.pool, "orders.events", &outbox, deadline),
        order_svc::saga::sweep_once(&db.pool, "orders.events", &outbox, deadline),
    );
    let cancelled = a.unwrap() + b.unwrap() + c.unwrap();
    assert_eq!(cancelled, 30, "each order cancelled by exactly one sweeper");
    let (orders, versions_ok, cancellations): (i64, bool, i64) = sqlx::query_as(
        "SELECT count(*), bool_and(version = 1 AND status = 'CANCELLED' AND cancellation_reason = 'PAYMENT_TIMEOUT'),
                (SELECT count(*) FROM outbox WHERE event_type = 'orderflow.events.v1.OrderCancelled')
         FROM orders",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (orders, versions_ok, cancellations),
        (30, true, 30),
        "one transition and one OrderCancelled per order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_deletes_only_what_is_past_its_retention_in_batches() {
    use orderflow_platform::housekeeping;
    use std::time::Duration;
    let db = fresh_orders_db().await;
    // 1,200 outbox rows published two hours ago (more than two batches), 10 published just
    // now, 5 never published; old and new inbox rows of two consumers; expired and live keys.
    sqlx::query(
        "INSERT INTO outbox (message_id, topic, partition_key, event_type, schema_version, payload, published_at)
         SELECT gen_random_uuid(), 't', 'k', 'e', 1, '', CASE WHEN n <= 1200 THEN now() - interval '2 hours'
                                                             WHEN n <= 1210 THEN now() END
         FROM generate_series(1, 1215) AS n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let svc = start_order_svc(&db, "orders.events").await;
    let mut client = svc.client().await;
    for customer in 1..=3 {
        let request = api::PlaceOrderRequest {
            request_id: new_key(),
            ..valid_order(customer)
        };
        client.place_order(request).await.unwrap();
    }
    // (The service's own housekeeping ran while it was up; these rows come after it stopped.)
    svc.stop().await;
    sqlx::query(
        "INSERT INTO inbox (consumer, message_id, processed_at)
         SELECT c, gen_random_uuid(), CASE WHEN n % 2 = 0 THEN now() - interval '8 days' ELSE now() END
         FROM generate_series(1, 100) AS n, unnest(ARRAY['order', 'projector']) AS c",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Two keys made to look expired: as the table's owner, past the trigger that keeps a live
    // key from any change (which is what it is for).
    sqlx::raw_sql(
        "BEGIN;
         ALTER TABLE idempotency_keys DISABLE TRIGGER live_idempotency_keys_are_immutable;
         UPDATE idempotency_keys SET expires_at = now() - interval '1 minute'
         WHERE ctid IN (SELECT ctid FROM idempotency_keys LIMIT 2);
         ALTER TABLE idempotency_keys ENABLE TRIGGER live_idempotency_keys_are_immutable;
         COMMIT;",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let outbox = housekeeping::purge(&db.pool, &housekeeping::published_outbox(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(outbox, 1_200, "only rows published longer ago than the retention");
    let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(unpublished, 5 + 3, "unpublished rows are never deleted");
    assert_eq!(count(&db, "outbox").await, 10 + 5 + 3);

    let inbox = housekeeping::purge(&db.pool, &housekeeping::inbox("order", Duration::from_secs(7 * 86_400)))
        .await
        .unwrap();
    assert_eq!(inbox, 50, "only this consumer's rows older than the window");
    assert_eq!(count(&db, "inbox").await, 150);

    let keys = housekeeping::purge(&db.pool, &order_svc::expired_request_ids())
        .await
        .unwrap();
    assert_eq!(keys, 2);
    assert_eq!(count(&db, "idempotency_keys").await, 1);
}

async fn health_of(addr: std::net::SocketAddr) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: "orderflow.orders.v1.OrderService".into(),
    };
    health.check(request).await.unwrap().into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_and_not_the_broker() {
    use orderflow_tests::{eventually, stack, start_order_svc_with};
    use std::time::Duration;
    const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let wait = Duration::from_secs(20);

    // A broker address where nothing listens: SERVING all the same, and PlaceOrder works: the
    // outbox exists so that orders are taken while Kafka is away.
    let db = fresh_orders_db().await;
    let svc = start_order_svc_with(&db, "orders.events", |c| {
        c.bootstrap_servers = Some("127.0.0.1:9".into())
    })
    .await;
    assert!(
        eventually(wait, || async { health_of(svc.addr).await == SERVING }).await,
        "no broker: still SERVING"
    );
    let placed = svc.client().await.place_order(valid_order(7)).await;
    assert!(placed.is_ok(), "no broker: PlaceOrder still accepted: {placed:?}");
    svc.stop().await;

    // A real broker: SERVING; then the database refuses connections: NOT_SERVING; then back.
    let db = fresh_orders_db().await;
    let broker = stack().bootstrap_servers.clone();
    let svc = start_order_svc_with(&db, "orders.events", move |c| {
        c.bootstrap_servers = Some(broker);
        c.db_max_connections = 1;
    })
    .await;
    assert!(
        eventually(wait, || async { health_of(svc.addr).await == SERVING }).await,
        "SERVING when all is up"
    );
    let admin = sqlx::PgPool::connect(&stack().admin_url).await.unwrap();
    let block = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false", db.name);
    sqlx::query(sqlx::AssertSqlSafe(block)).execute(&admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db.name)
        .execute(&admin)
        .await
        .unwrap();
    assert!(
        eventually(wait, || async { health_of(svc.addr).await == NOT_SERVING }).await,
        "database away: NOT_SERVING"
    );
    let unblock = format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true", db.name);
    sqlx::query(sqlx::AssertSqlSafe(unblock)).execute(&admin).await.unwrap();
    assert!(
        eventually(wait, || async { health_of(svc.addr).await == SERVING }).await,
        "back: SERVING"
    );
    svc.stop().await;
}
