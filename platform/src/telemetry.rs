//! Prometheus metrics. Every process serves the Prometheus text format over HTTP at
//! `ORDERFLOW_METRICS_ADDR` (e.g. `127.0.0.1:9101`; any path, `/metrics` by convention).
//! Names follow the Prometheus conventions: a unit suffix, `_total` for counters.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// gRPC requests, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "orderflow_grpc_requests_total";
/// gRPC request duration, by `method`.
pub const GRPC_DURATION: &str = "orderflow_grpc_request_duration_seconds";
/// Outbox rows not yet published.
pub const OUTBOX_PENDING: &str = "orderflow_outbox_pending_rows";
/// Gauge: seconds since the oldest unpublished outbox row was committed (0 when none waits).
pub const OUTBOX_OLDEST_PENDING: &str = "orderflow_outbox_oldest_pending_seconds";
/// Gauge: dead letters held in a dead-letter topic, by `topic` (its partitions' high minus
/// low watermarks: what retention keeps, redriven or not).
pub const DEAD_LETTER_MESSAGES: &str = "orderflow_dead_letter_messages";
/// Outbox commit → broker acknowledgement.
pub const RELAY_LAG: &str = "orderflow_relay_lag_seconds";
/// Rows published.
pub const RELAY_PUBLISHED: &str = "orderflow_relay_published_total";
/// Rows the broker refused.
pub const RELAY_PUBLISH_ERRORS: &str = "orderflow_relay_publish_errors_total";
/// Counter: relay passes (each claims and publishes batches until its key slots have nothing
/// left, a record fails, or the relay stops; under steady load one pass lasts).
pub const RELAY_PASSES: &str = "orderflow_relay_passes_total";
/// Counter: outbox notifications answered by a claim already due (one claim per burst).
pub const RELAY_WAKEUPS_COALESCED: &str = "orderflow_relay_wakeups_coalesced_total";
/// Gauge: the polling relay's batches handed to the producer and not yet settled
/// (RELAY_PIPELINE_DEPTH at most).
pub const RELAY_BATCHES_IN_FLIGHT: &str = "orderflow_relay_batches_in_flight";
/// Counter: producers a relay replaced after every pass failed for its stall limit.
pub const RELAY_PRODUCERS_REPLACED: &str = "orderflow_relay_producers_replaced_total";
/// Gauge: outbox key slots this relay holds (of relay::KEY_SLOTS; several relays share them).
pub const RELAY_KEY_SLOTS_OWNED: &str = "orderflow_relay_key_slots_owned";
/// Gauge: WAL between the server's current position and what the relay's replication slot
/// confirmed (RELAY_MODE=wal-message): what the slot holds back from being recycled.
pub const RELAY_SLOT_LAG_BYTES: &str = "orderflow_relay_slot_lag_bytes";
/// Gauge: age of the oldest committed event the slot has not yet confirmed (0 when the relay
/// has confirmed everything it received).
pub const RELAY_SLOT_LAG_SECONDS: &str = "orderflow_relay_slot_lag_seconds";
/// Gauge: the WAL the slot may still fall behind before Postgres invalidates it
/// (`safe_wal_size`, from max_slot_wal_keep_size).
pub const RELAY_SLOT_SAFE_BYTES: &str = "orderflow_relay_slot_safe_wal_bytes";
/// Messages handled, by `group`, `topic` and `outcome` (processed, duplicate, skipped, dead_lettered).
pub const CONSUMER_MESSAGES: &str = "orderflow_consumer_messages_total";
/// Histogram: messages in one committed unit of work (one transaction, across partitions),
/// by `group`.
pub const CONSUMER_BATCH_SIZE: &str = "orderflow_consumer_batch_size";
/// Transient failures retried (a message alone, or a unit of work as a whole), by `group`.
pub const CONSUMER_RETRIES: &str = "orderflow_consumer_retries_total";
/// Messages of a consumer failing transiently right now (each holds up its partition), by
/// `group`. Above 0 for long: a dependency is away, or one message fails over and over.
pub const CONSUMER_RETRYING: &str = "orderflow_consumer_retrying_messages";
/// Messages dead-lettered because their transient failures outlasted the retry budget, by
/// `group` (`reason="retry_budget"` of the dead-letter outcome).
pub const CONSUMER_BUDGET_EXHAUSTED: &str = "orderflow_consumer_retry_budget_exhausted_total";
/// Partitions a consumer holds now, by `group` (0 for long: a consumer that cannot join).
pub const CONSUMER_ASSIGNED: &str = "orderflow_consumer_assigned_partitions";
/// Counter: new clients a consumer started after giving up (no partition, or a stall), by
/// `group`.
pub const CONSUMER_RECONNECTS: &str = "orderflow_consumer_reconnects_total";
/// Rebalances seen by a consumer, by `group` and `kind` (assign, revoke).
pub const CONSUMER_REBALANCES: &str = "orderflow_consumer_rebalances_total";
/// Counter: records whose event no trusted key of its producer signed, dead-lettered and never
/// acted on, by `group` and `reason` (unsigned, unknown_key, wrong_producer, bad_signature,
/// key_mismatch). Anything above 0 is someone writing events who should not (the
/// EventSignatureRejected alert), or a key rotation done out of order.
pub const EVENTS_REJECTED: &str = "orderflow_events_rejected_total";
/// Records not yet handled (high watermark minus the offset stored after the last effect), by
/// `group`, `topic` and `partition`; 0 for a partition the member no longer holds. Updated
/// every statistics interval (5 s).
pub const CONSUMER_LAG: &str = "orderflow_consumer_lag_messages";
/// Placed → CONFIRMED or CANCELLED, by `status`.
pub const SAGA_COMPLETION: &str = "orderflow_saga_completion_seconds";
/// Orders the sweeper cancelled.
pub const SWEEPER_CANCELLATIONS: &str = "orderflow_sweeper_cancellations_total";
/// Authorizations payment-svc voided because their order never settled in time.
pub const OVERDUE_AUTHORIZATIONS_VOIDED: &str = "orderflow_payment_overdue_authorizations_voided_total";
/// Histogram: orders written in one PlaceOrder transaction (group commit).
pub const PLACE_ORDER_BATCH_SIZE: &str = "orderflow_place_order_batch_size";
/// PlaceOrder calls refused as overload (RESOURCE_EXHAUSTED), by `reason`: `saga_at_capacity`
/// (admission) or `writers_busy` (every group-commit writer has a full batch waiting).
pub const PLACE_ORDER_REFUSED: &str = "orderflow_place_order_refused_total";
/// Gauge: orders in flight in the saga (PENDING), as admission last read them.
pub const ADMISSION_IN_FLIGHT: &str = "orderflow_admission_orders_in_flight";
/// Gauge: the share of admission's room open (1: all of it; less while PlaceOrder is slower
/// than its latency target).
pub const ADMISSION_OPEN: &str = "orderflow_admission_open";
/// Gauge: orders completing per second, as admission last measured them.
pub const ADMISSION_COMPLETING: &str = "orderflow_admission_completing_per_second";
/// Gauge: pending payments parked now (the gateway refuses their capture or void, or their
/// answer could not be recorded): never claimed again until an operator releases them.
pub const PAYMENTS_PARKED: &str = "orderflow_payments_parked";
/// Gateway calls, by `operation` and `outcome`.
pub const GATEWAY_CALL_DURATION: &str = "orderflow_gateway_call_duration_seconds";
/// Event occurred → visible in the read model.
pub const READ_MODEL_LAG: &str = "orderflow_read_model_lag_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A process's logs, spans and metrics settings: part of each binary's `Config`
/// (flattened), parsed and validated with the rest of it, so that nothing in this crate reads
/// the environment behind the Config's back and a value that cannot be used stops the process
/// at start-up naming its variable.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics at this address (any path; `/metrics` by convention); unset:
    /// not served.
    #[arg(long, env = "ORDERFLOW_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Which log lines (and spans) are kept, in tracing's filter syntax (`info`,
    /// `warn,order_svc=debug`). A filter that does not parse is refused, not replaced by the
    /// default.
    #[arg(long = "log", env = "RUST_LOG", default_value = DEFAULT_LOG_FILTER, value_parser = parse_log_filter)]
    pub log_filter: String,
    /// The OTLP/gRPC collector spans are exported to (the standard OpenTelemetry variable);
    /// unset: spans still carry W3C ids across the services, nothing is exported. (The
    /// exporter library itself may read the other standard `OTEL_EXPORTER_OTLP_*` variables,
    /// headers and timeouts, by the OpenTelemetry specification.)
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// The log filter when none is set.
pub const DEFAULT_LOG_FILTER: &str = "info";

fn parse_log_filter(filter: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| filter.to_owned())
        .map_err(|error| error.to_string())
}

impl Default for TelemetryArgs {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            log_filter: DEFAULT_LOG_FILTER.to_owned(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryArgs {
    /// Serves the metrics, if an address is set. Once per process, from `main`: the recorder
    /// is process-wide.
    pub fn install(&self) -> anyhow::Result<()> {
        match self.metrics_addr {
            Some(addr) => install_metrics(addr),
            None => Ok(()),
        }
    }
}

/// Serves metrics at `addr` (the process-wide recorder: install it once).
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(LATENCY_BUCKETS)?
        .install()
        .map_err(|error| anyhow::anyhow!("cannot serve metrics on {addr}: {error}"))?;
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

/// Keeps the tracer provider alive; dropping it flushes the spans still buffered.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process's subscriber: JSON log lines (filtered by `settings.log_filter`) and
/// OpenTelemetry spans. Spans always get W3C trace ids, which travel with every event (outbox
/// row, Kafka header, envelope) so one order is one trace across the services. They are
/// exported over OTLP only to `settings.otlp_endpoint`; without one nothing is sent and
/// nothing waits. A second call is a no-op.
pub fn init(service: impl Into<String>, settings: &TelemetryArgs) -> TelemetryGuard {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let service: String = service.into();
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.clone())
        .build();
    let mut builder = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &settings.otlp_endpoint {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(error) => eprintln!("OTLP export disabled: {error}"),
        }
    }
    let provider = builder.build();
    // Parsed once already, by the Config (parse_log_filter): a filter that does not parse
    // never gets here, so the default below is for a caller that built the settings by hand.
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true);
    let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    TelemetryGuard {
        provider: installed.then_some(provider),
    }
}

fn propagator_inject(cx: &opentelemetry::Context) -> Option<String> {
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(cx, &mut carrier));
    carrier.remove("traceparent")
}

/// The W3C traceparent of the current span, if it has a valid trace context.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C traceparent of `span` (for a message or a call that continues from it).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    propagator_inject(&span.context())
}

/// The OpenTelemetry context a W3C traceparent describes.
pub fn context_of(traceparent: &str) -> opentelemetry::Context {
    let carrier = std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier))
}

/// Makes `span` a child of the span that `traceparent` names (the producer of a message).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let _ = span.set_parent(context_of(traceparent));
}

/// [`continue_trace`] for a traceparent carried as text that may be empty (an envelope's, when
/// its producer had no trace context): an empty one leaves `span` where it was opened, instead
/// of making it the root of a trace of its own.
pub fn continue_trace_of(span: &tracing::Span, traceparent: &str) {
    if !traceparent.is_empty() {
        continue_trace(span, traceparent);
    }
}

/// The trace id of a W3C traceparent (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

/// The current span's trace id, as it appears in logs.
pub fn current_trace_id() -> Option<String> {
    current_traceparent()
        .as_deref()
        .and_then(trace_id_of)
        .map(str::to_owned)
}
