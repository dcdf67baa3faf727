//! ordersctl: orderflow's command-line client.
//!
//!   ordersctl place --customer 42 --item BOOK-1:2:1250 --currency EUR
//!   ordersctl get ORDER_ID
//!   ordersctl watch ORDER_ID
//!   ordersctl bench --rate 200 --duration 60
//!   ordersctl bench --find-ceiling
//!   ordersctl events --topic orders.events --count 3

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use orderflow::envelope;
use orderflow::orders::v1 as api;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use rdkafka::message::Message as _;

#[derive(Debug, Parser)]
#[command(name = "ordersctl", about = "orderflow's command-line client")]
struct Cli {
    /// The order service's gRPC address.
    #[arg(
        long,
        env = "ORDERFLOW_ORDER_SVC_ADDR",
        default_value = "127.0.0.1:15051",
        global = true
    )]
    addr: String,
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "ORDERFLOW_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:19092",
        global = true
    )]
    bootstrap_servers: String,
    /// The Kafka principal ordersctl reads and redrives as (the stack's operator principal).
    #[arg(long, env = "ORDERFLOW_KAFKA_USERNAME", global = true, requires = "kafka_password")]
    kafka_username: Option<String>,
    /// Its password.
    #[arg(long, env = "ORDERFLOW_KAFKA_PASSWORD", global = true, hide_env_values = true)]
    kafka_password: Option<orderflow_platform::Secret>,
    #[command(flatten)]
    access: ordersctl::access::AccessArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place an order.
    Place {
        /// The customer id.
        #[arg(long, required_unless_present = "from_json")]
        customer: Option<i64>,
        /// An item as SKU:QUANTITY:UNIT_PRICE_MINOR; repeat for more items.
        #[arg(long = "item", required_unless_present = "from_json")]
        items: Vec<String>,
        /// ISO-4217 currency of every price.
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// The card token.
        #[arg(long, default_value = "tok_visa")]
        payment_token: String,
        /// Idempotency key (a UUID); a new one by default. Reuse it to retry safely.
        #[arg(long)]
        request_id: Option<uuid::Uuid>,
        /// The order as JSON instead of flags ("-" reads standard input):
        /// {"customer_id": 42, "currency": "EUR", "payment_token": "tok_visa",
        ///  "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price_minor": 1250}]}
        #[arg(long, conflicts_with_all = ["customer", "items"])]
        from_json: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an order.
    Get {
        /// The order id.
        order_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow an order until it is CONFIRMED or CANCELLED; prints every change.
    Watch {
        /// The order id.
        order_id: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Open-model load at a fixed rate, with latencies, backlogs, the invariant checker, a
    /// JSON file and an HTML report; --find-ceiling steps the rate up until the service level breaks.
    Bench(Box<BenchArgs>),
    /// Every relay mode on the same Postgres and Kafka: drain rate, lag at fixed rates, CPU
    /// and WAL per event, per-key order on the topic (scripts/relay-bench).
    RelayBench(Box<ordersctl::relay_bench::RelayBenchArgs>),
    /// Dead letters: list, show, redrive.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check every invariant across all stores; exits 1 on any violation.
    Verify {
        #[command(flatten)]
        stores: StoreArgs,
        /// The saga deadline in force, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        deadline_ms: u64,
        /// Slack past the deadline before a PENDING order counts as stuck (sweeper period, lag).
        #[arg(long, default_value_t = 5_000)]
        grace_ms: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the invariants `verify` checks, as a Markdown table (docs/saga.md holds the same).
    Invariants,
    /// Print the targets (the seeds' service levels, the project's goals beside them) as a
    /// Markdown table, as README and docs/performance.md hold them.
    Targets,
    /// Print a benchmark report (the JSON `bench` wrote) as Markdown: the ceiling, each step,
    /// the verdict; the docs quote it (scripts/check-docs checks every copy).
    BenchSummary {
        /// The report.
        report: std::path::PathBuf,
        /// Print only the ceiling (orders/s), for a figure quoted in a sentence.
        #[arg(long)]
        ceiling: bool,
    },
    /// Print a bearer token signed with the stack's key (`ORDERFLOW_JWT_SIGNING_KEY`), for
    /// grpcurl and other clients: `-H "authorization: Bearer $(ordersctl token --customer 42)"`.
    Token {
        /// For this customer.
        #[arg(long, conflicts_with = "operator", required_unless_present = "operator")]
        customer: Option<i64>,
        /// For an operator of this name.
        #[arg(long)]
        operator: Option<String>,
    },
    /// Make the stack's keys: a CA, the servers' and payment-svc's certificates, the
    /// token-signing key pair (once; an existing directory is left as it is).
    Pki {
        /// Where.
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// Apply every service's database migrations, as the databases' owners (the services
    /// themselves run with roles that cannot change the schema: deploy/postgres/grants/).
    Migrate {
        #[command(flatten)]
        stores: StoreArgs,
    },
    /// One order's trace from Jaeger (`scripts/stack up --telemetry`): a waterfall with one
    /// line per span (service, hop, operation, start offset, duration); --html FILE writes it
    /// as a page.
    Trace {
        /// The order id.
        order_id: uuid::Uuid,
        /// Jaeger's query API.
        #[arg(long, env = "ORDERFLOW_JAEGER_URL", default_value = "http://127.0.0.1:16686")]
        jaeger_url: String,
        /// Wait up to this long for the spans to arrive (the services export them in batches):
        /// until the trace stops growing for 2 s.
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
        /// Also write the waterfall as a self-contained HTML page.
        #[arg(long)]
        html: Option<std::path::PathBuf>,
        /// Print the spans as JSON instead.
        #[arg(long)]
        json: bool,
        /// The orders database (where the order's trace id is kept).
        #[arg(long, env = "ORDERFLOW_ORDERS_DATABASE_URL", hide_env_values = true)]
        orders_db: String,
    },
    /// Everything every store and topic knows about one order (state, events with offsets,
    /// inboxes, consumer groups, dead letters, payment, ledger, shipment, read model) and a
    /// one-line diagnosis of where a stuck order is stuck.
    Explain {
        /// The order id.
        order_id: uuid::Uuid,
        #[command(flatten)]
        stores: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the events on a topic, decoded, from the beginning.
    Events {
        /// The topic.
        #[arg(long, default_value = orderflow::topics::ORDERS_EVENTS)]
        topic: String,
        /// Only the events of this order.
        #[arg(long)]
        order: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds without a new event.
        #[arg(long, default_value_t = 5)]
        idle_secs: u64,
        /// Tail the topic: start at its end and print events as they arrive, until interrupted
        /// (with --from-start, the events already there first).
        #[arg(long)]
        follow: bool,
        /// With --follow: start at the beginning of the topic.
        #[arg(long, requires = "follow")]
        from_start: bool,
        /// One JSON object per event: the envelope in the proto3 JSON mapping (the names grpcurl
        /// shows), payment tokens redacted, the record's topic, partition, offset and key under
        /// `kafka`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Orders a second offered (the first step's rate with --find-ceiling).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Warm-up seconds before each measured window.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Seed of the workload: one seed, the same orders.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Distinct customers (Zipfian ranks).
    #[arg(long, default_value_t = 1_000_000)]
    customers: u64,
    /// Zipf exponent of the customer popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    /// Share of orders paid with a card the gateway declines.
    #[arg(long, default_value_t = 0.05)]
    decline_rate: f64,
    /// Share of orders whose gateway reply is late (charged, reply lost to a timeout).
    #[arg(long, default_value_t = 0.01)]
    late_reply_rate: f64,
    /// HTTP/2 connections to order-svc.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight at most.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Step the rate up until the service level breaks; report the highest that held.
    #[arg(long)]
    find_ceiling: bool,
    /// Each step's rate is the previous one's times this.
    #[arg(long, default_value_t = 1.25)]
    step_factor: f64,
    /// Stop searching at this rate.
    #[arg(long, default_value_t = 5_000.0)]
    max_rate: f64,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 30)]
    step_secs: u64,
    /// A step breaks when the saga completion p99 passes this (the seeds' level by default).
    #[arg(long, default_value_t = ordersctl::bench::targets::SAGA_P99_MS)]
    saga_p99_limit_ms: f64,
    /// pgbench's duration in seconds (0 skips the Postgres ceiling).
    #[arg(long, default_value_t = 20)]
    pgbench_secs: u32,
    /// pgbench's clients.
    #[arg(long, default_value_t = 8)]
    pgbench_clients: u32,
    /// How long to wait for the system to settle after the load, in seconds.
    #[arg(long, default_value_t = 180)]
    drain_timeout_secs: u64,
    /// Metrics endpoints of the consuming processes (records consumed, for the cost per order).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103,127.0.0.1:9104"
    )]
    consumer_metrics: Vec<String>,
    /// Metrics endpoints of the relays (records published, for the cost per order).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:9105,127.0.0.1:9106")]
    relay_metrics: Vec<String>,
    /// Where the JSON and HTML reports go.
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
    /// Print the JSON report on standard output instead of the summary.
    #[arg(long)]
    json: bool,
    /// The stack directory (pid files, for CPU per process).
    #[arg(long, env = "ORDERFLOW_STACK_DIR")]
    stack_dir: Option<std::path::PathBuf>,
    /// Jaeger's query API (`scripts/stack up --telemetry`): the report shows the slowest
    /// order's trace as a waterfall.
    #[arg(long, env = "ORDERFLOW_JAEGER_URL")]
    jaeger_url: Option<String>,
    /// The Postgres admin URL (pgbench's scratch database).
    #[arg(long, env = "ORDERFLOW_PG_ADMIN_URL", hide_env_values = true)]
    admin_db: Option<String>,
    /// The saga deadline in force, in milliseconds (for the invariant checker).
    #[arg(long, env = "ORDERFLOW_SAGA_DEADLINE_MS", default_value_t = 30_000)]
    deadline_ms: u64,
    #[command(flatten)]
    stores: StoreArgs,
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The orders database.
    #[arg(long, env = "ORDERFLOW_ORDERS_DATABASE_URL", hide_env_values = true)]
    orders_db: String,
    /// The payments database.
    #[arg(long, env = "ORDERFLOW_PAYMENTS_DATABASE_URL", hide_env_values = true)]
    payments_db: String,
    /// The fulfilment database.
    #[arg(long, env = "ORDERFLOW_FULFILMENT_DATABASE_URL", hide_env_values = true)]
    fulfilment_db: String,
    /// The gateway's database.
    #[arg(long, env = "ORDERFLOW_GATEWAY_DATABASE_URL", hide_env_values = true)]
    gateway_db: String,
}

impl StoreArgs {
    async fn connect(&self, pool_size: u32) -> anyhow::Result<ordersctl::verify::Stores> {
        ordersctl::verify::Stores::connect(
            &self.orders_db,
            &self.payments_db,
            &self.fulfilment_db,
            &self.gateway_db,
            pool_size,
        )
        .await
    }
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per dead letter: where it came from, who gave up, why.
    List {
        /// The dead-letter topic.
        #[arg(long, default_value = "orders.events.dlq")]
        topic: String,
    },
    /// One dead letter in full: headers and decoded payload.
    Show {
        /// The dead-letter topic.
        #[arg(long, default_value = "orders.events.dlq")]
        topic: String,
        /// Its partition in the dead-letter topic.
        #[arg(long, default_value_t = 0)]
        partition: i32,
        /// Its offset there.
        #[arg(long)]
        offset: i64,
    },
    /// Republish dead letters to their original topic (safe to repeat: the inboxes deduplicate).
    Redrive {
        /// The dead-letter topic.
        #[arg(long, default_value = "orders.events.dlq")]
        topic: String,
        /// Only those this consumer group gave up on.
        #[arg(long)]
        group: Option<String>,
        /// Only those of this order id.
        #[arg(long)]
        key: Option<String>,
        /// Say what would be republished; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many records a second.
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// The event verifying keys (`<service>.<name>.pub`): only what a trusted key of its
        /// producer signed is republished.
        #[arg(long, env = "ORDERFLOW_EVENT_VERIFYING_KEYS")]
        event_verifying_keys: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cluster = orderflow_platform::kafka::Cluster::new(
        cli.bootstrap_servers.clone(),
        &orderflow_platform::kafka::KafkaArgs {
            kafka_username: cli.kafka_username.clone(),
            kafka_password: cli.kafka_password.clone(),
            tuning: orderflow_platform::kafka::KafkaTuning::default(),
        },
    );
    // Read only by the commands that call a server (`pki` runs before the keys exist).
    let access = || ordersctl::access::Access::new(&cli.access);
    match cli.command {
        Command::Place {
            customer,
            items,
            currency,
            payment_token,
            request_id,
            from_json,
            json,
        } => {
            let mut request = match from_json {
                Some(source) => order_from_json(&source)?,
                None => order_from_flags(customer.unwrap_or_default(), &items, &currency, payment_token)?,
            };
            request.request_id = request_id.unwrap_or_else(uuid::Uuid::now_v7).to_string();
            let caller = orderflow_platform::auth::Caller::Customer(request.customer_id);
            let access = access()?;
            let response = access
                .order_client(&cli.addr)
                .await?
                .place_order(access.request(request, &caller)?)
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "order_id": response.order_id,
                        "status": response.status().as_str_name(),
                        "correlation_id": response.correlation_id,
                    })
                );
            } else {
                println!("order_id        {}", response.order_id);
                println!("status          {}", response.status().as_str_name());
                println!("correlation_id  {}", response.correlation_id);
            }
        }
        Command::Get { order_id, json } => {
            let access = access()?;
            let order = fetch_order(&access, &mut access.order_client(&cli.addr).await?, &order_id)
                .await
                .map_err(status_error)?
                .context("the server sent no order")?;
            if json {
                println!("{}", order_json(&order));
            } else {
                print!("{}", order_table(&order));
            }
        }
        Command::Watch {
            order_id,
            timeout_secs,
            json,
        } => {
            if !watch(&access()?, &cli.addr, order_id, Duration::from_secs(timeout_secs), json).await? {
                std::process::exit(1);
            }
        }
        Command::Bench(args) => bench(&cli.addr, access()?, &cluster, *args).await?,
        Command::RelayBench(args) => {
            let results = ordersctl::relay_bench::run(*args, &cluster).await?;
            let out = std::path::Path::new("bench-results");
            std::fs::create_dir_all(out)?;
            let file = out.join(format!(
                "relay-bench-{}.json",
                chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
            ));
            std::fs::write(&file, serde_json::to_string_pretty(&results)?)?;
            println!("\nreport: {}", file.display());
        }
        Command::Token { customer, operator } => {
            let caller = match (customer, operator) {
                (Some(id), _) => orderflow_platform::auth::Caller::Customer(id),
                (None, Some(name)) => orderflow_platform::auth::Caller::Operator(name),
                (None, None) => anyhow::bail!("--customer or --operator"),
            };
            let token = access()?
                .token(&caller)?
                .context("no signing key: set ORDERFLOW_JWT_SIGNING_KEY (scripts/stack writes it to .stack/env)")?;
            println!("{token}");
        }
        Command::Pki { dir } => {
            if ordersctl::pki::init(&dir)? {
                println!("made the CA, certificates and token keys in {}", dir.display());
            } else {
                println!("{} holds a PKI already; left as it is", dir.display());
            }
        }
        Command::Dlq { command } => dlq(&cluster, command).await?,
        Command::Migrate { stores } => {
            let stores = stores.connect(1).await?;
            for (name, migrator, pool) in [
                ("orders", &order_svc::MIGRATOR, &stores.orders),
                ("payments", &payment_svc::MIGRATOR, &stores.payments),
                ("fulfilment", &fulfilment::MIGRATOR, &stores.fulfilment),
                ("gateway", &gateway_sim::MIGRATOR, &stores.gateway),
            ] {
                migrator
                    .run(pool)
                    .await
                    .with_context(|| format!("migrating the {name} database"))?;
                println!("{name}: migrated");
            }
        }
        Command::Invariants => print!("{}", ordersctl::verify::markdown_table()),
        Command::Targets => print!("{}", ordersctl::bench::targets::markdown()),
        Command::BenchSummary { report, ceiling } => {
            let json: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&report).with_context(|| format!("reading {}", report.display()))?,
            )
            .with_context(|| format!("{} is not a benchmark report", report.display()))?;
            if ceiling {
                let ceiling = json
                    .get("ceiling")
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("{} found no ceiling", report.display()))?;
                println!("{ceiling:.0}");
            } else {
                print!(
                    "{}",
                    ordersctl::bench::summary::markdown(&json, &report.display().to_string())
                );
            }
        }
        Command::Verify {
            stores,
            deadline_ms,
            grace_ms,
            json,
        } => {
            let stores = stores.connect(2).await?;
            let report = ordersctl::verify::verify(
                &stores,
                Duration::from_millis(deadline_ms),
                Duration::from_millis(grace_ms),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", ordersctl::verify::render(&report));
            }
            if report.violations() > 0 {
                std::process::exit(1);
            }
        }
        Command::Trace {
            order_id,
            jaeger_url,
            wait_secs,
            html,
            json,
            orders_db,
        } => {
            let orders = sqlx::PgPool::connect(&orders_db).await?;
            let trace_id = ordersctl::trace::trace_id_of_order(&orders, order_id)
                .await?
                .context("the order has no trace context (placed without one)")?;
            let trace = tokio::task::spawn_blocking(move || {
                ordersctl::trace::fetch_settled(&jaeger_url, &trace_id, Duration::from_secs(wait_secs))
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&trace)?);
            } else {
                print!("{}", trace.render_text());
            }
            if let Some(path) = html {
                std::fs::write(&path, trace.render_html(&format!("order {order_id}")))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Explain { order_id, stores, json } => {
            let stores = stores.connect(2).await?;
            let explanation = ordersctl::explain::explain(&stores, &cluster, order_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
            } else {
                print!("{}", ordersctl::explain::render(&explanation));
            }
        }
        Command::Events {
            topic,
            order,
            count,
            idle_secs,
            follow,
            from_start,
            json,
        } => {
            let cluster = cluster.clone();
            let options = EventsOptions {
                order,
                count,
                idle: (!follow).then_some(Duration::from_secs(idle_secs)),
                start: if follow && !from_start {
                    rdkafka::Offset::End
                } else {
                    rdkafka::Offset::Beginning
                },
                json,
            };
            tokio::task::spawn_blocking(move || print_events(&cluster, &topic, &options)).await??;
        }
    }
    Ok(())
}

fn money(amount_minor: i64, currency: &str) -> Option<api::Money> {
    Some(api::Money {
        amount_minor,
        currency_code: currency.to_owned(),
    })
}

/// The request from `--customer`, `--item SKU:QUANTITY:UNIT_PRICE_MINOR`..., with its total.
fn order_from_flags(
    customer: i64,
    items: &[String],
    currency: &str,
    payment_token: String,
) -> anyhow::Result<api::PlaceOrderRequest> {
    let mut total: i64 = 0;
    let mut lines = Vec::new();
    for item in items {
        let parts: Vec<&str> = item.split(':').collect();
        let [sku, quantity, price] = parts.as_slice() else {
            anyhow::bail!("--item {item}: expected SKU:QUANTITY:UNIT_PRICE_MINOR");
        };
        let quantity: i32 = quantity.parse().with_context(|| format!("--item {item}: quantity"))?;
        let price: i64 = price.parse().with_context(|| format!("--item {item}: price"))?;
        total = price
            .checked_mul(i64::from(quantity))
            .and_then(|line| total.checked_add(line))
            .context("the total overflows")?;
        lines.push(api::OrderItem {
            sku: (*sku).to_owned(),
            quantity,
            unit_price: money(price, currency),
        });
    }
    Ok(api::PlaceOrderRequest {
        request_id: String::new(),
        customer_id: customer,
        items: lines,
        total: money(total, currency),
        payment_token,
    })
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOrder {
    customer_id: i64,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default = "default_token")]
    payment_token: String,
    items: Vec<JsonItem>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonItem {
    sku: String,
    quantity: i32,
    unit_price_minor: i64,
}

fn default_currency() -> String {
    "EUR".into()
}

fn default_token() -> String {
    "tok_visa".into()
}

/// The request from a JSON document (a path, or "-" for standard input).
fn order_from_json(source: &str) -> anyhow::Result<api::PlaceOrderRequest> {
    let text = if source == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(source).with_context(|| format!("cannot read {source}"))?
    };
    let order: JsonOrder = serde_json::from_str(&text).context("the order JSON")?;
    let items: Vec<String> = order
        .items
        .iter()
        .map(|i| format!("{}:{}:{}", i.sku, i.quantity, i.unit_price_minor))
        .collect();
    order_from_flags(order.customer_id, &items, &order.currency, order.payment_token)
}

/// One GetOrder call; the order, or None when the server sent none.
/// An order, read as an operator (ordersctl is a support tool: it reads any order).
async fn fetch_order(
    access: &ordersctl::access::Access,
    client: &mut OrderServiceClient<tonic::transport::Channel>,
    order_id: &str,
) -> Result<Option<api::Order>, tonic::Status> {
    let request = api::GetOrderRequest {
        order_id: order_id.to_owned(),
    };
    let request = access
        .request(request, &ordersctl::access::operator())
        .map_err(|error| tonic::Status::internal(format!("{error:#}")))?;
    Ok(client.get_order(request).await?.into_inner().order)
}

fn order_json(order: &api::Order) -> serde_json::Value {
    let total = order.total.clone().unwrap_or_default();
    serde_json::json!({
        "order_id": order.order_id,
        "customer_id": order.customer_id,
        "status": order.status().as_str_name(),
        "saga_state": order.saga_state().as_str_name(),
        "cancellation_reason": order.cancellation_reason().as_str_name(),
        "total_minor": total.amount_minor,
        "currency": total.currency_code,
        "items": order.items.len(),
        "version": order.version,
        "correlation_id": order.correlation_id,
    })
}

fn order_table(order: &api::Order) -> String {
    let total = order.total.clone().unwrap_or_default();
    let mut out = format!(
        "order_id        {}\ncustomer_id     {}\nstatus          {}\nsaga_state      {}\n",
        order.order_id,
        order.customer_id,
        order.status().as_str_name(),
        order.saga_state().as_str_name()
    );
    if order.cancellation_reason != 0 {
        out += &format!("cancelled for   {}\n", order.cancellation_reason().as_str_name());
    }
    out += &format!(
        "total           {}.{:02} {}\nversion         {}\ncorrelation_id  {}\n\n{:<16} {:>8} {:>12}\n",
        total.amount_minor / 100,
        total.amount_minor.rem_euclid(100),
        total.currency_code,
        order.version,
        order.correlation_id,
        "SKU",
        "QUANTITY",
        "UNIT PRICE"
    );
    for item in &order.items {
        let price = item.unit_price.as_ref().map_or(0, |p| p.amount_minor);
        out += &format!(
            "{:<16} {:>8} {:>9}.{:02}\n",
            item.sku,
            item.quantity,
            price / 100,
            price.rem_euclid(100)
        );
    }
    out
}

/// Follows an order to its terminal state; returns whether it got there in time.
async fn watch(
    access: &ordersctl::access::Access,
    addr: &str,
    order_id: String,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let mut client = access.order_client(addr).await?;
    let mut last = None;
    while started.elapsed() < timeout {
        match fetch_order(access, &mut client, &order_id).await {
            Ok(None) => anyhow::bail!("the server sent no order"),
            Ok(Some(order)) => {
                let state = (order.status, order.saga_state, order.version);
                if last != Some(state) {
                    last = Some(state);
                    if json {
                        println!("{}", order_json(&order));
                    } else {
                        println!(
                            "{:>7.1} s  {:<22} {:<22} {}",
                            started.elapsed().as_secs_f64(),
                            order.status().as_str_name(),
                            order.saga_state().as_str_name(),
                            if order.cancellation_reason == 0 {
                                String::new()
                            } else {
                                order.cancellation_reason().as_str_name().to_owned()
                            }
                        );
                    }
                }
                if matches!(
                    order.status(),
                    api::OrderStatus::Confirmed | api::OrderStatus::Cancelled
                ) {
                    return Ok(true);
                }
            }
            // The read model may not have the order yet right after PlaceOrder.
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(status_error(status)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("not terminal after {} s", timeout.as_secs());
    Ok(false)
}

async fn bench(
    addr: &str,
    access: ordersctl::access::Access,
    cluster: &orderflow_platform::kafka::Cluster,
    args: BenchArgs,
) -> anyhow::Result<()> {
    use ordersctl::bench;
    let stores = args.stores.connect(8).await?;
    // The superuser reads every database's counters (pg_stat_database, pg_stat_statements).
    let admin = match &args.admin_db {
        Some(url) => {
            let admin = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .context("connect with ORDERFLOW_PG_ADMIN_URL")?;
            if !bench::cost::prepare(&admin).await {
                eprintln!(
                    "[bench] pg_stat_statements is not loaded: no statements per order (scripts/stack preloads it)"
                );
            }
            Some(admin)
        }
        None => None,
    };
    let options = bench::Options {
        addr: addr.to_owned(),
        access: std::sync::Arc::new(access),
        seed: args.seed,
        customers: args.customers,
        zipf_s: args.zipf_s,
        decline_rate: args.decline_rate,
        late_reply_rate: args.late_reply_rate,
        connections: args.connections,
        max_in_flight: args.max_in_flight,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        group_lag: std::sync::Arc::new(bench::lag::GroupLag::new(cluster)?),
        cost: bench::cost::Sources {
            admin,
            relay_metrics: args.relay_metrics.clone(),
            consumer_metrics: args.consumer_metrics.clone(),
        },
        stack_dir: args.stack_dir.clone(),
        jaeger_url: args.jaeger_url.clone(),
        progress: !args.json,
    };
    let plan = bench::Plan {
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        warmup: Duration::from_secs(args.warmup),
        find_ceiling: args.find_ceiling,
        step_factor: args.step_factor,
        max_rate: args.max_rate,
        step_duration: Duration::from_secs(args.step_secs),
        saga_p99_limit_ms: args.saga_p99_limit_ms,
        pgbench_secs: args.pgbench_secs,
        pgbench_clients: args.pgbench_clients,
        admin_url: args.admin_db.clone(),
        deadline: Duration::from_millis(args.deadline_ms),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    eprintln!("[bench] building the workload (seed {})", args.seed);
    let workload = bench::workload::Workload::new(
        args.seed,
        args.customers,
        args.zipf_s,
        args.decline_rate,
        args.late_reply_rate,
    );
    let report = bench::run(&options, &plan, &stores, workload).await?;
    std::fs::create_dir_all(&args.out)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let json_path = args.out.join(format!("bench-{stamp}.json"));
    let html_path = args.out.join(format!("bench-{stamp}.html"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(&html_path, bench::report::render_html(&report))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::report::render_text(&report));
    }
    eprintln!("reports: {} and {}", json_path.display(), html_path.display());
    if report.violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// What `ordersctl events` prints, from where, and until when.
struct EventsOptions {
    order: Option<String>,
    count: Option<usize>,
    /// Stop after this long without a new event; None: never (--follow).
    idle: Option<Duration>,
    start: rdkafka::Offset,
    json: bool,
}

fn print_events(
    cluster: &orderflow_platform::kafka::Cluster,
    topic: &str,
    options: &EventsOptions,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let (consumer, _) = orderflow_platform::kafka::reader(cluster, topic, options.start)?;
    let mut printed = 0;
    let mut last_seen = Instant::now();
    let mut out = std::io::stdout().lock();
    while options.count.is_none_or(|n| printed < n) && options.idle.is_none_or(|idle| last_seen.elapsed() < idle) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        last_seen = Instant::now();
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        if options.order.as_ref().is_some_and(|o| *o != key) {
            continue;
        }
        let payload = message.payload().unwrap_or_default();
        if options.json {
            let coordinates = ordersctl::events::Coordinates {
                topic: topic.to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                key,
                timestamp_ms: message.timestamp().to_millis(),
            };
            writeln!(out, "{}", ordersctl::events::json_line(&coordinates, payload))?;
        } else {
            let described = match envelope::open(payload) {
                Ok(event) => format!(
                    "{:<34} message {}  {}",
                    envelope::event_type_of(&event.payload).trim_start_matches("orderflow.events.v1."),
                    event.message_id,
                    ordersctl::events::describe_payload(&event.payload)
                ),
                Err(error) => format!("(does not open: {error})"),
            };
            writeln!(
                out,
                "{:>2}/{:<8} {key}  {described}",
                message.partition(),
                message.offset()
            )?;
        }
        // A follower's reader (a pipe, `jq`) sees each event as it arrives.
        out.flush()?;
        printed += 1;
    }
    Ok(())
}

async fn dlq(cluster: &orderflow_platform::kafka::Cluster, command: DlqCommand) -> anyhow::Result<()> {
    use ordersctl::dlq;
    match command {
        DlqCommand::List { topic } => {
            let reader = cluster.clone();
            let letters = tokio::task::spawn_blocking(move || dlq::read_all(&reader, &topic)).await??;
            for letter in &letters {
                let (origin_topic, origin_partition, origin_offset) = letter.origin();
                println!(
                    "{}",
                    serde_json::json!({
                        "partition": letter.partition,
                        "offset": letter.offset,
                        "key": String::from_utf8_lossy(letter.key.as_deref().unwrap_or_default()),
                        "original": format!("{origin_topic}/{origin_partition}/{origin_offset}"),
                        "group": letter.header("dlq.consumer_group"),
                        "attempts": letter.header("dlq.attempts"),
                        "error": letter.header("dlq.error"),
                        "last_failure_at": letter.header("dlq.last_failure_at"),
                    })
                );
            }
            eprintln!("{} dead letter(s)", letters.len());
        }
        DlqCommand::Show {
            topic,
            partition,
            offset,
        } => {
            let reader = cluster.clone();
            let letters = tokio::task::spawn_blocking(move || dlq::read_all(&reader, &topic)).await??;
            let letter = letters
                .iter()
                .find(|l| l.partition == partition && l.offset == offset)
                .context("no dead letter at that partition and offset")?;
            for (name, value) in &letter.headers {
                println!("{name}: {}", String::from_utf8_lossy(value));
            }
            match envelope::open(&letter.payload) {
                Ok(event) => {
                    println!(
                        "signed by: {}",
                        event.signing_key_id.as_deref().unwrap_or("(not signed)")
                    );
                    println!("payload: {}", ordersctl::events::describe_payload(&event.payload));
                }
                Err(error) => println!("payload ({} bytes) does not open: {error}", letter.payload.len()),
            }
        }
        DlqCommand::Redrive {
            topic,
            group,
            key,
            dry_run,
            rate,
            event_verifying_keys,
        } => {
            let options = dlq::RedriveOptions {
                group,
                key,
                dry_run,
                rate_per_sec: rate,
            };
            let verifier = orderflow_platform::signing::EventVerifier::from_dir(&event_verifying_keys)?;
            let summary = dlq::redrive(cluster, &topic, &options, &verifier).await?;
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(())
}
