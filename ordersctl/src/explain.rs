//! `ordersctl explain ORDER_ID`: what every store and topic knows about one order, and, for
//! an order that is not where it should be, the hop it is stuck at.
//!
//! Read-only everywhere: the databases as their owners (like `verify`), the topics through a
//! throw-away reader, each consumer group's committed offsets without joining it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use orderflow::topics;
use orderflow_platform::kafka;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::verify::Stores;
use order_svc::domain::OrderStatus;

/// Which database a consumer group keeps its inbox in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    Orders,
    Payments,
    Fulfilment,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Orders => "orders",
            Store::Payments => "payments",
            Store::Fulfilment => "fulfilment",
        }
    }
}

/// A consumer group, the topic it reads and the events of it that it acts on (the others it
/// consumes without an inbox row). The handlers' `wants` say the same; this is the map an
/// operator reads the diagnosis by.
#[derive(Debug)]
pub struct Consumer {
    pub group: &'static str,
    pub topic: &'static str,
    /// Event names (without the package); empty: every event.
    pub acts_on: &'static [&'static str],
    pub inbox: Store,
}

/// Every consumer of the saga.
pub const CONSUMERS: &[Consumer] = &[
    Consumer {
        group: "payment",
        topic: topics::ORDERS_EVENTS,
        acts_on: &["OrderPlaced", "OrderConfirmed", "OrderCancelled"],
        inbox: Store::Payments,
    },
    Consumer {
        group: "fulfilment",
        topic: topics::ORDERS_EVENTS,
        acts_on: &["OrderConfirmed"],
        inbox: Store::Fulfilment,
    },
    Consumer {
        group: "order",
        topic: topics::PAYMENTS_EVENTS,
        acts_on: &["PaymentAuthorized", "PaymentFailed"],
        inbox: Store::Orders,
    },
    Consumer {
        group: "projector",
        topic: topics::ORDERS_EVENTS,
        acts_on: &[],
        inbox: Store::Orders,
    },
    Consumer {
        group: "projector",
        topic: topics::PAYMENTS_EVENTS,
        acts_on: &[],
        inbox: Store::Orders,
    },
];

impl Consumer {
    fn acts_on(&self, event_type: &str) -> bool {
        self.acts_on.is_empty() || self.acts_on.contains(&short(event_type))
    }
}

fn short(event_type: &str) -> &str {
    event_type.trim_start_matches("orderflow.events.v1.")
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OrderRow {
    pub status: String,
    pub saga_state: String,
    pub version: i64,
    pub cancellation_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An outbox row still in its table (published or not: published rows are deleted later by
/// housekeeping).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxRow {
    pub store: Store,
    pub event_type: String,
    pub message_id: uuid::Uuid,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

/// An event of the order on a topic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_type: String,
    pub message_id: String,
    pub timestamp_ms: Option<i64>,
}

/// Where a consumer group is on one partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupPosition {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// The next offset the group will read (None: it never committed one).
    pub committed: Option<i64>,
    /// The partition's end.
    pub high_watermark: i64,
    /// Members of the group now.
    pub members: usize,
}

impl GroupPosition {
    /// Records between the group's position and the partition's end.
    pub fn lag(&self) -> i64 {
        self.high_watermark - self.committed.unwrap_or(0)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InboxRow {
    pub group: String,
    pub message_id: uuid::Uuid,
    pub processed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub message_id: String,
    pub group: String,
    pub error: String,
    pub attempts: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PaymentRow {
    pub state: String,
    pub amount_minor: i64,
    pub currency_code: String,
    pub authorization_id: Option<String>,
    pub failure_reason: Option<String>,
    pub version: i64,
    /// Since when the payment is in its state.
    pub updated_at: DateTime<Utc>,
    /// Calls made for its pending state, and the last one's failure (docs/adr/0005).
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Whether its call is parked for an operator (docs/runbook.md, "A payment parked").
    pub parked: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerRow {
    pub at: DateTime<Utc>,
    pub operation: String,
    pub amount_minor: i64,
    pub currency_code: String,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadModelRow {
    pub status: String,
    pub saga_state: String,
    pub payment_state: Option<String>,
    pub last_event_type: String,
    pub projected_at: DateTime<Utc>,
}

/// Everything known about one order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    pub order_id: uuid::Uuid,
    pub order: Option<OrderRow>,
    pub outbox: Vec<OutboxRow>,
    pub records: Vec<Record>,
    pub inboxes: Vec<InboxRow>,
    pub positions: Vec<GroupPosition>,
    pub dead_letters: Vec<DeadLetter>,
    pub payment: Option<PaymentRow>,
    pub ledger: Vec<LedgerRow>,
    pub shipment: Option<(uuid::Uuid, DateTime<Utc>)>,
    pub read_model: Option<ReadModelRow>,
    /// When this was read.
    pub at: DateTime<Utc>,
    pub diagnosis: String,
}

/// Reads every store and topic about `order_id` and diagnoses it.
pub async fn explain(
    stores: &Stores,
    cluster: &orderflow_platform::kafka::Cluster,
    order_id: uuid::Uuid,
) -> anyhow::Result<Explanation> {
    let at = Utc::now();
    let order = order_row(&stores.orders, order_id).await?;
    let mut outbox = outbox_rows(&stores.orders, Store::Orders, order_id).await?;
    outbox.extend(outbox_rows(&stores.payments, Store::Payments, order_id).await?);
    let since =
        order.as_ref().map_or(at - chrono::Duration::hours(1), |o| o.created_at) - chrono::Duration::seconds(10);
    let reading = cluster.clone();
    let (records, positions, dead_letters) =
        tokio::task::spawn_blocking(move || read_topics(&reading, order_id, since)).await??;
    // The inbox keeps message ids only: the order's are those on its topics, in its outbox
    // rows still there, and in the read model's history.
    let mut ids = projected_message_ids(order_id, &stores.orders).await?;
    ids.extend(outbox.iter().map(|row| row.message_id));
    ids.extend(records.iter().filter_map(|r| r.message_id.parse::<uuid::Uuid>().ok()));
    ids.sort_unstable();
    ids.dedup();
    let mut inboxes = Vec::new();
    for (pool, store) in [
        (&stores.orders, Store::Orders),
        (&stores.payments, Store::Payments),
        (&stores.fulfilment, Store::Fulfilment),
    ] {
        let groups: Vec<&str> = CONSUMERS.iter().filter(|c| c.inbox == store).map(|c| c.group).collect();
        inboxes.extend(inbox_rows(pool, &groups, &ids).await?);
    }
    let payment = payment_row(&stores.payments, order_id).await?;
    let ledger = ledger_rows(&stores.gateway, order_id).await?;
    let shipment = sqlx::query_as::<_, (uuid::Uuid, DateTime<Utc>)>(
        "SELECT shipment_id, requested_at FROM shipments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&stores.fulfilment)
    .await?;
    let read_model = sqlx::query_as::<_, (String, String, Option<String>, String, DateTime<Utc>)>(
        "SELECT status, saga_state, payment_state, last_event_type, projected_at FROM order_read WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&stores.orders)
    .await?
    .map(
        |(status, saga_state, payment_state, last_event_type, projected_at)| ReadModelRow {
            status,
            saga_state,
            payment_state,
            last_event_type,
            projected_at,
        },
    );
    let mut explanation = Explanation {
        order_id,
        order,
        outbox,
        records,
        inboxes,
        positions,
        dead_letters,
        payment,
        ledger,
        shipment,
        read_model,
        at,
        diagnosis: String::new(),
    };
    explanation.diagnosis = diagnose(&explanation);
    Ok(explanation)
}

async fn order_row(orders: &PgPool, order_id: uuid::Uuid) -> anyhow::Result<Option<OrderRow>> {
    let row = sqlx::query_as::<_, (String, String, i64, Option<String>, DateTime<Utc>, DateTime<Utc>)>(
        "SELECT status, saga_state, version, cancellation_reason, created_at, updated_at FROM orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(orders)
    .await?;
    Ok(row.map(
        |(status, saga_state, version, cancellation_reason, created_at, updated_at)| OrderRow {
            status,
            saga_state,
            version,
            cancellation_reason,
            created_at,
            updated_at,
        },
    ))
}

async fn outbox_rows(pool: &PgPool, store: Store, order_id: uuid::Uuid) -> anyhow::Result<Vec<OutboxRow>> {
    let rows = sqlx::query_as::<_, (String, uuid::Uuid, DateTime<Utc>, Option<DateTime<Utc>>)>(
        "SELECT event_type, message_id, created_at, published_at FROM outbox WHERE partition_key = $1 ORDER BY id",
    )
    .bind(order_id.to_string())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(event_type, message_id, created_at, published_at)| OutboxRow {
            store,
            event_type,
            message_id,
            created_at,
            published_at,
        })
        .collect())
}

/// The inbox rows of `groups` for the messages `ids`.
async fn inbox_rows(pool: &PgPool, groups: &[&str], ids: &[uuid::Uuid]) -> anyhow::Result<Vec<InboxRow>> {
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query_as::<_, (String, uuid::Uuid, DateTime<Utc>)>(
        "SELECT consumer, message_id, processed_at FROM inbox
         WHERE consumer = ANY($1) AND message_id = ANY($2) ORDER BY processed_at",
    )
    .bind(groups)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(group, message_id, processed_at)| InboxRow {
            group,
            message_id,
            processed_at,
        })
        .collect())
}

/// The ids of the order's events the read model projected (its history keeps them): the
/// outbox rows of older events may be gone, and their records past the topic's retention.
async fn projected_message_ids(order_id: uuid::Uuid, orders: &PgPool) -> anyhow::Result<Vec<uuid::Uuid>> {
    let history: Vec<String> = sqlx::query_scalar(
        "SELECT h->>'message_id' FROM order_read, jsonb_array_elements(history) AS h
         WHERE order_id = $1 AND h ? 'message_id'",
    )
    .bind(order_id)
    .fetch_all(orders)
    .await?;
    Ok(history.iter().filter_map(|id| id.parse::<uuid::Uuid>().ok()).collect())
}

async fn payment_row(payments: &PgPool, order_id: uuid::Uuid) -> anyhow::Result<Option<PaymentRow>> {
    type Row = (
        String,
        i64,
        String,
        Option<String>,
        Option<String>,
        i64,
        DateTime<Utc>,
        i32,
        Option<String>,
        bool,
    );
    let row = sqlx::query_as::<_, Row>(
        "SELECT state, amount_minor, currency_code, authorization_id, failure_reason, version, updated_at,
                attempts, last_error, coalesce(lease_until > now() + interval '1 year', false)
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(payments)
    .await?;
    Ok(row.map(
        |(
            state,
            amount_minor,
            currency_code,
            authorization_id,
            failure_reason,
            version,
            updated_at,
            attempts,
            last_error,
            parked,
        )| {
            PaymentRow {
                state,
                amount_minor,
                currency_code,
                authorization_id,
                failure_reason,
                version,
                updated_at,
                attempts,
                last_error,
                parked,
            }
        },
    ))
}

async fn ledger_rows(gateway: &PgPool, order_id: uuid::Uuid) -> anyhow::Result<Vec<LedgerRow>> {
    let rows = sqlx::query_as::<_, (DateTime<Utc>, String, i64, String, String)>(
        "SELECT at, operation, amount_minor, currency_code, idempotency_key FROM ledger WHERE order_id = $1 ORDER BY id",
    )
    .bind(order_id.to_string())
    .fetch_all(gateway)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(at, operation, amount_minor, currency_code, idempotency_key)| LedgerRow {
                at,
                operation,
                amount_minor,
                currency_code,
                idempotency_key,
            },
        )
        .collect())
}

/// How long a Kafka metadata or offset request may take.
const ASK: Duration = Duration::from_secs(10);
/// At most this many records are read per partition: an order's events are a handful, but a
/// partition read from an old order's creation time could be long.
const SCAN_LIMIT: i64 = 200_000;

/// The partition librdkafka's default partitioner (consistent_random) gives a key: CRC-32 of
/// the key modulo the partition count. Every producer of the system uses it.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    (crc32fast::hash(key.as_bytes()) % partitions.max(1) as u32) as i32
}

/// The order's records on the event topics and their dead-letter topics, and every group's
/// position on the partitions that hold them. Blocking.
fn read_topics(
    cluster: &orderflow_platform::kafka::Cluster,
    order_id: uuid::Uuid,
    since: DateTime<Utc>,
) -> anyhow::Result<(Vec<Record>, Vec<GroupPosition>, Vec<DeadLetter>)> {
    let key = order_id.to_string();
    let reader: BaseConsumer =
        orderflow_platform::kafka::consumer_config(cluster, &format!("explain-{}", uuid::Uuid::now_v7()), None)
            .set("enable.auto.commit", "false")
            .create()?;
    let mut records = Vec::new();
    let mut positions = Vec::new();
    let mut dead_letters = Vec::new();
    for topic in [topics::ORDERS_EVENTS, topics::PAYMENTS_EVENTS] {
        let partition = partition_of(&key, kafka::partition_count(&reader, topic)?);
        for (message, offset) in scan(&reader, topic, partition, &key, since)? {
            let headers = kafka::headers_of(&message);
            let header = |name: &str| kafka::header_text(&headers, name);
            records.push(Record {
                topic: topic.to_owned(),
                partition,
                offset,
                event_type: header(orderflow::envelope::headers::EVENT_TYPE).unwrap_or_default(),
                message_id: header(orderflow::envelope::headers::MESSAGE_ID).unwrap_or_default(),
                timestamp_ms: message.timestamp().to_millis(),
            });
        }
        let (_, high) = reader.fetch_watermarks(topic, partition, ASK)?;
        let groups: Vec<&str> = {
            let mut groups: Vec<&str> = CONSUMERS.iter().filter(|c| c.topic == topic).map(|c| c.group).collect();
            groups.dedup();
            groups
        };
        for group in groups {
            positions.push(position(cluster, &reader, group, topic, partition, high)?);
        }
        let dlq = topics::dead_letter(topic);
        let dlq_partition = partition_of(&key, kafka::partition_count(&reader, &dlq)?);
        for (message, offset) in scan(&reader, &dlq, dlq_partition, &key, since)? {
            let headers = kafka::headers_of(&message);
            let header = |name: &str| kafka::header_text(&headers, name).unwrap_or_default();
            dead_letters.push(DeadLetter {
                topic: dlq.clone(),
                partition: dlq_partition,
                offset,
                message_id: header(orderflow::envelope::headers::MESSAGE_ID),
                group: header("dlq.consumer_group"),
                error: header("dlq.error"),
                attempts: header("dlq.attempts"),
            });
        }
    }
    Ok((records, positions, dead_letters))
}

/// The records of `key` on one partition, from the first written at or after `since` to the
/// partition's end as it is now.
fn scan(
    reader: &BaseConsumer,
    topic: &str,
    partition: i32,
    key: &str,
    since: DateTime<Utc>,
) -> anyhow::Result<Vec<(rdkafka::message::OwnedMessage, i64)>> {
    let (low, high) = reader.fetch_watermarks(topic, partition, ASK)?;
    let mut by_time = TopicPartitionList::new();
    by_time.add_partition_offset(topic, partition, Offset::Offset(since.timestamp_millis()))?;
    let start = match reader
        .offsets_for_times(by_time, ASK)?
        .elements()
        .first()
        .map(|e| e.offset())
    {
        Some(Offset::Offset(offset)) => offset.max(low),
        // Nothing written since then.
        _ => high,
    };
    let mut found = Vec::new();
    if start >= high {
        return Ok(found);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(start.max(high - SCAN_LIMIT)))?;
    reader.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic}/{partition} took longer than 30 s"
        );
        let Some(message) = reader.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        let offset = message.offset();
        if message.key() == Some(key.as_bytes()) {
            found.push((message.detach(), offset));
        }
        if offset + 1 >= high {
            break;
        }
    }
    reader.unassign()?;
    Ok(found)
}

/// A group's committed offset on one partition (asked without joining the group) and how
/// many members it has.
fn position(
    cluster: &orderflow_platform::kafka::Cluster,
    reader: &BaseConsumer,
    group: &str,
    topic: &str,
    partition: i32,
    high_watermark: i64,
) -> anyhow::Result<GroupPosition> {
    let asker: BaseConsumer = orderflow_platform::kafka::consumer_config(cluster, group, None)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, partition);
    let committed = asker
        .committed_offsets(wanted, ASK)?
        .elements()
        .first()
        .and_then(|e| match e.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        });
    let members = reader
        .fetch_group_list(Some(group), ASK)?
        .groups()
        .first()
        .map_or(0, |g| g.members().len());
    Ok(GroupPosition {
        group: group.to_owned(),
        topic: topic.to_owned(),
        partition,
        committed,
        high_watermark,
        members,
    })
}

/// The gateway call a payment in `state` owes, if it owes one (payment-svc's pending states).
fn owed_call(state: &str) -> Option<&'static str> {
    match state {
        "AUTHORIZING" => Some("an authorization"),
        "CAPTURING" => Some("a capture"),
        "VOIDING" => Some("a void"),
        _ => None,
    }
}

/// One line: where the order is, and for an order not settled, the first hop that has not
/// done its part. Pure: a function of what was read.
pub fn diagnose(explanation: &Explanation) -> String {
    let Some(order) = &explanation.order else {
        return format!("no order {} in the orders database", explanation.order_id);
    };
    let age = |at: DateTime<Utc>| {
        let seconds = (explanation.at - at).num_milliseconds() as f64 / 1000.0;
        format!("{seconds:.1} s ago")
    };
    // 1. An event written and not yet published: its relay is behind or away.
    if let Some(row) = explanation.outbox.iter().find(|row| row.published_at.is_none()) {
        return format!(
            "{} written to the {} outbox {}, not yet published: relay-{} is behind or not running",
            short(&row.event_type),
            row.store.name(),
            age(row.created_at),
            row.store.name()
        );
    }
    // 2. An event published and not yet acted on by a group that acts on it.
    let recorded: HashSet<(&str, String)> = explanation
        .inboxes
        .iter()
        .map(|row| (row.group.as_str(), row.message_id.to_string()))
        .collect();
    for record in &explanation.records {
        for consumer in CONSUMERS
            .iter()
            .filter(|c| c.topic == record.topic && c.acts_on(&record.event_type))
        {
            if recorded.contains(&(consumer.group, record.message_id.clone())) {
                continue;
            }
            if let Some(letter) = explanation
                .dead_letters
                .iter()
                .find(|l| l.group == consumer.group && l.message_id == record.message_id)
            {
                return format!(
                    "{} dead-lettered by group {} after {} attempt(s): {} ({}/{} offset {}; ordersctl dlq show)",
                    short(&record.event_type),
                    consumer.group,
                    letter.attempts,
                    letter.error,
                    letter.topic,
                    letter.partition,
                    letter.offset
                );
            }
            let Some(position) = explanation
                .positions
                .iter()
                .find(|p| p.group == consumer.group && p.topic == record.topic && p.partition == record.partition)
            else {
                continue;
            };
            // The group has read past it without an inbox row: it did not act on it (the
            // inbox row went with housekeeping, or the handler ignored it).
            if position.committed.is_some_and(|committed| committed > record.offset) {
                continue;
            }
            let members = if position.members == 0 {
                "; the group has no member running".to_owned()
            } else {
                format!("; {} member(s) in the group", position.members)
            };
            return format!(
                "{} published at offset {} on {}, not yet consumed by group {}: lag {} on partition {}{members}",
                short(&record.event_type),
                record.offset,
                record.topic,
                consumer.group,
                position.lag(),
                record.partition,
            );
        }
    }
    // 3. A gateway call payment-svc owes: its executor makes it (or an operator must).
    if let Some((payment, call)) = explanation
        .payment
        .as_ref()
        .and_then(|payment| Some((payment, owed_call(&payment.state)?)))
    {
        let last = payment
            .last_error
            .as_deref()
            .map_or(String::new(), |error| format!("; last failure: {error}"));
        if payment.parked {
            return format!(
                "payment-svc owes the gateway {call} since {}, PARKED for an operator after {} attempt(s){last} (docs/runbook.md: a payment parked)",
                age(payment.updated_at),
                payment.attempts
            );
        }
        return format!(
            "payment-svc owes the gateway {call} since {} ({} attempt(s) so far{last}): its executor makes it",
            age(payment.updated_at),
            payment.attempts
        );
    }
    let last_event = explanation
        .records
        .iter()
        .max_by_key(|r| r.timestamp_ms)
        .map_or("none".to_owned(), |r| short(&r.event_type).to_owned());
    let projected = explanation
        .read_model
        .as_ref()
        .map_or("not in the read model yet".to_owned(), |read| {
            if read.status == order.status {
                "the read model agrees".to_owned()
            } else {
                format!("the read model still says {} (projector behind)", read.status)
            }
        });
    match OrderStatus::parse(&order.status) {
        Some(OrderStatus::Confirmed) => {
            let captured: i64 = explanation
                .ledger
                .iter()
                .filter(|row| row.operation == "CAPTURE")
                .map(|row| row.amount_minor)
                .sum();
            let shipped = explanation
                .shipment
                .map_or("no shipment yet (fulfilment behind)".to_owned(), |(id, _)| {
                    format!("shipment {id}")
                });
            format!("settled: CONFIRMED, {captured} captured at the gateway, {shipped}; {projected}")
        }
        Some(OrderStatus::Cancelled) => format!(
            "settled: CANCELLED ({}); payment {}; {projected}",
            order.cancellation_reason.as_deref().unwrap_or("no reason"),
            explanation
                .payment
                .as_ref()
                .map_or("never recorded", |p| p.state.as_str())
        ),
        None => format!(
            "status {} is not one this build knows (a newer order-svc?); nothing is inferred from it",
            order.status
        ),
        Some(OrderStatus::Pending) => format!(
            "PENDING since {}: every event so far was consumed by every group that acts on it (last: {last_event}); waiting for the next step (payment {})",
            age(order.created_at),
            explanation
                .payment
                .as_ref()
                .map_or("not recorded yet", |p| p.state.as_str())
        ),
    }
}

/// The explanation for a terminal.
pub fn render(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "order {}", e.order_id);
    match &e.order {
        Some(o) => {
            let _ = writeln!(
                out,
                "  state      {} / {} (version {}){}; placed {}, last change {}",
                o.status,
                o.saga_state,
                o.version,
                o.cancellation_reason
                    .as_deref()
                    .map(|r| format!(", {r}"))
                    .unwrap_or_default(),
                o.created_at.to_rfc3339(),
                o.updated_at.to_rfc3339()
            );
        }
        None => {
            let _ = writeln!(out, "  state      not in the orders database");
        }
    }
    let inboxes: BTreeMap<String, Vec<&str>> = e.inboxes.iter().fold(BTreeMap::new(), |mut by_id, row| {
        by_id
            .entry(row.message_id.to_string())
            .or_default()
            .push(row.group.as_str());
        by_id
    });
    let _ = writeln!(
        out,
        "  events on Kafka (topic/partition@offset, message id, inboxes that recorded it):"
    );
    if e.records.is_empty() {
        let _ = writeln!(out, "    none");
    }
    for r in &e.records {
        let groups = inboxes
            .get(&r.message_id)
            .map(|g| g.join(", "))
            .unwrap_or_else(|| "none".to_owned());
        let _ = writeln!(
            out,
            "    {:<20} {}/{}@{:<8} {}  inboxes: {groups}",
            short(&r.event_type),
            r.topic,
            r.partition,
            r.offset,
            r.message_id
        );
    }
    let _ = writeln!(out, "  outbox rows still in their tables:");
    if e.outbox.is_empty() {
        let _ = writeln!(out, "    none (published and cleaned up, or never written)");
    }
    for row in &e.outbox {
        let _ = writeln!(
            out,
            "    {:<20} {:<9} {}  {}",
            short(&row.event_type),
            row.store.name(),
            row.message_id,
            row.published_at.map_or("NOT PUBLISHED".to_owned(), |at| format!(
                "published {}",
                at.to_rfc3339()
            ))
        );
    }
    let _ = writeln!(out, "  consumer groups on the order's partitions:");
    for p in &e.positions {
        let _ = writeln!(
            out,
            "    {:<11} {}/{}  committed {}  end {}  lag {}  members {}",
            p.group,
            p.topic,
            p.partition,
            p.committed.map_or("none".to_owned(), |c| c.to_string()),
            p.high_watermark,
            p.lag(),
            p.members
        );
    }
    let _ = writeln!(
        out,
        "  dead letters: {}",
        if e.dead_letters.is_empty() { "none" } else { "" }
    );
    for l in &e.dead_letters {
        let _ = writeln!(
            out,
            "    {}/{}@{} by {} after {} attempt(s): {}",
            l.topic, l.partition, l.offset, l.group, l.attempts, l.error
        );
    }
    match &e.payment {
        Some(p) => {
            let _ = writeln!(
                out,
                "  payment    {} {} {} (version {}){}{}",
                p.state,
                p.amount_minor,
                p.currency_code,
                p.version,
                p.authorization_id
                    .as_deref()
                    .map(|a| format!(", authorization {a}"))
                    .unwrap_or_default(),
                p.failure_reason
                    .as_deref()
                    .map(|r| format!(", {r}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "  payment    none recorded");
        }
    }
    let _ = writeln!(
        out,
        "  gateway ledger:{}",
        if e.ledger.is_empty() { " none" } else { "" }
    );
    for l in &e.ledger {
        let _ = writeln!(
            out,
            "    {} {:<9} {} {} (key {})",
            l.at.to_rfc3339(),
            l.operation,
            l.amount_minor,
            l.currency_code,
            l.idempotency_key
        );
    }
    let _ = writeln!(
        out,
        "  shipment   {}",
        e.shipment.map_or("none".to_owned(), |(id, at)| format!(
            "{id}, requested {}",
            at.to_rfc3339()
        ))
    );
    match &e.read_model {
        Some(r) => {
            let _ = writeln!(
                out,
                "  read model {} / {} (payment {}), last event {}, projected {} ({:.1} s before this read)",
                r.status,
                r.saga_state,
                r.payment_state.as_deref().unwrap_or("-"),
                short(&r.last_event_type),
                r.projected_at.to_rfc3339(),
                (e.at - r.projected_at).num_milliseconds() as f64 / 1000.0
            );
        }
        None => {
            let _ = writeln!(out, "  read model not projected yet");
        }
    }
    let _ = writeln!(out, "diagnosis: {}", e.diagnosis);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Explanation {
        let at = Utc::now();
        Explanation {
            order_id: uuid::Uuid::nil(),
            order: Some(OrderRow {
                status: "PENDING".into(),
                saga_state: "AWAITING_PAYMENT".into(),
                version: 0,
                cancellation_reason: None,
                created_at: at - chrono::Duration::seconds(5),
                updated_at: at - chrono::Duration::seconds(5),
            }),
            outbox: vec![],
            records: vec![Record {
                topic: topics::ORDERS_EVENTS.into(),
                partition: 4,
                offset: 41,
                event_type: "orderflow.events.v1.OrderPlaced".into(),
                message_id: uuid::Uuid::from_u128(7).to_string(),
                timestamp_ms: Some(1),
            }],
            inboxes: vec![InboxRow {
                group: "projector".into(),
                message_id: uuid::Uuid::from_u128(7),
                processed_at: at,
            }],
            positions: vec![
                GroupPosition {
                    group: "payment".into(),
                    topic: topics::ORDERS_EVENTS.into(),
                    partition: 4,
                    committed: Some(38),
                    high_watermark: 42,
                    members: 0,
                },
                GroupPosition {
                    group: "projector".into(),
                    topic: topics::ORDERS_EVENTS.into(),
                    partition: 4,
                    committed: Some(42),
                    high_watermark: 42,
                    members: 1,
                },
            ],
            dead_letters: vec![],
            payment: None,
            ledger: vec![],
            shipment: None,
            read_model: None,
            at,
            diagnosis: String::new(),
        }
    }

    #[test]
    fn an_event_no_group_member_consumed_names_the_group_offset_and_lag() {
        assert_eq!(
            diagnose(&pending()),
            "OrderPlaced published at offset 41 on orders.events, not yet consumed by group payment: lag 4 on partition 4; the group has no member running"
        );
    }

    #[test]
    fn an_unpublished_outbox_row_comes_first_and_a_dead_letter_is_named() {
        let mut e = pending();
        e.outbox.push(OutboxRow {
            store: Store::Orders,
            event_type: "orderflow.events.v1.OrderPlaced".into(),
            message_id: uuid::Uuid::from_u128(7),
            created_at: e.at - chrono::Duration::seconds(3),
            published_at: None,
        });
        assert!(
            diagnose(&e)
                .starts_with("OrderPlaced written to the orders outbox 3.0 s ago, not yet published: relay-orders"),
            "{}",
            diagnose(&e)
        );
        let mut e = pending();
        e.dead_letters.push(DeadLetter {
            topic: "orders.events.dlq".into(),
            partition: 4,
            offset: 0,
            message_id: uuid::Uuid::from_u128(7).to_string(),
            group: "payment".into(),
            error: "permanent: total exceeds the limit".into(),
            attempts: "1".into(),
        });
        assert!(
            diagnose(&e).starts_with("OrderPlaced dead-lettered by group payment"),
            "{}",
            diagnose(&e)
        );
    }

    #[test]
    fn a_settled_order_says_so() {
        let mut e = pending();
        e.inboxes.push(InboxRow {
            group: "payment".into(),
            message_id: uuid::Uuid::from_u128(7),
            processed_at: e.at,
        });
        assert!(diagnose(&e).starts_with("PENDING since 5.0 s ago"), "{}", diagnose(&e));
        e.order.as_mut().unwrap().status = "CONFIRMED".into();
        assert!(diagnose(&e).starts_with("settled: CONFIRMED"), "{}", diagnose(&e));
    }

    #[test]
    fn a_payment_owing_a_gateway_call_says_which_and_whether_it_is_parked() {
        let mut e = pending();
        e.inboxes.push(InboxRow {
            group: "payment".into(),
            message_id: uuid::Uuid::from_u128(7),
            processed_at: e.at,
        });
        e.payment = Some(PaymentRow {
            state: "AUTHORIZING".into(),
            amount_minor: 4250,
            currency_code: "EUR".into(),
            authorization_id: None,
            failure_reason: None,
            version: 0,
            updated_at: e.at - chrono::Duration::seconds(2),
            attempts: 3,
            last_error: Some("authorize: DeadlineExceeded".into()),
            parked: false,
        });
        assert_eq!(
            diagnose(&e),
            "payment-svc owes the gateway an authorization since 2.0 s ago (3 attempt(s) so far; last failure: authorize: DeadlineExceeded): its executor makes it"
        );
        if let Some(payment) = e.payment.as_mut() {
            payment.state = "CAPTURING".into();
            payment.parked = true;
        }
        assert!(
            diagnose(&e).contains("a capture since 2.0 s ago, PARKED"),
            "{}",
            diagnose(&e)
        );
    }

    #[test]
    fn partitions_follow_librdkafkas_default_partitioner() {
        // CRC-32 (IEEE) of "123456789" is 0xCBF43926, the standard check value.
        assert_eq!(partition_of("123456789", 12), (0xCBF4_3926_u32 % 12) as i32);
    }
}
