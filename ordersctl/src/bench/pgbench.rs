//! Postgres's own ceiling for this workload: pgbench replays one order's database
//! transactions against the real schemas, in a scratch database on the same server (the four
//! services' schemas side by side: `o` orders, `p` payments, `f` fulfilment, `g` gateway). No
//! broker, no gRPC: what the database alone allows. Two scripts, run one after the other:
//!
//! - [`full_script`]`(1)`: **every** transaction of one approved order, as the services issue
//!   them at low load (every unit of work, batch and pass holding one order): PlaceOrder, four
//!   relay passes, payment-svc's two units and its executor's two recordings, the
//!   confirmation, the shipment, four projections (the gateway apart).
//! - [`full_script`]`(BATCH)`: the same for 32 orders at a time, as under load (units of work,
//!   group commit, relay passes and recordings that hold many orders): what Postgres does
//!   for the same rows written in batches.
//! - [`CRITICAL_PATH`]: the three transactions between PlaceOrder and a confirmed order
//!   (place, authorize, confirm). Faster, and overstates the headroom: kept to compare with
//!   earlier reports.
//!
//! The scripts are SQL text as pgbench reads it, so the stored state names (`'PENDING'`,
//! `'AUTHORIZING'`, ...) are written out here instead of bound from the services' enums.
//! They cannot drift unnoticed: the scripts run against the real migrations, whose CHECK
//! constraints refuse a name the services no longer use (pgbench then fails, and so does
//! the benchmark smoke run in scripts/test).

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

/// Every write transaction of approved orders, statement for statement as the services issue
/// them since units of work and group commit (docs/adr/0005), for `n` orders at a time: one
/// PlaceOrder transaction for `n` orders (group commit), each consumer's unit of work for `n`
/// of its messages, each relay pass for `n` rows, each executor recording for `n` answers.
/// `n = 1` is the system at low load (every transaction for one order); larger `n` is the
/// system under load, where units, batches and passes grow. The gateway's transactions are
/// left out: it stands in for a payment provider's machines, counted apart in the benchmark
/// too. An order's ids are derived from one random value per run (`md5(base || what || i)`),
/// so every statement finds the rows the earlier ones wrote.
pub fn full_script(n: u32) -> String {
    let series = format!("generate_series(1, {n}) AS i");
    let id = |what: &str| format!("md5(':base' || '{what}' || i)::uuid");
    let ids = |what: &str| format!("ARRAY(SELECT {} FROM {series})", id(what));
    let traceparent = "'00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'";
    let payload = "decode(repeat('ef', 300), 'hex')";
    let outbox = |schema: &str, topic: &str, what: &str, event: &str| {
        format!(
            "INSERT INTO {schema}.outbox (message_id, topic, partition_key, event_type, schema_version, traceparent, payload)
  SELECT {}, '{topic}', ({})::text, '{event}', 1, {traceparent}, {payload} FROM {series} ORDER BY i;",
            id(what),
            id("o")
        )
    };
    let relay = |schema: &str, what: &str| {
        format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.outbox WHERE published_at IS NULL);
BEGIN;
SELECT id, message_id, topic, partition_key, event_type, schema_version, traceparent, payload, created_at
  FROM {schema}.outbox WHERE message_id = ANY({}) AND published_at IS NULL ORDER BY id FOR UPDATE;
UPDATE {schema}.outbox SET published_at = clock_timestamp() WHERE message_id = ANY({});
COMMIT;",
            ids(what),
            ids(what)
        )
    };
    let inbox = |schema: &str, consumer: &str, what: &str| {
        format!(
            "INSERT INTO {schema}.inbox (consumer, message_id) SELECT '{consumer}', {} FROM {series} ORDER BY 2
  ON CONFLICT DO NOTHING RETURNING message_id;",
            id(what)
        )
    };
    let lock_payments = format!(
        "SELECT order_id, payment_id, state, authorization_id, amount_minor, currency_code
  FROM p.payments WHERE order_id = ANY({}) ORDER BY order_id FOR UPDATE;",
        ids("o")
    );
    let record = |from: &str, to: &str| {
        format!(
            "UPDATE p.payments p SET state = '{to}', authorization_id = COALESCE(p.authorization_id, 'auth_' || u.order_id),
    payment_token = NULL, lease_until = NULL, last_error = NULL, attempts = 0, version = p.version + 1, updated_at = now()
  FROM unnest({}) AS u(order_id) WHERE p.order_id = u.order_id AND p.state = '{from}' RETURNING p.order_id;",
            ids("o")
        )
    };
    let project = |what: &str, event: &str, set: &str| {
        format!(
            "BEGIN;
{}
INSERT INTO o.order_read AS r (order_id, {set}, last_event_type, history)
  SELECT {}, {}, '{event}', jsonb_build_array(jsonb_build_object('event_type', '{event}', 'message_id', {}))
  FROM {series} ORDER BY 1
  ON CONFLICT (order_id) DO UPDATE SET last_event_type = EXCLUDED.last_event_type,
     history = r.history || EXCLUDED.history, updated_at = now(), projected_at = now();
COMMIT;",
            inbox("o", "projector", what),
            id("o"),
            match event {
                "OrderPlaced" => "'PENDING'".to_owned(),
                "OrderConfirmed" => "'CONFIRMED'".to_owned(),
                "PaymentAuthorized" => "'AUTHORIZED'".to_owned(),
                _ => "'CAPTURED'".to_owned(),
            },
            id(what),
        )
    };
    format!(
        r"\set customer random_zipfian(1, 1000000, 1.1)
\set total random(299, 60000)
SELECT gen_random_uuid() AS base \gset
-- 1. order-svc, PlaceOrder ({n} calls, one group commit): keys, orders, items, OrderPlaced.
BEGIN;
INSERT INTO o.idempotency_keys (request_id, request_fingerprint, order_id, response, expires_at)
  SELECT ({request})::text, decode(repeat('ab', 120), 'hex'), {order}, decode(repeat('cd', 60), 'hex'), now() + make_interval(secs => 86400)
  FROM {series} ORDER BY 1
  ON CONFLICT (request_id) DO UPDATE SET request_fingerprint = EXCLUDED.request_fingerprint
  WHERE o.idempotency_keys.expires_at < now() RETURNING request_id;
INSERT INTO o.orders (order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state, version, correlation_id, traceparent)
  SELECT {order}, :customer, 'EUR', :total, 'tok_visa', 'PENDING', 'AWAITING_PAYMENT', 0, {correlation}, {traceparent} FROM {series};
INSERT INTO o.order_items (order_id, line_no, sku, quantity, unit_price_minor)
  SELECT {order}, v.l, v.sku, v.q, v.p FROM {series}, (VALUES (0, 'BOOK-1', 1, 1250), (1, 'MUG-RED', 2, 899)) AS v(l, sku, q, p);
{placed_outbox}
COMMIT;
-- 2. relay-orders publishes OrderPlaced (one pass).
{relay_placed}
-- 3. payment-svc, a unit of OrderPlaced: inbox, locked payments, AUTHORIZING intents (leased).
BEGIN;
{inbox_placed}
{lock_payments}
INSERT INTO p.payments (order_id, payment_id, amount_minor, currency_code, state, payment_token, correlation_id, causation_id,
                        traceparent, lease_until, attempts)
  SELECT {order}, {payment}, :total, 'EUR', 'AUTHORIZING', 'tok_visa', {correlation}, {placed}, {traceparent},
         now() + make_interval(secs => 3), 1 FROM {series} ORDER BY 1 ON CONFLICT (order_id) DO NOTHING;
COMMIT;
-- 4. payment-svc's executor records the authorizations: compare-and-set, PaymentAuthorized.
BEGIN;
{record_authorized}
{authorized_outbox}
COMMIT;
-- 5. relay-payments publishes PaymentAuthorized.
{relay_authorized}
-- 6. order-svc, a unit of PaymentAuthorized: inbox, orders and items read, compare-and-set, OrderConfirmed.
BEGIN;
{inbox_authorized}
SELECT order_id, customer_id, currency_code, total_minor, payment_token, status, saga_state, cancellation_reason,
       version, correlation_id, created_at, updated_at, traceparent FROM o.orders WHERE order_id = ANY({orders});
SELECT order_id, sku, quantity, unit_price_minor FROM o.order_items WHERE order_id = ANY({orders}) ORDER BY order_id, line_no;
UPDATE o.orders o SET status = 'CONFIRMED', saga_state = 'COMPLETED', cancellation_reason = NULL, version = 1,
                      updated_at = now(), settled_at = clock_timestamp()
  FROM unnest({orders}) AS u(order_id) WHERE o.order_id = u.order_id AND o.version = 0 RETURNING o.order_id;
{confirmed_outbox}
COMMIT;
-- 7. relay-orders publishes OrderConfirmed.
{relay_confirmed}
-- 8. payment-svc, a unit of OrderConfirmed: inbox, locked payments, CAPTURING intents.
BEGIN;
{inbox_confirmed}
{lock_payments}
UPDATE p.payments p SET state = 'CAPTURING', correlation_id = p.correlation_id, causation_id = NULL,
    lease_until = now() + make_interval(secs => 3), attempts = 1, version = p.version + 1, updated_at = now()
  FROM unnest({orders}) AS u(order_id) WHERE p.order_id = u.order_id AND p.state = 'AUTHORIZED';
COMMIT;
-- 9. the executor records the captures: compare-and-set, PaymentCaptured.
BEGIN;
{record_captured}
{captured_outbox}
COMMIT;
-- 10. relay-payments publishes PaymentCaptured.
{relay_captured}
-- 11. fulfilment, a unit of OrderConfirmed: inbox, shipments.
BEGIN;
{inbox_fulfilment}
INSERT INTO f.shipments (shipment_id, order_id) SELECT gen_random_uuid(), {order} FROM {series} ORDER BY 2
  ON CONFLICT (order_id) DO NOTHING;
COMMIT;
-- 12-15. the projector, a unit per event type (each order once per unit), OrderPlaced with its check.
SELECT order_id FROM o.orders WHERE order_id = ANY({orders});
{project_placed}
{project_authorized}
{project_confirmed}
{project_captured}
",
        request = id("r"),
        order = id("o"),
        orders = ids("o"),
        correlation = id("c"),
        payment = id("p"),
        placed = id("placed"),
        placed_outbox = outbox("o", "orders.events", "placed", "OrderPlaced"),
        relay_placed = relay("o", "placed"),
        inbox_placed = inbox("p", "payment", "placed"),
        record_authorized = record("AUTHORIZING", "AUTHORIZED"),
        authorized_outbox = outbox("p", "payments.events", "authorized", "PaymentAuthorized"),
        relay_authorized = relay("p", "authorized"),
        inbox_authorized = inbox("o", "order", "authorized"),
        confirmed_outbox = outbox("o", "orders.events", "confirmed", "OrderConfirmed"),
        relay_confirmed = relay("o", "confirmed"),
        inbox_confirmed = inbox("p", "payment", "confirmed"),
        record_captured = record("CAPTURING", "CAPTURED"),
        captured_outbox = outbox("p", "payments.events", "captured", "PaymentCaptured"),
        relay_captured = relay("p", "captured"),
        inbox_fulfilment = inbox("f", "fulfilment", "confirmed"),
        project_placed = project("placed", "OrderPlaced", "status"),
        project_authorized = project("authorized", "PaymentAuthorized", "payment_state"),
        project_confirmed = project("confirmed", "OrderConfirmed", "status"),
        project_captured = project("captured", "PaymentCaptured", "payment_state"),
    )
}

/// Orders per transaction of the batched script: the units the consumers form under load
/// (the benchmark reports the sizes it sees, per consumer group).
pub const BATCH: u32 = 32;

/// Database transactions in one run of a script: each BEGIN, and each statement outside one
/// (the relays' look for unpublished rows, the projector's check).
pub fn transactions_in(script: &str) -> u32 {
    let mut in_transaction = false;
    let mut transactions = 0;
    for statement in statements_in(script) {
        match statement.as_str() {
            "BEGIN" => {
                in_transaction = true;
                transactions += 1;
            }
            "COMMIT" => in_transaction = false,
            _ if !in_transaction => transactions += 1,
            _ => {}
        }
    }
    transactions
}

/// The SQL statements of a script (pgbench's meta-commands and comments apart), BEGIN and
/// COMMIT included: sqlx sends those as statements of their own too.
pub fn statements_in(script: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in script.lines() {
        let line = line.trim();
        // A query ended by \gset is the script's own bookkeeping (its ids), not the services'.
        if line.ends_with("\\gset") {
            current.clear();
            continue;
        }
        if line.is_empty() || line.starts_with("--") || line.starts_with('\\') {
            continue;
        }
        current.push_str(line);
        current.push(' ');
        if line.ends_with(';') {
            statements.push(current.trim().trim_end_matches(';').to_owned());
            current.clear();
        }
    }
    statements
}

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
    let full = run_script(&pgbench, &url, "full", &full_script(1), 1, clients, seconds).await?;
    let batched = run_script(&pgbench, &url, "batched", &full_script(BATCH), BATCH, clients, seconds).await?;
    let critical_path = run_script(&pgbench, &url, "critical-path", CRITICAL_PATH, 1, clients, seconds).await?;
    Ok(PgbenchCeiling {
        full,
        batched,
        critical_path,
    })
}

/// Runs `script` (which writes `orders_each` orders per run) for `seconds`.
async fn run_script(
    pgbench: &str,
    url: &str,
    name: &str,
    script: &str,
    orders_each: u32,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<PgbenchResult> {
    let script_path = std::env::temp_dir().join(format!("orderflow-pgbench-{name}-{}.sql", std::process::id()));
    std::fs::write(&script_path, script)?;
    // The password goes in pgbench's environment (only its owner reads it), never on its
    // command line (every local user can: /proc/PID/cmdline).
    let mut url = url::Url::parse(url).context("the pgbench database URL")?;
    let password = url.password().map(str::to_owned);
    let _ = url.set_password(None);
    let url = url.to_string();
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
        move || {
            let mut command = Command::new(pgbench);
            command.args(args);
            if let Some(password) = password {
                command.env("PGPASSWORD", password);
            }
            command.output()
        }
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
    let per_run = f64::from(orders_each.max(1));
    let orders_per_sec = value_after("tps = ").context("no tps in pgbench's output")? * per_run;
    let latency_avg_ms = value_after("latency average = ").unwrap_or(0.0) / per_run;
    let orders = value_after("number of transactions actually processed: ").unwrap_or(0.0) * per_run;
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
        orders_per_run: orders_each.max(1),
        transactions_per_order: f64::from(transactions_in(script)) / per_run,
        statements_per_order: statements_in(script).len() as f64 / per_run,
        orders_per_sec,
        latency_avg_ms,
        postgres_cpu_ms_per_order: postgres_ticks as f64 * super::probe::MILLIS_PER_TICK / orders.max(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_script_holds_every_transaction_of_an_order_and_the_batched_one_shares_them() {
        let one = full_script(1);
        // PlaceOrder, 4 relay passes (each a look and a transaction), 2 payment units, 2
        // recordings, the confirmation, the shipment, the projector's check and 4 units.
        assert_eq!(transactions_in(&one), 1 + 4 * 2 + 2 + 2 + 1 + 1 + 1 + 4);
        let batched = full_script(BATCH);
        assert_eq!(
            transactions_in(&batched),
            transactions_in(&one),
            "the same transactions, for 32 orders"
        );
        assert_eq!(statements_in(&batched).len(), statements_in(&one).len());
        assert!(batched.contains("generate_series(1, 32)"));
        // Every statement ends where it should: no statement swallowed another.
        assert!(
            statements_in(&one).iter().all(|s| !s.contains("; ")),
            "{:?}",
            statements_in(&one)
        );
    }
}
