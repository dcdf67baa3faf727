//! One order's journey, seen the way an operator sees it, on the running local stack with
//! telemetry (`scripts/stack up --telemetry`: every service as its own process, exporting to
//! Jaeger): `ordersctl trace` holds a span of every hop of the saga under the order's one
//! trace id, gateway-sim's among them; `ordersctl explain` on an order stuck because
//! payment-svc is stopped names the hop, the group, the partition and the lag.
//!
//! It needs that stack, so it is ignored by a plain `cargo test`; `scripts/test` runs it on the
//! demo's stack (`cargo test -p orderflow-tests --test journey -- --ignored`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use orderflow_tests::{eventually, stack};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `ordersctl` (as `scripts/stack` built it) with the stack's environment; its standard
/// output, or a panic with its error.
fn ordersctl(args: &[&str]) -> String {
    let binary = root().join("target/debug/ordersctl");
    assert!(
        binary.exists(),
        "{} is not built (cargo build -p ordersctl)",
        binary.display()
    );
    let output = Command::new(&binary)
        .args(args)
        .envs(&stack().vars)
        .output()
        .expect("run ordersctl");
    assert!(
        output.status.success(),
        "ordersctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn stack_command(args: &[&str]) {
    let status = Command::new(root().join("scripts/stack"))
        .args(args)
        .env("ORDERFLOW_NO_BUILD", "1")
        .status()
        .expect("run scripts/stack");
    assert!(status.success(), "scripts/stack {args:?} failed");
}

fn place(sku: &str) -> String {
    let placed = ordersctl(&["place", "--customer", "77", "--item", &format!("{sku}:1:990")]);
    placed
        .lines()
        .find_map(|line| line.strip_prefix("order_id"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("no order_id in {placed}"))
}

fn explain(order_id: &str) -> serde_json::Value {
    serde_json::from_str(&ordersctl(&["explain", order_id, "--json"])).unwrap()
}

/// Starts whatever the test stopped again, also when it fails half-way.
struct Revive;

impl Drop for Revive {
    fn drop(&mut self) {
        stack_command(&["revive"]);
    }
}

#[tokio::test]
#[ignore = "needs the running stack with --telemetry; scripts/test runs it after the demo"]
async fn an_orders_trace_holds_every_hop_and_explain_names_the_stuck_one() {
    assert!(
        stack().vars.contains_key("ORDERFLOW_JAEGER_URL"),
        "the stack runs without Jaeger: scripts/stack up --telemetry"
    );

    // A settled order: every store agrees, and its trace has every hop.
    let order_id = place("JOURNEY-1");
    ordersctl(&["watch", &order_id, "--timeout-secs", "60"]);
    let mut last = serde_json::Value::Null;
    let settled = eventually(Duration::from_secs(30), || {
        last = explain(&order_id);
        let diagnosis = last["diagnosis"].as_str().unwrap_or_default().to_owned();
        async move { diagnosis.starts_with("settled: CONFIRMED") && diagnosis.contains("the read model agrees") }
    })
    .await;
    assert!(settled, "{last:#}");
    assert!(!last["records"].as_array().unwrap().is_empty(), "{last:#}");

    let mut trace = serde_json::Value::Null;
    let complete = eventually(Duration::from_secs(30), || {
        trace = serde_json::from_str(&ordersctl(&["trace", &order_id, "--json", "--wait-secs", "3"])).unwrap();
        let hops: std::collections::HashSet<String> = trace["spans"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|span| span["hop"].as_str().map(str::to_owned))
            .collect();
        let missing: Vec<&str> = ordersctl::trace::APPROVED_JOURNEY
            .iter()
            .copied()
            .filter(|hop| !hops.contains(*hop))
            .collect();
        async move { missing.is_empty() }
    })
    .await;
    let spans = trace["spans"].as_array().unwrap();
    let hops: Vec<(&str, &str, &str)> = spans
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap(),
                s["operation"].as_str().unwrap(),
                s["hop"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert!(complete, "a hop has no span in the order's trace: {hops:?}");
    let services: std::collections::BTreeSet<&str> = hops.iter().map(|(service, _, _)| *service).collect();
    for service in [
        "order-svc",
        "relay-orders",
        "payment-svc",
        "gateway-sim",
        "relay-payments",
        "fulfilment",
        "order-projector",
    ] {
        assert!(services.contains(service), "no span of {service}: {services:?}");
    }
    // gateway-sim's span continues payment-svc's call (the trace context crossed in the
    // call's metadata), not a trace of its own that happens to be fetched alongside.
    let by_id: std::collections::HashMap<&str, &serde_json::Value> =
        spans.iter().map(|s| (s["span_id"].as_str().unwrap(), s)).collect();
    let authorize = spans
        .iter()
        .find(|s| s["service"] == "gateway-sim" && s["hop"] == "gateway authorize")
        .expect("gateway-sim's Authorize span");
    let caller = authorize["parent_id"]
        .as_str()
        .and_then(|id| by_id.get(id))
        .expect("its parent is in the trace");
    assert_eq!(caller["service"], "payment-svc", "{caller:#}");
    // The record's traceparent header is the relay's publication span (in the order's trace,
    // a child of the span that wrote the event), and the envelope's is the writer's span, as
    // docs/contracts.md says: the consumers' spans follow the publication.
    let records = orderflow_tests::read_topic(&stack().kafka, "orders.events", Duration::from_secs(30), {
        let order_id = order_id.clone();
        move |records| records.iter().any(|r| r.key == order_id)
    })
    .await;
    let placed = records
        .iter()
        .find(|r| r.key == order_id)
        .expect("the order's OrderPlaced on orders.events");
    let envelope = orderflow::envelope::open(&placed.payload).unwrap();
    let written_by = envelope.traceparent.expect("the envelope names the span that wrote it");
    let header = &placed.headers["traceparent"];
    let span_of = |traceparent: &str| traceparent.split('-').nth(2).unwrap().to_owned();
    assert_eq!(
        orderflow_platform::telemetry::trace_id_of(header),
        orderflow_platform::telemetry::trace_id_of(&written_by),
        "one trace"
    );
    let publication = by_id
        .get(span_of(header).as_str())
        .expect("the header's span is in the trace");
    assert_eq!(publication["operation"], "relay_publish", "{publication:#}");
    assert_eq!(
        publication["parent_id"].as_str(),
        Some(span_of(&written_by).as_str()),
        "{publication:#}"
    );
    let page = std::env::temp_dir().join(format!("trace-{order_id}.html"));
    ordersctl(&["trace", &order_id, "--html", page.to_str().unwrap(), "--wait-secs", "0"]);
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(
        html.matches("<rect class=\"span\"").count(),
        spans.len(),
        "one bar per span"
    );
    std::fs::remove_file(&page).ok();

    // A stuck order: payment-svc is stopped, so OrderPlaced is published and nobody pays.
    let _revive = Revive;
    stack_command(&["stop", "payment-svc"]);
    let stuck = place("JOURNEY-2");
    let mut diagnosis = String::new();
    let named = eventually(Duration::from_secs(30), || {
        diagnosis = explain(&stuck)["diagnosis"].as_str().unwrap().to_owned();
        let found = diagnosis.starts_with("OrderPlaced published at offset")
            && diagnosis.contains("not yet consumed by group payment: lag");
        async move { found }
    })
    .await;
    assert!(named, "explain did not name the stuck hop: {diagnosis}");
    assert!(diagnosis.contains(" on partition "), "{diagnosis}");

    // Once payment-svc is back, the same order settles and explain says so.
    stack_command(&["revive"]);
    ordersctl(&["watch", &stuck, "--timeout-secs", "60"]);
    let recovered = eventually(Duration::from_secs(30), || {
        diagnosis = explain(&stuck)["diagnosis"].as_str().unwrap().to_owned();
        let settled = diagnosis.starts_with("settled: CONFIRMED");
        async move { settled }
    })
    .await;
    assert!(recovered, "{diagnosis}");
}
