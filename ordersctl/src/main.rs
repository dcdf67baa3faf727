//! ordersctl: orderflow's command-line client.
//!
//!   ordersctl place --customer 42 --item BOOK-1:2:1250 --currency EUR
//!   ordersctl get ORDER_ID
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
        default_value = "127.0.0.1:50051",
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Place an order.
    Place {
        /// The customer id.
        #[arg(long)]
        customer: i64,
        /// An item as SKU:QUANTITY:UNIT_PRICE_MINOR; repeat for more items.
        #[arg(long = "item", required = true)]
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
    },
    /// Show an order.
    Get {
        /// The order id.
        order_id: String,
    },
    /// Dead letters: list, show, redrive.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check every invariant across all stores; exits 1 on any violation.
    Verify {
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
    },
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
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Place {
            customer,
            items,
            currency,
            payment_token,
            request_id,
        } => {
            let money = |amount_minor| {
                Some(api::Money {
                    amount_minor,
                    currency_code: currency.clone(),
                })
            };
            let mut total: i64 = 0;
            let mut lines = Vec::new();
            for item in &items {
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
                    unit_price: money(price),
                });
            }
            let request = api::PlaceOrderRequest {
                request_id: request_id.unwrap_or_else(uuid::Uuid::now_v7).to_string(),
                customer_id: customer,
                items: lines,
                total: money(total),
                payment_token,
            };
            let response = client(&cli.addr)
                .await?
                .place_order(request)
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "{}",
                serde_json::json!({
                    "order_id": response.order_id,
                    "status": response.status().as_str_name(),
                    "correlation_id": response.correlation_id,
                })
            );
        }
        Command::Get { order_id } => {
            let response = client(&cli.addr)
                .await?
                .get_order(api::GetOrderRequest { order_id })
                .await
                .map_err(status_error)?
                .into_inner();
            let order = response.order.context("the server sent no order")?;
            let total = order.total.clone().unwrap_or_default();
            println!(
                "{}",
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
            );
        }
        Command::Dlq { command } => dlq(&cli.bootstrap_servers, command).await?,
        Command::Verify {
            orders_db,
            payments_db,
            fulfilment_db,
            gateway_db,
            deadline_ms,
            grace_ms,
            json,
        } => {
            let connect = |url: String| async move {
                orderflow_platform::connect_postgres(&orderflow_platform::Secret::new(url), 2).await
            };
            let stores = ordersctl::verify::Stores {
                orders: connect(orders_db).await.context("orders database")?,
                payments: connect(payments_db).await.context("payments database")?,
                fulfilment: connect(fulfilment_db).await.context("fulfilment database")?,
                gateway: connect(gateway_db).await.context("gateway database")?,
            };
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
        Command::Events {
            topic,
            order,
            count,
            idle_secs,
        } => {
            let bootstrap = cli.bootstrap_servers.clone();
            tokio::task::spawn_blocking(move || print_events(&bootstrap, &topic, order.as_deref(), count, idle_secs))
                .await??;
        }
    }
    Ok(())
}

async fn client(addr: &str) -> anyhow::Result<OrderServiceClient<tonic::transport::Channel>> {
    OrderServiceClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("cannot reach order-svc at {addr}"))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn print_events(
    bootstrap_servers: &str,
    topic: &str,
    order: Option<&str>,
    count: Option<usize>,
    idle_secs: u64,
) -> anyhow::Result<()> {
    let (consumer, _) = orderflow_platform::kafka::reader_from_start(bootstrap_servers, topic)?;
    let mut printed = 0;
    let mut last_seen = Instant::now();
    while count.is_none_or(|n| printed < n) && last_seen.elapsed() < Duration::from_secs(idle_secs) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        last_seen = Instant::now();
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        if order.is_some_and(|o| o != key) {
            continue;
        }
        let line = match envelope::open(message.payload().unwrap_or_default()) {
            Ok(event) => serde_json::json!({
                "partition": message.partition(),
                "offset": message.offset(),
                "key": key,
                "event_type": envelope::event_type_of(&event.payload),
                "message_id": event.message_id.to_string(),
                "correlation_id": event.correlation_id.to_string(),
                "payload": format!("{:?}", event.payload),
            }),
            Err(error) => serde_json::json!({
                "partition": message.partition(),
                "offset": message.offset(),
                "key": key,
                "error": error.to_string(),
            }),
        };
        println!("{line}");
        printed += 1;
    }
    Ok(())
}

async fn dlq(bootstrap_servers: &str, command: DlqCommand) -> anyhow::Result<()> {
    use ordersctl::dlq;
    match command {
        DlqCommand::List { topic } => {
            let servers = bootstrap_servers.to_owned();
            let letters = tokio::task::spawn_blocking(move || dlq::read_all(&servers, &topic)).await??;
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
            let servers = bootstrap_servers.to_owned();
            let letters = tokio::task::spawn_blocking(move || dlq::read_all(&servers, &topic)).await??;
            let letter = letters
                .iter()
                .find(|l| l.partition == partition && l.offset == offset)
                .context("no dead letter at that partition and offset")?;
            for (name, value) in &letter.headers {
                println!("{name}: {}", String::from_utf8_lossy(value));
            }
            match envelope::open(&letter.payload) {
                Ok(event) => println!("payload: {:?}", event.payload),
                Err(error) => println!("payload ({} bytes) does not open: {error}", letter.payload.len()),
            }
        }
        DlqCommand::Redrive {
            topic,
            group,
            key,
            dry_run,
            rate,
        } => {
            let options = dlq::RedriveOptions {
                group,
                key,
                dry_run,
                rate_per_sec: rate,
            };
            let summary = dlq::redrive(bootstrap_servers, &topic, &options).await?;
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(())
}
