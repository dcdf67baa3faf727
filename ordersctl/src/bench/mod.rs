//! `ordersctl bench`: open-model load at a fixed arrival rate, deterministic by seed, with
//! HDR histograms of what a user feels (PlaceOrder) and of what the system does after the
//! reply (relay lag, saga completion, read-model convergence), a timeline, the invariant
//! checker at the end, and a search for the highest sustainable rate.
//!
//! Open model: the n-th order is due at `start + n / rate` whether or not earlier calls have
//! answered, and its latency counts from that due time. A closed loop (send, wait, send)
//! slows down with the system and hides its queueing (coordinated omission).

pub mod cost;
pub mod hops;
pub mod lag;
pub mod pgbench;
pub mod probe;
pub mod report;
pub mod summary;
pub mod targets;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use tonic::transport::Channel;

use crate::verify::Stores;
use report::{Percentiles, Sample, StepReport};
use workload::Workload;

/// How a benchmark runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// order-svc's gRPC address.
    pub addr: String,
    /// TLS and tokens (each order placed with its customer's token).
    pub access: Arc<crate::access::Access>,
    /// Seed of the workload.
    pub seed: u64,
    /// Customers (Zipfian ranks).
    pub customers: u64,
    /// Zipf exponent.
    pub zipf_s: f64,
    /// Share of orders paid with a declined card.
    pub decline_rate: f64,
    /// Share of orders whose gateway reply comes late (charged, reply lost to a timeout).
    pub late_reply_rate: f64,
    /// HTTP/2 connections to order-svc.
    pub connections: usize,
    /// Calls in flight at most; an arrival finding none free is counted as not sent.
    pub max_in_flight: usize,
    /// How long to wait for the system to settle after the load.
    pub drain_timeout: Duration,
    /// The consumer groups' lag, asked of the broker.
    pub group_lag: Arc<lag::GroupLag>,
    /// Where the cost per order is read from.
    pub cost: cost::Sources,
    /// The stack directory (pid files), for CPU per process.
    pub stack_dir: Option<PathBuf>,
    /// Jaeger's query API, for the slowest order's trace (None: the stack exports no spans).
    pub jaeger_url: Option<String>,
    /// Show a progress bar.
    pub progress: bool,
}

/// What one load step produced on the client side.
struct LoadOutcome {
    offered: u64,
    accepted: u64,
    not_sent: u64,
    errors: BTreeMap<String, u64>,
    place: Histogram<u64>,
    timeline: Vec<Sample>,
    cpu: BTreeMap<String, f64>,
    machine_cpu: f64,
    cost: cost::CostPerOrder,
    started_at: DateTime<Utc>,
    window_start: DateTime<Utc>,
    window_end: DateTime<Utc>,
}

pub(crate) fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 minutes, 3 significant digits.
    #[allow(clippy::expect_used)] // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a histogram of microseconds.
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        samples: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

async fn connect(options: &Options) -> anyhow::Result<Vec<OrderServiceClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..options.connections.max(1) {
        let channel = options
            .access
            .channel(&options.addr)
            .await
            .with_context(|| format!("cannot reach order-svc at {}", options.addr))?;
        clients.push(OrderServiceClient::new(channel));
    }
    Ok(clients)
}

struct Shared {
    accepted: AtomicU64,
    not_sent: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    place: Mutex<Histogram<u64>>,
    second: Mutex<Histogram<u64>>,
}

/// Drives `rate` orders a second for `warmup + duration`; measures only after the warm-up.
async fn load(
    options: &Options,
    stores: &Stores,
    workload: &Arc<Workload>,
    first_order: u64,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadOutcome> {
    let clients = connect(options).await?;
    let shared = Arc::new(Shared {
        accepted: AtomicU64::new(0),
        not_sent: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        place: Mutex::new(histogram()),
        second: Mutex::new(histogram()),
    });
    let in_flight = Arc::new(Semaphore::new(options.max_in_flight));
    let total = warmup + duration;
    let started_at = Utc::now();
    let start = Instant::now();
    let measured_from = start + warmup;
    let due_total = (total.as_secs_f64() * rate) as u64;

    let bar = if options.progress {
        indicatif::ProgressBar::new(total.as_secs())
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    // The sampler: once a second, the accepted rate, PlaceOrder p99 of that second, the
    // backlogs and the CPU of every process.
    let sampler = {
        let shared = shared.clone();
        let orders = stores.orders.clone();
        let payments = stores.payments.clone();
        let lag = lag::Latest::watch(options.group_lag.clone());
        let stack_dir = options.stack_dir.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut meter = CpuTotals::new(stack_dir);
            let mut timeline = Vec::new();
            let mut last_accepted = 0;
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                let t = start.elapsed().as_secs_f64();
                let accepted = shared.accepted.load(Ordering::Relaxed);
                let (p50, p99) = {
                    let mut second = shared.second.lock().await;
                    let p = if second.is_empty() {
                        (0.0, 0.0)
                    } else {
                        (
                            second.value_at_quantile(0.5) as f64 / 1000.0,
                            second.value_at_quantile(0.99) as f64 / 1000.0,
                        )
                    };
                    second.reset();
                    p
                };
                // A sample that cannot be read counts as empty; the drain below checks again.
                let backlog = probe::outbox_backlog(&orders, &payments).await.unwrap_or(0);
                let pending = probe::pending_sagas(&orders).await.unwrap_or(0);
                let (cpu, machine) = meter.sample(t >= warmup.as_secs_f64());
                let sample = Sample {
                    t,
                    accepted_per_sec: (accepted - last_accepted) as f64,
                    place_p50_ms: p50,
                    place_p99_ms: p99,
                    outbox_backlog: backlog,
                    pending_sagas: pending,
                    consumer_lag: lag.now(),
                    machine_cpu: machine,
                    cpu,
                };
                last_accepted = accepted;
                bar.set_position(t as u64);
                bar.set_message(format!(
                    "{:.0}/s accepted, PlaceOrder p99 {:.1} ms, outbox backlog {}, sagas in flight {}, CPU {:.0}%",
                    sample.accepted_per_sec, p99, backlog, pending, machine
                ));
                timeline.push(sample);
                if t >= total.as_secs_f64() - 0.5 {
                    break;
                }
            }
            (timeline, meter)
        })
    };

    let mut window_start = Utc::now();
    let mut measuring = false;
    let counters_meter = Arc::new(probe::CpuMeter::new(options.stack_dir.as_deref()));
    let read_counters = || {
        let (sources, meter) = (options.cost.clone(), counters_meter.clone());
        tokio::spawn(async move { cost::Counters::read(&sources, &meter).await })
    };
    let mut counters_at_start = None;
    let mut issued: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while issued < due_total {
        tick.tick().await;
        let elapsed = start.elapsed().as_secs_f64();
        let due_now = ((elapsed * rate) as u64).min(due_total);
        while issued < due_now {
            let n = issued;
            issued += 1;
            let due_at = start + Duration::from_secs_f64(n as f64 / rate);
            if !measuring && due_at >= measured_from {
                measuring = true;
                window_start = Utc::now();
                // Read in a task of its own: the arrivals keep their schedule.
                counters_at_start = Some(read_counters());
            }
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                shared.not_sent.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (mut request, _) = workload.order(first_order + n);
            request.request_id = uuid::Uuid::now_v7().to_string();
            let caller = orderflow_platform::auth::Caller::Customer(request.customer_id);
            let request = options.access.request(request, &caller)?;
            let mut client = clients[(n as usize) % clients.len()].clone();
            let shared = shared.clone();
            let measured = due_at >= measured_from;
            tokio::spawn(async move {
                let result = client.place_order(request).await;
                let micros = u64::try_from(due_at.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                match result {
                    Ok(_) => {
                        shared.accepted.fetch_add(1, Ordering::Relaxed);
                        if measured {
                            shared.place.lock().await.saturating_record(micros);
                        }
                        shared.second.lock().await.saturating_record(micros);
                    }
                    Err(status) => {
                        *shared
                            .errors
                            .lock()
                            .await
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                    }
                }
                drop(permit);
            });
        }
    }
    // Every call answered (or failed) before the step ends.
    let _all = in_flight
        .acquire_many(u32::try_from(options.max_in_flight).unwrap_or(u32::MAX))
        .await;
    let window_end = Utc::now();
    let counters_at_end = read_counters().await?;
    let (timeline, meter) = sampler.await?;
    bar.finish_and_clear();
    let (cpu, machine_cpu) = meter.averages();
    let place = shared.place.lock().await.clone();
    let errors = shared.errors.lock().await.clone();
    // The divisor: orders accepted whose arrival was due in the measured window.
    let cost = match counters_at_start {
        Some(start) => counters_at_end.per_order_since(&start.await?, place.len()),
        None => cost::CostPerOrder::default(),
    };
    Ok(LoadOutcome {
        offered: due_total,
        accepted: shared.accepted.load(Ordering::Relaxed),
        not_sent: shared.not_sent.load(Ordering::Relaxed),
        errors,
        place,
        timeline,
        cpu,
        machine_cpu,
        cost,
        started_at,
        window_start,
        window_end,
    })
}

/// CPU shares averaged over the measured part of a step.
struct CpuTotals {
    meter: probe::CpuMeter,
    sums: BTreeMap<String, f64>,
    machine: f64,
    samples: u32,
}

impl CpuTotals {
    fn new(stack_dir: Option<PathBuf>) -> Self {
        Self {
            meter: probe::CpuMeter::new(stack_dir.as_deref()),
            sums: BTreeMap::new(),
            machine: 0.0,
            samples: 0,
        }
    }

    fn sample(&mut self, measured: bool) -> (BTreeMap<String, f64>, f64) {
        let (shares, machine) = self.meter.sample();
        if measured {
            for (name, share) in &shares {
                *self.sums.entry(name.clone()).or_default() += share;
            }
            self.machine += machine;
            self.samples += 1;
        }
        (shares, machine)
    }

    fn averages(&self) -> (BTreeMap<String, f64>, f64) {
        let n = f64::from(self.samples.max(1));
        (
            self.sums.iter().map(|(k, v)| (k.clone(), v / n)).collect(),
            self.machine / n,
        )
    }
}

/// Waits until no order placed since `since` is PENDING and the read model shows every
/// such order's status; returns whether it got there within `timeout`.
async fn drain(stores: &Stores, since: DateTime<Utc>, timeout: Duration) -> anyhow::Result<bool> {
    let started = Instant::now();
    loop {
        let (pending, unprojected): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE o.status = $2),
                    count(*) FILTER (WHERE r.order_id IS NULL OR r.status <> o.status)
             FROM orders o LEFT JOIN order_read r USING (order_id)
             WHERE o.created_at >= $1",
        )
        .bind(since)
        .bind(order_svc::domain::OrderStatus::Pending.as_str())
        .fetch_one(&stores.orders)
        .await?;
        let backlog = probe::outbox_backlog(&stores.orders, &stores.payments).await?;
        if pending == 0 && unprojected == 0 && backlog == 0 {
            return Ok(true);
        }
        if started.elapsed() > timeout {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fetch_millis(
    pool: &PgPool,
    sql: &'static str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Histogram<u64>> {
    let values: Vec<f64> = sqlx::query_scalar(sql).bind(from).bind(to).fetch_all(pool).await?;
    let mut h = histogram();
    for ms in values {
        h.saturating_record((ms * 1000.0).max(1.0) as u64);
    }
    Ok(h)
}

/// The server-side latencies of the orders placed in [from, to), from the databases.
async fn server_latencies(
    stores: &Stores,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<(Histogram<u64>, Histogram<u64>, Histogram<u64>, Histogram<u64>)> {
    // Relay lag: outbox commit (created_at, the transaction's start, a little before its
    // commit) to the broker's ack (published_at, clock_timestamp() after the ack).
    let relay_sql = "SELECT extract(epoch FROM published_at - created_at)::float8 * 1000 FROM outbox
                     WHERE created_at >= $1 AND created_at < $2 AND published_at IS NOT NULL";
    let mut relay = fetch_millis(&stores.orders, relay_sql, from, to).await?;
    relay.add(fetch_millis(&stores.payments, relay_sql, from, to).await?)?;
    // Saga completion: the order row's insert to its terminal transition.
    let saga = fetch_millis(
        &stores.orders,
        "SELECT extract(epoch FROM settled_at - created_at)::float8 * 1000 FROM orders
         WHERE created_at >= $1 AND created_at < $2 AND settled_at IS NOT NULL",
        from,
        to,
    )
    .await?;
    // The same for the approved cards only: declines and late replies are slow by design
    // (a late reply waits out the gateway timeout, then retries).
    let saga_approved = fetch_millis(
        &stores.orders,
        "SELECT extract(epoch FROM settled_at - created_at)::float8 * 1000 FROM orders
         WHERE created_at >= $1 AND created_at < $2 AND settled_at IS NOT NULL AND payment_token = 'tok_visa'",
        from,
        to,
    )
    .await?;
    // Read-model convergence: the terminal transition to the projector's write of the
    // terminal event (GetOrder serves order_read, so that is when it becomes visible).
    let read_model = fetch_millis(
        &stores.orders,
        "SELECT greatest(extract(epoch FROM (h->>'projected_at')::timestamptz - o.settled_at)::float8 * 1000, 0)
         FROM orders o JOIN order_read r USING (order_id), jsonb_array_elements(r.history) h
         WHERE o.created_at >= $1 AND o.created_at < $2 AND o.settled_at IS NOT NULL
           AND h->>'event_type' IN ('orderflow.events.v1.OrderConfirmed', 'orderflow.events.v1.OrderCancelled')",
        from,
        to,
    )
    .await?;
    Ok((relay, saga, saga_approved, read_model))
}

/// Least-squares slope (per second) of `values` over `ts`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

/// Runs one step: load, drain, measure.
pub async fn step(
    options: &Options,
    stores: &Stores,
    workload: &Arc<Workload>,
    first_order: u64,
    rate: f64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<StepReport> {
    let outcome = load(options, stores, workload, first_order, rate, warmup, duration).await?;
    let drain_started = Instant::now();
    let drained = drain(stores, outcome.started_at, options.drain_timeout).await?;
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let (relay, saga, saga_approved, read_model) =
        server_latencies(stores, outcome.window_start, outcome.window_end).await?;
    let hops = hops::decompose(stores, outcome.window_start, outcome.window_end).await?;
    let saga_over_time = saga_per_second(stores, outcome.started_at, outcome.window_end).await?;
    let slowest = slowest_order(options, stores, outcome.window_start, outcome.window_end).await?;
    let measured: Vec<&Sample> = outcome
        .timeline
        .iter()
        .filter(|s| s.t >= warmup.as_secs_f64())
        .collect();
    let backlog_points: Vec<(f64, f64)> = measured
        .iter()
        .map(|s| (s.t, (s.outbox_backlog + s.pending_sagas) as f64))
        .collect();
    let second_half = &backlog_points[backlog_points.len() / 2..];
    let measured_secs = (outcome.window_end - outcome.window_start).num_milliseconds() as f64 / 1000.0;
    let accepted_in_window = saga.len() as f64;
    Ok(StepReport {
        offered_rate: rate,
        warmup_secs: warmup.as_secs_f64(),
        duration_secs: duration.as_secs_f64(),
        offered: outcome.offered,
        accepted: outcome.accepted,
        not_sent: outcome.not_sent,
        errors: outcome.errors,
        sustained_rate: if measured_secs > 0.0 {
            accepted_in_window / measured_secs
        } else {
            0.0
        },
        place_order: percentiles(&outcome.place),
        relay_lag: percentiles(&relay),
        saga_completion: percentiles(&saga),
        saga_completion_approved: percentiles(&saga_approved),
        read_model_convergence: percentiles(&read_model),
        backlog_slope_per_sec: slope(second_half),
        backlog_max: backlog_points.iter().map(|p| p.1).fold(0.0, f64::max),
        drained,
        drain_secs,
        cpu: outcome.cpu,
        machine_cpu: outcome.machine_cpu,
        cost: outcome.cost,
        hops,
        timeline: outcome.timeline,
        saga_over_time,
        slowest,
    })
}

/// Saga completion p50 and p99 of the orders placed in each second since the step began (the
/// timeline's clock), warm-up included like the timeline.
async fn saga_per_second(
    stores: &Stores,
    started_at: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Vec<report::SecondLatency>> {
    let rows: Vec<(f64, f64, f64, i64)> = sqlx::query_as(
        "SELECT floor(extract(epoch FROM created_at - $1))::float8 + 1,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM settled_at - created_at)) * 1000,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM settled_at - created_at)) * 1000,
                count(*)
         FROM orders WHERE created_at >= $1 AND created_at < $2 AND settled_at IS NOT NULL
         GROUP BY 1 ORDER BY 1",
    )
    .bind(started_at)
    .bind(to)
    .fetch_all(&stores.orders)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, p50_ms, p99_ms, orders)| report::SecondLatency {
            t,
            p50_ms,
            p99_ms,
            orders,
        })
        .collect())
}

/// The measured window's slowest settled order, with its trace when the stack runs Jaeger.
async fn slowest_order(
    options: &Options,
    stores: &Stores,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Option<report::SlowestOrder>> {
    let row: Option<(uuid::Uuid, f64)> = sqlx::query_as(
        "SELECT order_id, extract(epoch FROM settled_at - created_at)::float8 * 1000 FROM orders
         WHERE created_at >= $1 AND created_at < $2 AND settled_at IS NOT NULL
         ORDER BY settled_at - created_at DESC LIMIT 1",
    )
    .bind(from)
    .bind(to)
    .fetch_optional(&stores.orders)
    .await?;
    let Some((order_id, saga_ms)) = row else {
        return Ok(None);
    };
    let (trace, note) = match &options.jaeger_url {
        None => (
            None,
            "no trace: the stack exports no spans (scripts/stack up --telemetry)".to_owned(),
        ),
        Some(url) => match crate::trace::trace_id_of_order(&stores.orders, order_id).await? {
            None => (
                None,
                "no trace: the order was placed without a trace context".to_owned(),
            ),
            Some(trace_id) => {
                let url = url.clone();
                let fetched = tokio::task::spawn_blocking(move || {
                    crate::trace::fetch_settled(&url, &trace_id, Duration::from_secs(10))
                })
                .await?;
                match fetched {
                    Ok(trace) => (Some(trace), String::new()),
                    Err(error) => (None, format!("no trace: {error:#}")),
                }
            }
        },
    };
    Ok(Some(report::SlowestOrder {
        order_id,
        saga_ms,
        trace,
        note,
    }))
}

/// The seeds' latency levels ([`targets`]) a step is held to, each with what measures it:
/// the step rule and the verdict read this one list. The saga's limit is the caller's (the
/// step rule may be asked for another; the verdict always says the seeds').
fn latency_levels(step: &StepReport, saga_limit_ms: f64) -> [(&'static str, &Percentiles, f64); 4] {
    [
        ("PlaceOrder", &step.place_order, targets::PLACE_ORDER_P99_MS),
        ("relay lag", &step.relay_lag, targets::RELAY_LAG_P99_MS),
        ("saga completion", &step.saga_completion, saga_limit_ms),
        (
            "read-model convergence",
            &step.read_model_convergence,
            targets::READ_MODEL_P99_MS,
        ),
    ]
}

/// Whether a step held its service level: every p99 of [`latency_levels`] within its limit
/// (the saga's `saga_p99_limit_ms`, the seeds' [`targets::SAGA_P99_MS`] unless asked
/// otherwise), a backlog that does not keep rising, every arrival sent and accepted but
/// [`targets::MOST_REFUSED`].
pub fn sustainable(step: &StepReport, saga_p99_limit_ms: f64) -> Result<(), String> {
    let mut broken = Vec::new();
    for (name, latency, limit) in latency_levels(step, saga_p99_limit_ms) {
        if latency.samples > 0 && latency.p99_ms > limit {
            broken.push(format!("{name} p99 {:.0} ms > {limit:.0} ms", latency.p99_ms));
        }
    }
    // Rising: more than 1% of the rate a second, and more than half a second of work queued.
    if step.backlog_slope_per_sec > (step.offered_rate * 0.01).max(2.0) && step.backlog_max > step.offered_rate * 0.5 {
        broken.push(format!(
            "backlog rising {:.1}/s (peak {:.0})",
            step.backlog_slope_per_sec, step.backlog_max
        ));
    }
    let refused = step.offered - step.accepted;
    if refused as f64 > step.offered as f64 * targets::MOST_REFUSED {
        broken.push(format!(
            "{refused} of {} arrivals not accepted ({} not sent by the generator)",
            step.offered, step.not_sent
        ));
    }
    if !step.drained {
        broken.push("did not drain".into());
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(broken.join("; "))
    }
}

/// What `ordersctl bench` was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The offered rate of a single run, or the first step's when searching.
    pub rate: f64,
    /// Measured duration of a single run.
    pub duration: Duration,
    /// Warm-up before each measured window.
    pub warmup: Duration,
    /// Step the rate up until the service level breaks.
    pub find_ceiling: bool,
    /// Each step's rate is the previous one's times this.
    pub step_factor: f64,
    /// Never offer more than this.
    pub max_rate: f64,
    /// Measured duration of each step.
    pub step_duration: Duration,
    /// The saga completion p99 a step must stay under.
    pub saga_p99_limit_ms: f64,
    /// pgbench's duration (0: skip it).
    pub pgbench_secs: u32,
    /// pgbench's clients.
    pub pgbench_clients: u32,
    /// The admin URL of the Postgres server, for pgbench's scratch database.
    pub admin_url: Option<String>,
    /// The saga deadline in force (for the invariant checker).
    pub deadline: Duration,
    /// The command line, for the report.
    pub command: String,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0));
    format!("{cores} cores, {cpu}, {memory}")
}

fn target(name: &str, goal: &str, measured: String, met: bool) -> report::Target {
    report::Target {
        name: name.into(),
        goal: goal.into(),
        measured,
        met,
    }
}

/// Each target of [`targets`] against what was measured: one line per target and source
/// (the seeds' level, the project's goal).
fn verdict(
    plan: &Plan,
    steps: &[StepReport],
    ceiling: Option<f64>,
    reference: Option<&StepReport>,
    violations: usize,
) -> Vec<report::Target> {
    let mut verdict = Vec::new();
    let ceiling_text = ceiling.map_or_else(
        || {
            if plan.find_ceiling {
                "no step held".to_owned()
            } else {
                "not searched (--find-ceiling)".to_owned()
            }
        },
        |c| format!("{c:.0}/s"),
    );
    // A ceiling found in steps of a few seconds says nothing yet of 20 minutes.
    let held_for = Duration::from_secs_f64(
        steps
            .iter()
            .filter(|s| ceiling.is_some_and(|c| s.offered_rate <= c))
            .map(|s| s.duration_secs)
            .fold(0.0, f64::max),
    );
    verdict.push(target(
        "ceiling (seeds)",
        &targets::seeds_throughput(),
        if ceiling.is_some() {
            format!("{ceiling_text}, held {} s", held_for.as_secs())
        } else {
            ceiling_text.clone()
        },
        ceiling.is_some_and(|c| c >= targets::SEEDS_ORDERS_PER_SEC) && held_for >= targets::SUSTAINED_FOR,
    ));
    verdict.push(target(
        "ceiling (project)",
        &targets::project_throughput(),
        ceiling_text,
        ceiling.is_some_and(|c| c >= targets::PROJECT_ORDERS_PER_SEC),
    ));
    // CPU per order is read at the step closest to the goal's rate (the load generator apart).
    if let Some(r) = steps.iter().min_by(|a, b| {
        (a.offered_rate - targets::PROJECT_CPU_AT_RATE)
            .abs()
            .total_cmp(&(b.offered_rate - targets::PROJECT_CPU_AT_RATE).abs())
    }) {
        verdict.push(target(
            "CPU per order (project)",
            &targets::project_cpu(),
            format!("{:.2} ms at {:.0}/s", r.cost.cpu_ms_total, r.offered_rate),
            r.cost.cpu_ms_total <= targets::PROJECT_CPU_MS_PER_ORDER
                && (r.offered_rate - targets::PROJECT_CPU_AT_RATE).abs() <= targets::PROJECT_CPU_AT_RATE * 0.1,
        ));
    }
    if let Some(r) = reference {
        let at = format!(" at {:.0}/s", r.offered_rate);
        let latencies = latency_levels(r, targets::SAGA_P99_MS);
        for (name, latency, limit_ms) in latencies {
            // No samples is not a p99 of zero: in the WAL-message outbox mode there are no
            // outbox rows to time the relay (and the hops it starts) by.
            let (measured, met) = if latency.samples == 0 {
                (format!("not measured (no samples){at}"), false)
            } else {
                (format!("{:.1} ms{at}", latency.p99_ms), latency.p99_ms < limit_ms)
            };
            verdict.push(target(
                &format!("{name} p99 (seeds)"),
                &targets::p99_below(limit_ms),
                measured,
                met,
            ));
        }
    }
    verdict.push(target(
        "invariant violations",
        "0",
        violations.to_string(),
        violations == 0,
    ));
    verdict
}

/// Runs the benchmark: one step or the ceiling search, then pgbench, then the invariant checker.
pub async fn run(
    options: &Options,
    plan: &Plan,
    stores: &Stores,
    workload: Workload,
) -> anyhow::Result<report::BenchReport> {
    let workload = Arc::new(workload);
    let started_at = Utc::now().to_rfc3339();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut steps = Vec::new();
    let mut ceiling = None;
    let mut broken_by = None;
    let mut first_order = 0;
    if plan.find_ceiling {
        let mut rate = plan.rate;
        while rate <= plan.max_rate {
            eprintln!(
                "[bench] step at {rate:.0} orders/s for {} s",
                plan.step_duration.as_secs()
            );
            let result = step(
                options,
                stores,
                &workload,
                first_order,
                rate,
                plan.warmup,
                plan.step_duration,
            )
            .await?;
            first_order += result.offered;
            let verdict = sustainable(&result, plan.saga_p99_limit_ms);
            eprintln!(
                "[bench]   sustained {:.0}/s, saga p99 {:.0} ms, PlaceOrder p99 {:.1} ms, backlog slope {:+.1}/s: {}",
                result.sustained_rate,
                result.saga_completion.p99_ms,
                result.place_order.p99_ms,
                result.backlog_slope_per_sec,
                verdict
                    .as_ref()
                    .map_or_else(|why| format!("broken ({why})"), |()| "held".into())
            );
            steps.push(result);
            match verdict {
                Ok(()) => ceiling = Some(rate),
                Err(why) => {
                    broken_by = Some(why);
                    break;
                }
            }
            rate = (rate * plan.step_factor).round();
        }
    } else {
        steps.push(step(options, stores, &workload, 0, plan.rate, plan.warmup, plan.duration).await?);
    }

    // The bottleneck is read from the step that broke (or the only one).
    let bottleneck = steps.last().map(|s| report::bottleneck(s, cores)).unwrap_or_default();

    let pgbench = match (&plan.admin_url, plan.pgbench_secs) {
        (Some(url), secs) if secs > 0 => {
            eprintln!("[bench] pgbench: one order's transactions, every one and the critical path, {secs} s each");
            Some(pgbench::run(url, plan.pgbench_clients, secs).await?)
        }
        _ => None,
    };
    let best_sustained = match ceiling {
        Some(c) => steps
            .iter()
            .filter(|s| s.offered_rate <= c)
            .map(|s| s.sustained_rate)
            .fold(0.0, f64::max),
        None if !plan.find_ceiling => steps.first().map_or(0.0, |s| s.sustained_rate),
        None => 0.0,
    };
    let ratio_to_pgbench = pgbench
        .as_ref()
        .map(|pg| best_sustained / pg.full.orders_per_sec.max(1e-9));

    let verification = crate::verify::verify(stores, plan.deadline, Duration::from_secs(5)).await?;
    let violations = verification.violations();

    // The verdict against the targets (targets.rs: the seeds' service levels, the project's
    // goals beside them). The latencies are read at the step nearest below 80% of the ceiling
    // when searching, else at the single run's rate.
    let reference = match ceiling {
        Some(c) => steps
            .iter()
            .filter(|s| s.offered_rate <= targets::SHARE_OF_CEILING * c + 1.0)
            .max_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate))
            .or(steps.first()),
        None => steps.first(),
    };
    let targets = verdict(plan, &steps, ceiling, reference, violations);

    Ok(report::BenchReport {
        command: plan.command.clone(),
        started_at,
        machine: machine(),
        workload: workload.describe(),
        steps,
        ceiling,
        ceiling_broken_by: broken_by,
        bottleneck,
        pgbench,
        ratio_to_pgbench,
        targets,
        verify: serde_json::to_value(&verification)?,
        violations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step of `rate` orders/s with the given saga p99, backlog trend and counts.
    pub(super) fn step_report(rate: f64, saga_p99_ms: f64, slope: f64, backlog_max: f64, accepted: u64) -> StepReport {
        StepReport {
            offered_rate: rate,
            warmup_secs: 5.0,
            duration_secs: 20.0,
            offered: 1000,
            accepted,
            not_sent: 0,
            errors: BTreeMap::new(),
            sustained_rate: rate,
            place_order: Percentiles::default(),
            relay_lag: Percentiles::default(),
            saga_completion: Percentiles {
                p99_ms: saga_p99_ms,
                samples: accepted,
                ..Percentiles::default()
            },
            saga_completion_approved: Percentiles::default(),
            read_model_convergence: Percentiles::default(),
            backlog_slope_per_sec: slope,
            backlog_max,
            drained: true,
            drain_secs: 1.0,
            cpu: BTreeMap::new(),
            machine_cpu: 50.0,
            cost: cost::CostPerOrder::default(),
            hops: Vec::new(),
            timeline: Vec::new(),
            saga_over_time: Vec::new(),
            slowest: None,
        }
    }

    #[test]
    fn slope_is_the_least_squares_trend_per_second() {
        let rising: Vec<(f64, f64)> = (0..10).map(|t| (f64::from(t), 3.0 * f64::from(t) + 7.0)).collect();
        assert!((slope(&rising) - 3.0).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10).map(|t| (f64::from(t), 42.0)).collect();
        assert!(slope(&flat).abs() < 1e-9);
        assert!(slope(&[(1.0, 5.0)]).abs() < f64::EPSILON, "one point has no trend");
    }

    #[test]
    fn a_step_holds_only_within_its_service_level() {
        assert!(sustainable(&step_report(100.0, 900.0, 0.0, 40.0, 1000), 2000.0).is_ok());

        let slow = sustainable(&step_report(100.0, 2500.0, 0.0, 40.0, 1000), 2000.0);
        assert!(slow.is_err_and(|why| why.contains("saga completion p99")));

        // Rising faster than 2/s and more than half a second of work queued.
        let rising = sustainable(&step_report(100.0, 900.0, 5.0, 80.0, 1000), 2000.0);
        assert!(rising.is_err_and(|why| why.contains("backlog rising")));
        // A slope with little queued is noise, not a rising backlog.
        assert!(sustainable(&step_report(100.0, 900.0, 5.0, 20.0, 1000), 2000.0).is_ok());

        let refused = sustainable(&step_report(100.0, 900.0, 0.0, 40.0, 980), 2000.0);
        assert!(refused.is_err_and(|why| why.contains("20 of 1000 arrivals not accepted")));

        let mut undrained = step_report(100.0, 900.0, 0.0, 40.0, 1000);
        undrained.drained = false;
        assert!(sustainable(&undrained, 2000.0).is_err_and(|why| why.contains("did not drain")));
    }

    #[test]
    fn percentiles_are_read_in_milliseconds_from_microseconds() {
        let mut h = histogram();
        for micros in 1..=1000u64 {
            h.record(micros * 1000).expect("within the histogram's bounds");
        }
        let p = percentiles(&h);
        assert_eq!(p.samples, 1000);
        assert!((p.p50_ms - 500.0).abs() < 1.0, "p50 {}", p.p50_ms);
        assert!((p.p99_ms - 990.0).abs() < 1.0, "p99 {}", p.p99_ms);
        assert!((p.max_ms - 1000.0).abs() < 1.0, "max {}", p.max_ms);
    }
}
