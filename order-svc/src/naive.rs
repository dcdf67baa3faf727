//! The chaos harness's "before" column only, compiled in only with the `naive` feature (and
//! used only with `ORDERFLOW_NAIVE=true`): PlaceOrder publishes its event itself after the
//! commit (the textbook dual write) instead of writing the outbox row. If that publish fails
//! or the process dies before it, the event is lost and nothing retries it: the damage the
//! chaos harness shows beside the outbox.

use std::time::Duration;

use orderflow_platform::outbox::OutboxMessage;
use orderflow_platform::signing::EventSigner;

use crate::api::ApiError;

/// A plain producer with a 5 s delivery timeout, as a textbook dual write would have.
#[derive(Clone)]
pub struct DualWrite {
    producer: rdkafka::producer::FutureProducer,
    signer: EventSigner,
}

impl std::fmt::Debug for DualWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DualWrite")
    }
}

impl DualWrite {
    /// The dual write, when this process runs naive and has a broker to write to.
    pub fn from_config(config: &crate::Config, signer: &EventSigner) -> anyhow::Result<Option<Self>> {
        let Some(servers) = config
            .bootstrap_servers
            .as_ref()
            .filter(|_| orderflow_platform::naive::active())
        else {
            return Ok(None);
        };
        let producer = orderflow_platform::kafka::Cluster::new(servers.clone(), &config.kafka_auth)
            .client_config()
            .set("message.timeout.ms", "5000")
            .create()?;
        tracing::warn!("NAIVE MODE: PlaceOrder publishes directly (dual write), no outbox");
        Ok(Some(Self {
            producer,
            signer: signer.clone(),
        }))
    }

    /// Publishes `event` (its order is committed already).
    pub async fn publish(&self, event: &OutboxMessage) -> Result<(), ApiError> {
        let envelope = &event.envelope;
        let payload = self.signer.seal(envelope);
        let version = envelope.schema_version.to_string();
        let headers =
            orderflow_platform::outbox::record_headers(&envelope.message_id, &envelope.event_type, &version, None);
        let record = rdkafka::producer::FutureRecord::to(&event.topic)
            .key(&envelope.aggregate_id)
            .payload(&payload)
            .headers(headers);
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(drop)
            .map_err(|(error, _)| ApiError::Unavailable(format!("publish failed: {error}")))
    }
}
