//! What one order costs: counters read at both ends of a step's measured window, divided by
//! the orders accepted in it. CPU per process, Postgres transactions and statements per
//! database, Kafka records produced and consumed. These say whether a change helped, however
//! busy or noisy the machine was (a rate or a latency does not).
//!
//! The window is steady state: the work done in it belongs partly to orders placed just
//! before it, and the work of its last orders partly falls after it; over a window of many
//! seconds the two cancel out.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;
use sqlx::PgPool;

use super::probe;

/// The service databases, in the order the report shows them.
pub const DATABASES: [&str; 4] = ["orders", "payments", "fulfilment", "gateway"];

/// The roles the services run as (deploy/postgres/grants): the statements counted are
/// theirs, not the benchmark's own probes nor an operator's.
pub const SERVICE_ROLES: [&str; 7] = [
    "order_svc",
    "orders_relay",
    "orders_projector",
    "payment_svc",
    "payments_relay",
    "fulfilment_svc",
    "gateway_sim",
];

/// The process the benchmark runs in: its CPU is reported apart, never in the total.
pub const LOAD_GENERATOR: &str = "ordersctl-bench";

/// Processes that are not the system: the load generator, the stack's Jaeger and Prometheus
/// under --telemetry (they watch it), and the gateway simulator with its database's Postgres
/// backends (they stand in for a payment provider's machines). Their CPU is reported apart,
/// never in the total.
pub fn is_apart(process: &str) -> bool {
    matches!(
        process,
        LOAD_GENERATOR | "jaeger" | "prometheus" | "gateway-sim" | probe::POSTGRES_GATEWAY
    )
}

/// Whether a database is the system's own (the gateway's is the payment provider's): its
/// transactions, statements and rows count in the totals.
fn is_systems(database: &str) -> bool {
    database != probe::GATEWAY_DATABASE
}

/// Where the counters are read.
#[derive(Debug, Clone)]
pub struct Sources {
    /// A superuser connection: `pg_stat_database` of every database and
    /// `pg_stat_statements` of every role (None: no database counters).
    pub admin: Option<PgPool>,
    /// Metrics endpoints of the relays (records produced).
    pub relay_metrics: Vec<String>,
    /// Metrics endpoints of the consumers (records consumed).
    pub consumer_metrics: Vec<String>,
}

/// The counters at one moment.
#[derive(Debug, Clone)]
pub struct Counters {
    at: Instant,
    cpu_ticks: BTreeMap<String, u64>,
    transactions: BTreeMap<String, i64>,
    statements: BTreeMap<String, i64>,
    rows: BTreeMap<String, i64>,
    produced: f64,
    consumed: f64,
    /// Per consumer group (and `place_order`), messages (orders) in units of work so far and
    /// units so far.
    unit_messages: BTreeMap<String, f64>,
    units: BTreeMap<String, f64>,
}

/// One order's cost, averaged over a step's measured window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CostPerOrder {
    /// Orders accepted in the window (the divisor).
    pub orders: u64,
    /// Seconds the window lasted.
    pub seconds: f64,
    /// CPU milliseconds per order, by process (the load generator included, marked apart).
    pub cpu_ms: BTreeMap<String, f64>,
    /// CPU milliseconds per order over every process but the load generator.
    pub cpu_ms_total: f64,
    /// Postgres transactions (commits and rollbacks) per order, by database. Postgres
    /// publishes a busy backend's counts at most once a second, so a window's ends are
    /// blurred by about that much.
    pub transactions: BTreeMap<String, f64>,
    /// Transactions per order over the system's databases (the gateway's apart).
    pub transactions_total: f64,
    /// Statements per order by database, as `pg_stat_statements` counts them for the
    /// services' roles (BEGIN and COMMIT included). sqlx sends each statement in one round
    /// trip, so this is also the round trips per order, connection pings apart.
    pub statements: BTreeMap<String, f64>,
    /// Statements per order over the system's databases (the gateway's apart).
    pub statements_total: f64,
    /// Rows inserted, updated or deleted per order, by database (`pg_stat_database`).
    pub rows: BTreeMap<String, f64>,
    /// Rows written per order over the system's databases (the gateway's apart).
    pub rows_total: f64,
    /// The average unit of work, in messages, per consumer group; `place_order`: orders per
    /// PlaceOrder transaction (group commit).
    pub unit_size: BTreeMap<String, f64>,
    /// Kafka records the relays published, per order.
    pub records_produced: f64,
    /// Kafka records the consumers handled (processed, duplicate, skipped or
    /// dead-lettered), per order.
    pub records_consumed: f64,
}

/// Makes sure `pg_stat_statements` can be read (the stack preloads it; the view needs the
/// extension created in the database it is read from). False when it cannot be.
pub async fn prepare(admin: &PgPool) -> bool {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(admin)
        .await
        .is_ok()
        && sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
            .execute(admin)
            .await
            .is_ok()
}

/// A counter per service database, from a query returning (database, value) and binding
/// the databases as $1 (and, with `roles`, the services' roles as $2).
async fn per_database(admin: &PgPool, sql: &'static str, roles: bool) -> BTreeMap<String, i64> {
    let mut query = sqlx::query_as::<_, (String, i64)>(sql).bind(&DATABASES[..]);
    if roles {
        query = query.bind(&SERVICE_ROLES[..]);
    }
    match query.fetch_all(admin).await {
        Ok(rows) => rows.into_iter().collect(),
        Err(error) => {
            tracing::debug!(%error, "cannot read the database counters");
            BTreeMap::new()
        }
    }
}

impl Counters {
    /// Reads every counter now.
    pub async fn read(sources: &Sources, meter: &probe::CpuMeter) -> Self {
        let at = Instant::now();
        let cpu_ticks = meter.ticks();
        let (transactions, statements, rows) = match &sources.admin {
            Some(admin) => (
                per_database(
                    admin,
                    "SELECT datname::text, (xact_commit + xact_rollback)::int8 FROM pg_stat_database
                     WHERE datname = ANY($1)",
                    false,
                )
                .await,
                per_database(
                    admin,
                    "SELECT d.datname::text, sum(s.calls)::int8 FROM pg_stat_statements s
                     JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid
                     WHERE d.datname = ANY($1) AND r.rolname = ANY($2) GROUP BY 1",
                    true,
                )
                .await,
                per_database(
                    admin,
                    "SELECT datname::text, (tup_inserted + tup_updated + tup_deleted)::int8 FROM pg_stat_database
                     WHERE datname = ANY($1)",
                    false,
                )
                .await,
            ),
            None => (BTreeMap::new(), BTreeMap::new(), BTreeMap::new()),
        };
        let (relays, consumers) = (sources.relay_metrics.clone(), sources.consumer_metrics.clone());
        let (produced, consumed, unit_messages, units) = tokio::task::spawn_blocking(move || {
            use orderflow_platform::telemetry::{CONSUMER_BATCH_SIZE, PLACE_ORDER_BATCH_SIZE};
            let mut unit_messages = probe::scrape_by_group(&consumers, &format!("{CONSUMER_BATCH_SIZE}_sum"));
            let mut units = probe::scrape_by_group(&consumers, &format!("{CONSUMER_BATCH_SIZE}_count"));
            // order-svc serves PlaceOrder's group commit on the same endpoint as its consumer.
            unit_messages.insert(
                "place_order".into(),
                probe::scrape_total(&consumers, &format!("{PLACE_ORDER_BATCH_SIZE}_sum")),
            );
            units.insert(
                "place_order".into(),
                probe::scrape_total(&consumers, &format!("{PLACE_ORDER_BATCH_SIZE}_count")),
            );
            (
                probe::scrape_total(&relays, orderflow_platform::telemetry::RELAY_PUBLISHED),
                probe::scrape_total(&consumers, orderflow_platform::telemetry::CONSUMER_MESSAGES),
                unit_messages,
                units,
            )
        })
        .await
        .unwrap_or_default();
        Self {
            at,
            cpu_ticks,
            transactions,
            statements,
            rows,
            produced,
            consumed,
            unit_messages,
            units,
        }
    }

    /// What happened between `start` and `self`, per order, for `orders` orders.
    pub fn per_order_since(&self, start: &Self, orders: u64) -> CostPerOrder {
        let n = orders.max(1) as f64;
        let mut cpu_ms = BTreeMap::new();
        for (name, &ticks) in &self.cpu_ticks {
            // A process that restarted has fewer ticks than before: count from zero.
            let before = start.cpu_ticks.get(name).copied().filter(|&b| b <= ticks).unwrap_or(0);
            cpu_ms.insert(name.clone(), (ticks - before) as f64 * probe::MILLIS_PER_TICK / n);
        }
        let cpu_ms_total = cpu_ms
            .iter()
            .filter(|(name, _)| !is_apart(name))
            .map(|(_, ms)| ms)
            .sum();
        let delta = |now: &BTreeMap<String, i64>, before: &BTreeMap<String, i64>| -> BTreeMap<String, f64> {
            now.iter()
                .map(|(db, &v)| (db.clone(), (v - before.get(db).copied().unwrap_or(0)).max(0) as f64 / n))
                .collect()
        };
        let transactions = delta(&self.transactions, &start.transactions);
        let statements = delta(&self.statements, &start.statements);
        let rows = delta(&self.rows, &start.rows);
        let systems = |per_db: &BTreeMap<String, f64>| -> f64 {
            per_db.iter().filter(|(db, _)| is_systems(db)).map(|(_, n)| n).sum()
        };
        // Messages per unit in the window: both counters' growth, per group with units in it.
        let unit_size = self
            .units
            .iter()
            .filter_map(|(group, &units)| {
                let units = units - start.units.get(group).copied().unwrap_or(0.0);
                let messages = self.unit_messages.get(group).copied().unwrap_or(0.0)
                    - start.unit_messages.get(group).copied().unwrap_or(0.0);
                (units > 0.0).then(|| (group.clone(), messages / units))
            })
            .collect();
        CostPerOrder {
            orders,
            seconds: self.at.duration_since(start.at).as_secs_f64(),
            cpu_ms_total,
            cpu_ms,
            transactions_total: systems(&transactions),
            transactions,
            statements_total: systems(&statements),
            statements,
            rows_total: systems(&rows),
            rows,
            unit_size,
            records_produced: (self.produced - start.produced).max(0.0) / n,
            records_consumed: (self.consumed - start.consumed).max(0.0) / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(cpu: &[(&str, u64)], xacts: &[(&str, i64)], produced: f64) -> Counters {
        Counters {
            at: Instant::now(),
            cpu_ticks: cpu.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            transactions: xacts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            statements: BTreeMap::new(),
            rows: BTreeMap::new(),
            produced,
            consumed: 0.0,
            unit_messages: BTreeMap::new(),
            units: BTreeMap::new(),
        }
    }

    #[test]
    fn cost_is_the_counters_delta_per_order_with_the_load_generator_apart() {
        let start = counters(
            &[
                ("postgres", 100),
                (LOAD_GENERATOR, 10),
                ("relay-orders", 50),
                ("gateway-sim", 0),
            ],
            &[("orders", 1000), ("gateway", 0)],
            5.0,
        );
        let end = counters(
            &[
                ("postgres", 300),
                (LOAD_GENERATOR, 60),
                ("relay-orders", 20),
                ("gateway-sim", 100),
            ],
            &[("orders", 1400), ("gateway", 300)],
            205.0,
        );
        let cost = end.per_order_since(&start, 100);
        // 200 ticks of 10 ms over 100 orders.
        assert!((cost.cpu_ms["postgres"] - 20.0).abs() < 1e-9);
        assert!((cost.cpu_ms[LOAD_GENERATOR] - 5.0).abs() < 1e-9);
        // The relay restarted (fewer ticks than before): its 20 ticks count from zero.
        assert!((cost.cpu_ms["relay-orders"] - 2.0).abs() < 1e-9);
        // The gateway simulator is the payment provider's machines: apart.
        assert!((cost.cpu_ms["gateway-sim"] - 10.0).abs() < 1e-9);
        assert!((cost.cpu_ms_total - 22.0).abs() < 1e-9, "{}", cost.cpu_ms_total);
        assert!((cost.transactions["orders"] - 4.0).abs() < 1e-9);
        assert!((cost.transactions["gateway"] - 3.0).abs() < 1e-9);
        assert!((cost.transactions_total - 4.0).abs() < 1e-9, "the gateway's apart");
        assert!((cost.records_produced - 2.0).abs() < 1e-9);
    }
}
