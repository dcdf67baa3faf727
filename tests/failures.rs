//! Failure handling on the real stack: poison messages of every kind go to the dead-letter
//! topic with their context, the partition keeps flowing and no process stops; a repaired
//! dead letter, redriven, completes its saga.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use orderflow::envelope::{self, EventMeta};
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{EventEnvelope, OrderPlaced, PaymentAuthorized};
use orderflow::orders::v1 as api;
use orderflow_platform::kafka;
use orderflow_tests::saga::{Saga, SagaOptions};
use orderflow_tests::{eventually, stack, valid_order};
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

const WAIT: Duration = Duration::from_secs(60);

fn meta(order: uuid::Uuid) -> EventMeta {
    EventMeta {
        message_id: uuid::Uuid::now_v7(),
        aggregate_id: order,
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: None,
        traceparent: None,
        occurred_at: orderflow_platform::outbox::now_timestamp(),
    }
}

/// Writes raw bytes straight into a topic, as a buggy or foreign producer would.
async fn produce(topic: &str, key: &str, payload: Vec<u8>) {
    let producer: FutureProducer = kafka::producer_config(&stack().kafka, "poisoner", kafka::DEFAULT_DELIVERY_TIMEOUT)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

async fn dead_letters(topic: &str) -> Vec<ordersctl::dlq::DeadLetter> {
    let (servers, dlq) = (stack().kafka.clone(), orderflow::topics::dead_letter(topic));
    tokio::task::spawn_blocking(move || ordersctl::dlq::read_all(&servers, &dlq))
        .await
        .unwrap()
        .unwrap()
}

async fn status(saga: &Saga, order_id: &str) -> api::OrderStatus {
    let response = saga
        .client()
        .await
        .get_order(api::GetOrderRequest {
            order_id: order_id.into(),
        })
        .await
        .expect("found");
    response.into_inner().order.expect("order").status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_with_context_and_the_partition_keeps_flowing() {
    // One partition: the poison and the good order share it.
    let saga = Saga::start(SagaOptions {
        partitions: 1,
        ..SagaOptions::default()
    })
    .await;
    let topic = saga.orders_topic.clone();
    let order = uuid::Uuid::now_v7();

    let placed_without_total = OrderPlaced {
        order_id: order.to_string(),
        customer_id: 1,
        ..Default::default()
    };
    let mut unknown_type = EventEnvelope {
        event_type: "orderflow.events.v1.OrderShipped".into(),
        payload: None,
        ..envelope::seal(meta(order), Payload::OrderPlaced(placed_without_total.clone()))
    }
    .encode_to_vec();
    prost::encoding::encode_key(40, prost::encoding::WireType::LengthDelimited, &mut unknown_type);
    prost::encoding::encode_varint(0, &mut unknown_type);
    let mut newer_version = envelope::seal(meta(order), Payload::OrderPlaced(placed_without_total.clone()));
    newer_version.schema_version = 99;
    let mut missing_id = envelope::seal(meta(order), Payload::OrderPlaced(placed_without_total.clone()));
    missing_id.message_id = String::new();
    let invalid = envelope::seal(meta(order), Payload::OrderPlaced(placed_without_total));
    // Well-formed envelopes whose values no service may act on: three bytes that are not a
    // currency (the database refuses a NUL byte: once this stalled the partition forever),
    // and a total no order may reach.
    let placed = |amount_minor, currency_code: &str| {
        let mut order = valid_order(9);
        order.total = Some(api::Money {
            amount_minor,
            currency_code: currency_code.into(),
        });
        envelope::seal(
            meta(uuid::Uuid::now_v7()),
            Payload::OrderPlaced(OrderPlaced {
                order_id: String::new(),
                customer_id: order.customer_id,
                items: order.items,
                total: order.total,
                payment_token: order.payment_token,
            }),
        )
    };
    let with_own_id = |mut envelope: EventEnvelope| {
        if let Some(Payload::OrderPlaced(placed)) = envelope.payload.as_mut() {
            placed.order_id.clone_from(&envelope.aggregate_id);
        }
        envelope.encode_to_vec()
    };
    let nul_currency = with_own_id(placed(4_250, "E\0R"));
    let too_large = with_own_id(placed(i64::MAX, "EUR"));

    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "undecodable",
            b"\xff\xfe not a protobuf envelope".to_vec(),
            "undecodable",
        ),
        ("unknown-type", unknown_type, "unknown event type"),
        ("newer-version", newer_version.encode_to_vec(), "schema version 99"),
        ("missing-id", missing_id.encode_to_vec(), "message_id"),
        ("invalid", invalid.encode_to_vec(), "without a total"),
        ("nul-currency", nul_currency, "ISO-4217"),
        ("too-large", too_large, "above the limit"),
    ];
    for (key, payload, _) in &poison {
        produce(&topic, key, payload.clone()).await;
    }
    // A payment event for an order nobody knows, to the order service.
    let stray = envelope::seal(
        meta(order),
        Payload::PaymentAuthorized(PaymentAuthorized {
            order_id: order.to_string(),
            ..Default::default()
        }),
    );
    produce(&saga.payments_topic, "unknown-order", stray.encode_to_vec()).await;

    // A real order behind the poison, on the same partition.
    let good = saga
        .client()
        .await
        .place_order(valid_order(5))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    assert!(
        eventually(WAIT, || async {
            status(&saga, &good).await == api::OrderStatus::Confirmed
        })
        .await,
        "later messages of the partition are processed"
    );

    let letters = dead_letters(&topic).await;
    for (key, _, reason) in &poison {
        let found: Vec<_> = letters
            .iter()
            .filter(|l| l.key.as_deref() == Some(key.as_bytes()))
            .collect();
        assert!(!found.is_empty(), "{key} was dead-lettered");
        let letter = found[0];
        assert!(
            found
                .iter()
                .any(|l| l.header("dlq.error").unwrap_or_default().contains(reason)),
            "{key}: reason mentions {reason:?}: {:?}",
            found.iter().map(|l| l.header("dlq.error")).collect::<Vec<_>>()
        );
        assert_eq!(letter.header("dlq.original_topic").as_deref(), Some(topic.as_str()));
        assert_eq!(letter.header("dlq.original_partition").as_deref(), Some("0"));
        assert_eq!(letter.header("dlq.original_key").as_deref(), Some(*key));
        for header in [
            "dlq.original_offset",
            "dlq.attempts",
            "dlq.first_failure_at",
            "dlq.last_failure_at",
            "dlq.consumer_group",
        ] {
            assert!(
                letter.header(header).is_some_and(|v| !v.is_empty()),
                "{key}: header {header}"
            );
        }
    }
    // The payment service is the one that refuses an invalid OrderPlaced, and the gateway
    // never saw any of them.
    for key in ["invalid", "nul-currency", "too-large"] {
        assert!(
            letters.iter().any(|l| {
                l.key.as_deref() == Some(key.as_bytes())
                    && l.header("dlq.consumer_group")
                        .is_some_and(|g| g.starts_with("payment-"))
            }),
            "{key} dead-lettered by payment-svc"
        );
    }
    let gateway_lines: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE order_id <> $1")
        .bind(&good)
        .fetch_one(&saga.gateway.pool)
        .await
        .unwrap();
    assert_eq!(gateway_lines, 0, "no poison reached the gateway");
    let stray_letters = dead_letters(&saga.payments_topic).await;
    assert!(
        stray_letters
            .iter()
            .any(|l| l.header("dlq.error").unwrap_or_default().contains("unknown order")
                && l.header("dlq.consumer_group").is_some_and(|g| g.starts_with("order-"))),
        "the order service dead-letters a payment for an unknown order"
    );
    saga.stop().await; // every component still running stops cleanly (none crashed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repaired_dead_letter_redriven_completes_its_saga() {
    let mut saga = Saga::start(SagaOptions {
        payment_retry_budget: Duration::from_secs(3),
        ..SagaOptions::default()
    })
    .await;
    // A fault in the payments database that refuses this order's payment (a broken trigger
    // an operator installed): transient as far as the consumer can tell, so the message is
    // retried, then dead-lettered once its retry budget is spent; the order waits.
    saga.stop_payment_svc().await;
    let placed = saga.place(9, "tok_visa").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.order_id = '{placed}' THEN RAISE EXCEPTION 'refused by a broken trigger'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_one BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION refuse_one();"
    )))
    .execute(&saga.payments.pool)
    .await
    .unwrap();
    saga.start_payment_svc().await;
    assert!(
        eventually(WAIT, || async {
            dead_letters(&saga.orders_topic)
                .await
                .iter()
                .any(|l| l.key.as_deref() == Some(placed.as_bytes()))
        })
        .await,
        "the payment service dead-letters the OrderPlaced it cannot record"
    );
    assert_eq!(
        status(&saga, &placed).await,
        api::OrderStatus::Pending,
        "the order waits"
    );

    // Repair: the operator drops the trigger. Then redrive what the payment group gave up on.
    sqlx::query("DROP TRIGGER refuse_one ON payments")
        .execute(&saga.payments.pool)
        .await
        .unwrap();
    let options = ordersctl::dlq::RedriveOptions {
        group: Some(saga.payment_group()),
        key: Some(placed.clone()),
        dry_run: true,
        rate_per_sec: 10,
    };
    let dry = ordersctl::dlq::redrive(
        &stack().kafka,
        &orderflow::topics::dead_letter(&saga.orders_topic),
        &options,
    )
    .await
    .unwrap();
    assert_eq!((dry.distinct, dry.republished), (1, 0), "a dry run publishes nothing");
    let options = ordersctl::dlq::RedriveOptions {
        dry_run: false,
        ..options
    };
    let done = ordersctl::dlq::redrive(
        &stack().kafka,
        &orderflow::topics::dead_letter(&saga.orders_topic),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(done.republished, 1);
    assert!(
        eventually(WAIT, || async {
            status(&saga, &placed).await == api::OrderStatus::Confirmed
        })
        .await,
        "the redriven OrderPlaced completes the saga"
    );
    assert!(saga.settled(WAIT).await);
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_order_placed_is_caught_by_verify_and_its_money_released_by_the_payment_deadline() {
    // Anyone able to write to orders.events can make payment-svc authorize an order that
    // does not exist. The money side must notice (verify) and undo it (payment-svc's own
    // deadline), whatever the order service knows.
    let saga = Saga::start(SagaOptions {
        authorization_deadline: Duration::from_secs(6),
        ..SagaOptions::default()
    })
    .await;
    let forged = uuid::Uuid::now_v7();
    let order = valid_order(13);
    let placed = envelope::seal(
        meta(forged),
        Payload::OrderPlaced(OrderPlaced {
            order_id: forged.to_string(),
            customer_id: order.customer_id,
            items: order.items,
            total: order.total,
            payment_token: order.payment_token,
        }),
    );
    produce(&saga.orders_topic, &forged.to_string(), placed.encode_to_vec()).await;

    let state = |id: String| {
        let pool = saga.gateway.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT state FROM authorizations WHERE order_id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    assert!(
        eventually(WAIT, || async { state(forged.to_string()).await.is_some() }).await,
        "the forged order is authorized (payment-svc cannot tell it is forged)"
    );
    // While it is held, verify (with no deadline) names it from the money side, although
    // the orders table has never heard of it.
    let stores = ordersctl::verify::Stores {
        orders: saga.orders.pool.clone(),
        payments: saga.payments.pool.clone(),
        fulfilment: saga.fulfilment.pool.clone(),
        gateway: saga.gateway.pool.clone(),
    };
    // (The authorization is seconds old; the payment deadline is 6 s.)
    assert_eq!(state(forged.to_string()).await.as_deref(), Some("AUTHORIZED"));
    let report = ordersctl::verify::verify(&stores, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap();
    let held = report
        .checks
        .iter()
        .find(|c| c.name.starts_with("authorizations held past the deadline"))
        .unwrap();
    assert_eq!(held.examples, vec![forged.to_string()], "{report:?}");
    // payment-svc's deadline releases it.
    assert!(
        eventually(WAIT, || async {
            state(forged.to_string()).await.as_deref() == Some("VOIDED")
        })
        .await,
        "the forged authorization is voided by the payment deadline"
    );
    let report = ordersctl::verify::verify(&stores, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap();
    let money_checks: usize = report
        .checks
        .iter()
        .filter(|c| c.name.contains("gateway"))
        .map(|c| c.violations)
        .sum();
    assert_eq!(money_checks, 0, "{report:?}");
    // The read model never shows it: GetOrder knows no such order.
    assert!(
        eventually(WAIT, || async {
            dead_letters(&saga.orders_topic).await.iter().any(|l| {
                l.key.as_deref() == Some(forged.to_string().as_bytes())
                    && l.header("dlq.consumer_group")
                        .is_some_and(|g| g.starts_with("projector-"))
            })
        })
        .await,
        "the projector refuses an OrderPlaced the order service never placed"
    );
    let found = saga
        .client()
        .await
        .get_order(api::GetOrderRequest {
            order_id: forged.to_string(),
        })
        .await;
    assert_eq!(found.map(|_| ()).unwrap_err().code(), tonic::Code::NotFound);
    let ledger: Vec<String> = sqlx::query_scalar("SELECT operation FROM ledger WHERE order_id = $1 ORDER BY id")
        .bind(forged.to_string())
        .fetch_all(&saga.gateway.pool)
        .await
        .unwrap();
    assert_eq!(ledger, ["AUTHORIZE", "VOID"]);
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_payment_deadline_and_a_late_confirmation_never_both_act_on_one_payment() {
    // The service's own sweeper is kept out of the way: this test drives one pass itself.
    let saga = Saga::start(SagaOptions {
        authorization_deadline: Duration::from_secs(10 * 86_400),
        ..SagaOptions::default()
    })
    .await;
    let order = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payments (payment_id, order_id, amount_minor, currency_code, state, authorization_id, created_at)
         VALUES ($1, $2, 4250, 'EUR', 'AUTHORIZED', $3, now() - interval '1 day')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(order)
    .bind(uuid::Uuid::now_v7().to_string())
    .execute(&saga.payments.pool)
    .await
    .unwrap();

    // A late OrderConfirmed is capturing: its transaction holds the payment row.
    let mut capture = saga.payments.pool.begin().await.unwrap();
    sqlx::query("SELECT state FROM payments WHERE order_id = $1 FOR UPDATE")
        .bind(order)
        .execute(&mut *capture)
        .await
        .unwrap();
    sqlx::query("UPDATE payments SET state = 'CAPTURED' WHERE order_id = $1")
        .bind(order)
        .execute(&mut *capture)
        .await
        .unwrap();

    // The deadline passes meanwhile: the sweeper's pass skips the row the capture holds (it
    // never waits on a consumer, and never decides on a state about to change).
    let pool = saga.payments.pool.clone();
    assert_eq!(
        payment_svc::void_overdue(&pool, Duration::ZERO).await.unwrap(),
        0,
        "a payment a consumer holds is left for the next pass"
    );
    capture.commit().await.unwrap();
    // It then finds the payment captured and leaves it: no void at the gateway.
    assert_eq!(
        payment_svc::void_overdue(&pool, Duration::ZERO).await.unwrap(),
        0,
        "nothing voided"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM payments WHERE order_id = $1")
        .bind(order)
        .fetch_one(&saga.payments.pool)
        .await
        .unwrap();
    assert_eq!(state, "CAPTURED");
    let voids: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE idempotency_key = $1")
        .bind(format!("void:{order}"))
        .fetch_one(&saga.gateway.pool)
        .await
        .unwrap();
    assert_eq!(voids, 0, "the gateway was never asked to void");
    saga.stop().await;
}
