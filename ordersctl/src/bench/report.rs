//! The benchmark's results: the JSON document, the terminal summary, and a self-contained
//! HTML report (inline SVG, no script, no network).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// One second of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the step began.
    pub t: f64,
    /// Orders accepted in that second.
    pub accepted_per_sec: f64,
    /// PlaceOrder p50 of the calls answered in that second.
    pub place_p50_ms: f64,
    /// PlaceOrder p99 of the calls answered in that second.
    pub place_p99_ms: f64,
    /// Unpublished outbox rows (both databases).
    pub outbox_backlog: i64,
    /// Orders still PENDING.
    pub pending_sagas: i64,
    /// The consumer groups' lag (high watermark − committed offset, every group and
    /// partition, asked of the broker: [`super::lag`]); None when the broker did not answer.
    pub consumer_lag: Option<f64>,
    /// Busy share of the machine (100 = every core).
    pub machine_cpu: f64,
    /// Share of one core per process (100 = one core).
    pub cpu: BTreeMap<String, f64>,
}

/// Saga completion of the orders placed in one second.
#[derive(Debug, Clone, Serialize)]
pub struct SecondLatency {
    /// Seconds since the step began (the end of the second, as the timeline counts).
    pub t: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Orders placed in that second that settled.
    pub orders: i64,
}

/// The measured window's slowest settled order.
#[derive(Debug, Clone, Serialize)]
pub struct SlowestOrder {
    pub order_id: uuid::Uuid,
    /// Placed to settled.
    pub saga_ms: f64,
    /// Its trace, when the stack exports spans to Jaeger.
    pub trace: Option<crate::trace::Trace>,
    /// Why there is no trace.
    pub note: String,
}

/// One load step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Arrivals a second asked for.
    pub offered_rate: f64,
    /// Warm-up, not measured.
    pub warmup_secs: f64,
    /// Measured duration.
    pub duration_secs: f64,
    /// Arrivals (warm-up included).
    pub offered: u64,
    /// Accepted by order-svc.
    pub accepted: u64,
    /// Arrivals the generator could not send (its in-flight limit was reached).
    pub not_sent: u64,
    /// Refusals by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Orders accepted a second over the measured window (from the database).
    pub sustained_rate: f64,
    /// PlaceOrder, client side, from the arrival's due time.
    pub place_order: Percentiles,
    /// Outbox commit to broker ack.
    pub relay_lag: Percentiles,
    /// Placed to terminal.
    pub saga_completion: Percentiles,
    /// Placed to terminal, approved cards only.
    pub saga_completion_approved: Percentiles,
    /// Terminal transition committed to visible in the read model.
    pub read_model_convergence: Percentiles,
    /// Slope of outbox backlog + sagas in flight over the second half, per second.
    pub backlog_slope_per_sec: f64,
    /// Highest outbox backlog + sagas in flight seen.
    pub backlog_max: f64,
    /// Everything settled after the load.
    pub drained: bool,
    /// How long settling took.
    pub drain_secs: f64,
    /// Average share of one core per process over the measured window.
    pub cpu: BTreeMap<String, f64>,
    /// Average busy share of the machine.
    pub machine_cpu: f64,
    /// What one order cost over the measured window.
    pub cost: super::cost::CostPerOrder,
    /// An approved order's saga, hop by hop.
    pub hops: Vec<super::hops::Hop>,
    /// Second by second.
    pub timeline: Vec<Sample>,
    /// Saga completion of the orders placed in each second.
    pub saga_over_time: Vec<SecondLatency>,
    /// The slowest order of the measured window, with its trace when there is one.
    pub slowest: Option<SlowestOrder>,
}

/// A target from the issue, and whether the run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub name: String,
    /// The goal.
    pub goal: String,
    /// What was measured.
    pub measured: String,
    /// Met.
    pub met: bool,
}

/// One pgbench script's run.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchResult {
    /// The command run.
    pub command: String,
    /// The script.
    pub script: String,
    /// Orders one run of the script writes.
    pub orders_per_run: u32,
    /// Database transactions per order (the gateway's apart).
    pub transactions_per_order: f64,
    /// Statements per order, BEGIN and COMMIT included (compare the services' own count in
    /// the step's cost).
    pub statements_per_order: f64,
    /// Runs of the script a second (one run = one order's database work).
    pub orders_per_sec: f64,
    /// Average latency of one order's work.
    pub latency_avg_ms: f64,
    /// Postgres CPU milliseconds per order: the machine's busy time during the run less
    /// pgbench's own, per order.
    pub postgres_cpu_ms_per_order: f64,
}

/// The pgbench side-by-side: Postgres's own ceiling for this workload.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchCeiling {
    /// Every transaction of one order, one order at a time (the system at low load).
    pub full: PgbenchResult,
    /// The same transactions for 32 orders at a time (the system under load).
    pub batched: PgbenchResult,
    /// The three critical-path transactions only (overstates the headroom).
    pub critical_path: PgbenchResult,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The command line.
    pub command: String,
    /// When.
    pub started_at: String,
    /// The machine.
    pub machine: String,
    /// The workload's parameters.
    pub workload: serde_json::Value,
    /// The steps (one unless searching for the ceiling).
    pub steps: Vec<StepReport>,
    /// The highest rate whose step held the service level, when searching.
    pub ceiling: Option<f64>,
    /// Why the first failing step failed.
    pub ceiling_broken_by: Option<String>,
    /// The bottleneck, with its evidence.
    pub bottleneck: Vec<String>,
    /// Postgres's own ceiling for one order's transactions.
    pub pgbench: Option<PgbenchCeiling>,
    /// The sustained rate as a share of pgbench's full-order rate.
    pub ratio_to_pgbench: Option<f64>,
    /// The targets.
    pub targets: Vec<Target>,
    /// The invariant checker's report.
    pub verify: serde_json::Value,
    /// Violations found.
    pub violations: usize,
}

fn p(p: &Percentiles) -> String {
    format!(
        "p50 {:>8.1}  p99 {:>8.1}  p99.9 {:>8.1}  max {:>8.1} ms  (n={})",
        p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms, p.samples
    )
}

/// Names the bottleneck of a step from where the CPU went and which queue grew.
pub fn bottleneck(step: &StepReport, cores: usize) -> Vec<String> {
    let mut evidence = Vec::new();
    let mut by_cpu: Vec<(&String, &f64)> = step.cpu.iter().collect();
    by_cpu.sort_by(|a, b| b.1.total_cmp(a.1));
    let top: Vec<String> = by_cpu
        .iter()
        .take(4)
        .map(|(name, share)| format!("{name} {share:.0}%"))
        .collect();
    evidence.push(format!(
        "machine CPU {:.0}% of {cores} cores; busiest processes (100% = one core): {}",
        step.machine_cpu,
        top.join(", ")
    ));
    if step.machine_cpu > 85.0 {
        evidence.push(format!(
            "the CPU is saturated: every process shares {cores} cores, so the bottleneck is the machine; \
             the largest consumer is {}",
            by_cpu.first().map_or("unknown", |(n, _)| n.as_str())
        ));
    }
    let last = step.timeline.last();
    let outbox = last.map_or(0, |s| s.outbox_backlog);
    let pending = last.map_or(0, |s| s.pending_sagas);
    let lag = last
        .and_then(|s| s.consumer_lag)
        .map_or_else(|| "?".to_owned(), |lag| format!("{lag:.0}"));
    if step.backlog_slope_per_sec > 2.0 {
        if outbox > pending {
            evidence.push(format!(
                "the outbox backlog grows ({outbox} rows at the end): the relays (or the broker's produce path) fall behind"
            ));
        } else {
            evidence.push(format!(
                "sagas in flight grow ({pending} PENDING at the end, consumer groups' lag {lag}): the consumers \
                 (payment-svc, order-svc) or the broker's fetch path fall behind"
            ));
        }
    }
    if step.place_order.p99_ms > 100.0 {
        evidence.push(format!(
            "PlaceOrder p99 {:.0} ms: requests queue in order-svc or wait on Postgres commits",
            step.place_order.p99_ms
        ));
    }
    evidence
}

/// The cost of one order as (what, per order) lines, shared by the text and HTML reports.
pub fn cost_lines(cost: &super::cost::CostPerOrder) -> Vec<(String, String)> {
    let mut lines = vec![(
        "CPU of the system (apart: the load generator, the gateway simulator and its database's backends, Jaeger, Prometheus)".to_owned(),
        format!("{:.2} ms", cost.cpu_ms_total),
    )];
    let mut by_cpu: Vec<(&String, &f64)> = cost.cpu_ms.iter().collect();
    by_cpu.sort_by(|a, b| b.1.total_cmp(a.1));
    for (name, ms) in by_cpu {
        let apart = if super::cost::is_apart(name) { " (apart)" } else { "" };
        lines.push((format!("  CPU {name}{apart}"), format!("{ms:.2} ms")));
    }
    lines.push((
        "Postgres transactions (the gateway's apart)".to_owned(),
        format!("{:.1}", cost.transactions_total),
    ));
    for (db, n) in &cost.transactions {
        lines.push((format!("  transactions in {db}"), format!("{n:.1}")));
    }
    lines.push((
        "Postgres statements (round trips, pings apart; the gateway's apart)".to_owned(),
        format!("{:.1}", cost.statements_total),
    ));
    for (db, n) in &cost.statements {
        lines.push((format!("  statements in {db}"), format!("{n:.1}")));
    }
    lines.push((
        "Postgres rows written (the gateway's apart)".to_owned(),
        format!("{:.1}", cost.rows_total),
    ));
    for (db, n) in &cost.rows {
        lines.push((format!("  rows written in {db}"), format!("{n:.1}")));
    }
    for (group, size) in &cost.unit_size {
        let what = if group == "place_order" {
            "orders per PlaceOrder transaction".to_owned()
        } else {
            format!("messages per unit of work, group {group}")
        };
        lines.push((format!("  {what}"), format!("{size:.1}")));
    }
    lines.push((
        "Kafka records published".to_owned(),
        format!("{:.2}", cost.records_produced),
    ));
    lines.push((
        "Kafka records consumed".to_owned(),
        format!("{:.2}", cost.records_consumed),
    ));
    lines
}

/// The terminal summary.
pub fn render_text(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "orderflow benchmark  {}  ({})", report.started_at, report.machine);
    for step in &report.steps {
        let _ = writeln!(
            out,
            "\nstep: {:.0} orders/s offered for {:.0} s (+{:.0} s warm-up): {} accepted, {} not sent, refused {:?}",
            step.offered_rate, step.duration_secs, step.warmup_secs, step.accepted, step.not_sent, step.errors
        );
        let _ = writeln!(out, "  sustained           {:.1} orders/s", step.sustained_rate);
        let _ = writeln!(out, "  PlaceOrder          {}", p(&step.place_order));
        let _ = writeln!(out, "  relay lag           {}", p(&step.relay_lag));
        let _ = writeln!(out, "  saga completion     {}", p(&step.saga_completion));
        let _ = writeln!(out, "    approved cards    {}", p(&step.saga_completion_approved));
        let _ = writeln!(out, "  read-model converg. {}", p(&step.read_model_convergence));
        let _ = writeln!(
            out,
            "  backlog             peak {:.0}, slope {:+.2}/s; drained {} in {:.1} s; machine CPU {:.0}%",
            step.backlog_max,
            step.backlog_slope_per_sec,
            if step.drained { "yes" } else { "NO" },
            step.drain_secs,
            step.machine_cpu
        );
        if !step.hops.is_empty() {
            let _ = writeln!(
                out,
                "  hop by hop (approved orders)                      p50        p99"
            );
            for hop in &step.hops {
                let _ = writeln!(
                    out,
                    "    {:<46} {:>7.1} ms {:>7.1} ms",
                    hop.name, hop.latency.p50_ms, hop.latency.p99_ms
                );
            }
        }
        let _ = writeln!(
            out,
            "  per order ({} orders over {:.0} s):",
            step.cost.orders, step.cost.seconds
        );
        for (what, value) in cost_lines(&step.cost) {
            let _ = writeln!(out, "    {what:<48} {value}");
        }
    }
    if let Some(ceiling) = report.ceiling {
        let _ = writeln!(out, "\nceiling: {ceiling:.0} orders/s sustainable");
        if let Some(why) = &report.ceiling_broken_by {
            let _ = writeln!(out, "  the next step broke: {why}");
        }
    }
    if !report.bottleneck.is_empty() {
        let _ = writeln!(out, "bottleneck:");
        for line in &report.bottleneck {
            let _ = writeln!(out, "  - {line}");
        }
    }
    if let Some(pg) = &report.pgbench {
        let _ = writeln!(
            out,
            "\npgbench on the same Postgres (one run of the script = one order):"
        );
        for (name, run) in [
            ("every transaction", &pg.full),
            ("every transaction, 32 orders each", &pg.batched),
            ("critical path only", &pg.critical_path),
        ] {
            let _ = writeln!(
                out,
                "  {name:<34} ({:.2} transactions, {:.1} statements per order): {:.0} orders/s, {:.2} ms per order, Postgres CPU {:.2} ms per order",
                run.transactions_per_order,
                run.statements_per_order,
                run.orders_per_sec,
                run.latency_avg_ms,
                run.postgres_cpu_ms_per_order
            );
        }
        if let Some(ratio) = report.ratio_to_pgbench {
            let _ = writeln!(
                out,
                "  the system sustains {:.0}% of the full-order rate",
                ratio * 100.0
            );
        }
    }
    let _ = writeln!(out, "\ntargets:");
    for t in &report.targets {
        let _ = writeln!(
            out,
            "  [{}] {:<32} goal {:<16} measured {}",
            if t.met { "met" } else { "MISSED" },
            t.name,
            t.goal,
            t.measured
        );
    }
    let _ = writeln!(
        out,
        "\ninvariants: {}",
        if report.violations == 0 {
            "0 violations".to_owned()
        } else {
            format!("{} VIOLATIONS", report.violations)
        }
    );
    out
}

/// One line chart as inline SVG: several series over a shared x axis.
/// One line of a chart: its name, its colour, its points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn chart(title: &str, unit: &str, series: &[Series<'_>]) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 220.0, 60.0, 30.0, 24.0, 150.0);
    let xs = series.iter().flat_map(|s| s.2.iter().map(|p| p.0));
    let x_max = xs.clone().fold(1.0_f64, f64::max);
    let x_min = xs.fold(x_max, f64::min).min(0.0);
    let y_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.1;
    let px = |x: f64| left + (x - x_min) / (x_max - x_min).max(1e-9) * (w - left - right);
    let py = |y: f64| h - bottom - y / y_max * (h - bottom - top);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">
<text x="{left}" y="14" font-weight="bold">{title}</text>
<line x1="{left}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{left}" y1="{top}" x2="{left}" y2="{b}" stroke="#888"/>
"##,
        b = h - bottom,
        r = w - right,
    );
    for i in 0..=4 {
        let y = y_max / 4.0 * f64::from(i);
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{:.1}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            left - 4.0,
            py(y) + 4.0,
            y,
            py(y),
            w - right,
            py(y)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds</text><text x="{}" y="{}" text-anchor="start">{:.0}</text><text x="4" y="{}" >{unit}</text>"#,
        (w - right + left) / 2.0,
        h - 6.0,
        left,
        h - 14.0,
        x_min,
        top - 4.0
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
        w - right,
        h - 14.0,
        x_max
    );
    for (i, (name, color, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            path.join(" "),
            w - right + 10.0,
            top + 16.0 * i as f64,
            w - right + 24.0,
            top + 9.0 + 16.0 * i as f64,
            crate::trace::escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The hops as horizontal bars, p50 filled and p99 outlined, on one scale.
fn hop_bars(hops: &[super::hops::Hop]) -> String {
    let (w, row, left, right) = (760.0, 26.0, 300.0, 90.0);
    let h = row * hops.len() as f64 + 40.0;
    let max = hops.iter().map(|hop| hop.latency.p99_ms).fold(1e-9_f64, f64::max);
    let scale = |ms: f64| ms / max * (w - left - right);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">
<text x="0" y="14" font-weight="bold">Saga latency by hop: p50 (filled), p99 (outline), ms</text>
"##
    );
    for (i, hop) in hops.iter().enumerate() {
        let y = 26.0 + row * i as f64;
        let _ = writeln!(
            svg,
            r##"<text x="{tx}" y="{ty}" text-anchor="end">{name}</text><rect x="{left}" y="{y}" width="{p99}" height="16" fill="none" stroke="{c}"/><rect x="{left}" y="{y}" width="{p50}" height="16" fill="{c}"/><text x="{lx}" y="{ty}">{p50v:.1} / {p99v:.1}</text>"##,
            tx = left - 6.0,
            ty = y + 12.0,
            name = crate::trace::escape(&hop.name),
            p99 = scale(hop.latency.p99_ms).max(1.0),
            p50 = scale(hop.latency.p50_ms).max(1.0),
            c = COLORS[i % COLORS.len()],
            lx = left + scale(hop.latency.p99_ms) + 6.0,
            p50v = hop.latency.p50_ms,
            p99v = hop.latency.p99_ms,
        );
    }
    svg.push_str("</svg>");
    svg
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22",
];

fn percentile_row(name: &str, p: &Percentiles) -> String {
    format!(
        "<tr><td>{name}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
        p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms, p.samples
    )
}

/// The HTML report: everything inline, opens with no network.
pub fn render_html(report: &BenchReport) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>orderflow benchmark</h1><p>{} &middot; {}</p><pre>{}</pre>",
        crate::trace::escape(&report.started_at),
        crate::trace::escape(&report.machine),
        crate::trace::escape(&report.command)
    );
    let _ = write!(
        body,
        "<h2>Targets</h2><table><tr><th>target</th><th>goal</th><th>measured</th><th></th></tr>"
    );
    for t in &report.targets {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            crate::trace::escape(&t.name),
            crate::trace::escape(&t.goal),
            crate::trace::escape(&t.measured),
            if t.met { "ok" } else { "bad" },
            if t.met { "met" } else { "missed" }
        );
    }
    let _ = write!(
        body,
        "</table><p>Invariant checker: <b class=\"{}\">{} violation(s)</b></p>",
        if report.violations == 0 { "ok" } else { "bad" },
        report.violations
    );
    if let Some(ceiling) = report.ceiling {
        let _ = write!(
            body,
            "<h2>Ceiling</h2><p>Highest sustainable rate: <b>{ceiling:.0} orders/s</b>."
        );
        if let Some(why) = &report.ceiling_broken_by {
            let _ = write!(body, " The next step broke: {}.", crate::trace::escape(why));
        }
        body.push_str("</p>");
        let offered: Vec<(f64, f64)> = report.steps.iter().map(|s| (s.offered_rate, s.offered_rate)).collect();
        let sustained: Vec<(f64, f64)> = report
            .steps
            .iter()
            .map(|s| (s.offered_rate, s.sustained_rate))
            .collect();
        body.push_str(&chart(
            "Sustained versus offered rate (x: offered orders/s)",
            "orders/s",
            &[("offered", COLORS[7], offered), ("sustained", COLORS[0], sustained)],
        ));
        let saga: Vec<(f64, f64)> = report
            .steps
            .iter()
            .map(|s| (s.offered_rate, s.saga_completion.p99_ms))
            .collect();
        let place: Vec<(f64, f64)> = report
            .steps
            .iter()
            .map(|s| (s.offered_rate, s.place_order.p99_ms))
            .collect();
        body.push_str(&chart(
            "p99 by offered rate (x: offered orders/s)",
            "ms",
            &[
                ("saga completion p99", COLORS[1], saga),
                ("PlaceOrder p99", COLORS[0], place),
            ],
        ));
    }
    if !report.bottleneck.is_empty() {
        body.push_str("<h2>Bottleneck</h2><ul>");
        for line in &report.bottleneck {
            let _ = write!(body, "<li>{}</li>", crate::trace::escape(line));
        }
        body.push_str("</ul>");
    }
    if let Some(pg) = &report.pgbench {
        let _ = write!(
            body,
            "<h2>Postgres's own ceiling</h2><p>pgbench replaying one order's transactions on the same Postgres. \
             The system sustained <b>{}</b> of the full-order rate.</p>\
             <table><tr><th>script</th><th>transactions per order</th><th>statements per order</th><th>orders/s</th><th>ms per order</th><th>Postgres CPU ms per order</th></tr>",
            report
                .ratio_to_pgbench
                .map_or("n/a".to_owned(), |r| format!("{:.0}%", r * 100.0)),
        );
        for (name, run) in [
            ("every transaction", &pg.full),
            ("every transaction, 32 orders each", &pg.batched),
            ("critical path only", &pg.critical_path),
        ] {
            let _ = write!(
                body,
                "<tr><td>{name}</td><td>{:.2}</td><td>{:.1}</td><td>{:.0}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                run.transactions_per_order,
                run.statements_per_order,
                run.orders_per_sec,
                run.latency_avg_ms,
                run.postgres_cpu_ms_per_order
            );
        }
        body.push_str("</table>");
        for (name, run) in [
            ("every transaction", &pg.full),
            ("every transaction, 32 orders each", &pg.batched),
            ("critical path only", &pg.critical_path),
        ] {
            let _ = write!(
                body,
                "<details><summary>{name}: command and script</summary><pre>{}</pre><pre>{}</pre></details>",
                crate::trace::escape(&run.command),
                crate::trace::escape(&run.script)
            );
        }
    }
    for (i, step) in report.steps.iter().enumerate() {
        let _ = write!(
            body,
            "<h2>Step {}: {:.0} orders/s offered</h2><p>{} accepted, {} not sent, refused {:?}; sustained {:.1} orders/s; \
             drained: {} ({:.1} s); machine CPU {:.0}%</p>",
            i + 1,
            step.offered_rate,
            step.accepted,
            step.not_sent,
            step.errors,
            step.sustained_rate,
            step.drained,
            step.drain_secs,
            step.machine_cpu
        );
        body.push_str(
            "<table><tr><th>latency (ms)</th><th>p50</th><th>p99</th><th>p99.9</th><th>max</th><th>n</th></tr>",
        );
        body.push_str(&percentile_row("PlaceOrder (client)", &step.place_order));
        body.push_str(&percentile_row("relay lag", &step.relay_lag));
        body.push_str(&percentile_row("saga completion", &step.saga_completion));
        body.push_str(&percentile_row(
            "saga completion, approved cards",
            &step.saga_completion_approved,
        ));
        body.push_str(&percentile_row("read-model convergence", &step.read_model_convergence));
        body.push_str("</table>");
        let _ = write!(
            body,
            "<table><tr><th>per order ({} orders over {:.0} s)</th><th></th></tr>",
            step.cost.orders, step.cost.seconds
        );
        for (what, value) in cost_lines(&step.cost) {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td></tr>",
                crate::trace::escape(&what),
                crate::trace::escape(&value)
            );
        }
        body.push_str("</table>");
        if !step.hops.is_empty() {
            body.push_str(
                "<table><tr><th>hop (approved orders)</th><th>p50</th><th>p99</th><th>p99.9</th><th>max</th><th>n</th></tr>",
            );
            for hop in &step.hops {
                body.push_str(&percentile_row(&hop.name, &hop.latency));
            }
            body.push_str("</table>");
            body.push_str(&hop_bars(&step.hops));
        }
        let series =
            |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> { step.timeline.iter().map(|s| (s.t, f(s))).collect() };
        body.push_str(&chart(
            "Throughput",
            "orders/s",
            &[
                ("accepted/s", COLORS[0], series(&|s| s.accepted_per_sec)),
                ("offered/s", COLORS[7], series(&|_| step.offered_rate)),
            ],
        ));
        body.push_str(&chart(
            "PlaceOrder latency per second (calls answered in that second)",
            "ms",
            &[
                ("PlaceOrder p50", COLORS[0], series(&|s| s.place_p50_ms)),
                ("PlaceOrder p99", COLORS[1], series(&|s| s.place_p99_ms)),
            ],
        ));
        let saga = |f: &dyn Fn(&SecondLatency) -> f64| -> Vec<(f64, f64)> {
            step.saga_over_time.iter().map(|s| (s.t, f(s))).collect()
        };
        body.push_str(&chart(
            "Saga completion per second (orders placed in that second)",
            "ms",
            &[
                ("saga p50", COLORS[2], saga(&|s| s.p50_ms)),
                ("saga p99", COLORS[3], saga(&|s| s.p99_ms)),
            ],
        ));
        body.push_str(&chart(
            "Backlog",
            "messages",
            &[
                ("outbox rows", COLORS[3], series(&|s| s.outbox_backlog as f64)),
                ("sagas in flight", COLORS[0], series(&|s| s.pending_sagas as f64)),
                (
                    "consumer groups' lag (high watermark − committed offset; commits trail by up to 1 s)",
                    COLORS[4],
                    // A sample the broker did not answer is left out, not drawn as zero.
                    step.timeline
                        .iter()
                        .filter_map(|s| s.consumer_lag.map(|lag| (s.t, lag)))
                        .collect(),
                ),
            ],
        ));
        let names: Vec<&String> = step.cpu.keys().collect();
        let cpu_series: Vec<Series<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    name.as_str(),
                    COLORS[i % COLORS.len()],
                    series(&|s| s.cpu.get(*name).copied().unwrap_or(0.0)),
                )
            })
            .collect();
        body.push_str(&chart("CPU per process (100 = one core)", "%", &cpu_series));
        if let Some(slowest) = &step.slowest {
            let _ = write!(
                body,
                "<h3>The slowest order: {} ({:.0} ms placed to settled)</h3>",
                slowest.order_id, slowest.saga_ms
            );
            match &slowest.trace {
                Some(trace) => body.push_str(&trace.render_svg()),
                None => {
                    let _ = write!(body, "<p>{}</p>", crate::trace::escape(&slowest.note));
                }
            }
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>orderflow benchmark</title><style>\
         body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
         td:first-child{{text-align:left}}.ok{{color:#2a7a2a}}.bad{{color:#b00}}pre{{background:#f6f6f6;padding:6px;overflow-x:auto}}\
         </style></head><body>{body}<h2>Raw data</h2><p>Everything above is in the JSON file written next to this report.</p>\
         </body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, outbox: i64, pending: i64) -> Sample {
        Sample {
            t,
            accepted_per_sec: 100.0,
            place_p50_ms: 8.0,
            place_p99_ms: 20.0,
            outbox_backlog: outbox,
            pending_sagas: pending,
            consumer_lag: Some(0.0),
            machine_cpu: 95.0,
            cpu: BTreeMap::from([("postgres".to_owned(), 80.0), ("kafka-1".to_owned(), 30.0)]),
        }
    }

    fn report() -> BenchReport {
        let mut step = crate::bench::tests::step_report(150.0, 1200.0, 0.0, 40.0, 1000);
        step.timeline = (0..20).map(|t| sample(f64::from(t), 3, 40)).collect();
        BenchReport {
            command: "ordersctl bench --rate 150 <script>".into(),
            started_at: "2026-11-24T00:00:00Z".into(),
            machine: "2 cores".into(),
            workload: serde_json::json!({"seed": 42}),
            steps: vec![step],
            ceiling: Some(150.0),
            ceiling_broken_by: None,
            bottleneck: vec!["machine CPU".into()],
            pgbench: None,
            ratio_to_pgbench: None,
            targets: vec![Target {
                name: "invariant violations".into(),
                goal: "0".into(),
                measured: "0".into(),
                met: true,
            }],
            verify: serde_json::json!({}),
            violations: 0,
        }
    }

    #[test]
    fn the_html_report_needs_no_network_and_escapes_what_it_quotes() {
        let html = render_html(&report());
        assert!(html.contains("<svg"), "the charts are inline SVG");
        assert!(!html.contains("<script"), "no script");
        assert!(
            !html.contains("src=\"http") && !html.contains("href=\"http"),
            "nothing fetched"
        );
        assert!(html.contains("&lt;script&gt;"), "the command line is escaped");
    }

    #[test]
    fn a_saturated_machine_is_named_the_bottleneck_with_its_largest_consumer() {
        let mut step = report().steps.remove(0);
        step.machine_cpu = 95.0;
        step.cpu = BTreeMap::from([("postgres".to_owned(), 80.0), ("kafka-1".to_owned(), 30.0)]);
        let evidence = bottleneck(&step, 2);
        assert!(evidence[0].contains("postgres 80%"), "{evidence:?}");
        assert!(
            evidence.iter().any(|e| e.contains("the largest consumer is postgres")),
            "{evidence:?}"
        );

        // Sagas in flight growing while the outbox keeps up: the consumers fall behind.
        step.backlog_slope_per_sec = 5.0;
        step.timeline = vec![sample(1.0, 2, 300)];
        let evidence = bottleneck(&step, 2);
        assert!(
            evidence.iter().any(|e| e.contains("sagas in flight grow (300 PENDING")),
            "{evidence:?}"
        );
    }
}
