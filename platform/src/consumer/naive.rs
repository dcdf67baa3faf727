//! The consumer runtime's seams for the naive build (`naive` feature): the textbook
//! consumer's two mistakes, kept out of the production path. Without the feature this
//! module does not exist and the runtime calls the inbox and its effects directly.
//!
//! - **No inbox**: [`record_all`] stands in for [`crate::inbox::record_all`] in the unit of
//!   work and records nothing, so every redelivery takes effect again.
//! - **Offsets before work**: [`StoreFirst`] wraps the real effects and stores each
//!   message's offset before attempting it, so dying during the work loses the message.
//!   Units shrink to one message ([`unit_size`]), so that what it loses is what the textbook
//!   consumer loses, no more.
//!
//! Each acts only while [`crate::naive::active`]; otherwise it hands over to the real step.

use std::collections::HashSet;
use std::time::SystemTime;

use super::Incoming;
use super::unit::{Failure, Outcome};
use super::worker::Effects;

/// The inbox step of the unit of work: in naive mode every id counts as first seen.
pub(super) async fn record_all(
    tx: &mut sqlx::PgConnection,
    consumer: &str,
    message_ids: &[uuid::Uuid],
) -> Result<HashSet<uuid::Uuid>, sqlx::Error> {
    if crate::naive::active() {
        Ok(message_ids.iter().copied().collect())
    } else {
        crate::inbox::record_all(tx, consumer, message_ids).await
    }
}

/// The most messages in a unit: one in naive mode, `configured` otherwise.
pub(super) fn unit_size(configured: usize) -> usize {
    if crate::naive::active() { 1 } else { configured }
}

/// The real effects, with each offset stored before its work in naive mode.
pub(super) struct StoreFirst<E>(pub E);

impl<E: Effects> Effects for StoreFirst<E> {
    async fn attempt(&self, messages: &[Incoming]) -> Result<Vec<Outcome>, Failure> {
        if crate::naive::active() {
            for message in messages {
                self.0.store(&message.topic, message.partition, message.offset);
            }
        }
        self.0.attempt(messages).await
    }

    async fn dead_letter(
        &self,
        message: &Incoming,
        reason: &str,
        attempts: u32,
        first_failure: SystemTime,
    ) -> anyhow::Result<()> {
        self.0.dead_letter(message, reason, attempts, first_failure).await
    }

    fn store(&self, topic: &str, partition: i32, offset: i64) {
        self.0.store(topic, partition, offset);
    }
}
