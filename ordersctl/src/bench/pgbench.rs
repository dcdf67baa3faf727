//! Postgres's own ceiling for this workload: pgbench replays one order's database
//! transactions (the place with its outbox row, the payment with its inbox and outbox rows,
//! the confirmation with its inbox and outbox rows) against the real schemas, in a scratch
//! database on the same server. No broker, no gRPC, no relay: what the database alone allows.

use std::path::Path;
use std::process::Command;
use std::str::FromStr as _;

use anyhow::Context as _;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::report::PgbenchResult;

/// The scratch database (dropped and created again on every run).
pub const DATABASE: &str = "orderflow_pgbench";

static ORDERS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/orders");
static PAYMENTS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/payments");

/// One order's three transactions, as order-svc and payment-svc issue them (schema `o` is
/// the orders database, `p` the payments database). Payloads are 300 bytes, about the size
/// of an encoded envelope.
pub const SCRIPT: &str = r"\set customer random_zipfian(1, 1000000, 1.1)
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

/// Creates the scratch database with the orders schema in `o` and the payments schema in `p`.
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
    for schema in ["o", "p"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    for (schema, migrator) in [("o", &ORDERS), ("p", &PAYMENTS)] {
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

/// Runs the script for `seconds` with `clients` connections; one pgbench transaction is one
/// order.
pub async fn run(admin_url: &str, clients: u32, seconds: u32) -> anyhow::Result<PgbenchResult> {
    let pgbench = find_pgbench().context("pgbench not found (Debian: apt-get install postgresql)")?;
    let url = prepare(admin_url).await?;
    let script_path = std::env::temp_dir().join(format!("orderflow-pgbench-{}.sql", std::process::id()));
    std::fs::write(&script_path, SCRIPT)?;
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
        url.clone(),
    ];
    let output = tokio::task::spawn_blocking({
        let pgbench = pgbench.clone();
        let args = args.clone();
        move || Command::new(pgbench).args(args).output()
    })
    .await??;
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
        script: SCRIPT.to_owned(),
        orders_per_sec,
        latency_avg_ms,
    })
}
