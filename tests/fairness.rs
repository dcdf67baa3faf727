//! Fair sharing between callers (platform/src/fairness.rs), tried as one abusive customer on
//! the same host would, against order-svc with tokens: streams that send their headers and
//! never a body, many complete calls at once, and sockets that never start TLS or never send
//! anything. Meanwhile another customer's GetOrder, called at a customer's pace (50 a second),
//! is served, never refused, and its p99 stays within twice the quiet baseline's p99 (plus
//! 5 ms of scheduling noise on this 2-core machine), beside the bodiless streams and beside
//! many complete calls alike. Measured side by side in one run.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orderflow::orders::v1 as api;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use orderflow_platform::auth::{Caller, Issuer};
use orderflow_platform::fairness::FairnessArgs;
use orderflow_platform::security::ServerSecurityArgs;
use orderflow_tests::{
    RunningOrderSvc, fresh_orders_db, fresh_pki as pki, start_order_svc_with, valid_order, with_token,
};
use ordersctl::pki::Pki;
use tokio::io::AsyncReadExt as _;

/// The limits under test, small enough to reach quickly.
fn fairness() -> FairnessArgs {
    FairnessArgs {
        max_streams_per_connection: 50,
        body_timeout_ms: 2_000,
        max_calls_per_caller: 2,
        calls_per_second_per_caller: 100,
        caller_burst: 20,
        tls_handshake_timeout_ms: 500,
        max_connections: 256,
        idle_timeout_ms: 1_000,
    }
}

fn token(pki: &Pki, customer: i64) -> String {
    Issuer::from_private_pem(&std::fs::read(pki.signing_key()).unwrap())
        .unwrap()
        .issue(&Caller::Customer(customer), Duration::from_secs(600))
        .unwrap()
}

/// order-svc with tokens, in plaintext (the abusive client speaks raw HTTP/2), with `limits`.
async fn order_svc(pki: &Pki, limits: FairnessArgs) -> RunningOrderSvc {
    let db = fresh_orders_db().await;
    let verification_key = pki.verification_key();
    start_order_svc_with(&db, "orders.events", move |config| {
        config.security = ServerSecurityArgs {
            auth_public_key: Some(verification_key),
            insecure_plaintext: true,
            ..ServerSecurityArgs::default()
        };
        // About the machine's cores (2) times two: a caller's share (2) is less than all of
        // them, so another caller never waits for one.
        config.max_concurrent_requests = 4;
        config.fairness = limits;
    })
    .await
}

/// How often the quiet customer calls: a customer's pace, below its rate (100 a second), so
/// that what is measured is the server's answer, never the customer's own allowance.
const QUIET_PACE: Duration = Duration::from_millis(20);

/// The p99 of `calls` sequential GetOrders of `order_id` by `token`'s customer, one every
/// [`QUIET_PACE`] (or as soon as the previous one is answered, if later), in ms.
async fn p99_of_get_order(addr: std::net::SocketAddr, token: &str, order_id: &str, calls: usize) -> f64 {
    let mut client = OrderServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut took = Vec::with_capacity(calls);
    // The pace is what is modelled here (time is the subject), not a wait for something.
    let mut pace = tokio::time::interval(QUIET_PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..calls {
        pace.tick().await;
        let started = Instant::now();
        client
            .get_order(with_token(
                api::GetOrderRequest {
                    order_id: order_id.to_owned(),
                },
                token,
            ))
            .await
            .expect("the quiet customer's call is served");
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    took[(took.len() * 99).div_ceil(100) - 1]
}

/// A raw HTTP/2 connection that opens `streams` GetOrder streams as `token`, sends their
/// headers and never a body (counting each in `opened` once its headers are sent); returns
/// the gRPC status each was answered with.
async fn streams_without_bodies(
    addr: std::net::SocketAddr,
    token: &str,
    streams: usize,
    opened: &AtomicUsize,
) -> Vec<Option<String>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut answers = Vec::new();
    let mut held = Vec::new();
    for _ in 0..streams {
        let mut client = client.clone().ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/orderflow.orders.v1.OrderService/GetOrder"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        // end_of_stream false, and nothing sent after: the body never comes.
        let (response, body) = client.send_request(request, false).unwrap();
        opened.fetch_add(1, Ordering::Relaxed);
        held.push(body);
        answers.push(tokio::spawn(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(error) => return Some(format!("no answer: {error}")),
            };
            if let Some(status) = response.headers().get("grpc-status") {
                return Some(status.to_str().unwrap().to_owned());
            }
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.ok()??;
            Some(trailers.get("grpc-status")?.to_str().unwrap().to_owned())
        }));
    }
    let mut statuses = Vec::new();
    for answer in answers {
        statuses.push(answer.await.unwrap());
    }
    drop(held);
    statuses
}

/// Waits until `count` reaches `at_least`: the abuse is under way before the quiet customer's
/// calls are measured beside it.
async fn until_at_least(count: &AtomicUsize, at_least: usize) {
    let waited = Instant::now();
    while count.load(Ordering::Relaxed) < at_least {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the abuse did not start within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The bound this test holds a quiet customer's p99 to, given its quiet baseline.
fn bound(baseline_p99: f64) -> f64 {
    2.0 * baseline_p99 + 5.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_customers_abuse_leaves_anothers_latency_within_twice_its_quiet_baseline() {
    let pki = pki();
    // Idle connections are closed late here: the bodiless streams' connections carry nothing
    // for the body timeout, and what is checked is that each stream gets its status.
    let svc = order_svc(
        &pki,
        FairnessArgs {
            idle_timeout_ms: 10_000,
            ..fairness()
        },
    )
    .await;
    let (abuser, quiet) = (token(&pki, 1), token(&pki, 2));
    let mut client = OrderServiceClient::connect(format!("http://{}", svc.addr))
        .await
        .unwrap();
    let quiet_order = client
        .place_order(with_token(valid_order(2), &quiet))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let abuser_order = client
        .place_order(with_token(valid_order(1), &abuser))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    // Warm up (the database pool opens its connections under the first concurrent calls,
    // which takes seconds in a debug build), then the quiet baseline.
    let mut warm_up = Vec::new();
    for (token, order) in [(&quiet, &quiet_order), (&abuser, &abuser_order)] {
        for _ in 0..2 {
            let (addr, token, order) = (svc.addr, token.clone(), order.clone());
            warm_up.push(tokio::spawn(
                async move { p99_of_get_order(addr, &token, &order, 20).await },
            ));
        }
    }
    for task in warm_up {
        task.await.unwrap();
    }
    p99_of_get_order(svc.addr, &quiet, &quiet_order, 50).await;
    let baseline = p99_of_get_order(svc.addr, &quiet, &quiet_order, 500).await;

    // 1. Streams that send headers and never a body: eight connections of the abuser, each
    //    holding as many streams as the server's SETTINGS allow (50; a stream opened beyond
    //    them is refused by the server), opened again as each is answered. The abuser runs on
    //    threads of its own, as another process would.
    let stop = tokio_util::sync::CancellationToken::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let mut abuse = Vec::new();
    for _ in 0..8 {
        let (stop, abuser, addr, opened) = (stop.clone(), abuser.clone(), svc.addr, opened.clone());
        abuse.push(std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut statuses = Vec::new();
                while !stop.is_cancelled() {
                    statuses.extend(streams_without_bodies(addr, &abuser, 50, &opened).await);
                }
                statuses
            })
        }));
    }
    until_at_least(&opened, 8 * 50).await;
    let under_silent_streams = p99_of_get_order(svc.addr, &quiet, &quiet_order, 500).await;
    stop.cancel();
    let mut statuses = Vec::new();
    for thread in abuse {
        statuses.extend(thread.join().unwrap());
    }
    let deadline_exceeded = statuses.iter().filter(|s| s.as_deref() == Some("4")).count();
    println!(
        "quiet customer's GetOrder p99: {baseline:.2} ms alone, {under_silent_streams:.2} ms beside {} streams without a body ({deadline_exceeded} answered DEADLINE_EXCEEDED, the others refused at the connection's limit)",
        statuses.len()
    );
    // Each stream without a body that the server took was answered DEADLINE_EXCEEDED (code
    // 4) by the body timeout, a status, not a reset; any other was refused before it started
    // (beyond the connection's SETTINGS, before the client had read them).
    let refused = |s: &Option<String>| s.as_deref().is_some_and(|s| s.contains("refused stream"));
    assert!(
        deadline_exceeded > 0,
        "{:?}",
        statuses.iter().take(5).collect::<Vec<_>>()
    );
    let other: Vec<&Option<String>> = statuses
        .iter()
        .filter(|s| s.as_deref() != Some("4") && !refused(s))
        .take(5)
        .collect();
    assert!(other.is_empty(), "{other:?}");
    assert!(
        under_silent_streams <= bound(baseline),
        "p99 {under_silent_streams:.2} ms beside streams without a body; quiet {baseline:.2} ms"
    );

    // 2. Many complete calls at once: the abuser runs 64 calls at a time. Beyond its share (2
    //    in flight) they are refused at once; within it, beyond its rate (100 a second, 20 at
    //    once) they wait for their turn, holding no permit and using no CPU.
    let stop = tokio_util::sync::CancellationToken::new();
    let served = Arc::new(AtomicUsize::new(0));
    let mut abuse = Vec::new();
    for _ in 0..64 {
        let (stop, abuser, order, addr, served) = (
            stop.clone(),
            abuser.clone(),
            abuser_order.clone(),
            svc.addr,
            served.clone(),
        );
        abuse.push(tokio::spawn(async move {
            let mut client = OrderServiceClient::connect(format!("http://{addr}")).await.unwrap();
            let mut refused = 0;
            while !stop.is_cancelled() {
                match client
                    .get_order(with_token(
                        api::GetOrderRequest {
                            order_id: order.clone(),
                        },
                        &abuser,
                    ))
                    .await
                {
                    Ok(_) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        refused += 1;
                        // It comes back when the hint says (100 ms). A caller that never
                        // waits spends the server's CPU on being refused, which no bound on
                        // calls in flight stops (docs/security.md, "Not covered").
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(status) => panic!("{status:?}"),
                }
            }
            refused
        }));
    }
    until_at_least(&served, 20).await;
    let abuse_started = (Instant::now(), served.load(Ordering::Relaxed));
    let under_many_calls = p99_of_get_order(svc.addr, &quiet, &quiet_order, 500).await;
    let measured_secs = abuse_started.0.elapsed().as_secs_f64();
    let abuse_rate = (served.load(Ordering::Relaxed) - abuse_started.1) as f64 / measured_secs;
    stop.cancel();
    let mut refused = 0;
    for task in abuse {
        refused += task.await.unwrap();
    }
    println!(
        "quiet customer's GetOrder p99: {under_many_calls:.2} ms beside 64 calls at a time of another ({} served, {abuse_rate:.0} a second while measured; {refused} refused)",
        served.load(Ordering::Relaxed)
    );
    assert!(refused > 0, "the abuser's calls beyond its share were refused");
    // Its rate (100 a second, and its burst of 20 spread over the measured seconds) bounds
    // what the abuser takes: without it (a rate of a million), it was served 947 calls a
    // second (2026-12-07). Before the verified-token cache and the optimised gRPC path of the
    // debug build, the share alone let the quiet p99 rise to 18.7-21.7 ms against a quiet
    // 4.2-5.7 ms; with them, 7.2 ms beside a quiet 3.7 ms even without the rate.
    assert!(
        abuse_rate <= 100.0 * 1.1 + 20.0 / measured_secs,
        "the abuser was served {abuse_rate:.0} calls a second, beyond its rate (100) and burst (20)"
    );
    assert!(
        under_many_calls <= bound(baseline),
        "p99 {under_many_calls:.2} ms beside many calls; quiet {baseline:.2} ms"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_start_tls_or_never_send_are_closed_in_bounded_time() {
    let pki = pki();
    let db = fresh_orders_db().await;
    let (cert, key) = pki.identity("order-svc");
    let tls = start_order_svc_with(&db, "orders.events", move |config| {
        config.security = ServerSecurityArgs {
            tls_cert: Some(cert),
            tls_key: Some(key),
            auth_public_key: Some(pki.verification_key()),
            ..ServerSecurityArgs::default()
        };
        config.fairness = fairness();
    })
    .await;
    let plaintext = order_svc(&self::pki(), fairness()).await;
    for (svc, limit, what) in [
        (&tls, Duration::from_millis(500), "a TLS handshake never started"),
        (&plaintext, Duration::from_millis(1_000), "an idle connection"),
    ] {
        let mut sockets = Vec::new();
        for _ in 0..20 {
            sockets.push(tokio::net::TcpStream::connect(svc.addr).await.unwrap());
        }
        let started = Instant::now();
        for socket in &mut sockets {
            // The server closes it: end of stream (or a reset), not a wait without end. (An
            // HTTP/2 server speaks first: its SETTINGS arrive before the close.)
            let mut sent = Vec::new();
            let read = tokio::time::timeout(limit * 4, socket.read_to_end(&mut sent)).await;
            assert!(read.is_ok(), "{what}: still open after {:?}", limit * 4);
        }
        println!("{what}: 20 sockets closed by the server after {:?}", started.elapsed());
        assert!(
            started.elapsed() >= limit / 2,
            "{what}: closed by the timeout, not at once"
        );
    }
    tls.stop().await;
    plaintext.stop().await;
}
