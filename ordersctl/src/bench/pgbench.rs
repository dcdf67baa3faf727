//! Postgres's own ceiling for this workload: pgbench replays one order's database
//! transactions against the real schemas, in a scratch database on the same server (the four
//! services' schemas side by side: `o` orders, `p` payments, `f` fulfilment, `g` gateway). No
//! broker, no gRPC: what the database alone allows. Two scripts, run one after the other:
//!
//! - [`FULL`]: **every** write transaction of one approved order, as the services issue
//!   them (15: the place, four relay marks, the payment's authorize and capture, the
//!   gateway's authorize and capture, the confirmation, the shipment, four projections).
//!   The system cannot do better than this on this Postgres.
//! - [`CRITICAL_PATH`]: the three transactions between PlaceOrder and a confirmed order
//!   (place, authorize, confirm). Faster, and overstates the headroom: kept to compare with
//!   earlier reports.

use std::path::Path;
use std::process::Command;
use std::str::FromStr as _;

use anyhow::Context as _;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::report::{PgbenchCeiling, PgbenchResult};

/// The scratch database (dropped and created again on every run).
pub const DATABASE: &str = "orderflow_pgbench";

static ORDERS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orders");
static PAYMENTS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payments");
static FULFILMENT: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/fulfilment");
static GATEWAY: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/gateway");

/// One order's three critical-path transactions, as order-svc and payment-svc issue them
/// (schema `o` is the orders database, `p` the payments database). Payloads are 300 bytes,
/// about the size of an encoded envelope.
pub const CRITICAL_PATH: &str = r"\set customer random_zipfian(1, 1000000, 1.1)
\set total random(299, 60000)
SELECT gen_random_uuid() AS order_id, gen_random_uuid() AS correlation, gen_random_uuid() AS request,
       gen_random_uuid() AS placed, gen_random_uuid() AS authorized, gen_random_uuid() AS confirmed,
       gen_random_uuid() AS payment \gset
-- 1. PlaceOrder: idempotency key, order, items, OrderPlaced in the outbox.
BEGIN;
INSERT INTO o.idempotency_keys (request_id, request_fingerprint, order_id, response, expires_at)
  VALUES (':request', decode(repeat('ab', 120), 'hex'), ':order_id', decode(repeat('cd', 60), 'hex'), now() + interval '24 hours')
  ON CONFLICT (request_id) DO NOTHING;
INSERT INTO o.orders (order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state, version, correlation_id, traceparent)
  VALUES (':order_id', :customer, 'EUR', :total, 'tok_visa', 'PENDING', 'AWAITING_PAYMENT', 0, ':correlation',
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
INSERT INTO o.order_items (order_id, line_no, sku, quantity, unit_price_minor)
  SELECT ':order_id', * FROM UNNEST(ARRAY[0, 1], ARRAY['BOOK-1', 'MUG-RED'], ARRAY[1, 2], ARRAY[1250, 899]::bigint[]);
INSERT INTO o.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':placed', 'orders.events', ':order_id', 'OrderPlaced', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex'));
COMMIT;
-- 2. payment-svc on OrderPlaced: inbox, payment row, PaymentAuthorized in the outbox.
BEGIN;
INSERT INTO p.inbox (consumer, message_id) VALUES ('payment', ':placed') ON CONFLICT DO NOTHING;
INSERT INTO p.payments (payment_id, order_id, amount_minor, currency_code, state, authorization_id)
  VALUES (':payment', ':order_id', :total, 'EUR', 'AUTHORIZED', 'auth_:payment') ON CONFLICT (order_id) DO NOTHING;
INSERT INTO p.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':authorized', 'payments.events', ':order_id', 'PaymentAuthorized', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex'));
COMMIT;
-- 3. order-svc on PaymentAuthorized: inbox, state read, compare-and-set, OrderConfirmed in the outbox.
BEGIN;
INSERT INTO o.inbox (consumer, message_id) VALUES ('order', ':authorized') ON CONFLICT DO NOTHING;
SELECT status, version FROM o.orders WHERE order_id = ':order_id';
UPDATE o.orders SET status = 'CONFIRMED', saga_state = 'COMPLETED', version = 1, updated_at = now(), settled_at = clock_timestamp()
  WHERE order_id = ':order_id' AND version = 0;
INSERT INTO o.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':confirmed', 'orders.events', ':order_id', 'OrderConfirmed', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex'));
COMMIT;
";

/// Every write transaction of one approved order, statement for statement as the services
/// issue them (BEGIN and COMMIT are sent by sqlx as statements of their own, as here). The
/// relays publish in batches; here each event is marked in a transaction of its own, the
/// relay's cost at low load (a pessimistic choice: under load a relay marks many rows in one
/// transaction).
pub const FULL: &str = r#"\set customer random_zipfian(1, 1000000, 1.1)
\set total random(299, 60000)
SELECT gen_random_uuid() AS order_id, gen_random_uuid() AS correlation, gen_random_uuid() AS request,
       gen_random_uuid() AS placed, gen_random_uuid() AS authorized, gen_random_uuid() AS confirmed,
       gen_random_uuid() AS captured, gen_random_uuid() AS payment, gen_random_uuid() AS auth_id \gset
-- 1. order-svc, PlaceOrder: idempotency key, order, items, OrderPlaced in the outbox.
BEGIN;
INSERT INTO o.idempotency_keys (request_id, request_fingerprint, order_id, response, expires_at)
  VALUES (':request', decode(repeat('ab', 120), 'hex'), ':order_id', decode(repeat('cd', 60), 'hex'), now() + make_interval(secs => 86400))
  ON CONFLICT (request_id) DO UPDATE SET request_fingerprint = EXCLUDED.request_fingerprint
  WHERE o.idempotency_keys.expires_at < now() RETURNING request_id;
INSERT INTO o.orders (order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state, version, correlation_id, traceparent)
  VALUES (':order_id', :customer, 'EUR', :total, 'tok_visa', 'PENDING', 'AWAITING_PAYMENT', 0, ':correlation',
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
INSERT INTO o.order_items (order_id, line_no, sku, quantity, unit_price_minor)
  SELECT ':order_id', * FROM UNNEST(ARRAY[0, 1], ARRAY['BOOK-1', 'MUG-RED'], ARRAY[1, 2], ARRAY[1250, 899]::bigint[]);
INSERT INTO o.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':placed', 'orders.events', ':order_id', 'OrderPlaced', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex')) RETURNING id AS placed_row \gset
COMMIT;
-- 2. relay-orders publishes OrderPlaced: publisher lock, claim, mark.
BEGIN;
SELECT pg_try_advisory_xact_lock(8030591472428805231);
SELECT id, message_id, topic, partition_key, event_type, schema_version, traceparent, payload, created_at
  FROM o.outbox WHERE id = :placed_row AND published_at IS NULL FOR UPDATE SKIP LOCKED;
UPDATE o.outbox SET published_at = clock_timestamp() WHERE id = ANY(ARRAY[:placed_row]::bigint[]);
COMMIT;
-- 3. gateway-sim, Authorize: idempotency key, authorization, ledger line, stored reply.
BEGIN;
INSERT INTO g.idempotency_keys (idempotency_key, operation, fingerprint, response, expires_at)
  VALUES ('authorize::order_id', 'AUTHORIZE', decode(repeat('ab', 80), 'hex'), '', now() + make_interval(secs => 86400))
  ON CONFLICT (idempotency_key) DO NOTHING;
INSERT INTO g.authorizations (authorization_id, order_id, amount_minor, currency_code, state)
  VALUES (':auth_id', ':order_id', :total, 'EUR', 'AUTHORIZED');
INSERT INTO g.ledger (operation, order_id, authorization_id, amount_minor, currency_code, idempotency_key)
  VALUES ('AUTHORIZE', ':order_id', ':auth_id', :total, 'EUR', 'authorize::order_id');
UPDATE g.idempotency_keys SET response = decode(repeat('cd', 40), 'hex') WHERE idempotency_key = 'authorize::order_id';
COMMIT;
-- 4. payment-svc on OrderPlaced: inbox, payment row (locked read first), PaymentAuthorized.
BEGIN;
INSERT INTO p.inbox (consumer, message_id) VALUES ('payment', ':placed') ON CONFLICT DO NOTHING;
SELECT order_id, payment_id, state, authorization_id, amount_minor, currency_code
  FROM p.payments WHERE order_id = ANY(ARRAY[':order_id']::uuid[]) ORDER BY order_id FOR UPDATE;
INSERT INTO p.payments (payment_id, order_id, amount_minor, currency_code, state, authorization_id, failure_reason)
  VALUES (':payment', ':order_id', :total, 'EUR', 'AUTHORIZED', ':auth_id', NULL) ON CONFLICT (order_id) DO NOTHING;
INSERT INTO p.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':authorized', 'payments.events', ':order_id', 'PaymentAuthorized', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex')) RETURNING id AS authorized_row \gset
COMMIT;
-- 5. relay-payments publishes PaymentAuthorized.
BEGIN;
SELECT pg_try_advisory_xact_lock(8030591472428805231);
SELECT id, message_id, topic, partition_key, event_type, schema_version, traceparent, payload, created_at
  FROM p.outbox WHERE id = :authorized_row AND published_at IS NULL FOR UPDATE SKIP LOCKED;
UPDATE p.outbox SET published_at = clock_timestamp() WHERE id = ANY(ARRAY[:authorized_row]::bigint[]);
COMMIT;
-- 6. order-svc on PaymentAuthorized: inbox, order and items read, compare-and-set, OrderConfirmed.
BEGIN;
INSERT INTO o.inbox (consumer, message_id) VALUES ('order', ':authorized') ON CONFLICT DO NOTHING;
SELECT customer_id, currency_code, total_minor, payment_token, status, saga_state, cancellation_reason,
       version, correlation_id, created_at, updated_at, traceparent FROM o.orders WHERE order_id = ':order_id';
SELECT sku, quantity, unit_price_minor FROM o.order_items WHERE order_id = ':order_id' ORDER BY line_no;
UPDATE o.orders SET status = 'CONFIRMED', saga_state = 'COMPLETED', cancellation_reason = NULL, version = 1,
                    updated_at = now(), settled_at = clock_timestamp()
  WHERE order_id = ':order_id' AND version = 0;
INSERT INTO o.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':confirmed', 'orders.events', ':order_id', 'OrderConfirmed', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex')) RETURNING id AS confirmed_row \gset
COMMIT;
-- 7. relay-orders publishes OrderConfirmed.
BEGIN;
SELECT pg_try_advisory_xact_lock(8030591472428805231);
SELECT id, message_id, topic, partition_key, event_type, schema_version, traceparent, payload, created_at
  FROM o.outbox WHERE id = :confirmed_row AND published_at IS NULL FOR UPDATE SKIP LOCKED;
UPDATE o.outbox SET published_at = clock_timestamp() WHERE id = ANY(ARRAY[:confirmed_row]::bigint[]);
COMMIT;
-- 8. gateway-sim, Capture: idempotency key, locked authorization, capture, ledger line, reply.
BEGIN;
INSERT INTO g.idempotency_keys (idempotency_key, operation, fingerprint, response, expires_at)
  VALUES ('capture::order_id', 'CAPTURE', decode(repeat('ab', 80), 'hex'), '', now() + make_interval(secs => 86400))
  ON CONFLICT (idempotency_key) DO NOTHING;
SELECT order_id, state, amount_minor, currency_code FROM g.authorizations WHERE authorization_id = ':auth_id' FOR UPDATE;
UPDATE g.authorizations SET state = 'CAPTURED', captured_minor = :total, updated_at = now() WHERE authorization_id = ':auth_id';
INSERT INTO g.ledger (operation, order_id, authorization_id, amount_minor, currency_code, idempotency_key)
  VALUES ('CAPTURE', ':order_id', ':auth_id', :total, 'EUR', 'capture::order_id');
UPDATE g.idempotency_keys SET response = decode(repeat('cd', 40), 'hex') WHERE idempotency_key = 'capture::order_id';
COMMIT;
-- 9. payment-svc on OrderConfirmed: inbox, locked payment, capture recorded, PaymentCaptured.
BEGIN;
INSERT INTO p.inbox (consumer, message_id) VALUES ('payment', ':confirmed') ON CONFLICT DO NOTHING;
SELECT order_id, payment_id, state, authorization_id, amount_minor, currency_code
  FROM p.payments WHERE order_id = ANY(ARRAY[':order_id']::uuid[]) ORDER BY order_id FOR UPDATE;
UPDATE p.payments SET state = 'CAPTURED', version = version + 1, updated_at = now() WHERE order_id = ':order_id' AND state = 'AUTHORIZED';
INSERT INTO p.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  VALUES (':captured', 'payments.events', ':order_id', 'PaymentCaptured', 1,
          '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', decode(repeat('ef', 300), 'hex')) RETURNING id AS captured_row \gset
COMMIT;
-- 10. relay-payments publishes PaymentCaptured.
BEGIN;
SELECT pg_try_advisory_xact_lock(8030591472428805231);
SELECT id, message_id, topic, partition_key, event_type, schema_version, traceparent, payload, created_at
  FROM p.outbox WHERE id = :captured_row AND published_at IS NULL FOR UPDATE SKIP LOCKED;
UPDATE p.outbox SET published_at = clock_timestamp() WHERE id = ANY(ARRAY[:captured_row]::bigint[]);
COMMIT;
-- 11. fulfilment on OrderConfirmed: inbox, shipment.
BEGIN;
INSERT INTO f.inbox (consumer, message_id) VALUES ('fulfilment', ':confirmed') ON CONFLICT DO NOTHING;
INSERT INTO f.shipments (shipment_id, order_id) VALUES (gen_random_uuid(), ':order_id') ON CONFLICT (order_id) DO NOTHING;
COMMIT;
-- 12-15. the projector, once per event (OrderPlaced with its check that the order exists).
BEGIN;
INSERT INTO o.inbox (consumer, message_id) VALUES ('projector', ':placed') ON CONFLICT DO NOTHING;
SELECT EXISTS (SELECT 1 FROM o.orders WHERE order_id = ':order_id');
INSERT INTO o.order_read AS r (order_id, customer_id, currency_code, total_minor, items, placed_at, correlation_id, status, saga_state, last_event_type, history)
  VALUES (':order_id', :customer, 'EUR', :total, '[{"sku": "BOOK-1", "quantity": 1}, {"sku": "MUG-RED", "quantity": 2}]', now(), ':correlation',
          'PENDING', 'AWAITING_PAYMENT', 'OrderPlaced', jsonb_build_array('{"event_type": "OrderPlaced"}'::jsonb))
  ON CONFLICT (order_id) DO UPDATE SET customer_id = COALESCE(EXCLUDED.customer_id, r.customer_id), last_event_type = EXCLUDED.last_event_type,
     history = r.history || EXCLUDED.history, updated_at = now(), projected_at = now();
COMMIT;
BEGIN;
INSERT INTO o.inbox (consumer, message_id) VALUES ('projector', ':authorized') ON CONFLICT DO NOTHING;
INSERT INTO o.order_read AS r (order_id, payment_state, last_event_type, history)
  VALUES (':order_id', 'AUTHORIZED', 'PaymentAuthorized', jsonb_build_array('{"event_type": "PaymentAuthorized"}'::jsonb))
  ON CONFLICT (order_id) DO UPDATE SET payment_state = EXCLUDED.payment_state, last_event_type = EXCLUDED.last_event_type,
     history = r.history || EXCLUDED.history, updated_at = now(), projected_at = now();
COMMIT;
BEGIN;
INSERT INTO o.inbox (consumer, message_id) VALUES ('projector', ':confirmed') ON CONFLICT DO NOTHING;
INSERT INTO o.order_read AS r (order_id, status, saga_state, last_event_type, history)
  VALUES (':order_id', 'CONFIRMED', 'COMPLETED', 'OrderConfirmed', jsonb_build_array('{"event_type": "OrderConfirmed"}'::jsonb))
  ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, saga_state = EXCLUDED.saga_state, last_event_type = EXCLUDED.last_event_type,
     history = r.history || EXCLUDED.history, updated_at = now(), projected_at = now();
COMMIT;
BEGIN;
INSERT INTO o.inbox (consumer, message_id) VALUES ('projector', ':captured') ON CONFLICT DO NOTHING;
INSERT INTO o.order_read AS r (order_id, payment_state, last_event_type, history)
  VALUES (':order_id', 'CAPTURED', 'PaymentCaptured', jsonb_build_array('{"event_type": "PaymentCaptured"}'::jsonb))
  ON CONFLICT (order_id) DO UPDATE SET payment_state = EXCLUDED.payment_state, last_event_type = EXCLUDED.last_event_type,
     history = r.history || EXCLUDED.history, updated_at = now(), projected_at = now();
COMMIT;
"#;

/// Write transactions per order in [`FULL`] and [`CRITICAL_PATH`].
pub const FULL_TRANSACTIONS: u32 = 15;
/// See [`FULL_TRANSACTIONS`].
pub const CRITICAL_PATH_TRANSACTIONS: u32 = 3;

/// Creates the scratch database with the four services' schemas (`o`, `p`, `f`, `g`).
async fn prepare(admin_url: &str) -> anyhow::Result<String> {
    let admin = PgConnectOptions::from_str(admin_url).context("ORDERFLOW_PG_ADMIN_URL")?;
    let mut conn = PgConnection::connect_with(&admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let scratch = admin.clone().database(DATABASE);
    let mut conn = PgConnection::connect_with(&scratch).await?;
    for schema in ["o", "p", "f", "g"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    for (schema, migrator) in [("o", &ORDERS), ("p", &PAYMENTS), ("f", &FULFILMENT), ("g", &GATEWAY)] {
        let mut conn = PgConnection::connect_with(&scratch.clone().options([("search_path", schema)])).await?;
        migrator.run(&mut conn).await?;
        conn.close().await?;
    }
    // The admin URL with the scratch database: replace the path.
    let base = admin_url.split('?').next().unwrap_or(admin_url);
    let root = base.rsplit_once('/').map_or(base, |(root, _)| root);
    Ok(format!("{root}/{DATABASE}"))
}

/// Finds pgbench on PATH or in Debian's PostgreSQL directories.
pub fn find_pgbench() -> Option<String> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in path.split(':') {
            let candidate = Path::new(dir).join("pgbench");
            if candidate.is_file() {
                return Some(candidate.to_string_lossy().into_owned());
            }
        }
    }
    let mut found: Vec<String> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    found.sort();
    found.pop()
}

/// Runs both scripts for `seconds` each with `clients` connections, the full one first; one
/// pgbench transaction (one run of a script) is one order.
pub async fn run(admin_url: &str, clients: u32, seconds: u32) -> anyhow::Result<PgbenchCeiling> {
    let pgbench = find_pgbench().context("pgbench not found (Debian: apt-get install postgresql)")?;
    let url = prepare(admin_url).await?;
    let full = run_script(&pgbench, &url, "full", FULL, FULL_TRANSACTIONS, clients, seconds).await?;
    let critical_path = run_script(
        &pgbench,
        &url,
        "critical-path",
        CRITICAL_PATH,
        CRITICAL_PATH_TRANSACTIONS,
        clients,
        seconds,
    )
    .await?;
    Ok(PgbenchCeiling { full, critical_path })
}

async fn run_script(
    pgbench: &str,
    url: &str,
    name: &str,
    script: &str,
    transactions: u32,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<PgbenchResult> {
    let script_path = std::env::temp_dir().join(format!("orderflow-pgbench-{name}-{}.sql", std::process::id()));
    std::fs::write(&script_path, script)?;
    let args = [
        "-n".to_owned(),
        "-f".to_owned(),
        script_path.to_string_lossy().into_owned(),
        "-c".to_owned(),
        clients.to_string(),
        "-j".to_owned(),
        clients.clamp(1, 2).to_string(),
        "-T".to_owned(),
        seconds.to_string(),
        url.to_owned(),
    ];
    // Postgres's CPU per order: the machine's busy time during the run less pgbench's own.
    // (pgbench's backends start and end within the run, so summing the live postgres
    // processes at both ends, as the system's cost does, would miss them; the idle services
    // add a little.)
    let (busy_before, _) = super::probe::machine_ticks();
    let children_before = super::probe::children_ticks();
    let output = tokio::task::spawn_blocking({
        let pgbench = pgbench.to_owned();
        let args = args.clone();
        move || Command::new(pgbench).args(args).output()
    })
    .await??;
    let pgbench_ticks = super::probe::children_ticks().saturating_sub(children_before);
    let postgres_ticks = super::probe::machine_ticks()
        .0
        .saturating_sub(busy_before)
        .saturating_sub(pgbench_ticks);
    let _ = std::fs::remove_file(&script_path);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let value_after = |label: &str| -> Option<f64> {
        let line = stdout.lines().find(|l| l.starts_with(label))?;
        line[label.len()..].split_whitespace().next()?.parse().ok()
    };
    let orders_per_sec = value_after("tps = ").context("no tps in pgbench's output")?;
    let latency_avg_ms = value_after("latency average = ").unwrap_or(0.0);
    let orders = value_after("number of transactions actually processed: ").unwrap_or(0.0);
    // Print the command without the password.
    let shown_url = format!(
        "postgres://postgres:***@{}",
        url.rsplit_once('@').map_or("", |(_, host)| host)
    );
    let mut shown = args.to_vec();
    if let Some(last) = shown.last_mut() {
        *last = shown_url;
    }
    Ok(PgbenchResult {
        command: format!("{pgbench} {}", shown.join(" ")),
        script: script.to_owned(),
        transactions_per_order: transactions,
        orders_per_sec,
        latency_avg_ms,
        postgres_cpu_ms_per_order: postgres_ticks as f64 * super::probe::MILLIS_PER_TICK / orders.max(1.0),
    })
}
