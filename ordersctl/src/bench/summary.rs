//! A benchmark report (the JSON `ordersctl bench` wrote) as Markdown, for the docs: the
//! figures they quote are written by the tool from the committed report
//! (`ordersctl bench-summary docs/bench/....json`), and scripts/check-docs fails CI when a
//! copy in README or docs/ differs from what the report says, so a figure cannot drift from
//! its measurement. Read as plain JSON, so reports of earlier builds (whose fields were
//! fewer) still render.

use std::fmt::Write as _;

use serde_json::Value;

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("?")
}

fn number(value: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_f64()
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| format!("{v:.1} ms"))
}

/// `report`, read from `path`, as Markdown: where and how it was measured, the ceiling, each
/// step, and the verdict against the targets as the report gave it.
pub fn markdown(report: &Value, path: &str) -> String {
    let mut out = String::new();
    let ceiling = number(report, &["ceiling"]);
    let _ = writeln!(
        out,
        "Measured by `{}` (report `{path}`, started {}, {}).",
        text(report, "command"),
        text(report, "started_at"),
        text(report, "machine")
    );
    match ceiling {
        Some(c) => {
            let _ = write!(out, "\n**Ceiling: {c:.0} orders/s**");
            if let Some(why) = report.get("ceiling_broken_by").and_then(Value::as_str) {
                let _ = write!(out, "; the next step broke on {why}");
            }
            out.push_str(".\n");
        }
        None => out.push_str("\nOne run at a fixed rate (no ceiling searched).\n"),
    }
    out.push_str(
        "\n| offered/s | sustained/s | PlaceOrder p99 | relay lag p99 | saga p99 | read-model p99 | CPU per order | held |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for step in report.get("steps").and_then(Value::as_array).into_iter().flatten() {
        let offered = number(step, &["offered_rate"]).unwrap_or(0.0);
        let held = match ceiling {
            Some(c) if offered <= c => "yes",
            Some(_) => "no",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {offered:.0} | {:.1} | {} | {} | {} | {} | {} | {held} |",
            number(step, &["sustained_rate"]).unwrap_or(0.0),
            ms(number(step, &["place_order", "p99_ms"])),
            ms(number(step, &["relay_lag", "p99_ms"])),
            ms(number(step, &["saga_completion", "p99_ms"])),
            ms(number(step, &["read_model_convergence", "p99_ms"])),
            number(step, &["cost", "cpu_ms_total"]).map_or_else(|| "?".to_owned(), |v| format!("{v:.2} ms")),
        );
    }
    out.push_str("\n| target | goal | measured | met |\n|---|---|---|---|\n");
    for target in report.get("targets").and_then(Value::as_array).into_iter().flatten() {
        let met = target.get("met").and_then(Value::as_bool).unwrap_or(false);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            text(target, "name"),
            text(target, "goal"),
            text(target, "measured"),
            if met { "yes" } else { "**no**" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_reads_as_its_figures() {
        let report = serde_json::json!({
            "command": "ordersctl bench --find-ceiling",
            "started_at": "2026-12-07T08:31:50Z",
            "machine": "2 cores",
            "ceiling": 188.0,
            "ceiling_broken_by": "PlaceOrder p99 55 ms > 50 ms",
            "steps": [
                {"offered_rate": 188.0, "sustained_rate": 187.9, "place_order": {"p99_ms": 41.0},
                 "relay_lag": {"p99_ms": 80.0}, "saga_completion": {"p99_ms": 300.0},
                 "read_model_convergence": {"p99_ms": 90.0}, "cost": {"cpu_ms_total": 7.97}},
                {"offered_rate": 235.0, "sustained_rate": 230.0}
            ],
            "targets": [{"name": "ceiling (project)", "goal": ">= 1000", "measured": "188/s", "met": false}]
        });
        let md = markdown(&report, "docs/bench/x.json");
        assert!(md.contains("**Ceiling: 188 orders/s**; the next step broke on PlaceOrder p99 55 ms > 50 ms."));
        assert!(
            md.contains("| 188 | 187.9 | 41.0 ms | 80.0 ms | 300.0 ms | 90.0 ms | 7.97 ms | yes |"),
            "{md}"
        );
        assert!(md.contains("| 235 | 230.0 | ? | ? | ? | ? | ? | no |"), "{md}");
        assert!(md.contains("| ceiling (project) | >= 1000 | 188/s | **no** |"), "{md}");
    }
}
