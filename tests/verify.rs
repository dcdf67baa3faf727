//! The invariant checker can fail: on four fresh databases it reports nothing, then each
//! damage planted by hand is reported under its own invariant (a double charge in the
//! gateway's ledger; the UNIQUE constraint that makes a second payment impossible, dropped).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use orderflow_tests::fresh_db;
use ordersctl::verify::{Invariant, Stores, verify};

#[tokio::test]
async fn verify_reports_each_planted_damage_under_its_invariant() {
    let (orders, payments, fulfilment, gateway) = tokio::join!(
        fresh_db(&order_svc::MIGRATOR),
        fresh_db(&payment_svc::MIGRATOR),
        fresh_db(&fulfilment::MIGRATOR),
        fresh_db(&gateway_sim::MIGRATOR),
    );
    let stores = Stores {
        orders: orders.pool.clone(),
        payments: payments.pool.clone(),
        fulfilment: fulfilment.pool.clone(),
        gateway: gateway.pool.clone(),
    };
    let check = || verify(&stores, Duration::from_secs(30), Duration::from_secs(5));

    let clean = check().await.unwrap();
    assert_eq!(clean.violations(), 0, "{}", ordersctl::verify::render(&clean));
    let checked: Vec<Invariant> = clean.checks.iter().map(|c| c.invariant).collect();
    assert_eq!(checked, Invariant::ALL, "every invariant checked once, in order");

    // Two authorizations of one order at the gateway.
    for key in ["k1", "k2"] {
        sqlx::query(
            "INSERT INTO ledger (operation, order_id, amount_minor, currency_code, idempotency_key)
             VALUES ('AUTHORIZE', 'order-charged-twice', 100, 'EUR', $1)",
        )
        .bind(key)
        .execute(&gateway.pool)
        .await
        .unwrap();
    }
    // The constraint that keeps one payment per order, gone.
    sqlx::query("ALTER TABLE payments DROP CONSTRAINT payments_order_id_key")
        .execute(&payments.pool)
        .await
        .unwrap();

    let damaged = check().await.unwrap();
    let report = ordersctl::verify::render(&damaged);
    assert_eq!(
        damaged.violations_of(Invariant::ChargedAtMostOnce).unwrap(),
        1,
        "{report}"
    );
    let missing = damaged
        .checks
        .iter()
        .find(|c| c.invariant == Invariant::OneRowPerOrderByConstraint)
        .unwrap();
    assert_eq!(missing.examples, ["payments.order_id"], "{report}");
    assert_eq!(damaged.violations(), 2, "nothing else is reported: {report}");
}

/// Each state name is spelled once, in order-svc's `domain`; the orders table's CHECK
/// constraints, written in SQL, must accept exactly those names (a name added on one side
/// only fails here).
#[tokio::test]
async fn the_orders_table_accepts_exactly_the_names_the_domain_spells() {
    use order_svc::domain::{CancellationReason, OrderStatus, SagaState};
    let orders = fresh_db(&order_svc::MIGRATOR).await;
    let names_in_check = |column: &'static str| {
        let pool = orders.pool.clone();
        async move {
            let definitions: Vec<String> = sqlx::query_scalar(
                "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
                 WHERE c.conrelid = 'orders'::regclass AND c.contype = 'c' AND a.attname = $1",
            )
            .bind(column)
            .fetch_all(&pool)
            .await
            .unwrap();
            assert_eq!(definitions.len(), 1, "one CHECK on orders.{column}: {definitions:?}");
            // CHECK ((status = ANY (ARRAY['PENDING'::text, ...]))): the quoted names.
            let mut names: Vec<String> = definitions[0]
                .split('\'')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect();
            names.sort();
            names
        }
    };
    let sorted = |names: Vec<&str>| {
        let mut names: Vec<String> = names.into_iter().map(str::to_owned).collect();
        names.sort();
        names
    };
    assert_eq!(
        names_in_check("status").await,
        sorted(OrderStatus::ALL.iter().map(|v| v.as_str()).collect())
    );
    assert_eq!(
        names_in_check("saga_state").await,
        sorted(SagaState::ALL.iter().map(|v| v.as_str()).collect())
    );
    assert_eq!(
        names_in_check("cancellation_reason").await,
        sorted(CancellationReason::ALL.iter().map(|v| v.as_str()).collect())
    );
}
