//! Least privilege in Postgres: each process kind's role, connected to a database migrated
//! and granted exactly as `scripts/stack` does it (deploy/postgres/grants/), can do its work
//! and nothing else. Every forbidden operation must be refused by Postgres itself (42501),
//! so a broadened grant fails here.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use orderflow_platform::Secret;
use orderflow_tests::{TestDb, database_url_as, fresh_db};

/// A connection to `database` (a test database's name, or one of the stack's) as `role`.
async fn connect_as(role: &str, database: &str) -> Result<sqlx::PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(Secret::new(database_url_as(role, database)).expose())
        .await
}

async fn as_role(role: &str, db: &TestDb) -> sqlx::PgPool {
    db.pool_as(role).await.unwrap()
}

async fn allowed(pool: &sqlx::PgPool, role: &str, sql: &str) {
    if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(pool).await {
        panic!("{role} must be allowed to {sql}: {error}");
    }
}

async fn denied(pool: &sqlx::PgPool, role: &str, sql: &str) {
    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(pool).await {
        Ok(_) => panic!("{role} was allowed to {sql}"),
        Err(sqlx::Error::Database(error)) => assert_eq!(
            error.code().as_deref(),
            Some("42501"),
            "{role}: {sql}: {}",
            error.message()
        ),
        Err(other) => panic!("{role}: {sql}: {other}"),
    }
}

/// What no service role may ever do in its database.
const NEVER: &[&str] = &[
    "CREATE TABLE intruder (i int)",
    "DROP TABLE inbox",
    "ALTER TABLE inbox ADD COLUMN intruder int",
    "TRUNCATE inbox",
    "DELETE FROM inbox",
];

const ORDER: &str = "'01a22f59-deca-72cd-99b1-af14132e1474'";
const MESSAGE: &str = "'01a22f59-deca-72cd-99b1-af15cb66faed'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_roles_do_their_work_and_nothing_else() {
    let db = fresh_db(&order_svc::MIGRATOR).await;
    db.grant("orders").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO outbox (topic, partition_key, event_type, schema_version, payload, message_id)
         VALUES ('orders.events', 'k', 'T', 1, '\\x00', {MESSAGE})"
    )))
    .execute(&db.pool)
    .await
    .unwrap();

    let order_svc = as_role("order_svc", &db).await;
    allowed(&order_svc, "order_svc", "SELECT count(*) FROM orders").await;
    allowed(&order_svc, "order_svc", "SELECT count(*) FROM order_read").await;
    allowed(&order_svc, "order_svc", "SELECT purge_inbox('order', 0, 10)").await;
    for sql in [
        "SELECT payload FROM outbox",
        "UPDATE outbox SET published_at = now()",
        "DELETE FROM outbox",
        "DELETE FROM orders",
        "UPDATE order_read SET status = 'CONFIRMED'",
        "SELECT purge_published_outbox(0, 10)",
    ]
    .into_iter()
    .chain(NEVER.iter().copied())
    {
        denied(&order_svc, "order_svc", sql).await;
    }

    let relay = as_role("orders_relay", &db).await;
    allowed(
        &relay,
        "orders_relay",
        "SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE SKIP LOCKED",
    )
    .await;
    allowed(&relay, "orders_relay", "UPDATE outbox SET published_at = now()").await;
    allowed(&relay, "orders_relay", "SELECT purge_published_outbox(3600, 10)").await;
    for sql in [
        "SELECT count(*) FROM orders",
        "SELECT count(*) FROM order_read",
        "INSERT INTO outbox (topic, partition_key, event_type, schema_version, payload, message_id) VALUES ('t', 'k', 'T', 1, '\\x00', gen_random_uuid())",
        "UPDATE outbox SET payload = '\\x01'",
        "DELETE FROM outbox",
        "SELECT purge_inbox('order', 3600, 10)",
    ]
    .into_iter()
    .chain(NEVER.iter().copied())
    {
        denied(&relay, "orders_relay", sql).await;
    }

    let projector = as_role("orders_projector", &db).await;
    allowed(
        &projector,
        "orders_projector",
        &format!("SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = {ORDER})"),
    )
    .await;
    allowed(&projector, "orders_projector", "SELECT count(*) FROM order_read").await;
    for sql in [
        "SELECT status FROM orders",
        "UPDATE orders SET status = 'CONFIRMED'",
        "SELECT payload FROM outbox",
        "INSERT INTO outbox (topic, partition_key, event_type, schema_version, payload, message_id) VALUES ('t', 'k', 'T', 1, '\\x00', gen_random_uuid())",
        "DELETE FROM order_read",
    ]
    .into_iter()
    .chain(NEVER.iter().copied())
    {
        denied(&projector, "orders_projector", sql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_fulfilment_and_gateway_roles_do_their_work_and_nothing_else() {
    let payments = fresh_db(&payment_svc::MIGRATOR).await;
    payments.grant("payments").await;
    let payment_svc = as_role("payment_svc", &payments).await;
    allowed(&payment_svc, "payment_svc", "SELECT count(*) FROM payments").await;
    for sql in [
        "DELETE FROM payments",
        "SELECT payload FROM outbox",
        "UPDATE outbox SET published_at = now()",
    ]
    .into_iter()
    .chain(NEVER.iter().copied())
    {
        denied(&payment_svc, "payment_svc", sql).await;
    }
    let relay = as_role("payments_relay", &payments).await;
    allowed(
        &relay,
        "payments_relay",
        "UPDATE outbox SET published_at = now() WHERE false",
    )
    .await;
    // The relay records a failed delivery on its row (the orders relay's tests run as
    // orders_relay through a broker outage; this is the same grant here).
    allowed(
        &relay,
        "payments_relay",
        "UPDATE outbox SET failed_attempts = failed_attempts + 1, last_error = 'x' WHERE false",
    )
    .await;
    for sql in [
        "SELECT count(*) FROM payments",
        "DELETE FROM outbox",
        "UPDATE outbox SET payload = '\\x01'",
    ]
    .into_iter()
    .chain(NEVER.iter().copied())
    {
        denied(&relay, "payments_relay", sql).await;
    }

    let fulfilment = fresh_db(&fulfilment::MIGRATOR).await;
    fulfilment.grant("fulfilment").await;
    let fulfilment_svc = as_role("fulfilment_svc", &fulfilment).await;
    allowed(&fulfilment_svc, "fulfilment_svc", "SELECT count(*) FROM shipments").await;
    for sql in ["DELETE FROM shipments", "UPDATE shipments SET order_id = order_id"]
        .into_iter()
        .chain(NEVER.iter().copied())
    {
        denied(&fulfilment_svc, "fulfilment_svc", sql).await;
    }

    // The gateway's ledger is append-only for the simulator.
    let gateway = fresh_db(&gateway_sim::MIGRATOR).await;
    gateway.grant("gateway").await;
    let gateway_sim = as_role("gateway_sim", &gateway).await;
    allowed(
        &gateway_sim,
        "gateway_sim",
        "INSERT INTO ledger (operation, order_id, amount_minor, currency_code, idempotency_key) VALUES ('VOID', 'o', 1, 'EUR', 'k')",
    )
    .await;
    for sql in [
        "SELECT count(*) FROM ledger",
        "UPDATE ledger SET amount_minor = 0",
        "DELETE FROM ledger",
        "DELETE FROM authorizations",
        "DELETE FROM idempotency_keys",
        "TRUNCATE ledger",
    ] {
        denied(&gateway_sim, "gateway_sim", sql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_through_a_service_role_deletes_nothing_young() {
    let db = fresh_db(&order_svc::MIGRATOR).await;
    db.grant("orders").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO inbox (consumer, message_id) VALUES ('order', {MESSAGE})"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let order_svc = as_role("order_svc", &db).await;
    // Asked to delete everything: the function's floor (one hour) keeps the fresh row.
    let deleted: i64 = sqlx::query_scalar("SELECT purge_inbox('order', 0, 1000)")
        .fetch_one(&order_svc)
        .await
        .unwrap();
    assert_eq!(deleted, 0);
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_role_can_connect_to_another_services_database() {
    for (role, foreign) in [
        ("order_svc", "payments"),
        ("orders_relay", "payments"),
        ("orders_projector", "gateway"),
        ("payment_svc", "orders"),
        ("payment_svc", "gateway"),
        ("payments_relay", "orders"),
        ("fulfilment_svc", "orders"),
        ("gateway_sim", "payments"),
    ] {
        match connect_as(role, foreign).await {
            Ok(_) => panic!("{role} connected to the {foreign} database"),
            Err(sqlx::Error::Database(error)) => {
                assert_eq!(
                    error.code().as_deref(),
                    Some("42501"),
                    "{role} -> {foreign}: {}",
                    error.message()
                );
            }
            Err(other) => panic!("{role} -> {foreign}: {other}"),
        }
    }
}

/// What a table promises about its rows is kept against the role that writes them: an
/// order's total and creation time, a payment's amount, an authorization's amount, the
/// gateway's keys' expiry (column grants), and a live PlaceOrder key as a whole, expiry
/// included (a trigger: order_svc may rewrite a key once it has expired, never before, so it
/// cannot shorten a retention and then have the purge delete the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_cannot_rewrite_what_its_tables_promise() {
    let orders = fresh_db(&order_svc::MIGRATOR).await;
    orders.grant("orders").await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO orders (order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state,
                             correlation_id)
         VALUES ({ORDER}, 1, 'EUR', 100, 'tok', 'PENDING', 'AWAITING_PAYMENT', {MESSAGE});
         INSERT INTO idempotency_keys (request_id, request_fingerprint, order_id, response, expires_at)
         VALUES ('live', '\\x00', {ORDER}, '\\x00', now() + interval '1 day'),
                ('expired', '\\x00', {ORDER}, '\\x00', now() - interval '1 minute');"
    )))
    .execute(&orders.pool)
    .await
    .unwrap();
    let order_svc = as_role("order_svc", &orders).await;
    allowed(
        &order_svc,
        "order_svc",
        "UPDATE orders SET status = 'CANCELLED', saga_state = 'COMPENSATED'",
    )
    .await;
    for sql in [
        "UPDATE orders SET total_minor = 1",
        "UPDATE orders SET created_at = now() - interval '1 day'",
        "UPDATE orders SET customer_id = 2",
        "UPDATE idempotency_keys SET request_id = 'other'",
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 day' WHERE request_id = 'live'",
        "UPDATE idempotency_keys SET response = '\\x01' WHERE request_id = 'live'",
    ] {
        denied(&order_svc, "order_svc", sql).await;
    }
    // The insert's reclaim of an expired key is what the grant is for.
    allowed(
        &order_svc,
        "order_svc",
        "UPDATE idempotency_keys SET response = '\\x01', expires_at = now() + interval '1 day' WHERE request_id = 'expired'",
    )
    .await;
    let purged: i64 = sqlx::query_scalar("SELECT purge_expired_request_ids(0, 1000)")
        .fetch_one(&order_svc)
        .await
        .unwrap();
    assert_eq!(purged, 0, "no key was expired early, so none is purged");

    let payments = fresh_db(&payment_svc::MIGRATOR).await;
    payments.grant("payments").await;
    let payment_svc = as_role("payment_svc", &payments).await;
    for sql in [
        "UPDATE payments SET amount_minor = 1",
        "UPDATE payments SET currency_code = 'USD'",
        "UPDATE payments SET order_id = gen_random_uuid()",
    ] {
        denied(&payment_svc, "payment_svc", sql).await;
    }
    allowed(
        &payment_svc,
        "payment_svc",
        "UPDATE payments SET state = state WHERE false",
    )
    .await;

    let gateway = fresh_db(&gateway_sim::MIGRATOR).await;
    gateway.grant("gateway").await;
    let gateway_sim = as_role("gateway_sim", &gateway).await;
    allowed(
        &gateway_sim,
        "gateway_sim",
        "UPDATE idempotency_keys SET attempts = attempts + 1 WHERE false",
    )
    .await;
    allowed(
        &gateway_sim,
        "gateway_sim",
        "UPDATE authorizations SET state = 'VOIDED' WHERE false",
    )
    .await;
    for sql in [
        "UPDATE idempotency_keys SET expires_at = now()",
        "UPDATE idempotency_keys SET fingerprint = '\\x00'",
        "UPDATE authorizations SET amount_minor = 0",
        "UPDATE authorizations SET order_id = 'other'",
    ] {
        denied(&gateway_sim, "gateway_sim", sql).await;
    }
}
