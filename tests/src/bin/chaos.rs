//! The chaos harness: drives load through the real processes of the local stack, injects a
//! fault (kill -9 at a failpoint or at a random moment, broker and database outages, gateway
//! cohorts, duplicate delivery), lets a supervisor restart what died, drains, and counts the
//! damage: double charges at the gateway's ledger, lost events, stuck sagas, money kept for
//! cancelled orders, and every invariant of `ordersctl verify`; and the goodput: of the
//! orders that should confirm (an approved card, no injected gateway fault), the share that did.
//!
//!   chaos [--mode hardened|naive] [--orders N] [--seed S] SCENARIO...|all
//!
//! Run it through `scripts/chaos`, which builds the services with the `failpoints` (and,
//! for `--mode naive`, the `naive`) feature: a release build has neither. Every scenario
//! starts from an empty stack (`scripts/stack reset`), so its counts are its own.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use order_svc::domain::OrderStatus;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use ordersctl::bench::probe;
use ordersctl::bench::workload::{Outcome, Rng, Workload};
use ordersctl::verify::Invariant;
use rdkafka::message::Message as _;
use tokio::sync::Mutex;

const SERVICES: &[&str] = &[
    "order-svc",
    "payment-svc",
    "relay-orders",
    "relay-payments",
    "order-projector",
    "fulfilment",
    "gateway-sim",
];

/// The payment consumer's failpoints, each a place where a crash leaves different work done.
const PAYMENT_STEPS: &[&str] = &[
    "payment::before_gateway",
    "payment::after_gateway_before_commit",
    "consumer::after_commit_before_store",
];

#[derive(Debug, Parser)]
#[command(name = "chaos", about = "orderflow's chaos harness")]
struct Cli {
    /// hardened (the real services) or naive (the textbook mistakes, for comparison).
    #[arg(long, default_value = "hardened")]
    mode: String,
    /// Orders per scenario.
    #[arg(long, default_value_t = 200)]
    orders: u64,
    /// Orders a second.
    #[arg(long, default_value_t = 25.0)]
    rate: f64,
    /// Seed of the workload and of every random choice.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Seconds of broker outage in broker-pause.
    #[arg(long, default_value_t = 60)]
    pause_secs: u64,
    /// The payment crash loop heals only after this many failpoint crashes.
    #[arg(long, default_value_t = 3)]
    min_crashes: u64,
    /// The chance, in percent, that an armed failpoint fires each time payment-svc passes it.
    /// Units of work pass each step once per unit, not once per message, so a short run
    /// (scripts/test: 200 orders in 8 s) needs better odds than the full form to reach
    /// --min-crashes while its orders still flow (at 2% it once waited out the 300 s cap).
    #[arg(long, default_value_t = 2)]
    crash_percent: u32,
    /// How long to wait for the system to settle after the load, at most.
    #[arg(long, default_value_t = 180)]
    drain_secs: u64,
    /// Seconds the nemesis runs.
    #[arg(long, default_value_t = 30)]
    nemesis_secs: u64,
    /// The saga deadline: an order still PENDING this long is cancelled. It must exceed the
    /// longest outage a scenario injects plus the recovery after it (docs/saga.md).
    #[arg(long, default_value_t = 90)]
    deadline_secs: u64,
    /// Where the result table goes (markdown and JSON).
    #[arg(long, default_value = "chaos-results")]
    out: PathBuf,
    /// Print the scenarios' names, one a line, and exit.
    #[arg(long, exclusive = true)]
    list: bool,
    /// Print the findings table of earlier runs (the JSON files this harness wrote: the
    /// hardened run's, then optionally the naive run's) as Markdown, and exit: what
    /// docs/findings.md holds (scripts/check-docs checks it).
    #[arg(long, num_args = 1..=2, value_name = "RESULTS.json", conflicts_with_all = ["list", "scenarios"])]
    table: Vec<PathBuf>,
    /// With --table: print only its first line, the count of scenarios run and damaged (what
    /// README quotes).
    #[arg(long, requires = "table")]
    summary: bool,
    /// Scenarios, or `all`.
    #[arg(required_unless_present_any = ["list", "table"])]
    scenarios: Vec<String>,
}

impl Cli {
    /// The saga deadline of `scenario`. The gateway cohorts test the race between the
    /// deadline and a late authorization, not an outage: their hangs must outlast the deadline,
    /// and with the 90 s one each hang would hold its partition for two minutes (two on one
    /// partition outlast the drain). They run with 20 s.
    fn deadline(&self, scenario: &str) -> Duration {
        if scenario == "gateway-cohorts" {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(self.deadline_secs)
        }
    }
}

/// Every scenario, and whether its goodput must reach [`GOODPUT_TARGET`]: yes where one
/// process is killed, the broker or the database is away for a while, or brokers restart;
/// not for the gateway cohorts (whose faults cancel orders on purpose), the crash loop and
/// the nemesis (which kill again and again), or the redelivery scenarios (nothing is down).
/// Each with the fault it injects, as the findings table says it.
const SCENARIOS: &[(&str, bool, &str)] = &[
    (
        "payment-kill-after-commit",
        true,
        "payment-svc aborts after its commit, before its offset store (once)",
    ),
    (
        "payment-crash-loop",
        false,
        "payment-svc aborts at a failpoint chosen at random (--crash-percent of passes) on every restart, until --min-crashes",
    ),
    ("kill-order-svc", true, "kill -9 mid-saga"),
    ("kill-payment-svc", true, "kill -9 mid-saga"),
    ("kill-relay-orders", true, "kill -9"),
    ("kill-relay-payments", true, "kill -9"),
    ("kill-projector", true, "kill -9"),
    ("kill-fulfilment", true, "kill -9"),
    ("kill-gateway", true, "kill -9 of the gateway simulator"),
    (
        "broker-pause",
        true,
        "SIGSTOP of the broker for --pause-secs, then SIGCONT",
    ),
    ("broker-kill", true, "kill -9 of the broker, restart 3 s later"),
    ("postgres-restart", true, "`pg_ctl stop -m immediate`, start"),
    (
        "gateway-cohorts",
        false,
        "10% declined cards, 5% charged-but-reply-lost, 3% hangs past the deadline",
    ),
    ("duplicate-delivery", false, "both relays publish every row twice"),
    (
        "replay-from-zero",
        false,
        "payment group reset to offset 0 after all orders were handled",
    ),
    (
        "nemesis",
        false,
        "seeded random kill -9 of any service process every 1–4 s for --nemesis-secs",
    ),
    (
        "kill-one-of-two-payment-svc",
        true,
        "two payment-svc in the group; one killed for good",
    ),
    (
        "restart-static-member",
        true,
        "two payment-svc; one killed and restarted with its static id",
    ),
    (
        "broker-leader-kill",
        true,
        "three brokers; kill -9 of the leader of orders.events/0, restart 5 s later",
    ),
    (
        "broker-rolling-restart",
        true,
        "three brokers restarted one after another (SIGTERM), each once its replicas are in sync, under load",
    ),
];

fn goodput_required(scenario: &str) -> bool {
    SCENARIOS
        .iter()
        .any(|(name, required, _)| *name == scenario && *required)
}

/// Percent of the orders that should confirm.
const GOODPUT_TARGET: f64 = 99.0;

/// How many brokers and instances of each consumer service a scenario runs with.
fn topology(scenario: &str) -> (u8, u8) {
    match scenario {
        "broker-leader-kill" | "broker-rolling-restart" => (3, 1),
        "kill-one-of-two-payment-svc" | "restart-static-member" => (1, 2),
        _ => (1, 1),
    }
}

/// One scenario's damage.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Row {
    scenario: String,
    mode: String,
    orders_accepted: usize,
    gave_up: usize,
    /// Accepted orders that should confirm (approved card, no injected gateway fault).
    should_confirm: usize,
    /// The share of those that did, in percent.
    goodput: f64,
    /// kill → first message handled from a moved partition (kill-one-of-two-payment-svc).
    failover_secs: Option<f64>,
    /// Rebalances the surviving member saw while the other restarted (restart-static-member).
    rebalances_of_others: Option<f64>,
    /// (broker-pause) The broker did not answer after the resume and was restarted.
    broker_restarted: bool,
    confirmed: i64,
    cancelled: i64,
    double_charges: usize,
    lost_events: usize,
    undelivered_outbox_rows: i64,
    stuck_sagas: i64,
    money_kept_for_cancelled: usize,
    invariant_violations: usize,
    /// The invariants broken, by the checker's name, with how many orders break each.
    violated: BTreeMap<String, usize>,
    crashes: u64,
    crash_steps: BTreeMap<String, u64>,
    duplicates_deduplicated: f64,
    seconds: f64,
}

impl Row {
    /// Every count [`Row::damaged`] adds up, in [`DAMAGE_COLUMNS`]' order: a row of zeros is
    /// a row without damage.
    fn damage(&self) -> String {
        format!(
            "{} / {} / {} / {} / {} / {} / {}",
            self.double_charges,
            self.lost_events,
            self.undelivered_outbox_rows,
            self.stuck_sagas,
            self.money_kept_for_cancelled,
            self.invariant_violations,
            self.gave_up
        )
    }

    /// Whether the scenario did damage (the goodput and rebalance targets are checked apart).
    fn damaged(&self) -> bool {
        self.double_charges + self.lost_events + self.money_kept_for_cancelled + self.invariant_violations > 0
            || self.stuck_sagas > 0
            || self.undelivered_outbox_rows > 0
            || self.gave_up > 0
            || (self.mode == "hardened" && goodput_required(&self.scenario) && self.goodput < GOODPUT_TARGET)
    }
}

/// Copies the stack's logs to `out/logs/MODE-SCENARIO/` before the next scenario resets the
/// stack: a damaged run is explained from them afterwards (CI keeps `out`).
fn keep_logs(out: &std::path::Path, row: &Row) -> anyhow::Result<PathBuf> {
    let kept = out.join("logs").join(format!("{}-{}", row.mode, row.scenario));
    let _ = std::fs::remove_dir_all(&kept);
    std::fs::create_dir_all(&kept)?;
    for entry in std::fs::read_dir(stack_dir().join("log"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), kept.join(entry.file_name()))?;
    }
    std::fs::write(kept.join("row.json"), serde_json::to_string_pretty(row)?)?;
    Ok(kept)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One `scripts/stack` command at a time. Without it the supervisor's `revive` raced the
/// heal's `stop payment-svc`: revive started a new payment-svc, then stop removed the new
/// one's pid file, and the untracked process outlived every later reset, holding the
/// metrics port (every payment-svc after it died at start).
static STACK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn stack(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<()> {
    let _one_at_a_time = STACK_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let run = |quiet: bool| {
        let mut command = Command::new(root().join("scripts/stack"));
        command.args(args).envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        if quiet {
            command
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        }
        command.status()
    };
    // Quiet first; a failure is retried once with its output shown.
    if run(true)?.success() {
        return Ok(());
    }
    eprintln!("[chaos]   scripts/stack {args:?} failed; once more, with its output");
    anyhow::ensure!(run(false)?.success(), "scripts/stack {args:?} failed");
    Ok(())
}

fn stack_dir() -> PathBuf {
    std::env::var("ORDERFLOW_STACK_DIR").map_or_else(|_| root().join(".stack"), PathBuf::from)
}

fn alive(name: &str) -> bool {
    std::fs::read_to_string(stack_dir().join("pid").join(format!("{name}.pid")))
        .ok()
        .and_then(|pid| pid.trim().parse::<i32>().ok())
        .is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

/// The stack's environment file, as variables.
fn stack_env() -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(stack_dir().join("env")).context("no .stack/env: is the stack up?")?;
    Ok(orderflow_tests::parse_stack_env(&text).collect())
}

/// The stack's Kafka cluster, as its admin principal (the harness reads every topic and
/// resets groups).
fn kafka_cluster() -> anyhow::Result<orderflow_platform::kafka::Cluster> {
    let env = stack_env()?;
    let get = |key: &str| {
        env.get(key)
            .cloned()
            .with_context(|| format!("{key} missing from .stack/env"))
    };
    Ok(orderflow_platform::kafka::Cluster::scram(
        get("ORDERFLOW_BOOTSTRAP_SERVERS")?,
        get("ORDERFLOW_KAFKA_USERNAME")?,
        orderflow_platform::Secret::new(get("ORDERFLOW_KAFKA_PASSWORD")?),
    ))
}

/// How each scenario sets the stack up.
fn scenario_env(
    scenario: &str,
    naive: bool,
    deadline: Duration,
    payment_failpoints: Option<String>,
) -> Vec<(&'static str, String)> {
    let (brokers, instances) = topology(scenario);
    let mut env = vec![
        ("ORDERFLOW_NO_BUILD", "1".to_owned()),
        ("ORDERFLOW_PROFILE", "debug".to_owned()),
        ("ORDERFLOW_BROKERS", brokers.to_string()),
        ("ORDERFLOW_INSTANCES", instances.to_string()),
        ("ORDERFLOW_SAGA_DEADLINE_MS", deadline.as_millis().to_string()),
        ("ORDERFLOW_NAIVE", if naive { "true" } else { "false" }.to_owned()),
        ("PAYMENT_SVC_GATEWAY_TIMEOUT_MS", "1000".to_owned()),
        ("GATEWAY_TIMEOUT_REPLY_DELAY_MS", "1500".to_owned()),
    ];
    if scenario == "duplicate-delivery" {
        env.push(("RELAY_PUBLISH_TWICE", "true".to_owned()));
    }
    if scenario == "gateway-cohorts" {
        // A hang cohort past this scenario's 20 s saga deadline: 12 silent calls of 1 s each,
        // with the consumer's backoff between them about 45 s (the partition waits behind it).
        env.push(("GATEWAY_HANG_ATTEMPTS", "12".to_owned()));
    }
    if scenario == "payment-kill-after-commit" {
        // Once, on the first message: the effect and its inbox row are committed, the offset
        // is not stored. The restarted consumer gets the message again.
        env.push((
            "PAYMENT_SVC_FAILPOINTS",
            "consumer::after_commit_before_store=1*return".to_owned(),
        ));
    }
    if let Some(failpoints) = payment_failpoints {
        env.push(("PAYMENT_SVC_FAILPOINTS", failpoints));
    }
    env
}

/// How the supervisor restarts what died: as the scenario started it, except what the
/// scenario keeps down on purpose.
fn revive_env(
    scenario: &str,
    naive: bool,
    deadline: Duration,
    payment_failpoints: Option<String>,
) -> Vec<(&'static str, String)> {
    let mut env = scenario_env(scenario, naive, deadline, payment_failpoints);
    let kept: Vec<String> = processes(scenario)
        .into_iter()
        .filter(|p| kept_down(scenario, p))
        .collect();
    if !kept.is_empty() {
        env.push(("ORDERFLOW_KEEP_DOWN", kept.join(" ")));
    }
    env
}

struct Placed {
    /// Each accepted order with what its card and the gateway were set to do.
    accepted: Mutex<Vec<(String, Outcome)>>,
    gave_up: AtomicU64,
}

/// Places `orders` at `rate`, each retried with its own request id (so a retry is safe)
/// until accepted or 120 s have passed: what a careful client does through an outage.
async fn place_orders(
    access: Arc<ordersctl::access::Access>,
    addr: String,
    workload: Arc<Workload>,
    orders: u64,
    rate: f64,
) -> anyhow::Result<Arc<Placed>> {
    let placed = Arc::new(Placed {
        accepted: Mutex::new(Vec::new()),
        gave_up: AtomicU64::new(0),
    });
    // One channel for every attempt: it reconnects by itself after order-svc dies. (A
    // connection per attempt left thousands of client sockets in TIME_WAIT, and one on a
    // port a service was about to listen on kept it from binding.)
    let channel = access
        .endpoint(&addr)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let mut tasks = Vec::new();
    let start = Instant::now();
    for n in 0..orders {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (mut request, outcome) = workload.order(n);
        request.request_id = uuid::Uuid::now_v7().to_string();
        let mut client = OrderServiceClient::new(channel.clone());
        let caller = orderflow_platform::auth::Caller::Customer(request.customer_id);
        let access = access.clone();
        let placed = placed.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            // The same request_id on every attempt: a retry of an order that was committed
            // (its reply lost) returns the same order, never a second one.
            while started.elapsed() < Duration::from_secs(120) {
                let Ok(call) = access.request(request.clone(), &caller) else {
                    placed.gave_up.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if let Ok(response) = client.place_order(call).await {
                    placed
                        .accepted
                        .lock()
                        .await
                        .push((response.into_inner().order_id, outcome));
                    return;
                }
                // A client's back-off before it tries the same order again.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            placed.gave_up.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(placed)
}

/// The payment crash loop's state: which failpoint the running payment-svc has armed, and
/// how often each one fired.
struct CrashLoop {
    percent: u32,
    rng: std::sync::Mutex<Rng>,
    armed: std::sync::Mutex<Option<&'static str>>,
    fired: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl CrashLoop {
    fn new(seed: u64, percent: u32) -> Self {
        Self {
            percent: percent.clamp(1, 100),
            rng: std::sync::Mutex::new(Rng::new(seed ^ 0x5EED)),
            armed: std::sync::Mutex::new(None),
            fired: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Arms one of the payment consumer's failpoints, chosen at random (seeded), to fire on
    /// about 2% of its passes; returns the FAILPOINTS value.
    fn arm(&self) -> String {
        let step = {
            let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            PAYMENT_STEPS[usize::try_from(rng.below(PAYMENT_STEPS.len() as u64)).unwrap_or(0)]
        };
        *self.armed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(step);
        format!("{step}={}%return", self.percent)
    }

    /// payment-svc died: the armed failpoint fired.
    fn record_crash(&self) {
        if let Some(step) = self
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            *self
                .fired
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(step.to_owned())
                .or_default() += 1;
        }
    }

    fn fired(&self) -> BTreeMap<String, u64> {
        self.fired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Restarts whatever died, every 300 ms, until stopped. In the payment crash loop every
/// restart of payment-svc arms one failpoint, chosen at random, until the heal.
#[allow(clippy::too_many_arguments)] // One thread's whole context; a struct would only rename it.
fn supervise(
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    healing: Arc<AtomicBool>,
    scenario: String,
    naive: bool,
    crash_loop: Arc<CrashLoop>,
    crashes: Arc<AtomicU64>,
    deadline: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let processes = processes(&scenario);
        while !stop.load(Ordering::Relaxed) {
            // A supervisor's polling of its processes.
            std::thread::sleep(Duration::from_millis(300));
            if paused.load(Ordering::Relaxed) {
                continue;
            }
            let dead: Vec<&str> = processes
                .iter()
                .map(String::as_str)
                .filter(|s| !alive(s) && !kept_down(&scenario, s))
                .collect();
            if dead.is_empty() {
                continue;
            }
            crashes.fetch_add(dead.len() as u64, Ordering::Relaxed);
            if dead.contains(&"payment-svc") {
                crash_loop.record_crash();
            }
            let failpoints =
                (scenario == "payment-crash-loop" && !healing.load(Ordering::Relaxed)).then(|| crash_loop.arm());
            // The one-shot failpoint is not armed again after its crash.
            let scenario = if scenario == "payment-kill-after-commit" {
                ""
            } else {
                scenario.as_str()
            };
            let _ = stack(&["revive"], &revive_env(scenario, naive, deadline, failpoints));
        }
    })
}

/// A process the scenario keeps dead on purpose (its partitions must move to the survivor).
fn kept_down(scenario: &str, process: &str) -> bool {
    scenario == "kill-one-of-two-payment-svc" && process == "payment-svc-2"
}

/// The service processes of a scenario's stack (a second instance of each consumer service
/// where it runs two).
fn processes(scenario: &str) -> Vec<String> {
    let mut all: Vec<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
    if topology(scenario).1 == 2 {
        all.extend(["payment-svc-2", "fulfilment-2", "order-projector-2"].map(str::to_owned));
    }
    all
}

/// Keeps the payment consumer's deduplicated count, summed over its lifetimes (the counter
/// starts again at 0 after every restart).
fn watch_duplicates(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let (mut total, mut last) = (0.0, 0.0);
        while !stop.load(Ordering::Relaxed) {
            // payment-svc down (or restarting) reads as 0: its counter starts again.
            let now = probe::scrape_sum(
                "127.0.0.1:9102",
                orderflow_platform::telemetry::CONSUMER_MESSAGES,
                "outcome=\"duplicate\"",
            )
            .unwrap_or(0.0);
            if now < last {
                total += last;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(200));
        }
        total + last
    })
}

/// What a scenario measured while injecting its fault.
#[derive(Debug, Default)]
struct Measured {
    failover_secs: Option<f64>,
    rebalances_of_others: Option<f64>,
    broker_restarted: bool,
}

/// Whether the stack's broker answers a metadata request within `limit`.
async fn broker_answers(limit: Duration) -> bool {
    let Ok(cluster) = kafka_cluster() else { return false };
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer as _;
        let started = Instant::now();
        let Ok(client) = cluster.client_config().create::<rdkafka::consumer::BaseConsumer>() else {
            return false;
        };
        while started.elapsed() < limit {
            if client.fetch_metadata(None, Duration::from_secs(5)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// The broker's threads, into the stack's logs (kept with them if the scenario is damaged).
fn dump_broker_threads(name: &str) {
    let pid_file = stack_dir().join("pid").join(format!("{name}.pid"));
    let Ok(pid) = std::fs::read_to_string(&pid_file) else {
        return;
    };
    let pid = pid.trim();
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let dump = Command::new("jstack").arg(pid).output();
    let text = match dump {
        Ok(output) => format!(
            "process state: {state}\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => format!("process state: {state}\njstack: {error}\n"),
    };
    let _ = std::fs::write(stack_dir().join("log").join(format!("{name}.threads.txt")), text);
}

async fn inject(scenario: &str, cli: &Cli, paused: &AtomicBool) -> anyhow::Result<Measured> {
    let kill = |name: &str| stack(&["kill", name], &[]);
    let revive = || {
        stack(
            &["revive"],
            &revive_env(scenario, cli.mode == "naive", cli.deadline(scenario), None),
        )
    };
    let mut measured = Measured::default();
    match scenario {
        "kill-order-svc" => kill("order-svc")?,
        "kill-payment-svc" => kill("payment-svc")?,
        "kill-relay-orders" => kill("relay-orders")?,
        "kill-relay-payments" => kill("relay-payments")?,
        "kill-projector" => kill("order-projector")?,
        "kill-fulfilment" => kill("fulfilment")?,
        "kill-gateway" => kill("gateway-sim")?,
        "broker-pause" => {
            paused.store(true, Ordering::Relaxed);
            stack(&["broker-pause"], &[])?;
            // The pause's length is the scenario.
            tokio::time::sleep(Duration::from_secs(cli.pause_secs)).await;
            stack(&["broker-resume"], &[])?;
            // A liveness probe, as an operator's supervisor has one: a broker that does not
            // answer 30 s after SIGCONT is dumped and restarted, and the row says so. (Seen
            // twice in about twenty runs: the single KRaft node answered for a second after
            // the resume, then nothing, for minutes; every client waited on it.)
            if !broker_answers(Duration::from_secs(30)).await {
                eprintln!(
                    "[chaos]   the broker does not answer 30 s after the resume: thread dump kept, restarting it"
                );
                dump_broker_threads("kafka-1");
                kill("kafka-1")?;
                revive()?;
                measured.broker_restarted = true;
            }
            paused.store(false, Ordering::Relaxed);
        }
        "broker-kill" => {
            paused.store(true, Ordering::Relaxed);
            kill("kafka-1")?;
            // How long the broker stays dead: time is the subject.
            tokio::time::sleep(Duration::from_secs(3)).await;
            paused.store(false, Ordering::Relaxed);
            revive()?;
        }
        "kill-one-of-two-payment-svc" => {
            let killed_at = chrono::Utc::now();
            kill("payment-svc-2")?;
            let failover = first_moved_message(&killed_at, Duration::from_secs(60)).await?;
            eprintln!(
                "[chaos]   failover: {failover:.2} s from kill -9 to the first message handled from a moved partition"
            );
            measured.failover_secs = Some(failover);
        }
        "restart-static-member" => {
            // Count what the survivor sees while the other member dies and comes back with
            // its static id.
            two_members_stable().await;
            let before = payment_rebalances();
            kill("payment-svc-2")?;
            // The supervisor restarts it within a second; then a session timeout and more,
            // in which a rebalance would have happened if the restart had caused one.
            let back = Instant::now();
            while partitions_held(9112) < 1.0 && back.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            eprintln!(
                "[chaos]   payment-svc-2 holds partitions again after {:.1} s",
                back.elapsed().as_secs_f64()
            );
            tokio::time::sleep(orderflow_platform::kafka::SESSION_TIMEOUT + Duration::from_secs(4)).await;
            let seen = payment_rebalances() - before;
            eprintln!("[chaos]   rebalances seen by the other member meanwhile: {seen}");
            measured.rebalances_of_others = Some(seen);
        }
        "broker-leader-kill" => {
            let bootstrap = kafka_cluster()?;
            let leader =
                tokio::task::spawn_blocking(move || leader_of(&bootstrap, orderflow::topics::ORDERS_EVENTS, 0))
                    .await??;
            eprintln!("[chaos]   kill -9 of broker {leader}, leader of orders.events partition 0");
            paused.store(true, Ordering::Relaxed);
            kill(&format!("kafka-{leader}"))?;
            // How long the leader stays dead: time is the subject.
            tokio::time::sleep(Duration::from_secs(5)).await;
            paused.store(false, Ordering::Relaxed);
            revive()?;
        }
        "broker-rolling-restart" => {
            for node in 1..=3 {
                eprintln!("[chaos]   restarting broker {node} (SIGTERM: controlled shutdown)");
                stack(&["stop", &format!("kafka-{node}")], &[])?;
                revive()?;
                // As an operator does: the next broker only once every replica is in sync.
                let bootstrap = kafka_cluster()?;
                let waited = Instant::now();
                while waited.elapsed() < Duration::from_secs(120) {
                    let probe = bootstrap.clone();
                    if tokio::task::spawn_blocking(move || fully_replicated(&probe)).await?? {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        "postgres-restart" => stack(&["pg-restart"], &[])?,
        "nemesis" => {
            let mut rng = Rng::new(cli.seed ^ 0xBAD);
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(cli.nemesis_secs) {
                // A random moment between kills: time is the subject.
                tokio::time::sleep(Duration::from_millis(1_000 + rng.below(3_000))).await;
                let victim = SERVICES[usize::try_from(rng.below(SERVICES.len() as u64)).unwrap_or(0)];
                eprintln!("[chaos]   nemesis kills {victim}");
                kill(victim)?;
            }
        }
        _ => {}
    }
    Ok(measured)
}

/// Rebalances the first payment-svc has seen (NaN when its metrics do not answer).
fn payment_rebalances() -> f64 {
    probe::scrape_sum("127.0.0.1:9102", orderflow_platform::telemetry::CONSUMER_REBALANCES, "").unwrap_or(f64::NAN)
}

/// Partitions held by the payment-svc whose metrics are on `port`.
fn partitions_held(port: u16) -> f64 {
    probe::scrape_sum(
        &format!("127.0.0.1:{port}"),
        orderflow_platform::telemetry::CONSUMER_ASSIGNED,
        "",
    )
    .unwrap_or(0.0)
}

/// Waits (at most 60 s) until both payment-svc instances hold partitions, all 12 between
/// them, and no rebalance has happened for 3 s: the group has settled after its start.
async fn two_members_stable() {
    let started = Instant::now();
    let mut last = payment_rebalances();
    let mut stable_since = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = payment_rebalances();
        let (first, second) = (partitions_held(9102), partitions_held(9112));
        if now != last || first < 1.0 || second < 1.0 || first + second < 12.0 {
            (last, stable_since) = (now, Instant::now());
        } else if stable_since.elapsed() > Duration::from_secs(3) {
            eprintln!("[chaos]   the payment group is stable: {first} + {second} partitions");
            return;
        }
    }
    eprintln!("[chaos]   the payment group did not settle within 60 s");
}

/// The broker leading `partition` of `topic`.
fn leader_of(cluster: &orderflow_platform::kafka::Cluster, topic: &str, partition: i32) -> anyhow::Result<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = cluster.client_config().create()?;
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    metadata
        .topics()
        .first()
        .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
        .map(|p| p.leader())
        .context("no leader in the metadata")
}

/// Whether every partition of the event topics has all three replicas in sync.
fn fully_replicated(cluster: &orderflow_platform::kafka::Cluster) -> anyhow::Result<bool> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = cluster.client_config().create()?;
    let metadata = client.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == orderflow::topics::ORDERS_EVENTS || t.name() == orderflow::topics::PAYMENTS_EVENTS)
        .flat_map(|t| t.partitions())
        .all(|p| p.isr().len() == 3 && p.leader() >= 0))
}

/// Seconds from `killed_at` to the first message the surviving payment-svc handled from a
/// partition assigned to it after that moment (its log says so, with a timestamp).
async fn first_moved_message(killed_at: &chrono::DateTime<chrono::Utc>, limit: Duration) -> anyhow::Result<f64> {
    let log = stack_dir().join("log").join("payment-svc.log");
    let waited = Instant::now();
    while waited.elapsed() < limit {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let first = text
            .lines()
            .filter(|line| line.contains("first message handled since the partition was assigned"))
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|entry| {
                chrono::DateTime::parse_from_rfc3339(entry.get("timestamp")?.as_str()?)
                    .ok()
                    .map(|at| at.with_timezone(&chrono::Utc))
            })
            .filter(|at| at > killed_at)
            .min();
        if let Some(at) = first {
            return Ok((at - *killed_at).to_std().unwrap_or_default().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no partition moved to the surviving payment-svc within {limit:?}")
}

/// Reads the orders topic and returns the orders whose OrderPlaced is on it.
fn placed_on_topic(bootstrap: &orderflow_platform::kafka::Cluster) -> anyhow::Result<HashSet<String>> {
    use rdkafka::consumer::Consumer as _;
    let topic = orderflow::topics::ORDERS_EVENTS;
    let (consumer, partitions) = orderflow_platform::kafka::reader_from_start(bootstrap, topic)?;
    // Read up to each partition's end as it is now (nothing is produced any more): the next
    // offset to read, per partition, against its high watermark.
    let mut next = vec![0_i64; usize::try_from(partitions)?];
    let mut high = Vec::with_capacity(next.len());
    for partition in 0..partitions {
        high.push(consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?.1);
    }
    let mut seen = HashSet::new();
    let started = Instant::now();
    while next.iter().zip(&high).any(|(n, h)| n < h) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "cannot read {topic} to its end"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        if let Some(n) = usize::try_from(message.partition()).ok().and_then(|p| next.get_mut(p)) {
            *n = message.offset() + 1;
        }
        if let Ok(event) = orderflow::envelope::open(message.payload().unwrap_or_default())
            && matches!(
                event.payload,
                orderflow::events::v1::event_envelope::Payload::OrderPlaced(_)
            )
        {
            seen.insert(event.aggregate_id.to_string());
        }
    }
    Ok(seen)
}

async fn run_scenario(cli: &Cli, scenario: &str) -> anyhow::Result<Row> {
    let naive = cli.mode == "naive";
    let started = Instant::now();
    eprintln!("[chaos] {scenario} ({}), {} orders", cli.mode, cli.orders);
    stack(&["reset"], &[])?;
    let crash_loop = Arc::new(CrashLoop::new(cli.seed, cli.crash_percent));
    let first_failpoint = (scenario == "payment-crash-loop").then(|| crash_loop.arm());
    stack(
        &["up"],
        &scenario_env(scenario, naive, cli.deadline(scenario), first_failpoint),
    )?;
    let env = stack_env()?;
    let var = |k: &str| {
        env.get(k)
            .cloned()
            .with_context(|| format!("{k} missing from .stack/env"))
    };

    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let healing = Arc::new(AtomicBool::new(false));
    let crashes = Arc::new(AtomicU64::new(0));
    let supervisor = supervise(
        stop.clone(),
        paused.clone(),
        healing.clone(),
        scenario.to_owned(),
        naive,
        crash_loop.clone(),
        crashes.clone(),
        cli.deadline(scenario),
    );
    let duplicates = watch_duplicates(stop.clone());
    if topology(scenario).1 == 2 {
        // The group settles after its start before any load: a kill must find it stable.
        two_members_stable().await;
    }

    let (decline, late, hang) = if scenario == "gateway-cohorts" {
        (0.10, 0.05, 0.03)
    } else {
        (0.05, 0.01, 0.0)
    };
    let workload = Arc::new(Workload::new(cli.seed, 1_000_000, 1.1, decline, late).with_hang_rate(hang));
    // A rolling restart of three brokers takes about a minute: its orders are spread over
    // 90 s, so that every restart happens under load, and it starts 5 s in.
    let (rate, fault_at) = if scenario == "broker-rolling-restart" {
        (cli.orders as f64 / 90.0, Duration::from_secs(5))
    } else {
        // Elsewhere the fault lands a third of the way into the load.
        (cli.rate, Duration::from_secs_f64(cli.orders as f64 / cli.rate / 3.0))
    };
    // TLS with the stack's CA; each order with its customer's token, signed with the
    // stack's key.
    let access = Arc::new(ordersctl::access::Access::new(&ordersctl::access::AccessArgs {
        ca_cert: env.get("ORDERFLOW_CA_CERT").map(PathBuf::from),
        token: None,
        signing_key: env.get("ORDERFLOW_JWT_SIGNING_KEY").map(PathBuf::from),
    })?);
    let load = tokio::spawn(place_orders(
        access,
        var("ORDERFLOW_ORDER_SVC_ADDR")?,
        workload,
        cli.orders,
        rate,
    ));
    // The fault lands at a moment of the load: time is the subject.
    tokio::time::sleep(fault_at).await;
    let measured = inject(scenario, cli, &paused).await?;
    let placed = load.await??;

    // Heal: the faults stop. In the crash loop payment-svc is stopped gracefully (it leaves
    // its group, so its successor gets the partitions at once) and comes back unarmed.
    if scenario == "payment-crash-loop" {
        // The loop goes on until enough crashes (at least --min-crashes), or 5 minutes.
        let looping = Instant::now();
        while crash_loop.fired().values().sum::<u64>() < cli.min_crashes && looping.elapsed() < Duration::from_secs(300)
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    healing.store(true, Ordering::Relaxed);
    if scenario == "payment-crash-loop" {
        stack(&["stop", "payment-svc"], &[])?;
    }

    if scenario == "replay-from-zero" {
        // Every order event again, from offset 0, to a payment-svc that has seen them all.
        // First payment-svc takes in every order event: its committed offsets reach the end.
        paused.store(true, Ordering::Relaxed);
        let cluster = kafka_cluster()?;
        let caught_up = payment_caught_up(&cluster).await;
        anyhow::ensure!(caught_up, "payment-svc did not take in every order event within 120 s");
        stack(&["kill", "payment-svc"], &[])?;
        // Its static member stays in the group until its session expires; offsets can be
        // reset only in an empty group.
        let empty = orderflow_tests::eventually(orderflow_platform::kafka::SESSION_TIMEOUT * 4, || {
            let cluster = cluster.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    orderflow_tests::group_state(&cluster, "payment").is_ok_and(|state| state == "Empty")
                })
                .await
                .unwrap_or(false)
            }
        })
        .await;
        anyhow::ensure!(empty, "the payment group did not become empty after its member's death");
        orderflow_tests::reset_group_to_start(&cluster, "payment", orderflow::topics::ORDERS_EVENTS)?;
        paused.store(false, Ordering::Relaxed);
        // The replay is the scenario: the drain below must not end before payment-svc has
        // taken in every event again (its inbox absorbing each), or the run proves nothing
        // (once it ended first, with 0 redeliveries counted, and passed).
        anyhow::ensure!(
            payment_caught_up(&cluster).await,
            "payment-svc did not take in the replayed order events within 120 s"
        );
    }

    // Drain: no order PENDING (the sweeper ends any saga within the deadline) and every
    // outbox row published, or 180 s.
    let stores = ordersctl::verify::Stores::connect(
        &var("ORDERFLOW_ORDERS_DATABASE_URL")?,
        &var("ORDERFLOW_PAYMENTS_DATABASE_URL")?,
        &var("ORDERFLOW_FULFILMENT_DATABASE_URL")?,
        &var("ORDERFLOW_GATEWAY_DATABASE_URL")?,
        2,
    )
    .await?;
    let drain_started = Instant::now();
    let mut last_state = (-1, -1, -1, -1, -1, -1, -1, -1);
    let mut last_change = Instant::now();
    loop {
        // A count that cannot be read is never "quiet".
        let pending = probe::pending_sagas(&stores.orders).await.unwrap_or(1);
        let outbox = probe::outbox_backlog(&stores.orders, &stores.payments)
            .await
            .unwrap_or(1);
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM authorizations WHERE state = $1")
            .bind(gateway_sim::AuthorizationState::Authorized.as_str())
            .fetch_one(&stores.gateway)
            .await
            .unwrap_or(1);
        let unprojected: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orders o LEFT JOIN order_read r USING (order_id) WHERE r.status IS DISTINCT FROM o.status",
        )
        .fetch_one(&stores.orders)
        .await
        .unwrap_or(1);
        // Every confirmed order shipped (fulfilment may still be rejoining its group).
        let confirmed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = $1")
            .bind(OrderStatus::Confirmed.as_str())
            .fetch_one(&stores.orders)
            .await
            .unwrap_or(0);
        let shipped: i64 = sqlx::query_scalar("SELECT count(DISTINCT order_id) FROM shipments")
            .fetch_one(&stores.fulfilment)
            .await
            .unwrap_or(-1);
        // A gateway call owed or made and not yet recorded (the gateway may have captured
        // while payment-svc has still to say so).
        let owed: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE state = ANY($1)")
            .bind(payment_svc::domain::PaymentState::pending_names())
            .fetch_one(&stores.payments)
            .await
            .unwrap_or(1);
        let quiet = pending == 0 && outbox == 0 && open == 0 && owed == 0 && unprojected == 0 && shipped >= confirmed;
        // Damage that never heals (an orphaned authorization in naive mode) would hold the
        // drain to its limit: nothing pending, nothing to publish and nothing changing for
        // 40 s is as quiet as it gets.
        // A consumer still retrying (a hanging gateway holds its partition) is progress
        // that no count shows yet: its retries count in the state.
        let retries = probe::scrape_sum("127.0.0.1:9102", orderflow_platform::telemetry::CONSUMER_RETRIES, "")
            .map_or(-1, |r| r as i64);
        let state = (pending, outbox, open, owed, unprojected, confirmed, shipped, retries);
        if state != last_state {
            last_state = state;
            last_change = Instant::now();
        }
        let stalled = pending == 0 && outbox == 0 && last_change.elapsed() > Duration::from_secs(40);
        if quiet || stalled || drain_started.elapsed() > Duration::from_secs(cli.drain_secs) {
            break;
        }
        // Polling the drain's counts.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // No "last moment" here: quiet means every count above is settled, and the checker
    // reads the same stores.
    stop.store(true, Ordering::Relaxed);
    let _ = supervisor.join();
    let duplicates = duplicates.join().unwrap_or(0.0);

    let report = ordersctl::verify::verify(&stores, cli.deadline(scenario), Duration::from_secs(5)).await?;
    // By the invariant's type: a check missing from the report is an error, never a zero.
    let count = |invariant| report.violations_of(invariant);
    let accepted = placed.accepted.lock().await.clone();
    let bootstrap = kafka_cluster()?;
    let on_topic = tokio::task::spawn_blocking(move || placed_on_topic(&bootstrap)).await??;
    let lost_events = accepted.iter().filter(|(id, _)| !on_topic.contains(id)).count();
    // Goodput: the orders that should confirm, and how many did.
    let should: Vec<uuid::Uuid> = accepted
        .iter()
        .filter(|(_, outcome)| *outcome == Outcome::Approved)
        .filter_map(|(id, _)| id.parse().ok())
        .collect();
    let confirmed_of_should: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1) AND status = $2")
            .bind(&should)
            .bind(OrderStatus::Confirmed.as_str())
            .fetch_one(&stores.orders)
            .await?;
    let goodput = if should.is_empty() {
        100.0
    } else {
        confirmed_of_should as f64 * 100.0 / should.len() as f64
    };
    let undelivered = probe::outbox_backlog(&stores.orders, &stores.payments).await?;
    let stuck = probe::pending_sagas(&stores.orders).await?;
    let by_status = |status: &str| report.orders_by_status.get(status).copied().unwrap_or(0);
    Ok(Row {
        scenario: scenario.to_owned(),
        mode: cli.mode.clone(),
        orders_accepted: accepted.len(),
        gave_up: usize::try_from(placed.gave_up.load(Ordering::Relaxed)).unwrap_or(0),
        should_confirm: should.len(),
        goodput,
        failover_secs: measured.failover_secs,
        rebalances_of_others: measured.rebalances_of_others,
        broker_restarted: measured.broker_restarted,
        confirmed: by_status(OrderStatus::Confirmed.as_str()),
        cancelled: by_status(OrderStatus::Cancelled.as_str()),
        double_charges: count(Invariant::ChargedAtMostOnce)?,
        lost_events,
        undelivered_outbox_rows: undelivered,
        stuck_sagas: stuck,
        money_kept_for_cancelled: count(Invariant::CancelledHoldsNoMoney)?,
        invariant_violations: report.violations(),
        violated: report
            .checks
            .iter()
            .filter(|c| c.violations > 0)
            .map(|c| (c.invariant.id().to_owned(), c.violations))
            .collect(),
        crashes: crashes.load(Ordering::Relaxed),
        crash_steps: crash_loop.fired(),
        duplicates_deduplicated: duplicates,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A row's goodput, with what else its scenario measured.
fn goodput_text(r: &Row) -> String {
    let mut goodput = format!("{:.1}% of {}", r.goodput, r.should_confirm);
    if let Some(failover) = r.failover_secs {
        goodput += &format!(" (failover {failover:.1} s)");
    }
    if let Some(rebalances) = r.rebalances_of_others {
        goodput += &format!(" ({rebalances:.0} rebalances of the other member)");
    }
    if r.broker_restarted {
        goodput += " (broker unresponsive after the resume: restarted)";
    }
    goodput
}

/// The columns of a row's damage, as [`Row::damage`] fills them.
const DAMAGE_COLUMNS: &str = "double charges / lost events / undelivered outbox rows / stuck sagas / money kept / invariant violations / orders the client gave up on";

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "| scenario | mode | accepted | confirmed | cancelled | goodput | damage: {DAMAGE_COLUMNS} | restarts | deduplicated | s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
            r.scenario,
            r.mode,
            r.orders_accepted,
            r.confirmed,
            r.cancelled,
            goodput_text(r),
            r.damage(),
            r.crashes,
            r.duplicates_deduplicated,
            r.seconds
        );
    }
    out
}

/// The findings table of a hardened run and, beside it, a naive run (docs/findings.md), from
/// the JSON files the harness wrote, with a first line counting the hardened damage.
fn findings_table(files: &[PathBuf]) -> anyhow::Result<String> {
    let read = |path: &PathBuf| -> anyhow::Result<Vec<Row>> {
        let rows: Vec<Row> =
            serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("{} is not a chaos results file", path.display()))?;
        Ok(rows)
    };
    let hardened = read(&files[0])?;
    anyhow::ensure!(
        hardened.iter().all(|r| r.mode == "hardened"),
        "{} is not a hardened run",
        files[0].display()
    );
    let naive = match files.get(1) {
        Some(path) => read(path)?,
        None => Vec::new(),
    };
    anyhow::ensure!(
        naive.iter().all(|r| r.mode == "naive"),
        "the second file is not a naive run"
    );
    let damaged = hardened.iter().filter(|r| r.damaged()).count();
    let required: Vec<&Row> = hardened.iter().filter(|r| goodput_required(&r.scenario)).collect();
    let met = required.iter().filter(|r| r.goodput >= GOODPUT_TARGET).count();
    let mut out = format!(
        "Hardened: {} scenarios run, {damaged} with damage; goodput ≥ {GOODPUT_TARGET}% in {met} of the {} that require it.",
        hardened.len(),
        required.len(),
    );
    out += &if naive.is_empty() {
        " No naive run in this table.\n\n".to_owned()
    } else {
        format!(
            " Naive: {} scenarios run, {} with damage.\n\n",
            naive.len(),
            naive.iter().filter(|r| r.damaged()).count()
        )
    };
    out += &format!("Damage columns: {DAMAGE_COLUMNS}.\n\n");
    out += "| scenario | fault | hardened damage | goodput | hardened: confirmed, cancelled, restarts, deduplicated | naive damage | naive goodput |\n|---|---|---|---|---|---|---|\n";
    for r in &hardened {
        let fault = SCENARIOS
            .iter()
            .find(|(name, _, _)| *name == r.scenario)
            .map_or("?", |(_, _, fault)| fault);
        let (naive_damage, naive_goodput) = naive
            .iter()
            .find(|n| n.scenario == r.scenario)
            .map_or(("not run".to_owned(), String::new()), |n| {
                (n.damage(), format!("{:.1}%", n.goodput))
            });
        out += &format!(
            "| {} | {fault} | {} | {} | {}, {}, {}, {:.0} | {naive_damage} | {naive_goodput} |\n",
            r.scenario,
            r.damage(),
            goodput_text(r),
            r.confirmed,
            r.cancelled,
            r.crashes,
            r.duplicates_deduplicated
        );
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.list {
        for (name, _, _) in SCENARIOS {
            println!("{name}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    if !cli.table.is_empty() {
        return match findings_table(&cli.table) {
            Ok(markdown) => {
                if cli.summary {
                    println!("{}", markdown.lines().next().unwrap_or_default());
                } else {
                    print!("{markdown}");
                }
                std::process::ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("[chaos] {error:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match run(&cli).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        // The harness itself failed (a stack that would not start, say): no verdict. The
        // cause chain, not a backtrace (CI sets RUST_BACKTRACE for the tests).
        Err(error) => {
            eprintln!("[chaos] error, no verdict: {error:#}");
            let _ = stack(&["down"], &[]);
            std::process::ExitCode::from(2)
        }
    }
}

/// Waits (up to 120 s) until the payment group's committed offsets reach the end of
/// orders.events: payment-svc has taken in every order event.
async fn payment_caught_up(cluster: &orderflow_platform::kafka::Cluster) -> bool {
    orderflow_tests::eventually(Duration::from_secs(120), || {
        let cluster = cluster.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                orderflow_tests::committed_and_end(&cluster, "payment", orderflow::topics::ORDERS_EVENTS)
                    .is_ok_and(|partitions| partitions.iter().all(|(committed, end)| committed >= end))
            })
            .await
            .unwrap_or(false)
        }
    })
    .await
}

/// Runs the scenarios; false when the hardened services showed damage.
async fn run(cli: &Cli) -> anyhow::Result<bool> {
    anyhow::ensure!(cli.mode == "hardened" || cli.mode == "naive", "--mode hardened|naive");
    let scenarios: Vec<String> = if cli.scenarios.iter().any(|s| s == "all") {
        SCENARIOS.iter().map(|(s, _, _)| (*s).to_owned()).collect()
    } else {
        cli.scenarios.clone()
    };
    for s in &scenarios {
        anyhow::ensure!(
            SCENARIOS.iter().any(|(name, _, _)| name == s),
            "unknown scenario {s}; known: {}",
            SCENARIOS
                .iter()
                .map(|(name, _, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut rows = Vec::new();
    for scenario in &scenarios {
        let row = run_scenario(cli, scenario)
            .await
            .with_context(|| format!("scenario {scenario}"))?;
        if !row.crash_steps.is_empty() {
            eprintln!("[chaos]   failpoint crashes: {:?}", row.crash_steps);
        }
        eprintln!(
            "[chaos]   {} accepted, goodput {:.1}% of {}, double charges {}, lost events {}, stuck {}, money kept {}, violations {}, restarts {}, deduplicated {:.0} ({:.0} s)",
            row.orders_accepted,
            row.goodput,
            row.should_confirm,
            row.double_charges,
            row.lost_events,
            row.stuck_sagas,
            row.money_kept_for_cancelled,
            row.invariant_violations,
            row.crashes,
            row.duplicates_deduplicated,
            row.seconds
        );
        if row.damaged() {
            for (check, orders) in &row.violated {
                eprintln!("[chaos]   violated: {check} ({orders} orders)");
            }
            match keep_logs(&cli.out, &row) {
                Ok(kept) => eprintln!("[chaos]   the stack's logs are kept in {}", kept.display()),
                Err(error) => eprintln!("[chaos]   cannot keep the stack's logs: {error:#}"),
            }
        }
        rows.push(row);
    }
    let _ = stack(&["down"], &[]);
    let markdown = table(&rows);
    print!("{markdown}");
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(cli.out.join(format!("chaos-{}.md", cli.mode)), &markdown)?;
    std::fs::write(
        cli.out.join(format!("chaos-{}.json", cli.mode)),
        serde_json::to_string_pretty(&rows)?,
    )?;
    let mut damaged: Vec<&str> = rows
        .iter()
        .filter(|r| r.damaged())
        .map(|r| r.scenario.as_str())
        .collect();
    // The kill after the commit must have produced a redelivery that the inbox absorbed.
    if cli.mode == "hardened"
        && rows
            .iter()
            .any(|r| r.scenario == "payment-kill-after-commit" && (r.crashes == 0 || r.duplicates_deduplicated < 1.0))
    {
        damaged.push("payment-kill-after-commit (no crash or no deduplicated redelivery)");
    }
    // The replay from offset 0 must have reached payment-svc's inbox: one duplicate at least
    // per accepted order (its OrderPlaced).
    if cli.mode == "hardened"
        && rows
            .iter()
            .any(|r| r.scenario == "replay-from-zero" && r.duplicates_deduplicated < r.orders_accepted as f64)
    {
        damaged.push("replay-from-zero (the replay was not absorbed by the inbox, or did not happen)");
    }
    if cli.mode == "hardened" {
        for r in &rows {
            // Counted by damaged() above; said here with its number.
            if goodput_required(&r.scenario) && r.goodput < GOODPUT_TARGET {
                eprintln!(
                    "[chaos] {}: goodput {:.1}% is under {GOODPUT_TARGET}%",
                    r.scenario, r.goodput
                );
            }
            if r.rebalances_of_others.is_some_and(|n| n != 0.0) {
                damaged.push(&r.scenario);
                eprintln!(
                    "[chaos] {}: a static member's restart rebalanced the other member",
                    r.scenario
                );
            }
        }
    }
    if cli.mode == "hardened" && !damaged.is_empty() {
        eprintln!("[chaos] DAMAGE in hardened mode: {}", damaged.join(", "));
        return Ok(false);
    }
    Ok(true)
}
