//! One order's trace, from Jaeger's query API: every span of every service under the trace id
//! its PlaceOrder call started (the orders table keeps it, `orders.traceparent`), named by
//! the hop of the saga it belongs to, as a waterfall for a terminal, an SVG, or a page.
//!
//! The spans: order-svc's `PlaceOrder` and its `outbox_write`; each relay's `relay_publish`
//! per event (a child of the span that wrote the event); each consumer's `consume` per message
//! (a child of the publication, by the record's `traceparent` header); payment-svc's
//! `gateway_call` and gateway-sim's `grpc` span for the same call (payment-svc sends its trace
//! context in the call's metadata); the state transitions in between.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::Context as _;

/// One span, as Jaeger returns it, with the hop it belongs to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Span {
    pub span_id: String,
    pub parent_id: Option<String>,
    pub service: String,
    pub operation: String,
    /// Microseconds since the epoch.
    pub start_us: i64,
    pub duration_us: i64,
    pub tags: BTreeMap<String, String>,
    /// The saga hop (see [`hop_of`]), if the span is one.
    pub hop: Option<&'static str>,
    /// Nesting depth in the trace (0: a root).
    pub depth: usize,
}

/// A trace: its spans in waterfall order (each after its parent, siblings by start).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trace {
    pub trace_id: String,
    pub spans: Vec<Span>,
}

/// The hops of an order's journey, in saga order, as `hop_of` names them. A settled,
/// approved order's trace has a span for each of [`APPROVED_JOURNEY`].
pub const APPROVED_JOURNEY: &[&str] = &[
    "PlaceOrder",
    "outbox write",
    "relay publish",
    "payment consume",
    "gateway authorize",
    "order confirm",
    "capture",
    "fulfilment",
    "projector",
];

/// The saga hop a span belongs to, from its service, operation and attributes (the field
/// names the services give their spans: `group`, `operation`, `to`, `rpc.method`).
pub fn hop_of(service: &str, operation: &str, tags: &BTreeMap<String, String>) -> Option<&'static str> {
    let tag = |name: &str| tags.get(name).map(String::as_str);
    let gateway_operation = |name: &str| match name.to_ascii_lowercase().as_str() {
        "authorize" => Some("gateway authorize"),
        "capture" => Some("capture"),
        "void" => Some("void"),
        _ => None,
    };
    match operation {
        "PlaceOrder" => Some("PlaceOrder"),
        "outbox_write" => Some("outbox write"),
        "relay_publish" => Some("relay publish"),
        "consume" => match tag("group")? {
            "payment" => Some("payment consume"),
            "order" => Some("order consume"),
            "fulfilment" => Some("fulfilment"),
            "projector" => Some("projector"),
            _ => None,
        },
        "gateway_call" => gateway_operation(tag("operation")?),
        "grpc" if service == "gateway-sim" => gateway_operation(tag("rpc.method")?),
        "grpc" => Some("api edge"),
        "order_transition" => match order_svc::domain::OrderStatus::parse(tag("to")?)? {
            order_svc::domain::OrderStatus::Confirmed => Some("order confirm"),
            order_svc::domain::OrderStatus::Cancelled => Some("order cancel"),
            order_svc::domain::OrderStatus::Pending => None,
        },
        "payment_transition" => Some("payment record"),
        "sweeper_cancel" => Some("sweeper cancel"),
        _ => None,
    }
}

/// The trace id of an order's PlaceOrder call, from the orders database (None: no such order,
/// or it was placed without a trace context).
pub async fn trace_id_of_order(orders: &sqlx::PgPool, order_id: uuid::Uuid) -> anyhow::Result<Option<String>> {
    let traceparent: Option<Option<String>> = sqlx::query_scalar("SELECT traceparent FROM orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(orders)
        .await?;
    let traceparent = traceparent.context("no such order")?;
    Ok(traceparent
        .as_deref()
        .and_then(orderflow_platform::telemetry::trace_id_of)
        .map(str::to_owned))
}

/// The trace from Jaeger's HTTP query API at `jaeger_url` (`http://127.0.0.1:16686`); None
/// while Jaeger has no span of it yet. Blocking (call it off the async workers).
pub fn fetch(jaeger_url: &str, trace_id: &str) -> anyhow::Result<Option<Trace>> {
    let url = format!("{}/api/traces/{trace_id}", jaeger_url.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .with_context(|| format!("cannot reach Jaeger at {url}"))?;
    let status = response.status().as_u16();
    if status == 404 {
        return Ok(None);
    }
    let body = response.body_mut().read_to_string()?;
    anyhow::ensure!(status == 200, "Jaeger answered {status} for {url}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).context("Jaeger's answer is not JSON")?;
    parse(&json)
}

/// The trace once it stops growing: spans reach Jaeger in each service's export batches, so
/// the trace is read again until two reads 2 s apart agree, for at most `wait`. Fails when
/// Jaeger has no span of it by then. Blocking.
pub fn fetch_settled(jaeger_url: &str, trace_id: &str, wait: std::time::Duration) -> anyhow::Result<Trace> {
    let deadline = std::time::Instant::now() + wait;
    let mut last: Option<Trace> = None;
    loop {
        let now = fetch(jaeger_url, trace_id)?;
        let settled = matches!((&last, &now), (Some(before), Some(after)) if before.spans.len() == after.spans.len());
        if settled || std::time::Instant::now() >= deadline {
            return now.or(last).with_context(|| {
                format!("Jaeger has no span of trace {trace_id} (is the stack up with --telemetry?)")
            });
        }
        if now.is_some() {
            last = now;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Reads Jaeger's `{"data": [{"traceID", "spans": [...], "processes": {...}}]}`.
pub fn parse(json: &serde_json::Value) -> anyhow::Result<Option<Trace>> {
    let Some(data) = json["data"].as_array().and_then(|traces| traces.first()) else {
        return Ok(None);
    };
    let trace_id = data["traceID"].as_str().unwrap_or_default().to_owned();
    let services: HashMap<&str, &str> = data["processes"]
        .as_object()
        .map(|processes| {
            processes
                .iter()
                .map(|(id, process)| (id.as_str(), process["serviceName"].as_str().unwrap_or("?")))
                .collect()
        })
        .unwrap_or_default();
    let mut spans = Vec::new();
    for span in data["spans"].as_array().context("no spans in Jaeger's answer")? {
        let tags: BTreeMap<String, String> = span["tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .filter_map(|tag| {
                        let value = match &tag["value"] {
                            serde_json::Value::String(text) => text.clone(),
                            other => other.to_string(),
                        };
                        Some((tag["key"].as_str()?.to_owned(), value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let service = services
            .get(span["processID"].as_str().unwrap_or_default())
            .copied()
            .unwrap_or("?")
            .to_owned();
        let operation = span["operationName"].as_str().unwrap_or_default().to_owned();
        let parent_id = span["references"].as_array().and_then(|references| {
            references
                .iter()
                .find(|r| r["refType"] == "CHILD_OF")
                .and_then(|r| r["spanID"].as_str())
                .map(str::to_owned)
        });
        spans.push(Span {
            span_id: span["spanID"].as_str().unwrap_or_default().to_owned(),
            parent_id,
            hop: hop_of(&service, &operation, &tags),
            service,
            operation,
            start_us: span["startTime"].as_i64().unwrap_or_default(),
            duration_us: span["duration"].as_i64().unwrap_or_default(),
            tags,
            depth: 0,
        });
    }
    Ok(Some(Trace {
        trace_id,
        spans: waterfall_order(spans),
    }))
}

/// Each span after its parent, siblings by start time, with its depth; a span whose parent is
/// not in the trace (not exported yet, or from outside) is a root.
fn waterfall_order(spans: Vec<Span>) -> Vec<Span> {
    let ids: std::collections::HashSet<String> = spans.iter().map(|s| s.span_id.clone()).collect();
    let mut children: HashMap<Option<String>, Vec<Span>> = HashMap::new();
    for span in spans {
        let parent = span.parent_id.clone().filter(|p| ids.contains(p));
        children.entry(parent).or_default().push(span);
    }
    for siblings in children.values_mut() {
        siblings.sort_by_key(|s| (s.start_us, s.span_id.clone()));
    }
    let mut ordered = Vec::new();
    // Depth first, without recursion: a stack of (span, depth), roots last-first.
    let mut stack: Vec<(Span, usize)> = children
        .remove(&None)
        .unwrap_or_default()
        .into_iter()
        .rev()
        .map(|s| (s, 0))
        .collect();
    while let Some((mut span, depth)) = stack.pop() {
        span.depth = depth;
        if let Some(kids) = children.remove(&Some(span.span_id.clone())) {
            stack.extend(kids.into_iter().rev().map(|kid| (kid, depth + 1)));
        }
        ordered.push(span);
    }
    ordered
}

impl Trace {
    /// When the first span started (microseconds since the epoch).
    pub fn start_us(&self) -> i64 {
        self.spans.iter().map(|s| s.start_us).min().unwrap_or_default()
    }

    /// From the first span's start to the last span's end.
    pub fn duration_us(&self) -> i64 {
        self.spans
            .iter()
            .map(|s| s.start_us + s.duration_us)
            .max()
            .unwrap_or_default()
            - self.start_us()
    }

    /// The hops that have at least one span.
    pub fn hops(&self) -> std::collections::BTreeSet<&'static str> {
        self.spans.iter().filter_map(|s| s.hop).collect()
    }

    /// The waterfall for a terminal: one line per span (start offset, duration, service, hop,
    /// operation with its most telling attribute, and a bar on the trace's time line).
    pub fn render_text(&self) -> String {
        const BAR: usize = 32;
        let start = self.start_us();
        let total = self.duration_us().max(1) as f64;
        let mut out = String::new();
        let services: std::collections::BTreeSet<&str> = self.spans.iter().map(|s| s.service.as_str()).collect();
        let _ = writeln!(
            out,
            "trace {}: {} spans, {} services, {:.1} ms",
            self.trace_id,
            self.spans.len(),
            services.len(),
            total / 1000.0
        );
        let _ = writeln!(
            out,
            "{:>10} {:>10}  {:<15} {:<17} {:<40} time line",
            "start", "duration", "service", "hop", "operation"
        );
        for span in &self.spans {
            let offset = (span.start_us - start) as f64;
            let from = ((offset / total) * BAR as f64).floor() as usize;
            let width = (((span.duration_us as f64) / total) * BAR as f64).ceil().max(1.0) as usize;
            let from = from.min(BAR - 1);
            let width = width.min(BAR - from);
            let bar = format!(
                "{}{}{}",
                " ".repeat(from),
                "█".repeat(width),
                " ".repeat(BAR - from - width)
            );
            let operation = format!("{}{}", "  ".repeat(span.depth.min(8)), span.label());
            let _ = writeln!(
                out,
                "{:>7.1} ms {:>7.1} ms  {:<15} {:<17} {:<40} |{bar}|",
                offset / 1000.0,
                span.duration_us as f64 / 1000.0,
                span.service,
                span.hop.unwrap_or("-"),
                truncate(&operation, 40),
            );
        }
        out
    }

    /// The waterfall as an SVG (one row per span, coloured by service), for a page.
    pub fn render_svg(&self) -> String {
        const ROW: f64 = 18.0;
        const LABEL: f64 = 430.0;
        const PLOT: f64 = 560.0;
        let start = self.start_us();
        let total = self.duration_us().max(1) as f64;
        let height = ROW * (self.spans.len() as f64 + 2.0);
        let palette = [
            "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f",
        ];
        let mut services: Vec<&str> = self.spans.iter().map(|s| s.service.as_str()).collect();
        services.sort_unstable();
        services.dedup();
        let colour = |service: &str| palette[services.iter().position(|s| *s == service).unwrap_or(0) % palette.len()];
        let mut svg = format!(
            r#"<svg class="waterfall" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="monospace" font-size="11">"#,
            w = LABEL + PLOT + 80.0
        );
        let _ = write!(
            svg,
            r#"<text x="0" y="12">trace {} · {} spans · {:.1} ms</text>"#,
            escape(&self.trace_id),
            self.spans.len(),
            total / 1000.0
        );
        for (row, span) in self.spans.iter().enumerate() {
            let y = ROW * (row as f64 + 1.5);
            let x = LABEL + PLOT * (span.start_us - start) as f64 / total;
            let width = (PLOT * span.duration_us as f64 / total).max(1.5);
            let label = format!(
                "{}{} · {} · {}",
                "  ".repeat(span.depth.min(8)),
                span.service,
                span.hop.unwrap_or("-"),
                span.label()
            );
            let _ = write!(
                svg,
                r#"<text x="0" y="{ty}" xml:space="preserve">{label}</text><rect class="span" x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{h}" fill="{fill}"><title>{title}</title></rect><text x="{tx:.1}" y="{ty}">{ms:.1} ms</text>"#,
                ty = y + 11.0,
                label = escape(&truncate(&label, 64)),
                h = ROW - 4.0,
                fill = colour(&span.service),
                title = escape(&format!("{} {} {:?}", span.service, span.operation, span.tags)),
                tx = x + width + 4.0,
                ms = span.duration_us as f64 / 1000.0,
            );
        }
        svg.push_str("</svg>");
        svg
    }

    /// A self-contained page with the waterfall and a table of the spans.
    pub fn render_html(&self, title: &str) -> String {
        let mut rows = String::new();
        let start = self.start_us();
        for span in &self.spans {
            let _ = write!(
                rows,
                "<tr><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                (span.start_us - start) as f64 / 1000.0,
                span.duration_us as f64 / 1000.0,
                escape(&span.service),
                span.hop.unwrap_or("-"),
                escape(&span.label())
            );
        }
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}</style></head><body><h1>{t}</h1>{svg}<h2>Spans</h2><table><tr><th>start ms</th><th>duration ms</th><th>service</th><th>hop</th><th>operation</th></tr>{rows}</table></body></html>\n",
            t = escape(title),
            svg = self.render_svg()
        )
    }
}

impl Span {
    /// The operation with the attribute that tells spans of one name apart.
    fn label(&self) -> String {
        let detail = ["event_type", "rpc.method", "operation", "to", "topic"]
            .iter()
            .find_map(|name| self.tags.get(*name));
        match detail {
            Some(detail) => format!(
                "{} {}",
                self.operation,
                detail.trim_start_matches("orderflow.events.v1.")
            ),
            None => self.operation.clone(),
        }
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        text.chars().take(width - 1).chain(['…']).collect()
    }
}

/// Text for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jaeger_answer() -> serde_json::Value {
        serde_json::json!({"data": [{
            "traceID": "4bf92f3577b34da6a3ce929d0e0e4736",
            "processes": {"p1": {"serviceName": "order-svc"}, "p2": {"serviceName": "payment-svc"}, "p3": {"serviceName": "gateway-sim"}},
            "spans": [
                {"spanID": "c", "operationName": "consume", "processID": "p2", "startTime": 1_000_300, "duration": 50,
                 "references": [{"refType": "CHILD_OF", "spanID": "r"}], "tags": [{"key": "group", "type": "string", "value": "payment"}]},
                {"spanID": "a", "operationName": "PlaceOrder", "processID": "p1", "startTime": 1_000_000, "duration": 100,
                 "references": [], "tags": []},
                {"spanID": "o", "operationName": "outbox_write", "processID": "p1", "startTime": 1_000_010, "duration": 20,
                 "references": [{"refType": "CHILD_OF", "spanID": "a"}], "tags": [{"key": "event_type", "type": "string", "value": "orderflow.events.v1.OrderPlaced"}]},
                {"spanID": "r", "operationName": "relay_publish", "processID": "p1", "startTime": 1_000_200, "duration": 30,
                 "references": [{"refType": "CHILD_OF", "spanID": "o"}], "tags": []},
                {"spanID": "g", "operationName": "grpc", "processID": "p3", "startTime": 1_000_320, "duration": 10,
                 "references": [{"refType": "CHILD_OF", "spanID": "c"}], "tags": [{"key": "rpc.method", "type": "string", "value": "Authorize"}, {"key": "offset", "type": "int64", "value": 7}]}
            ]
        }]})
    }

    #[test]
    fn spans_are_named_by_hop_and_nested_under_their_parents() {
        let trace = parse(&jaeger_answer()).unwrap().unwrap();
        let order: Vec<(&str, usize, Option<&str>)> = trace
            .spans
            .iter()
            .map(|s| (s.span_id.as_str(), s.depth, s.hop))
            .collect();
        assert_eq!(
            order,
            [
                ("a", 0, Some("PlaceOrder")),
                ("o", 1, Some("outbox write")),
                ("r", 2, Some("relay publish")),
                ("c", 3, Some("payment consume")),
                ("g", 4, Some("gateway authorize")),
            ]
        );
        assert_eq!(trace.spans[4].tags["offset"], "7", "numbers become text");
        assert_eq!(trace.duration_us(), 350);
        let text = trace.render_text();
        assert!(
            text.contains("gateway-sim") && text.contains("outbox_write OrderPlaced"),
            "{text}"
        );
        let svg = trace.render_svg();
        assert_eq!(svg.matches("<rect class=\"span\"").count(), 5, "{svg}");
    }

    #[test]
    fn a_span_whose_parent_is_missing_is_a_root_and_an_empty_answer_is_no_trace() {
        let mut answer = jaeger_answer();
        answer["data"][0]["spans"]
            .as_array_mut()
            .unwrap()
            .retain(|s| s["spanID"] != "o");
        let trace = parse(&answer).unwrap().unwrap();
        assert_eq!(trace.spans.len(), 4);
        assert_eq!(trace.spans.iter().filter(|s| s.depth == 0).count(), 2);
        assert!(parse(&serde_json::json!({"data": []})).unwrap().is_none());
    }

    #[test]
    fn transitions_and_consumers_map_to_the_journey() {
        let tags = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(
            hop_of("order-svc", "order_transition", &tags(&[("to", "CONFIRMED")])),
            Some("order confirm")
        );
        assert_eq!(
            hop_of("payment-svc", "gateway_call", &tags(&[("operation", "capture")])),
            Some("capture")
        );
        assert_eq!(
            hop_of("fulfilment", "consume", &tags(&[("group", "fulfilment")])),
            Some("fulfilment")
        );
        assert_eq!(
            hop_of("order-projector", "consume", &tags(&[("group", "projector")])),
            Some("projector")
        );
        assert_eq!(
            hop_of("order-svc", "grpc", &tags(&[("rpc.method", "PlaceOrder")])),
            Some("api edge")
        );
        assert_eq!(hop_of("x", "something_else", &tags(&[])), None);
    }
}
