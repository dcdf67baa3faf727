//! The invariant checker. It reads every store (orders, payments, fulfilment and the
//! gateway's ledger, which is the truth about money) and counts violations of what the
//! system promises, with example order ids.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use gateway_sim::AuthorizationState;
use order_svc::domain::OrderStatus;
use payment_svc::domain::PaymentState;
use sqlx::PgPool;

mod invariant;
pub use invariant::{Invariant, markdown_table};

/// The stores to check.
pub struct Stores {
    /// The orders database (orders and the read model).
    pub orders: PgPool,
    /// The payments database.
    pub payments: PgPool,
    /// The fulfilment database.
    pub fulfilment: PgPool,
    /// The gateway's database.
    pub gateway: PgPool,
}

impl Stores {
    /// Connects to the four databases (URLs are secrets: never logged), `pool_size`
    /// connections each.
    pub async fn connect(
        orders: &str,
        payments: &str,
        fulfilment: &str,
        gateway: &str,
        pool_size: u32,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let connect = |url: &str| {
            let url = orderflow_platform::Secret::new(url.to_owned());
            async move { orderflow_platform::connect_postgres(&url, pool_size).await }
        };
        Ok(Self {
            orders: connect(orders).await.context("orders database")?,
            payments: connect(payments).await.context("payments database")?,
            fulfilment: connect(fulfilment).await.context("fulfilment database")?,
            gateway: connect(gateway).await.context("gateway database")?,
        })
    }
}

/// One invariant and what broke it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What is checked.
    pub invariant: Invariant,
    /// What a violation is, for people.
    pub description: &'static str,
    /// How many orders break it.
    pub violations: usize,
    /// Up to five of them.
    pub examples: Vec<String>,
}

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    /// How many samples.
    pub samples: i64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// One table's size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSize {
    /// `database.table`.
    pub table: String,
    /// Rows.
    pub rows: i64,
    /// Bytes on disk, indexes included.
    pub bytes: i64,
}

async fn sizes(pool: &PgPool, database: &str, tables: &[&str]) -> Result<Vec<TableSize>, sqlx::Error> {
    let mut out = Vec::new();
    for table in tables {
        let (rows, bytes): (i64, i64) = sqlx::query_as(
            "SELECT (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I', $1), false, true, '')))[1]::text::bigint,
                    pg_total_relation_size($1::regclass)",
        )
        .bind(table)
        .fetch_one(pool)
        .await?;
        out.push(TableSize {
            table: format!("{database}.{table}"),
            rows,
            bytes,
        });
    }
    Ok(out)
}

/// A relay's replication slot, as the database knows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotLag {
    /// `database/slot`.
    pub slot: String,
    /// Postgres's `wal_status` (`reserved`, `extended`, `unreserved`, `lost`), or `missing`.
    pub wal_status: String,
    /// WAL between the current position and the slot's confirmed one.
    pub lag_bytes: Option<f64>,
    /// Seconds since its relay last recorded a confirmed position.
    pub confirmed_secs_ago: Option<f64>,
}

/// The whole verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Read-model lag: event occurred (its producing transaction) → projected, per event.
    pub read_model_lag: Option<Latency>,
    /// Rows and total size (with indexes and TOAST) of the tables that grow with traffic.
    pub table_sizes: Vec<TableSize>,
    /// The relays' replication slots (wal-message mode) and how far behind each is.
    pub slots: Vec<SlotLag>,
    /// Orders by status.
    pub orders_by_status: HashMap<String, i64>,
    /// Authorizations at the gateway by state.
    pub gateway_authorizations_by_state: HashMap<String, i64>,
    /// Shipments recorded.
    pub shipments: usize,
    /// Every invariant.
    pub checks: Vec<Check>,
}

impl Report {
    /// Total violations.
    pub fn violations(&self) -> usize {
        self.checks.iter().map(|c| c.violations).sum()
    }

    /// The violations of one invariant; an error if the report has no check of it (a report
    /// of another version, or one built by hand), never a silent zero.
    pub fn violations_of(&self, invariant: Invariant) -> Result<usize, MissingCheck> {
        self.checks
            .iter()
            .find(|c| c.invariant == invariant)
            .map(|c| c.violations)
            .ok_or(MissingCheck(invariant))
    }
}

/// A report without a check that was asked for.
#[derive(Debug, thiserror::Error)]
#[error("the report has no check of {0} ({desc})", desc = .0.description())]
pub struct MissingCheck(pub Invariant);

fn check(invariant: Invariant, mut ids: Vec<String>) -> Check {
    ids.sort();
    Check {
        invariant,
        description: invariant.description(),
        violations: ids.len(),
        examples: ids.into_iter().take(5).collect(),
    }
}

async fn ids(pool: &PgPool, sql: &'static str) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(sql).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The ids `sql` selects with `$1` bound to `states` (stored names, each spelled by its
/// service's enum).
async fn ids_in_states(pool: &PgPool, sql: &'static str, states: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(sql).bind(states).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// The same, with `$2` bound to an age in seconds.
async fn ids_in_states_since(
    pool: &PgPool,
    sql: &'static str,
    states: &[&str],
    secs: f64,
) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(sql).bind(states).bind(secs).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

async fn counts(pool: &PgPool, sql: &'static str) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

/// Whether `table` has a valid UNIQUE index on `order_id` alone (a constraint or an index).
async fn unique_on_order_id(pool: &PgPool, table: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
           SELECT 1 FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid
             AND i.indnkeyatts = 1 AND i.indpred IS NULL AND a.attname = 'order_id')",
    )
    .bind(table)
    .fetch_one(pool)
    .await
}

/// Checks every invariant. `deadline` is the saga deadline; an order PENDING longer than
/// `deadline + grace` is stuck.
pub async fn verify(stores: &Stores, deadline: Duration, grace: Duration) -> Result<Report, sqlx::Error> {
    let orders = &stores.orders;
    // One read of the orders: each id under its status (the names parsed by order-svc's
    // domain, where each is spelled once), and the count of each stored name.
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT order_id::text, status FROM orders")
        .fetch_all(orders)
        .await?;
    let (mut confirmed, mut cancelled, mut pending) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut orders_by_status: HashMap<String, i64> = HashMap::new();
    for (id, status) in rows {
        match OrderStatus::parse(&status) {
            Some(OrderStatus::Confirmed) => confirmed.insert(id),
            Some(OrderStatus::Cancelled) => cancelled.insert(id),
            Some(OrderStatus::Pending) => pending.insert(id),
            // A name this build does not know is counted below, in no set.
            None => false,
        };
        *orders_by_status.entry(status).or_default() += 1;
    }
    let stuck: Vec<(String,)> = sqlx::query_as(
        "SELECT order_id::text FROM orders WHERE status = $2 AND created_at < now() - make_interval(secs => $1)",
    )
    .bind((deadline + grace).as_secs_f64())
    .bind(OrderStatus::Pending.as_str())
    .fetch_all(orders)
    .await?;

    let gateway = &stores.gateway;
    // From the money side: every authorization still held past the deadline must belong to
    // an order that is still PENDING (and then the order is stuck, counted above). An order
    // that is settled, or that the order service never heard of (a forged or replayed
    // OrderPlaced), justifies no held money.
    let held_overdue = ids_in_states_since(
        gateway,
        "SELECT DISTINCT order_id FROM authorizations
         WHERE state = ANY($1) AND created_at < now() - make_interval(secs => $2)",
        &[AuthorizationState::Authorized.as_str()],
        (deadline + grace).as_secs_f64(),
    )
    .await?;
    let captured = ids_in_states(
        gateway,
        "SELECT DISTINCT order_id FROM authorizations WHERE state = ANY($1)",
        &[AuthorizationState::Captured.as_str()],
    )
    .await?;
    let holding = ids_in_states(
        gateway,
        "SELECT DISTINCT order_id FROM authorizations WHERE state = ANY($1)",
        &[
            AuthorizationState::Authorized.as_str(),
            AuthorizationState::Captured.as_str(),
        ],
    )
    .await?;
    let charged_twice = ids(
        gateway,
        "SELECT order_id FROM ledger GROUP BY order_id
         HAVING count(*) FILTER (WHERE operation = 'AUTHORIZE') > 1 OR count(*) FILTER (WHERE operation = 'CAPTURE') > 1",
    )
    .await?;
    let shipments = ids(&stores.fulfilment, "SELECT order_id::text FROM shipments").await?;
    // A payment owing a gateway call (AUTHORIZING, CAPTURING, VOIDING: docs/adr/0005) since
    // longer than the saga deadline: its executor died and no other finished it, or the
    // gateway refuses the call and an operator must act.
    let owed_too_long = ids_in_states_since(
        &stores.payments,
        "SELECT order_id::text FROM payments
         WHERE state = ANY($1) AND updated_at < now() - make_interval(secs => $2)",
        &PaymentState::pending_names(),
        (deadline + grace).as_secs_f64(),
    )
    .await?;
    let mut missing_constraints = Vec::new();
    for (pool, table) in [(&stores.payments, "payments"), (&stores.fulfilment, "shipments")] {
        if !unique_on_order_id(pool, table).await? {
            missing_constraints.push(format!("{table}.order_id"));
        }
    }

    let mismatched: Vec<(String,)> = sqlx::query_as(
        "SELECT o.order_id::text FROM orders o LEFT JOIN order_read r USING (order_id)
         WHERE r.order_id IS NULL OR r.status <> o.status OR r.saga_state <> o.saga_state",
    )
    .fetch_all(orders)
    .await?;

    // The relays' replication slots (wal-message mode): a slot a database remembers creating
    // that is missing or invalidated has lost the events its WAL held.
    let mut slots = Vec::new();
    let mut lost_slots = Vec::new();
    for (database, pool) in [("orders", orders), ("payments", &stores.payments)] {
        // slot, wal_status, lag in bytes, seconds since confirmed.
        type SlotRow = (String, Option<String>, Option<f64>, Option<f64>);
        let rows: Vec<SlotRow> = sqlx::query_as(
            "SELECT r.slot_name, s.wal_status,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8,
                    extract(epoch FROM now() - r.confirmed_at)::float8
             FROM outbox_wal_slot r LEFT JOIN pg_replication_slots s ON s.slot_name = r.slot_name",
        )
        .fetch_all(pool)
        .await?;
        for (slot, wal_status, lag_bytes, confirmed_secs_ago) in rows {
            if wal_status.is_none() || wal_status.as_deref() == Some("lost") {
                lost_slots.push(format!("{database}/{slot}"));
            }
            slots.push(SlotLag {
                slot: format!("{database}/{slot}"),
                wal_status: wal_status.unwrap_or_else(|| "missing".to_owned()),
                lag_bytes,
                confirmed_secs_ago,
            });
        }
    }

    // Exhaustive: an invariant declared and not computed here does not compile.
    let checks = Invariant::ALL
        .iter()
        .map(|&invariant| {
            let violating: Vec<String> = match invariant {
                Invariant::ReplicationSlotsKept => lost_slots.clone(),
                Invariant::NoSagaStuck => stuck.iter().map(|(id,)| id.clone()).collect(),
                Invariant::ConfirmedIsCaptured => confirmed.difference(&captured).cloned().collect(),
                Invariant::CancelledHoldsNoMoney => cancelled.intersection(&holding).cloned().collect(),
                Invariant::CapturedIsConfirmed => captured.difference(&confirmed).cloned().collect(),
                Invariant::NoMoneyHeldPastDeadline => held_overdue.difference(&pending).cloned().collect(),
                Invariant::ChargedAtMostOnce => charged_twice.iter().cloned().collect(),
                Invariant::NoGatewayCallOwedTooLong => owed_too_long.iter().cloned().collect(),
                Invariant::OneRowPerOrderByConstraint => missing_constraints.clone(),
                Invariant::ConfirmedIsShipped => confirmed.difference(&shipments).cloned().collect(),
                Invariant::ShippedIsConfirmed => shipments.difference(&confirmed).cloned().collect(),
                Invariant::ReadModelAgrees => mismatched.iter().map(|(id,)| id.clone()).collect(),
            };
            check(invariant, violating)
        })
        .collect();
    let lag: (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)::float8
         FROM (SELECT (extract(epoch FROM (e->>'projected_at')::timestamptz - (e->>'occurred_at')::timestamptz) * 1000)::float8 AS ms
               FROM order_read, jsonb_array_elements(history) AS e WHERE e ? 'projected_at') lags",
    )
    .fetch_one(orders)
    .await?;
    let read_model_lag = match lag {
        (samples, Some(p50_ms), Some(p99_ms), Some(max_ms)) if samples > 0 => Some(Latency {
            samples,
            p50_ms,
            p99_ms,
            max_ms,
        }),
        _ => None,
    };
    let mut table_sizes = sizes(
        orders,
        "orders",
        &["orders", "outbox", "inbox", "idempotency_keys", "order_read"],
    )
    .await?;
    table_sizes.extend(sizes(&stores.payments, "payments", &["payments", "outbox", "inbox"]).await?);
    table_sizes.extend(sizes(&stores.fulfilment, "fulfilment", &["shipments", "inbox"]).await?);
    table_sizes.extend(sizes(gateway, "gateway", &["ledger", "authorizations", "idempotency_keys"]).await?);
    Ok(Report {
        read_model_lag,
        table_sizes,
        slots,
        orders_by_status,
        gateway_authorizations_by_state: counts(gateway, "SELECT state, count(*) FROM authorizations GROUP BY state")
            .await?,
        shipments: shipments.len(),
        checks,
    })
}

/// `name count, name count` in name order, or `none`.
fn tally(counts: &HashMap<String, i64>) -> String {
    let mut counts: Vec<_> = counts.iter().collect();
    counts.sort();
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report for people (`--json` gives the same for programs).
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "orders:                 {}
",
        tally(&report.orders_by_status)
    ));
    out.push_str(&format!(
        "gateway authorizations: {}
",
        tally(&report.gateway_authorizations_by_state)
    ));
    out.push_str(&format!(
        "shipments:              {}
",
        report.shipments
    ));
    if let Some(lag) = report.read_model_lag {
        out.push_str(&format!(
            "read-model lag (event committed -> projected), {} events: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
            lag.samples, lag.p50_ms, lag.p99_ms, lag.max_ms
        ));
    }
    out.push_str("\ntable                      rows        kB\n");
    for size in &report.table_sizes {
        out.push_str(&format!(
            "{:<22} {:>9} {:>9}\n",
            size.table,
            size.rows,
            size.bytes / 1024
        ));
    }
    for slot in &report.slots {
        out.push_str(&format!(
            "slot {} {}: {:.0} kB behind, confirmed {:.0} s ago\n",
            slot.slot,
            slot.wal_status,
            slot.lag_bytes.unwrap_or(f64::NAN) / 1024.0,
            slot.confirmed_secs_ago.unwrap_or(f64::NAN)
        ));
    }
    out.push_str("\n     orders  invariant (what a violation is)\n");
    for check in &report.checks {
        let mark = if check.violations == 0 { "ok  " } else { "FAIL" };
        out.push_str(&format!(
            "{mark} {:>6}  {} ({})",
            check.violations, check.invariant, check.description
        ));
        if !check.examples.is_empty() {
            out.push_str(&format!("  e.g. {}", check.examples.join(", ")));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "\n{} violation(s) of {} invariants\n",
        report.violations(),
        report.checks.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>) -> Report {
        Report {
            read_model_lag: None,
            table_sizes: Vec::new(),
            slots: Vec::new(),
            orders_by_status: HashMap::from([("CONFIRMED".to_owned(), 3), ("CANCELLED".to_owned(), 1)]),
            gateway_authorizations_by_state: HashMap::new(),
            shipments: 3,
            checks,
        }
    }

    #[test]
    fn a_check_is_found_by_its_invariant_and_a_missing_one_is_an_error() {
        let report = report(vec![check(Invariant::ChargedAtMostOnce, vec!["o-1".to_owned()])]);
        assert_eq!(report.violations_of(Invariant::ChargedAtMostOnce).unwrap(), 1);
        let missing = report
            .violations_of(Invariant::CancelledHoldsNoMoney)
            .expect_err("no check of it in the report");
        assert!(missing.to_string().contains("cancelled_holds_no_money"), "{missing}");
    }

    #[test]
    fn the_people_report_is_a_table_without_debug_text() {
        let text = render(&report(vec![
            check(Invariant::ChargedAtMostOnce, vec!["o-1".to_owned()]),
            check(Invariant::ConfirmedIsShipped, Vec::new()),
        ]));
        assert!(
            text.contains("orders:                 CANCELLED 1, CONFIRMED 3"),
            "{text}"
        );
        assert!(text.contains("FAIL      1  charged_at_most_once ("), "{text}");
        assert!(text.contains("ok        0  confirmed_is_shipped ("), "{text}");
        assert!(!text.contains("(\"") && !text.contains("{ "), "Debug text: {text}");
    }

    #[test]
    fn the_json_report_names_each_check_by_its_identifier() {
        let json = serde_json::to_value(report(vec![check(Invariant::ReadModelAgrees, Vec::new())])).unwrap();
        assert_eq!(json["checks"][0]["invariant"], "read_model_agrees");
        assert_eq!(
            json["checks"][0]["description"],
            Invariant::ReadModelAgrees.description()
        );
    }
}
