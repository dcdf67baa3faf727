//! Authentication and access rules on the real brokers (SASL/SCRAM, one principal per
//! service, deploy/kafka/acls.txt): a service can do its own work and nothing else, so the
//! forged OrderPlaced of issue 12's finding 2 is refused at the broker when it comes with
//! payment-svc's credentials, and a stranger reads nothing.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use orderflow_platform::Secret;
use orderflow_platform::kafka::{self, Cluster};
use orderflow_tests::stack;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The stack's cluster as `principal`, with the password the stack gave it.
fn as_principal(principal: &str) -> Cluster {
    let key = format!(
        "ORDERFLOW_KAFKA_PASSWORD_{}",
        principal.replace('-', "_").to_uppercase()
    );
    let password = stack()
        .vars
        .get(&key)
        .unwrap_or_else(|| panic!("{key} missing from .stack/env"));
    Cluster::scram(
        stack().bootstrap_servers.clone(),
        principal,
        Secret::new(password.clone()),
    )
}

/// What the broker answers to one record from `cluster` on `topic`.
async fn produce(cluster: &Cluster, topic: &str) -> Result<(), KafkaError> {
    let producer: FutureProducer = kafka::producer_config(cluster, "acl-test", Duration::from_secs(5))
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(topic).key("forged").payload("not an order".as_bytes()),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
        .map_err(|(error, _)| error)
}

/// Reads `topic` from the start for a moment as `cluster`, in `group` (assigned, not
/// subscribed, committing nothing: the group's members are not disturbed); the first error,
/// if any.
async fn read(cluster: &Cluster, group: &str, topic: &str) -> Result<(), String> {
    let (cluster, group, topic) = (cluster.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka::consumer_config(&cluster, &group, None)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| e.to_string())?;
        // A principal with no right on the topic does not even learn that it exists.
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if let Some(error) = metadata.topics().first().and_then(|t| t.error()) {
            return Err(format!("{:?}", RDKafkaErrorCode::from(error)));
        }
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .map_err(|e| e.to_string())?;
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        for _ in 0..30 {
            if let Some(Err(error)) = consumer.poll(Duration::from_millis(100)) {
                return Err(error.to_string());
            }
        }
        Ok(())
    })
    .await
    .unwrap()
}

fn authorization_failed(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_each_relay_writes_its_topic_and_only_the_owners_write_the_dead_letters() {
    for (principal, topic) in [
        // Finding 2's forgery, with the credentials of the service most tempted to try it.
        ("payment-svc", "orders.events"),
        ("relay-payments", "orders.events"),
        ("relay-orders", "payments.events"),
        ("order-svc", "orders.events"),
        ("projector", "orders.events"),
        ("fulfilment", "payments.events.dlq"),
        ("relay-orders", "orders.events.dlq"),
    ] {
        let refused = produce(&as_principal(principal), topic)
            .await
            .expect_err(&format!("{principal} wrote to {topic}"));
        assert!(authorization_failed(&refused), "{principal} -> {topic}: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_its_own_topics_only() {
    read(&as_principal("payment-svc"), "payment", "orders.events")
        .await
        .expect("payment-svc reads the order events");
    read(&as_principal("projector"), "projector", "payments.events")
        .await
        .expect("the projector reads the payment events");
    for (principal, group, topic) in [
        ("payment-svc", "payment", "payments.events"),
        ("fulfilment", "fulfilment", "payments.events"),
        ("relay-orders", "payment", "orders.events"),
        ("order-svc", "order", "orders.events.dlq"),
        // Its own topic, in another service's group.
        ("fulfilment", "payment", "orders.events"),
    ] {
        let refused = read(&as_principal(principal), group, topic)
            .await
            .expect_err(&format!("{principal} read {topic}"));
        assert!(
            refused.to_lowercase().contains("authoriz"),
            "{principal} -> {topic}: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_wrong_passwords_get_nothing() {
    let bootstrap = stack().bootstrap_servers.clone();
    for (who, cluster) in [
        (
            "an unknown principal",
            Cluster::scram(bootstrap.clone(), "intruder", Secret::new("guess")),
        ),
        (
            "a wrong password",
            Cluster::scram(bootstrap.clone(), "payment-svc", Secret::new("guess")),
        ),
        ("no credentials", Cluster::anonymous(bootstrap.clone())),
    ] {
        let probe = cluster.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            let client: BaseConsumer = probe.client_config().set("group.id", "stranger").create().unwrap();
            client
                .fetch_metadata(Some("orders.events"), Duration::from_secs(5))
                .map(|_| ())
        })
        .await
        .unwrap();
        assert!(metadata.is_err(), "{who} got the cluster's metadata");
        assert!(
            produce(&cluster, "orders.events").await.is_err(),
            "{who} wrote to orders.events"
        );
    }
}
