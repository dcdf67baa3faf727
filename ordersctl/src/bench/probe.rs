//! What the benchmark watches while it runs: outbox backlogs (from the databases), consumer
//! lag (from each process's Prometheus endpoint) and CPU per process (from /proc).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// Unpublished outbox rows in both service databases.
pub async fn outbox_backlog(orders: &PgPool, payments: &PgPool) -> Result<i64, sqlx::Error> {
    let query = "SELECT count(*) FROM outbox WHERE published_at IS NULL";
    let (a, b) = tokio::join!(
        sqlx::query_scalar::<_, i64>(query).fetch_one(orders),
        sqlx::query_scalar::<_, i64>(query).fetch_one(payments)
    );
    Ok(a? + b?)
}

/// Orders still PENDING: sagas in flight, the end-to-end backlog (a partial index keeps
/// this count cheap).
pub async fn pending_sagas(orders: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = $1")
        .bind(order_svc::domain::OrderStatus::Pending.as_str())
        .fetch_one(orders)
        .await
}

/// Sum of `metric` over the series of the Prometheus text served at `addr` whose labels
/// contain `label` ("" for every series); None when the endpoint does not answer.
pub fn scrape_sum(addr: &str, metric: &str, label: &str) -> Option<f64> {
    let body = scrape(addr)?;
    let total = body
        .lines()
        .filter(|line| is_series_of(line, metric))
        .filter(|line| line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(total)
}

/// Sum of `metric` over every series of every endpoint that answers.
pub fn scrape_total(endpoints: &[String], metric: &str) -> f64 {
    endpoints.iter().filter_map(|addr| scrape_sum(addr, metric, "")).sum()
}

/// The gateway simulator's database: the payment provider's, not the system's.
pub const GATEWAY_DATABASE: &str = "gateway";

/// The CPU of the Postgres backends serving the gateway's database.
pub const POSTGRES_GATEWAY: &str = "postgres-gateway";

/// Whether a Postgres backend's process title (`postgres: USER DATABASE HOST STATE`, its
/// `/proc/PID/cmdline`, with a cluster name before the user when one is set) names `database`.
fn serves_database(title: &str, database: &str) -> bool {
    let Some(rest) = title.trim_end_matches('\0').strip_prefix("postgres: ") else {
        return false;
    };
    let mut words = rest.split(' ').peekable();
    if words.peek().is_some_and(|first| first.ends_with(':')) {
        words.next();
    }
    // The user, then the database.
    words.nth(1) == Some(database)
}

/// Per `group` label, the sum of `metric` over every endpoint that answers.
pub fn scrape_by_group(endpoints: &[String], metric: &str) -> BTreeMap<String, f64> {
    let mut by_group = BTreeMap::new();
    for addr in endpoints {
        let Some(body) = scrape(addr) else { continue };
        for line in body.lines().filter(|line| is_series_of(line, metric)) {
            let Some(group) = line.split("group=\"").nth(1).and_then(|rest| rest.split('"').next()) else {
                continue;
            };
            if let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *by_group.entry(group.to_owned()).or_default() += value;
            }
        }
    }
    by_group
}

/// The Prometheus text served at `addr`; None when it does not answer.
fn scrape(addr: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Whether `line` is a sample of `metric` (not of a longer name that starts with it).
fn is_series_of(line: &str, metric: &str) -> bool {
    line.starts_with(metric) && line[metric.len()..].starts_with(['{', ' '])
}

/// CPU time of a set of processes, sampled twice to give a share of one core.
#[derive(Debug)]
pub struct CpuMeter {
    stack_dir: Option<PathBuf>,
    last: BTreeMap<String, u64>,
    last_machine: (u64, u64),
    last_at: Instant,
}

/// Clock ticks a second in /proc's CPU counters: USER_HZ is 100 on every Linux this runs on
/// (it is fixed in the kernel's ABI).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// CPU milliseconds in one clock tick of /proc's counters.
pub const MILLIS_PER_TICK: f64 = 1000.0 / CLOCK_TICKS_PER_SEC;

/// The sum of two adjacent tick counters of `/proc/PID/stat`, `first` counted from the field
/// after the command name (11: utime + stime; 13: the waited-for children's).
fn stat_ticks(pid: &str, first: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(first)?.parse::<u64>().ok()? + fields.get(first + 1)?.parse::<u64>().ok()?)
}

/// utime + stime of one process, in clock ticks.
pub(crate) fn process_ticks(pid: &str) -> Option<u64> {
    stat_ticks(pid, 11)
}

/// CPU ticks of this process's children that it has waited for (cutime + cstime).
pub fn children_ticks() -> u64 {
    stat_ticks("self", 13).unwrap_or(0)
}

/// (busy, total) ticks of the whole machine.
pub fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else { return (0, 0) };
    let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

impl CpuMeter {
    /// A meter over the stack's processes (pid files under `stack_dir/pid`), every Postgres
    /// backend, and this process.
    pub fn new(stack_dir: Option<&Path>) -> Self {
        let mut meter = Self {
            stack_dir: stack_dir.map(Path::to_path_buf),
            last: BTreeMap::new(),
            last_machine: machine_ticks(),
            last_at: Instant::now(),
        };
        meter.last = meter.ticks();
        meter
    }

    /// CPU ticks (utime + stime) so far of every process measured.
    pub fn ticks(&self) -> BTreeMap<String, u64> {
        let mut ticks = BTreeMap::new();
        if let Some(dir) = &self.stack_dir
            && let Ok(entries) = std::fs::read_dir(dir.join("pid"))
        {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().trim_end_matches(".pid").to_owned();
                if let Ok(pid) = std::fs::read_to_string(entry.path())
                    && let Some(t) = process_ticks(pid.trim())
                {
                    ticks.insert(name, t);
                }
            }
        }
        let (mut postgres, mut gateway) = (0, 0);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_string_lossy().into_owned();
                if !pid.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres") {
                    let used = process_ticks(&pid).unwrap_or(0);
                    // A backend's title names its database: the gateway's are the payment
                    // provider's machines, counted apart.
                    let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if serves_database(&title, GATEWAY_DATABASE) {
                        gateway += used;
                    } else {
                        postgres += used;
                    }
                }
            }
        }
        ticks.insert("postgres".into(), postgres);
        ticks.insert(POSTGRES_GATEWAY.into(), gateway);
        if let Some(t) = process_ticks("self") {
            ticks.insert("ordersctl-bench".into(), t);
        }
        ticks
    }

    /// Per process, the share of one core used since the last call (100 = one full core),
    /// and the machine's busy share of all cores (100 = every core busy).
    pub fn sample(&mut self) -> (BTreeMap<String, f64>, f64) {
        let now = self.ticks();
        let elapsed = self.last_at.elapsed().as_secs_f64().max(0.001);
        let mut shares = BTreeMap::new();
        for (name, &ticks) in &now {
            // A process that restarted has fewer ticks than before: count from zero.
            let before = self.last.get(name).copied().filter(|&b| b <= ticks).unwrap_or(0);
            shares.insert(
                name.clone(),
                (ticks - before) as f64 / CLOCK_TICKS_PER_SEC / elapsed * 100.0,
            );
        }
        // Postgres backends come and go; their sum can shrink when one exits.
        for name in ["postgres", POSTGRES_GATEWAY] {
            if let (Some(now_pg), Some(before_pg)) = (now.get(name), self.last.get(name))
                && now_pg < before_pg
            {
                shares.insert(name.into(), 0.0);
            }
        }
        let machine = machine_ticks();
        let busy = machine.0.saturating_sub(self.last_machine.0) as f64;
        let total = machine.1.saturating_sub(self.last_machine.1).max(1) as f64;
        self.last = now;
        self.last_machine = machine;
        self.last_at = Instant::now();
        (shares, busy / total * 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_is_counted_with_the_database_its_title_names() {
        assert!(serves_database(
            "postgres: gateway_sim gateway 127.0.0.1(5432) idle\0",
            "gateway"
        ));
        assert!(serves_database(
            "postgres: main: gateway_sim gateway 127.0.0.1(5432) SELECT",
            "gateway"
        ));
        assert!(!serves_database(
            "postgres: payment_svc payments 127.0.0.1(5432) idle",
            "gateway"
        ));
        // A role named like the database is not the database.
        assert!(!serves_database(
            "postgres: gateway orders 127.0.0.1(5432) idle",
            "gateway"
        ));
        assert!(!serves_database("postgres: walwriter", "gateway"));
    }
}
