//! One set of targets, the same everywhere: the seeds' service levels, and beside them the
//! project's own stricter goals where it has one. The benchmark's step rule
//! ([`super::sustainable`]) and its verdict read the limits here, and README and
//! docs/performance.md show [`markdown`] (`ordersctl targets` writes it; scripts/check-docs
//! fails CI when a copy differs), so a target cannot say one thing in the docs and another
//! in the code.

use std::time::Duration;

/// PlaceOrder, the call accepted (it writes the order and its event locally, it does not
/// wait for the payment): p99 limit.
pub const PLACE_ORDER_P99_MS: f64 = 50.0;
/// Outbox relay lag, row committed → published to Kafka: p99 limit.
pub const RELAY_LAG_P99_MS: f64 = 1_000.0;
/// Saga completion, order placed → CONFIRMED or CANCELLED: p99 limit.
pub const SAGA_P99_MS: f64 = 2_000.0;
/// Read-model convergence, the terminal transition committed → visible to GetOrder: p99 limit.
pub const READ_MODEL_P99_MS: f64 = 500.0;
/// The most arrivals a step may refuse or fail to send, as a share of them.
pub const MOST_REFUSED: f64 = 0.01;
/// The share of the ceiling at which the latencies are read.
pub const SHARE_OF_CEILING: f64 = 0.8;
/// The seeds' throughput: orders a second, held for [`SUSTAINED_FOR`] with a flat backlog.
pub const SEEDS_ORDERS_PER_SEC: f64 = 2_000.0;
/// How long the seeds' throughput must be held.
pub const SUSTAINED_FOR: Duration = Duration::from_secs(20 * 60);
/// The project's throughput goal on this 2-core machine, everything on it (issue 22).
pub const PROJECT_ORDERS_PER_SEC: f64 = 1_000.0;
/// The project's CPU per order (every process but the load generator), in milliseconds ...
pub const PROJECT_CPU_MS_PER_ORDER: f64 = 2.0;
/// ... read at this offered rate (issue 22).
pub const PROJECT_CPU_AT_RATE: f64 = 500.0;

/// One row of the targets table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// What is measured, and where.
    pub measure: String,
    /// The seeds' service level ("" where they set none).
    pub seeds: String,
    /// The project's stricter goal ("" where it has none).
    pub project: String,
}

fn ms(limit: f64) -> String {
    if limit >= 1_000.0 {
        format!("{} s", limit / 1_000.0)
    } else {
        format!("{limit} ms")
    }
}

/// The seeds' throughput level, as the verdict and the table say it.
pub fn seeds_throughput() -> String {
    format!(
        "≥ {} orders/s for ≥ {} min",
        thousands(SEEDS_ORDERS_PER_SEC),
        SUSTAINED_FOR.as_secs() / 60
    )
}

/// The project's throughput goal, as the verdict and the table say it.
pub fn project_throughput() -> String {
    format!(
        "≥ {} orders/s on this 2-core machine",
        thousands(PROJECT_ORDERS_PER_SEC)
    )
}

/// The project's CPU goal, as the verdict and the table say it.
pub fn project_cpu() -> String {
    format!(
        "≤ {PROJECT_CPU_MS_PER_ORDER} ms at {} orders/s offered",
        thousands(PROJECT_CPU_AT_RATE)
    )
}

/// A p99 limit, as the verdict and the table say it.
pub fn p99_below(limit_ms: f64) -> String {
    format!("< {}", ms(limit_ms))
}

fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    if n >= 1_000 {
        format!("{},{:03}", n / 1_000, n % 1_000)
    } else {
        n.to_string()
    }
}

/// Every target, in the order the table shows them.
pub fn rows() -> Vec<Row> {
    let share = format!("{:.0}%", SHARE_OF_CEILING * 100.0);
    vec![
        Row {
            measure: format!(
                "orders/s sustained (the ceiling: every level below held, a flat backlog, ≥ {:.0}% of arrivals accepted)",
                (1.0 - MOST_REFUSED) * 100.0
            ),
            seeds: seeds_throughput(),
            project: project_throughput(),
        },
        Row {
            measure: "PlaceOrder p99".into(),
            seeds: p99_below(PLACE_ORDER_P99_MS),
            project: String::new(),
        },
        Row {
            measure: "relay lag p99 (outbox row committed → published)".into(),
            seeds: p99_below(RELAY_LAG_P99_MS),
            project: String::new(),
        },
        Row {
            measure: format!("saga completion p99 (placed → CONFIRMED or CANCELLED), at {share} of the ceiling"),
            seeds: p99_below(SAGA_P99_MS),
            project: String::new(),
        },
        Row {
            measure: "read-model convergence p99 (terminal transition → visible to GetOrder)".into(),
            seeds: p99_below(READ_MODEL_P99_MS),
            project: String::new(),
        },
        Row {
            measure: "CPU per order, every process but the load generator".into(),
            seeds: String::new(),
            project: project_cpu(),
        },
        Row {
            measure: "invariant violations (`ordersctl verify`)".into(),
            seeds: "0".into(),
            project: "0".into(),
        },
    ]
}

/// The targets as a Markdown table (what README and docs/performance.md hold).
pub fn markdown() -> String {
    let mut out = String::from("| measure | the seeds' service level | the project's goal |\n|---|---|---|\n");
    for row in rows() {
        let or_dash = |s: &str| if s.is_empty() { "—".to_owned() } else { s.to_owned() };
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            row.measure,
            or_dash(&row.seeds),
            or_dash(&row.project)
        ));
    }
    out.push_str(&format!(
        "\nThe latencies hold at every step up to the ceiling (`ordersctl bench --find-ceiling`); the \
         verdict reads them at the step nearest below {:.0}% of it.\n",
        SHARE_OF_CEILING * 100.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_the_limits_the_code_applies() {
        let table = markdown();
        for expected in [
            "| PlaceOrder p99 | < 50 ms | — |",
            "< 1 s |",
            "< 2 s |",
            "< 500 ms |",
            "≥ 2,000 orders/s for ≥ 20 min",
            "≥ 1,000 orders/s on this 2-core machine",
            "≤ 2 ms at 500 orders/s offered",
            "at 80% of the ceiling",
        ] {
            assert!(table.contains(expected), "{expected:?} in\n{table}");
        }
    }
}
