//! The polling relay's batches in flight: claimed, handed to the producer, their
//! acknowledgements outstanding; settled (marked published) strictly in the order they were
//! claimed.
//!
//! Why: a relay that waits for one batch's acknowledgements (the producer's linger and a
//! broker round trip with `acks=all`) before it looks for the next makes every row committed
//! meanwhile wait for that whole round, then for its own. With batches in flight the next
//! claim goes out while the broker still has the last one.
//!
//! What keeps per-key order and at-least-once:
//! - a claim leaves out the rows in flight ([`Pipeline::in_flight_ids`]): they stay
//!   unpublished until settled, and a second claim of them would publish them twice, a
//!   key's later row between its two copies;
//! - a key has records in one batch in flight at most ([`Pipeline::admit`]): a row of a key
//!   already in flight is held back, with the key's later rows, until that batch settles.
//!   The producer keeps the order of a partition's records, but when an outage outlasts a
//!   record's delivery timeout, librdkafka fails it and may still write the records queued
//!   after it (a gap, even with idempotence): a key's later row, sent seconds later in
//!   another batch, could reach consumers before the earlier one, and the earlier one's
//!   second copy would then come after it. Inside one batch a key's records are queued
//!   within the same moment and time out together;
//! - batches settle in claim order, and a key whose row failed is blocked for the rest of the
//!   drain: a later row of it, acknowledged in a later batch, is not marked either
//!   ([`Pipeline::marks`]), so the next drain publishes the key's rows again from the failed
//!   one, in id order;
//! - after a failure the relay claims nothing more, lets the batches in flight settle, and
//!   backs off.

use std::collections::{HashSet, VecDeque};

use futures::future::BoxFuture;

/// One batch handed to the producer.
pub(crate) struct InFlight<Row> {
    pub ids: Vec<i64>,
    /// The partition keys of its rows.
    pub keys: HashSet<String>,
    pub rows: Vec<Row>,
    /// One result per row, in the rows' order, once every record of the batch was
    /// acknowledged or failed.
    pub acknowledgements: BoxFuture<'static, Vec<Result<(), String>>>,
}

/// A batch whose records all have an answer from the broker.
pub(crate) struct Settled<Row> {
    pub ids: Vec<i64>,
    pub rows: Vec<Row>,
    pub results: Vec<Result<(), String>>,
}

/// The batches in flight, oldest first, and the keys blocked by a failure.
pub(crate) struct Pipeline<Row> {
    depth: usize,
    batches: VecDeque<InFlight<Row>>,
    blocked: HashSet<String>,
}

impl<Row> Pipeline<Row> {
    /// At most `depth` batches in flight (at least one).
    pub fn new(depth: usize) -> Self {
        Self {
            depth: depth.max(1),
            batches: VecDeque::new(),
            blocked: HashSet::new(),
        }
    }

    /// How many rows the next claim may take: none with `depth` batches in flight, and never
    /// more than `batch_size` rows in flight in all. Under a backlog, batches are full and one
    /// is in flight at a time (pipelining buys a drain little; it is bound by Postgres); under
    /// a steady stream, batches are small and up to `depth` of them overlap. The bound also
    /// keeps the claim's exclusion list, which Postgres checks row by row, short.
    pub fn room(&self, batch_size: usize) -> usize {
        if self.batches.len() >= self.depth {
            return 0;
        }
        batch_size.saturating_sub(self.batches.iter().map(|batch| batch.ids.len()).sum())
    }

    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Ids of every row claimed and not yet settled: the next claim must leave them out.
    pub fn in_flight_ids(&self) -> Vec<i64> {
        self.batches
            .iter()
            .flat_map(|batch| batch.ids.iter().copied())
            .collect()
    }

    /// Splits a claim (rows in id order) into the rows that may go to the producer now and
    /// whether any was held back: a row whose key has a row in flight waits, and so do the
    /// later rows of its key (the key's order), for that batch to settle.
    pub fn admit<Claimed>(&self, rows: Vec<Claimed>, key: impl Fn(&Claimed) -> &str) -> (Vec<Claimed>, bool) {
        let claimed = rows.len();
        let admitted: Vec<Claimed> = rows
            .into_iter()
            .filter(|row| !self.batches.iter().any(|batch| batch.keys.contains(key(row))))
            .collect();
        let held_back = admitted.len() < claimed;
        (admitted, held_back)
    }

    pub fn push(&mut self, batch: InFlight<Row>) {
        self.batches.push_back(batch);
    }

    /// Waits for the oldest batch's answers and takes it out; None with nothing in flight.
    /// A later batch answered first waits its turn: marks are made in claim order. Safe to
    /// cancel (in a `select!`): the batch is taken out only in the poll that completes.
    pub async fn next_settled(&mut self) -> Option<Settled<Row>> {
        let oldest = self.batches.front_mut()?;
        let results = (&mut oldest.acknowledgements).await;
        let batch = self.batches.pop_front()?;
        Some(Settled {
            ids: batch.ids,
            rows: batch.rows,
            results,
        })
    }

    /// Which rows of a settled batch (their keys, in id order, and the broker's answers) may
    /// be marked published: an acknowledged row, unless an earlier row of its key, in this
    /// batch or an earlier one of the drain, was not. Marking it would leave the earlier row
    /// to be published on a later pass, after it: the key's events out of order on the topic
    /// for good. Unmarked, both go out again, in order, and consumers' inboxes absorb the
    /// repeated one.
    pub fn marks<'a>(&mut self, rows: impl IntoIterator<Item = (&'a str, bool)>) -> Vec<bool> {
        rows.into_iter()
            .map(|(key, acknowledged)| {
                if !acknowledged {
                    self.blocked.insert(key.to_owned());
                }
                acknowledged && !self.blocked.contains(key)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{InFlight, Pipeline};
    use futures::FutureExt as _;

    fn batch(ids: &[i64], answers: tokio::sync::oneshot::Receiver<Vec<Result<(), String>>>) -> InFlight<()> {
        InFlight {
            ids: ids.to_vec(),
            keys: ids.iter().map(|id| format!("key-{id}")).collect(),
            rows: vec![(); ids.len()],
            acknowledgements: async move { answers.await.unwrap() }.boxed(),
        }
    }

    #[test]
    fn a_row_after_a_failed_row_of_its_key_is_not_marked() {
        let mut pipeline = Pipeline::<()>::new(1);
        let rows = [
            ("a", true),
            ("b", false),
            ("a", true),
            ("b", true),
            ("c", true),
            ("b", true),
        ];
        assert_eq!(pipeline.marks(rows), [true, false, true, false, true, false]);
    }

    #[test]
    fn a_row_before_the_failure_of_its_key_is_marked() {
        let mut pipeline = Pipeline::<()>::new(1);
        assert_eq!(
            pipeline.marks([("a", true), ("a", false), ("a", true)]),
            [true, false, false]
        );
        assert_eq!(Pipeline::<()>::new(1).marks([("a", true), ("b", true)]), [true, true]);
    }

    #[test]
    fn a_failure_blocks_its_key_in_the_batches_after_it() {
        let mut pipeline = Pipeline::<()>::new(4);
        assert_eq!(pipeline.marks([("a", false), ("b", true)]), [false, true]);
        // The next batch was already on its way: its row of `a` was acknowledged, and is
        // still not marked (it would be ahead of the failed one for good).
        assert_eq!(pipeline.marks([("a", true), ("b", true)]), [false, true]);
    }

    #[test]
    fn claims_leave_out_every_row_in_flight_and_stop_at_the_depth_or_a_batch_of_rows() {
        let mut pipeline = Pipeline::new(2);
        assert_eq!(pipeline.room(10), 10);
        let (_first, answers) = tokio::sync::oneshot::channel();
        pipeline.push(batch(&[1, 2], answers));
        assert_eq!(pipeline.room(10), 8, "a batch's worth of rows in flight at most");
        assert_eq!(pipeline.room(2), 0, "a full batch in flight: wait for it");
        let (_second, answers) = tokio::sync::oneshot::channel();
        pipeline.push(batch(&[4], answers));
        assert_eq!(pipeline.room(10), 0, "two batches in flight, the depth");
        assert_eq!(pipeline.in_flight_ids(), [1, 2, 4]);
        assert_eq!(Pipeline::<()>::new(0).room(10), 10, "a depth of 0 would claim nothing");
    }

    #[tokio::test]
    async fn batches_settle_in_claim_order_even_when_a_later_one_is_answered_first() {
        let mut pipeline = Pipeline::new(2);
        let (first, answers) = tokio::sync::oneshot::channel();
        pipeline.push(batch(&[1], answers));
        let (second, answers) = tokio::sync::oneshot::channel();
        pipeline.push(batch(&[2], answers));

        second.send(vec![Ok(())]).unwrap();
        assert!(
            pipeline.next_settled().now_or_never().is_none(),
            "the first batch has no answer yet"
        );
        assert_eq!(pipeline.len(), 2, "a cancelled wait takes nothing out");

        first.send(vec![Err("refused".to_owned())]).unwrap();
        let settled = pipeline.next_settled().await.unwrap();
        assert_eq!(
            (settled.ids, settled.results),
            (vec![1], vec![Err("refused".to_owned())])
        );
        let settled = pipeline.next_settled().await.unwrap();
        assert_eq!(settled.ids, [2]);
        assert!(pipeline.next_settled().await.is_none());
        assert!(pipeline.is_empty());
    }

    #[test]
    fn a_key_in_flight_waits_with_its_later_rows_and_the_other_keys_go() {
        let mut pipeline = Pipeline::new(4);
        let (_answers, receiver) = tokio::sync::oneshot::channel();
        pipeline.push(batch(&[1], receiver));
        // Rows of a claim: (key, id). key-1 is in flight (batch [1]).
        let claimed = vec![("key-2", 5), ("key-1", 6), ("key-3", 7), ("key-1", 8)];
        let (admitted, held_back) = pipeline.admit(claimed, |row| row.0);
        assert_eq!(admitted, [("key-2", 5), ("key-3", 7)]);
        assert!(held_back, "the relay must claim again once key-1's batch settles");
        let (admitted, held_back) = pipeline.admit(vec![("key-2", 9)], |row| row.0);
        assert_eq!((admitted, held_back), (vec![("key-2", 9)], false));
    }
}
