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
use orderflow_tests::{event_keys, eventually, stack, valid_order};
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
    prost::encoding::encode_key(
        orderflow_tests::UNDEFINED_PAYLOAD_FIELD,
        prost::encoding::WireType::LengthDelimited,
        &mut unknown_type,
    );
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
    // Signed by order-svc's key and keyed by their order, as the relay publishes them: they
    // reach the services' own checks.
    let signed = |mut envelope: EventEnvelope| {
        if let Some(Payload::OrderPlaced(placed)) = envelope.payload.as_mut() {
            placed.order_id.clone_from(&envelope.aggregate_id);
        }
        (envelope.aggregate_id.clone(), event_keys().seal(&envelope))
    };
    let (invalid_key, invalid) = signed(invalid);
    let (nul_currency_key, nul_currency) = signed(placed(4_250, "E\0R"));
    let (too_large_key, too_large) = signed(placed(i64::MAX, "EUR"));
    // Well-formed, but signed by a key no consumer trusts (a relay's stolen credential can
    // write the topic, not sign), and not signed at all.
    let forger = orderflow_platform::signing::EventSigner::ephemeral(orderflow_platform::signing::ORDER_SVC).unwrap();
    let forged_envelope = placed(4_250, "EUR");
    let forged_key = forged_envelope.aggregate_id.clone();
    let forged = forger.seal(&forged_envelope);
    let unsigned_envelope = placed(4_250, "EUR");
    let unsigned_key = unsigned_envelope.aggregate_id.clone();

    let poison: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "undecodable",
            "undecodable".into(),
            b"\xff\xfe not a protobuf envelope".to_vec(),
            "undecodable",
        ),
        (
            "unknown-type",
            "unknown-type".into(),
            unknown_type,
            "unknown event type",
        ),
        (
            "newer-version",
            "newer-version".into(),
            newer_version.encode_to_vec(),
            "schema version 99",
        ),
        (
            "missing-id",
            "missing-id".into(),
            missing_id.encode_to_vec(),
            "message_id",
        ),
        ("invalid", invalid_key, invalid, "without a total"),
        ("nul-currency", nul_currency_key, nul_currency, "ISO-4217"),
        ("too-large", too_large_key, too_large, "above the limit"),
        ("forged", forged_key, forged, "which is not trusted here"),
        (
            "unsigned",
            unsigned_key,
            unsigned_envelope.encode_to_vec(),
            "not signed",
        ),
    ];
    for (_, key, payload, _) in &poison {
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
    produce(&saga.payments_topic, &order.to_string(), event_keys().seal(&stray)).await;

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
    for (label, key, _, reason) in &poison {
        let found: Vec<_> = letters
            .iter()
            .filter(|l| l.key.as_deref() == Some(key.as_bytes()))
            .collect();
        assert!(!found.is_empty(), "{label} was dead-lettered");
        let letter = found[0];
        assert!(
            found
                .iter()
                .any(|l| l.header("dlq.error").unwrap_or_default().contains(reason)),
            "{label}: reason mentions {reason:?}: {:?}",
            found.iter().map(|l| l.header("dlq.error")).collect::<Vec<_>>()
        );
        assert_eq!(letter.header("dlq.original_topic").as_deref(), Some(topic.as_str()));
        assert_eq!(letter.header("dlq.original_partition").as_deref(), Some("0"));
        assert_eq!(letter.header("dlq.original_key").as_deref(), Some(key.as_str()));
        for header in [
            "dlq.original_offset",
            "dlq.attempts",
            "dlq.first_failure_at",
            "dlq.last_failure_at",
            "dlq.consumer_group",
        ] {
            assert!(
                letter.header(header).is_some_and(|v| !v.is_empty()),
                "{label}: header {header}"
            );
        }
    }
    // The payment service is the one that refuses an invalid OrderPlaced, and every consumer
    // group refuses the forged and the unsigned ones; the gateway never saw any of them.
    let key_of = |label: &str| poison.iter().find(|(l, ..)| *l == label).unwrap().1.clone();
    for label in ["invalid", "nul-currency", "too-large"] {
        let key = key_of(label);
        assert!(
            letters.iter().any(|l| {
                l.key.as_deref() == Some(key.as_bytes())
                    && l.header("dlq.consumer_group")
                        .is_some_and(|g| g.starts_with("payment-"))
            }),
            "{label} dead-lettered by payment-svc"
        );
    }
    for label in ["forged", "unsigned"] {
        let key = key_of(label);
        for group in ["payment-", "fulfilment-", "projector-"] {
            assert!(
                letters.iter().any(|l| {
                    l.key.as_deref() == Some(key.as_bytes())
                        && l.header("dlq.consumer_group").is_some_and(|g| g.starts_with(group))
                        && l.header("dlq.error").unwrap_or_default().contains("untrusted event")
                }),
                "{label} dead-lettered by {group}*, as untrusted"
            );
        }
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
    // Someone allowed to write the dead-letter topic plants a letter that looks like the
    // payment group's for the same order: an OrderPlaced with another total, signed by a key
    // nobody trusts. The redrive must not launder it onto the main topic.
    let dlq = orderflow::topics::dead_letter(&saga.orders_topic);
    let planted = {
        let mut order = valid_order(9);
        order.total = Some(api::Money {
            amount_minor: 1,
            currency_code: "EUR".into(),
        });
        let forger =
            orderflow_platform::signing::EventSigner::ephemeral(orderflow_platform::signing::ORDER_SVC).unwrap();
        forger.seal(&envelope::seal(
            meta(placed.parse().unwrap()),
            Payload::OrderPlaced(OrderPlaced {
                order_id: placed.clone(),
                customer_id: order.customer_id,
                items: order.items,
                total: order.total,
                payment_token: order.payment_token,
            }),
        ))
    };
    let producer: FutureProducer = kafka::producer_config(&stack().kafka, "planter", kafka::DEFAULT_DELIVERY_TIMEOUT)
        .create()
        .unwrap();
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: "dlq.consumer_group",
            value: Some(saga.payment_group().as_str()),
        })
        .insert(rdkafka::message::Header {
            key: "dlq.original_topic",
            value: Some(saga.orders_topic.as_str()),
        })
        .insert(rdkafka::message::Header {
            key: "dlq.original_partition",
            value: Some("0"),
        })
        .insert(rdkafka::message::Header {
            key: "dlq.original_offset",
            value: Some("999999"),
        });
    producer
        .send(
            FutureRecord::to(&dlq).key(&placed).payload(&planted).headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let options = ordersctl::dlq::RedriveOptions {
        group: Some(saga.payment_group()),
        key: Some(placed.clone()),
        dry_run: true,
        rate_per_sec: 10,
    };
    let verifier = &event_keys().verifier;
    let dry = ordersctl::dlq::redrive(&stack().kafka, &dlq, &options, verifier)
        .await
        .unwrap();
    assert_eq!(
        (dry.distinct, dry.refused, dry.republished),
        (2, 1, 0),
        "a dry run publishes nothing, and names the planted letter refused"
    );
    let options = ordersctl::dlq::RedriveOptions {
        dry_run: false,
        ..options
    };
    let done = ordersctl::dlq::redrive(&stack().kafka, &dlq, &options, verifier)
        .await
        .unwrap();
    assert_eq!(
        (done.refused, done.republished),
        (1, 1),
        "only the genuine letter goes back"
    );
    assert!(
        eventually(WAIT, || async {
            status(&saga, &placed).await == api::OrderStatus::Confirmed
        })
        .await,
        "the redriven OrderPlaced completes the saga"
    );
    let records = orderflow_tests::read_topic(&stack().kafka, &saga.orders_topic, WAIT, |records| {
        records.iter().any(|r| r.headers.contains_key("dlq.redriven_from"))
    })
    .await;
    assert!(records.iter().any(|r| r.headers.contains_key("dlq.redriven_from")));
    assert!(
        records.iter().all(|r| r.payload != planted),
        "the planted letter never reached the main topic"
    );
    assert!(saga.settled(WAIT).await);
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
    saga.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_no_trusted_key_of_its_producer_signed_is_never_acted_on() {
    // What a stolen relay or broker credential can write to orders.events: an OrderPlaced
    // signed by a key of its own, and one signed with payment-svc's real key (a service may
    // sign only the event types it produces). Neither is acted on by anyone: no money moves,
    // the read model has no row, every consumer group dead-letters both as untrusted, and the
    // genuine order behind them on the same partition settles.
    let saga = Saga::start(SagaOptions {
        partitions: 1,
        ..SagaOptions::default()
    })
    .await;
    let forged_event = |id: uuid::Uuid| {
        let order = valid_order(13);
        envelope::seal(
            meta(id),
            Payload::OrderPlaced(OrderPlaced {
                order_id: id.to_string(),
                customer_id: order.customer_id,
                items: order.items,
                total: order.total,
                payment_token: order.payment_token,
            }),
        )
    };
    let (own_key, wrong_producer) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let forger = orderflow_platform::signing::EventSigner::ephemeral(orderflow_platform::signing::ORDER_SVC).unwrap();
    produce(
        &saga.orders_topic,
        &own_key.to_string(),
        forger.seal(&forged_event(own_key)),
    )
    .await;
    produce(
        &saga.orders_topic,
        &wrong_producer.to_string(),
        event_keys().payment_svc.seal(&forged_event(wrong_producer)),
    )
    .await;
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
        "the genuine order behind them settles"
    );
    for (forged, reason) in [
        (own_key, "which is not trusted here"),
        (wrong_producer, "only order-svc's keys sign it"),
    ] {
        for group in ["payment-", "fulfilment-", "projector-"] {
            assert!(
                eventually(WAIT, || async {
                    dead_letters(&saga.orders_topic).await.iter().any(|l| {
                        l.key.as_deref() == Some(forged.to_string().as_bytes())
                            && l.header("dlq.consumer_group").is_some_and(|g| g.starts_with(group))
                            && l.header("dlq.error").unwrap_or_default().contains(reason)
                    })
                })
                .await,
                "{forged} dead-lettered by {group}* because {reason}"
            );
        }
        let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE order_id = $1")
            .bind(forged.to_string())
            .fetch_one(&saga.gateway.pool)
            .await
            .unwrap();
        assert_eq!(ledger, 0, "no money moved for {forged}");
        let found = saga
            .client()
            .await
            .get_order(api::GetOrderRequest {
                order_id: forged.to_string(),
            })
            .await;
        assert_eq!(found.map(|_| ()).unwrap_err().code(), tonic::Code::NotFound);
        let projected: i64 = sqlx::query_scalar("SELECT count(*) FROM order_read WHERE order_id = $1")
            .bind(forged)
            .fetch_one(&saga.orders.pool)
            .await
            .unwrap();
        assert_eq!(projected, 0, "the read model has no row for {forged}");
    }
    assert!(saga.settled(WAIT).await);
    let report = saga.verify().await;
    assert_eq!(report.violations(), 0, "{}", ordersctl::verify::render(&report));
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
