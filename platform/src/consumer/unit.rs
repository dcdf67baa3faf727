//! The unit of work: one transaction for many messages, here and nowhere else.
//!
//! `begin → one insert of every wanted message's id into the inbox → the handler's effects of
//! those the inbox did not know → commit`; the worker then stores each partition's offsets.
//! A message whose id the inbox knows is a redelivery (a duplicate: no effect). A message the
//! consumer does not want is skipped: no inbox row, no effect, its offset stored with the
//! others. There is no third way to finish a message: a handler either writes its effect in
//! the transaction or fails, so "ignored but half-written" cannot happen.
//!
//! **Per-key order is kept here, not by handlers.** A handler that takes one message of a key
//! at a time ([`super::Handler::ONE_PER_KEY`]) is called in rounds: the first message of every
//! key, then the second of every key that has one, and so on, all in the one transaction, so
//! each round sees the effects of the one before.

use std::collections::{HashMap, HashSet};

use sqlx::PgPool;

// The inbox step. The naive build's seam swaps in one that records nothing (super::naive).
#[cfg(feature = "naive")]
use super::naive::record_all;
use super::{Fresh, Handler, HandlerError, Incoming, message_span};
#[cfg(not(feature = "naive"))]
use crate::inbox::record_all;
use crate::signing::EventVerifier;

/// What became of a message of a committed unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect was committed with its inbox row.
    Processed,
    /// The inbox knew its id: a redelivery, nothing done.
    Duplicate,
    /// An event this consumer does not act on: no inbox row, no effect.
    Skipped,
}

impl Outcome {
    /// The `outcome` label of the messages counter.
    pub fn label(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Duplicate => "duplicate",
            Self::Skipped => "skipped",
        }
    }
}

/// Why an attempt at a unit failed; nothing of it was committed.
#[derive(Debug)]
pub enum Failure {
    /// One message's own handling failed (it cannot be opened, or its effect failed): its
    /// index in the unit.
    At(usize, HandlerError),
    /// The transaction failed as a whole (the inbox insert, the commit, a statement for all
    /// of its messages): no one message is known to be to blame.
    Whole(HandlerError),
    /// The database is away (no connection, or it closed): no message is to blame, and none
    /// should be tried apart.
    Unavailable(HandlerError),
}

/// A failure of the transaction itself: [`Failure::Unavailable`] when the database is away,
/// else [`Failure::Whole`].
fn whole(error: sqlx::Error) -> Failure {
    let away = match &error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // admin_shutdown, crash_shutdown, cannot_connect_now; connection exceptions.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
        _ => false,
    };
    if away {
        Failure::Unavailable(error.into())
    } else {
        Failure::Whole(error.into())
    }
}

/// The rounds of `keys` (each message's key, in unit order): the indices of the first
/// message of every key, then of the second, and so on. Each round holds a key at most once
/// and a key's messages are in successive rounds in their order.
pub fn rounds<K: std::hash::Hash + Eq>(keys: &[K]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<&K, usize> = HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let round = seen.entry(key).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(index);
        *round += 1;
    }
    rounds
}

/// Splits `messages` where message `at` failed: those that may still commit together (every
/// message of another partition, and those of its partition before it), and those set aside
/// (it and its partition's later messages, which must wait for it), each in order.
pub fn set_aside(messages: Vec<Incoming>, at: usize) -> (Vec<Incoming>, Vec<Incoming>) {
    let Some(failed) = messages.get(at) else {
        return (messages, Vec::new());
    };
    let (topic, partition) = (failed.topic.clone(), failed.partition);
    let mut kept = Vec::with_capacity(messages.len());
    let mut aside = Vec::new();
    for (index, message) in messages.into_iter().enumerate() {
        if index >= at && message.topic == topic && message.partition == partition {
            aside.push(message);
        } else {
            kept.push(message);
        }
    }
    (kept, aside)
}

/// The offset to store for each partition of a committed unit: its last message's.
pub fn offsets_to_store(messages: &[Incoming]) -> HashMap<(&str, i32), i64> {
    let mut offsets = HashMap::new();
    for message in messages {
        let offset = offsets
            .entry((message.topic.as_str(), message.partition))
            .or_insert(message.offset);
        *offset = (*offset).max(message.offset);
    }
    offsets
}

/// One attempt at `messages` in one transaction (see the module's documentation); each
/// message's work runs in its `consume` span.
pub async fn attempt<H: Handler>(
    pool: &PgPool,
    handler: &H,
    group: &str,
    verifier: &EventVerifier,
    messages: &[Incoming],
) -> Result<Vec<Outcome>, Failure> {
    let mut outcomes = vec![Outcome::Skipped; messages.len()];
    let mut wanted = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let span = message_span(group, message);
        let event = span
            .in_scope(|| message.open(verifier, group))
            .map_err(|error| Failure::At(index, error))?;
        if handler.wants(&event) {
            wanted.push((index, event, span));
        }
    }
    if wanted.is_empty() {
        return Ok(outcomes);
    }
    let mut tx = pool.begin().await.map_err(whole)?;
    let ids: Vec<uuid::Uuid> = wanted.iter().map(|(_, event, _)| event.message_id).collect();
    let mut first_time: HashSet<uuid::Uuid> = record_all(&mut tx, handler.inbox(), &ids).await.map_err(whole)?;
    let mut fresh = Vec::with_capacity(wanted.len());
    let mut fresh_at = Vec::with_capacity(wanted.len());
    for (index, event, span) in &wanted {
        // The first message with an id the insert recorded is new; any other with that id
        // (twice in this unit, or recorded by an earlier transaction) is a duplicate.
        if first_time.remove(&event.message_id) {
            fresh.push(Fresh {
                message: &messages[*index],
                event,
                span: span.clone(),
            });
            fresh_at.push(*index);
            outcomes[*index] = Outcome::Processed;
        } else {
            outcomes[*index] = Outcome::Duplicate;
        }
    }
    let mut work = Vec::new();
    if H::ONE_PER_KEY {
        let keys: Vec<uuid::Uuid> = fresh.iter().map(|f| f.event.aggregate_id).collect();
        for round in rounds(&keys) {
            let batch: Vec<Fresh<'_>> = round.iter().map(|&at| fresh[at].clone()).collect();
            work.extend(
                handler
                    .handle(&mut tx, &batch)
                    .await
                    .map_err(|(at, error)| match round.get(at) {
                        Some(&index) => Failure::At(fresh_at[index], error),
                        None => Failure::Whole(error),
                    })?,
            );
        }
    } else if !fresh.is_empty() {
        work = handler
            .handle(&mut tx, &fresh)
            .await
            .map_err(|(at, error)| match fresh_at.get(at) {
                Some(&index) => Failure::At(index, error),
                None => Failure::Whole(error),
            })?;
    }
    // Dying before this commit: nothing of the unit exists, every message is redelivered.
    tx.commit().await.map_err(whole)?;
    if !work.is_empty() {
        handler.committed(work);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(partition: i32, offset: i64) -> Incoming {
        super::super::test_message("t", partition, offset)
    }

    #[test]
    fn rounds_keep_each_keys_order_and_never_hold_a_key_twice() {
        let keys = ["a", "b", "a", "c", "a", "b"];
        assert_eq!(rounds(&keys), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
        assert!(rounds::<&str>(&[]).is_empty());
    }

    #[test]
    fn a_failure_sets_aside_its_message_and_its_partitions_later_ones_only() {
        let unit = vec![
            message(0, 1),
            message(1, 1),
            message(0, 2),
            message(1, 2),
            message(0, 3),
        ];
        let (kept, aside) = set_aside(unit, 2);
        let pairs = |v: &[Incoming]| v.iter().map(|m| (m.partition, m.offset)).collect::<Vec<_>>();
        assert_eq!(pairs(&kept), [(0, 1), (1, 1), (1, 2)]);
        assert_eq!(pairs(&aside), [(0, 2), (0, 3)]);
    }

    #[test]
    fn each_partition_stores_its_last_offset() {
        let unit = vec![message(0, 7), message(1, 3), message(0, 8)];
        let offsets = offsets_to_store(&unit);
        assert_eq!(offsets[&("t", 0)], 8);
        assert_eq!(offsets[&("t", 1)], 3);
    }
}
