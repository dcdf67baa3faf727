//! The whole checkout saga inside one test process: gateway simulator, order-svc (API,
//! payment-events consumer, sweeper), payment-svc, fulfilment, projector and both relays,
//! each test with its own four databases, its own topics and its own consumer groups.

use std::time::Duration;

use orderflow::gateway::v1::Faults;
use orderflow::orders::v1::order_service_client::OrderServiceClient;
use orderflow_platform::{Secret, kafka};
use rdkafka::producer::FutureProducer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{RunningOrderSvc, TestDb, fresh_db, fresh_topic, stack, start_order_svc_with};

/// How a saga is set up.
#[derive(Debug, Clone)]
pub struct SagaOptions {
    /// The saga deadline (the sweeper cancels PENDING orders older than this).
    pub deadline: Duration,
    /// The gateway's faults.
    pub faults: Faults,
    /// Both relays publish every event twice.
    pub publish_twice: bool,
    /// How long payment-svc waits for one gateway reply.
    pub gateway_timeout: Duration,
    /// Partitions of each topic.
    pub partitions: i32,
    /// payment-svc voids authorizations whose order has not settled after this.
    pub authorization_deadline: Duration,
    /// How long payment-svc's consumer retries a message failing transiently.
    pub payment_retry_budget: Duration,
    /// PlaceOrder's admission target (zero: off, as in every test that floods the saga on
    /// purpose to check it stays correct) and floor.
    pub admission: (Duration, u64),
}

impl Default for SagaOptions {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(60),
            faults: Faults {
                hang_attempts: 1,
                timeout_reply_delay_ms: 3_000,
                seed: 7,
                ..Faults::default()
            },
            publish_twice: false,
            gateway_timeout: Duration::from_millis(500),
            partitions: 4,
            authorization_deadline: Duration::from_secs(900),
            payment_retry_budget: orderflow_platform::consumer::DEFAULT_RETRY_BUDGET,
            admission: (Duration::ZERO, order_svc::admission::DEFAULT_FLOOR),
        }
    }
}

/// A running saga.
pub struct Saga {
    /// The orders database.
    pub orders: TestDb,
    /// The payments database.
    pub payments: TestDb,
    /// The fulfilment database.
    pub fulfilment: TestDb,
    /// The gateway's database.
    pub gateway: TestDb,
    /// Topic of the order events.
    pub orders_topic: String,
    /// Topic of the payment events.
    pub payments_topic: String,
    /// The options it runs with.
    pub options: SagaOptions,
    /// The gateway's address.
    pub gateway_addr: std::net::SocketAddr,
    order_svc: Option<RunningOrderSvc>,
    suffix: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    payment: Option<(CancellationToken, JoinHandle<()>)>,
}

fn spawn_logged(
    name: &'static str,
    future: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = future.await {
            panic!("{name} failed: {error:#}");
        }
    })
}

impl Saga {
    /// Starts every component.
    pub async fn start(options: SagaOptions) -> Saga {
        let (orders, payments, fulfilment, gateway) = tokio::join!(
            fresh_db(&order_svc::MIGRATOR),
            fresh_db(&payment_svc::MIGRATOR),
            fresh_db(&fulfilment::MIGRATOR),
            fresh_db(&gateway_sim::MIGRATOR),
        );
        let (orders_topic, payments_topic) =
            tokio::join!(fresh_topic(options.partitions), fresh_topic(options.partitions));
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let bootstrap = stack().bootstrap_servers.clone();
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let gateway_addr = listener.local_addr().expect("address");
        let gateway_config = crate::gateway_config(
            gateway_addr,
            &gateway,
            options.faults,
            orderflow_platform::security::ServerSecurityArgs::insecure(),
        );
        tasks.push(spawn_logged(
            "gateway-sim",
            gateway_sim::run(gateway_config, listener, shutdown.clone()),
        ));

        let deadline = options.deadline;
        let (admission_target, admission_floor) = options.admission;
        let (topic_o, topic_p, boot, sfx) = (
            orders_topic.clone(),
            payments_topic.clone(),
            bootstrap.clone(),
            suffix.clone(),
        );
        let order_svc = start_order_svc_with(&orders, &orders_topic, move |config| {
            config.bootstrap_servers = Some(boot);
            config.orders_topic = topic_o;
            config.payments_topic = topic_p;
            config.group_id = format!("order-{sfx}");
            config.saga_deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
            config.sweep_interval_ms = 200;
            config.placing.admission_target_ms = u64::try_from(admission_target.as_millis()).unwrap_or(u64::MAX);
            config.placing.admission_floor = admission_floor;
        })
        .await;

        for (db, name) in [(&orders, "relay-orders"), (&payments, "relay-payments")] {
            // As the relay binary does: a new producer when the current one stopped delivering.
            let new_producer: relay::ProducerFactory = Box::new(move || {
                Ok(kafka::producer_config(&stack().kafka, name, kafka::DEFAULT_DELIVERY_TIMEOUT).create()?)
            });
            let producer: FutureProducer = new_producer().expect("producer");
            let relay = relay::Relay::new(db.pool.clone(), producer, 500).reconnecting_with(new_producer);
            let relay = if options.publish_twice {
                relay.publishing_twice()
            } else {
                relay
            };
            tasks.push(spawn_logged(
                name,
                relay.run(Duration::from_millis(200), shutdown.clone()),
            ));
        }

        let fulfilment_config = fulfilment::Config {
            database_url: Secret::new(fulfilment.url.clone()),
            bootstrap_servers: bootstrap.clone(),
            group_id: format!("fulfilment-{suffix}"),
            orders_topic: orders_topic.clone(),
            migrate: false,
            inbox_retention_hours: 168,
            instance_id: None,
            consumer: Default::default(),
            verifying: crate::event_keys().verifying_args(),
            kafka_auth: stack().kafka_auth(),
            telemetry: Default::default(),
        };
        tasks.push(spawn_logged(
            "fulfilment",
            fulfilment::run(fulfilment_config, shutdown.clone()),
        ));

        let projector_config = order_svc::projector::Config {
            database_url: Secret::new(orders.url.clone()),
            bootstrap_servers: bootstrap.clone(),
            group_id: format!("projector-{suffix}"),
            topics: vec![orders_topic.clone(), payments_topic.clone()],
            instance_id: None,
            inbox_retention_hours: 168,
            consumer: Default::default(),
            verifying: crate::event_keys().verifying_args(),
            kafka_auth: stack().kafka_auth(),
            telemetry: Default::default(),
        };
        tasks.push(spawn_logged(
            "projector",
            order_svc::projector::run(projector_config, shutdown.clone()),
        ));

        let mut saga = Saga {
            orders,
            payments,
            fulfilment,
            gateway,
            orders_topic,
            payments_topic,
            options,
            gateway_addr,
            order_svc: Some(order_svc),
            suffix,
            shutdown,
            tasks,
            payment: None,
        };
        saga.start_payment_svc().await;
        saga
    }

    /// The payment service's consumer group.
    pub fn payment_group(&self) -> String {
        format!("payment-{}", self.suffix)
    }

    /// Starts payment-svc (again).
    pub async fn start_payment_svc(&mut self) {
        let config = payment_svc::Config {
            database_url: Secret::new(self.payments.url.clone()),
            bootstrap_servers: stack().bootstrap_servers.clone(),
            group_id: self.payment_group(),
            orders_topic: self.orders_topic.clone(),
            payments_topic: self.payments_topic.clone(),
            gateway_addr: self.gateway_addr.to_string(),
            gateway_ca: None,
            gateway_client_cert: None,
            gateway_client_key: None,
            gateway_plaintext: true,
            gateway_timeout_ms: u64::try_from(self.options.gateway_timeout.as_millis()).unwrap_or(u64::MAX),
            gateway_concurrency: 64,
            instance_id: None,
            db_max_connections: 8,
            migrate: false,
            inbox_retention_hours: 168,
            max_order_total: Default::default(),
            consumer: orderflow_platform::consumer::ConsumerArgs {
                retry_budget_ms: u64::try_from(self.options.payment_retry_budget.as_millis()).unwrap_or(u64::MAX),
                ..Default::default()
            },
            outbox: Default::default(),
            signing: crate::event_keys().signing_args(orderflow_platform::signing::PAYMENT_SVC),
            verifying: crate::event_keys().verifying_args(),
            kafka_auth: stack().kafka_auth(),
            telemetry: Default::default(),
            authorization_deadline_ms: u64::try_from(self.options.authorization_deadline.as_millis())
                .unwrap_or(u64::MAX),
            sweep_interval_ms: 200,
        };
        let token = CancellationToken::new();
        let task = spawn_logged("payment-svc", payment_svc::run(config, token.clone()));
        self.payment = Some((token, task));
    }

    /// The environment of a payment-svc process of this saga (the crash tests run the binary
    /// with failpoints, so that it can die at a chosen line).
    pub fn payment_svc_env(&self) -> Vec<(&'static str, String)> {
        let auth = stack().kafka_auth();
        let mut env = vec![
            ("PAYMENT_SVC_DATABASE_URL", self.payments.url.clone()),
            ("PAYMENT_SVC_BOOTSTRAP_SERVERS", stack().bootstrap_servers.clone()),
            ("PAYMENT_SVC_GROUP_ID", self.payment_group()),
            ("PAYMENT_SVC_ORDERS_TOPIC", self.orders_topic.clone()),
            ("PAYMENT_SVC_PAYMENTS_TOPIC", self.payments_topic.clone()),
            ("PAYMENT_SVC_GATEWAY_ADDR", self.gateway_addr.to_string()),
            ("PAYMENT_SVC_GATEWAY_PLAINTEXT", "true".into()),
            (
                "PAYMENT_SVC_GATEWAY_TIMEOUT_MS",
                self.options.gateway_timeout.as_millis().to_string(),
            ),
            ("PAYMENT_SVC_MIGRATE", "false".into()),
            ("PAYMENT_SVC_SWEEP_INTERVAL_MS", "200".into()),
            (
                "EVENT_SIGNING_KEY",
                crate::event_keys()
                    .signing_key(orderflow_platform::signing::PAYMENT_SVC)
                    .display()
                    .to_string(),
            ),
            (
                "EVENT_VERIFYING_KEYS",
                crate::event_keys().verifying_keys().display().to_string(),
            ),
            (
                "PAYMENT_SVC_AUTHORIZATION_DEADLINE_MS",
                self.options.authorization_deadline.as_millis().to_string(),
            ),
        ];
        if let (Some(user), Some(password)) = (auth.kafka_username, auth.kafka_password) {
            env.push(("KAFKA_USERNAME", user));
            env.push(("KAFKA_PASSWORD", password.expose().to_owned()));
        }
        env
    }

    /// Stops payment-svc gracefully (it leaves its consumer group).
    pub async fn stop_payment_svc(&mut self) {
        if let Some((token, task)) = self.payment.take() {
            token.cancel();
            task.await.expect("payment-svc stops");
        }
    }

    /// The order service's gRPC address.
    pub fn order_svc_addr(&self) -> std::net::SocketAddr {
        self.order_svc.as_ref().expect("running").addr
    }

    /// A client of the order service.
    pub async fn client(&self) -> OrderServiceClient<tonic::transport::Channel> {
        self.order_svc.as_ref().expect("running").client().await
    }

    /// Places an order of `customer_id` paid with `payment_token`, with a fresh idempotency
    /// key; returns its id.
    pub async fn place(&self, customer_id: i64, payment_token: &str) -> String {
        let request = orderflow::orders::v1::PlaceOrderRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            payment_token: payment_token.into(),
            ..crate::valid_order(customer_id)
        };
        self.client()
            .await
            .place_order(request)
            .await
            .expect("accepted")
            .into_inner()
            .order_id
    }

    /// The stores, for the invariant checker.
    pub fn stores(&self) -> ordersctl::verify::Stores {
        ordersctl::verify::Stores {
            orders: self.orders.pool.clone(),
            payments: self.payments.pool.clone(),
            fulfilment: self.fulfilment.pool.clone(),
            gateway: self.gateway.pool.clone(),
        }
    }

    /// Runs the invariant checker.
    pub async fn verify(&self) -> ordersctl::verify::Report {
        ordersctl::verify::verify(&self.stores(), self.options.deadline, Duration::from_secs(5))
            .await
            .expect("verify")
    }

    /// Waits until the saga is quiet: no order PENDING, the read model agrees with every
    /// order, no authorization is left open at the gateway, and fulfilment has a shipment for
    /// every confirmed order (after an outage it drains its own backlog, at its own pace).
    pub async fn settled(&self, timeout: Duration) -> bool {
        crate::eventually(timeout, || async {
            let (pending, unprojected, confirmed): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM orders WHERE status = $1),
                        (SELECT count(*) FROM orders o LEFT JOIN order_read r USING (order_id)
                         WHERE r.order_id IS NULL OR r.status <> o.status),
                        (SELECT count(*) FROM orders WHERE status = $2)",
            )
            .bind(order_svc::domain::OrderStatus::Pending.as_str())
            .bind(order_svc::domain::OrderStatus::Confirmed.as_str())
            .fetch_one(&self.orders.pool)
            .await
            .expect("count");
            // Every authorization captured (confirmed orders) or voided (cancelled ones).
            let open: i64 = sqlx::query_scalar("SELECT count(*) FROM authorizations WHERE state = $1")
                .bind(gateway_sim::AuthorizationState::Authorized.as_str())
                .fetch_one(&self.gateway.pool)
                .await
                .expect("count");
            let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments")
                .fetch_one(&self.fulfilment.pool)
                .await
                .expect("count");
            pending == 0 && unprojected == 0 && open == 0 && shipped >= confirmed
        })
        .await
    }

    /// Stops everything.
    pub async fn stop(mut self) {
        self.stop_payment_svc().await;
        if let Some(order_svc) = self.order_svc.take() {
            order_svc.stop().await;
        }
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            task.await.expect("component stops cleanly");
        }
    }
}
