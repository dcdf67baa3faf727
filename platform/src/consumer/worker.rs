//! The scheduler and the isolation of failures: which messages form the next unit of work,
//! and what happens when a unit cannot commit.
//!
//! One unit is in flight at a time, so per-key order holds without any lane or lock: a key's
//! messages are in one partition, taken in order, and a unit commits before the next starts.
//!
//! - **A message fails inside a unit** (its handler's effect, or it cannot be opened): the
//!   unit is tried again without it and without its partition's later messages (they wait
//!   for it); its partition becomes *suspect* and its head is next tried alone.
//! - **A message fails alone**: permanently, it is dead-lettered; transiently, its partition
//!   is *parked* and a task of its own retries it with backoff for at most the retry budget,
//!   then dead-letters it. Every other partition flows meanwhile.
//! - **The database is away** (no connection): the same unit is tried again with backoff for
//!   as long as it takes. No message is to blame, none is dead-lettered.
//! - **The unit fails as a whole** otherwise (the commit refused, a statement for all of its
//!   messages failing): transiently, the same unit is tried again with backoff, a few times;
//!   past that, and at once for a permanent failure, it is split in halves until, if one
//!   message is to blame, it is alone (and then retried alone within its budget, or
//!   dead-lettered): a message whose effect keeps failing the whole statement never holds up
//!   the consumer for good.
//! - **Offsets after the effect.** A partition's offset is stored only once the unit (or the
//!   message alone) committed or the message was dead-lettered. Dying anywhere before that
//!   means a redelivery, which the inbox makes a no-op.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::HandlerError;
use super::buffer::{Buffer, PartitionKey, Taken, key_of};
use super::in_flight::{Guard, InFlight};
use super::linger::{Linger, Start};
use super::unit::{Failure, Outcome, offsets_to_store, set_aside};
use super::{Incoming, Progress};
use crate::retry::RetryPolicy;
use crate::telemetry;

/// What a unit of work does to the outside world; the runtime's is Postgres and Kafka, the
/// unit tests' a script.
pub trait Effects: Send + Sync + 'static {
    /// One attempt at `messages` in one transaction ([`super::unit::attempt`]).
    fn attempt(&self, messages: &[Incoming]) -> impl Future<Output = Result<Vec<Outcome>, Failure>> + Send;
    /// Sends `message` to its dead-letter topic, saying why.
    fn dead_letter(
        &self,
        message: &Incoming,
        reason: &str,
        attempts: u32,
        first_failure: SystemTime,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Stores `offset` as done for its partition.
    fn store(&self, topic: &str, partition: i32, offset: i64);
}

/// Attempts of a unit failing as a whole, transiently, before it is halved to find out
/// whether one of its messages is to blame.
const WHOLE_RETRIES: u32 = 3;

/// The bounds of one unit of work.
#[derive(Debug, Clone, Copy)]
pub struct UnitLimits {
    /// Most messages.
    pub max_messages: usize,
    /// Most payload bytes (a single bigger message still goes alone).
    pub max_bytes: usize,
}

/// The worker: takes units from the buffer and sees each through.
pub struct Worker<E> {
    /// Postgres and Kafka, or a script.
    pub effects: Arc<E>,
    /// What the poll thread fetched.
    pub buffer: Arc<Mutex<Buffer>>,
    /// Notified when messages arrive or a partition is released.
    pub wake: Arc<Notify>,
    /// The work in flight, for revokes.
    pub in_flight: Arc<InFlight>,
    /// How big a unit may be.
    pub limits: UnitLimits,
    /// How long a small unit waits to grow.
    pub linger: Linger,
    /// How failures are retried.
    pub retry: RetryPolicy,
    /// The consumer group (metrics, logs).
    pub group: String,
    /// The stall watchdog's clock.
    pub progress: Arc<Progress>,
    /// Stops taking units.
    pub shutdown: CancellationToken,
    /// The parked messages' retry tasks.
    pub tasks: TaskTracker,
}

/// Counts a message in the retrying gauge from its first failure until it is done with.
struct Retrying {
    group: Option<String>,
}

impl Retrying {
    fn start(&mut self, group: &str) {
        if self.group.is_none() {
            metrics::gauge!(telemetry::CONSUMER_RETRYING, "group" => group.to_owned()).increment(1.0);
            self.group = Some(group.to_owned());
        }
    }
}

impl Drop for Retrying {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            metrics::gauge!(telemetry::CONSUMER_RETRYING, "group" => group).decrement(1.0);
        }
    }
}

impl<E: Effects> Worker<E> {
    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes and sees units through until shutdown.
    pub async fn run(self: Arc<Self>) {
        while let Some(taken) = self.next_unit().await {
            let abandon = self.shutdown.child_token();
            let guard = self
                .in_flight
                .enter(taken.partitions().cloned().collect(), abandon.clone());
            if taken.alone {
                self.clone().alone(taken, guard, abandon).await;
            } else {
                self.unit(taken, &abandon).await;
                drop(guard);
            }
        }
    }

    /// Waits for the next unit: as soon as messages are ready, or up to the linger to let a
    /// small unit grow. None at shutdown.
    async fn next_unit(&self) -> Option<Taken> {
        loop {
            // Registered before looking, so that a message arriving in between wakes it.
            let woken = self.wake.notified();
            let start = {
                let mut buffer = self.buffer();
                match buffer.oldest_ready() {
                    None => None,
                    Some(oldest) => match self
                        .linger
                        .start(buffer.ready(), oldest, buffer.arrivals(), Instant::now())
                    {
                        Start::Now => {
                            if let Some(taken) = buffer.take(self.limits.max_messages, self.limits.max_bytes) {
                                return Some(taken);
                            }
                            None
                        }
                        Start::At(at) => Some(at),
                    },
                }
            };
            let linger = async {
                match start {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = woken => {}
                _ = linger => {}
            }
        }
    }

    /// Sees a unit through: commits what can commit together, sets aside what failed.
    async fn unit(&self, taken: Taken, abandon: &CancellationToken) {
        let mut pending = taken.messages.clone();
        let mut backoff = None;
        let mut whole_failures = 0;
        while !pending.is_empty() {
            self.progress.mark();
            let error = match self.effects.attempt(&pending).await {
                Ok(outcomes) => {
                    self.finish(&taken, &pending, &outcomes);
                    return;
                }
                Err(Failure::At(at, error)) => {
                    tracing::debug!(%error, at, messages = pending.len(), "a message failed in its unit; it goes alone");
                    let key = key_of(&pending[at]);
                    let (kept, aside) = set_aside(std::mem::take(&mut pending), at);
                    self.set_aside(&taken, &key, aside);
                    pending = kept;
                    continue;
                }
                Err(Failure::Whole(error)) => {
                    whole_failures += 1;
                    error
                }
                Err(Failure::Unavailable(error)) => error,
            };
            match error {
                HandlerError::Transient(error) if whole_failures <= WHOLE_RETRIES => {
                    metrics::counter!(telemetry::CONSUMER_RETRIES, "group" => self.group.clone()).increment(1);
                    tracing::warn!(
                        error = format!("{error:#}"),
                        messages = pending.len(),
                        "a unit of work failed; retrying it"
                    );
                    let pause = backoff
                        .get_or_insert_with(|| self.retry.backoff())
                        .next()
                        .unwrap_or(self.retry.max);
                    tokio::select! {
                        _ = abandon.cancelled() => {
                            // Revoked or stopping: nothing of it is stored; what is still held
                            // is taken again later.
                            self.buffer().put_back(&taken, pending);
                            return;
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
                error if pending.len() > 1 => {
                    tracing::debug!(%error, messages = pending.len(), "a unit keeps failing as a whole; halving it");
                    let rest = pending.split_off(pending.len() / 2);
                    self.buffer().put_back(&taken, rest);
                    self.wake.notify_one();
                    whole_failures = 0;
                    backoff = None;
                }
                _ => {
                    let key = key_of(&pending[0]);
                    self.set_aside(&taken, &key, std::mem::take(&mut pending));
                }
            }
        }
    }

    /// Puts `aside` (a failed message and its partition's later ones) back, its partition
    /// suspect: its head is tried alone next.
    fn set_aside(&self, taken: &Taken, key: &PartitionKey, aside: Vec<Incoming>) {
        {
            let mut buffer = self.buffer();
            buffer.put_back(taken, aside);
            if let Some(epoch) = taken.epoch_of(key) {
                buffer.suspect(key, epoch);
            }
        }
        self.wake.notify_one();
    }

    /// A suspect partition's head, alone. Done at once, or its partition is parked while a
    /// task of its own retries it (`guard` held until then).
    async fn alone(self: Arc<Self>, taken: Taken, guard: Guard, abandon: CancellationToken) {
        let Some(message) = taken.messages.first().cloned() else {
            return;
        };
        let key = key_of(&message);
        let Some(epoch) = taken.epoch_of(&key) else {
            return;
        };
        self.progress.mark();
        let error = match self.effects.attempt(std::slice::from_ref(&message)).await {
            Ok(outcomes) => {
                self.finish(&taken, std::slice::from_ref(&message), &outcomes);
                self.release(&key, epoch);
                return;
            }
            Err(Failure::At(_, error) | Failure::Whole(error) | Failure::Unavailable(error)) => error,
        };
        // When it failed alone (the dead letter's `dlq.first_failure_at`): stamped once the
        // attempt has failed, never before it ran.
        let first_failure = SystemTime::now();
        self.buffer().park(&key, epoch);
        let worker = self.clone();
        self.tasks.spawn(async move {
            let _guard = guard;
            if worker
                .retry_alone(&taken, &message, error, &abandon, first_failure)
                .await
            {
                worker.release(&key, epoch);
            }
            // Abandoned: its partition was revoked (its queue is gone) or the consumer stops;
            // it stays parked, so nothing after it is handled before it.
        });
    }

    fn release(&self, key: &PartitionKey, epoch: u64) {
        self.buffer().release(key, epoch);
        self.wake.notify_one();
    }

    /// Retries `message` alone until it is processed or dead-lettered (true), or `abandon`
    /// (false: its offset is never stored).
    async fn retry_alone(
        &self,
        taken: &Taken,
        message: &Incoming,
        mut error: HandlerError,
        abandon: &CancellationToken,
        first_failure: SystemTime,
    ) -> bool {
        let started = tokio::time::Instant::now();
        let mut retrying = Retrying { group: None };
        let mut attempts: u32 = 1;
        let mut backoff = self.retry.backoff();
        loop {
            let reason = match error {
                HandlerError::Permanent(reason) => {
                    tracing::error!(%reason, attempts, "message cannot be processed; dead-lettering it");
                    Some(reason)
                }
                HandlerError::Transient(error) if self.retry.exhausted(started) => {
                    let reason = format!(
                        "transient failures for {:.0?} ({attempts} attempts, retry budget {:?}); last: {error:#}",
                        started.elapsed(),
                        self.retry.budget.unwrap_or_default(),
                    );
                    tracing::error!(%reason, "retry budget exhausted; dead-lettering the message");
                    metrics::counter!(telemetry::CONSUMER_BUDGET_EXHAUSTED, "group" => self.group.clone()).increment(1);
                    Some(reason)
                }
                HandlerError::Transient(error) => {
                    retrying.start(&self.group);
                    metrics::counter!(telemetry::CONSUMER_RETRIES, "group" => self.group.clone()).increment(1);
                    tracing::warn!(error = format!("{error:#}"), attempts, "transient failure; retrying");
                    None
                }
            };
            if let Some(reason) = reason {
                match self
                    .effects
                    .dead_letter(message, &reason, attempts, first_failure)
                    .await
                {
                    Ok(()) => {
                        metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => self.group.clone(),
                            "topic" => message.topic.clone(), "outcome" => "dead_lettered")
                        .increment(1);
                        self.store_offsets(taken, std::slice::from_ref(message));
                        return true;
                    }
                    Err(error) => {
                        retrying.start(&self.group);
                        tracing::warn!(%error, "cannot dead-letter yet; retrying");
                    }
                }
            }
            let pause = backoff.next().unwrap_or(self.retry.max);
            tokio::select! {
                _ = abandon.cancelled() => return false,
                _ = tokio::time::sleep(pause) => {}
            }
            attempts += 1;
            self.progress.mark();
            match self.effects.attempt(std::slice::from_ref(message)).await {
                Ok(outcomes) => {
                    self.finish(taken, std::slice::from_ref(message), &outcomes);
                    return true;
                }
                Err(Failure::At(_, next) | Failure::Whole(next) | Failure::Unavailable(next)) => error = next,
            }
        }
    }

    /// A unit committed: counts its messages, then, and only then, stores its offsets.
    fn finish(&self, taken: &Taken, messages: &[Incoming], outcomes: &[Outcome]) {
        fail::fail_point!("consumer::after_commit_before_store", |_| crate::chaos::crash());
        for (message, outcome) in messages.iter().zip(outcomes) {
            metrics::counter!(telemetry::CONSUMER_MESSAGES, "group" => self.group.clone(),
                "topic" => message.topic.clone(), "outcome" => outcome.label())
            .increment(1);
        }
        metrics::histogram!(telemetry::CONSUMER_BATCH_SIZE, "group" => self.group.clone())
            .record(messages.len() as f64);
        // Dying here redelivers the unit, and the inbox absorbs every message of it.
        self.store_offsets(taken, messages);
    }

    fn store_offsets(&self, taken: &Taken, messages: &[Incoming]) {
        for ((topic, partition), offset) in offsets_to_store(messages) {
            self.effects.store(topic, partition, offset);
            let key = (topic.to_owned(), partition);
            let first = taken
                .epoch_of(&key)
                .is_some_and(|epoch| self.buffer().first_done(&key, epoch));
            if first {
                // The chaos harness's failover measure: a partition that moved here flows
                // again from this moment.
                tracing::info!(%topic, partition, offset, "first message handled since the partition was assigned");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::super::buffer::Backpressure;
    use super::*;

    /// What the script does with a message: by its offset, the errors it answers in turn
    /// (then success).
    #[derive(Default)]
    struct Script {
        /// Attempts containing a message with this (partition, offset) fail with these, in
        /// turn: `true` transient, `false` permanent.
        failures: Mutex<HashMap<(i32, i64), Vec<bool>>>,
        /// Every attempt's messages.
        attempts: Mutex<Vec<Vec<(i32, i64)>>>,
        /// When each attempt of a message alone began (wall clock, as the header's).
        alone_started: Mutex<Vec<((i32, i64), SystemTime)>>,
        /// The first failure each dead letter was sent with.
        first_failures: Mutex<Vec<SystemTime>>,
        /// Committed messages, in commit order.
        committed: Mutex<Vec<(i32, i64)>>,
        dead_letters: Mutex<Vec<(i32, i64)>>,
        stored: Mutex<HashMap<i32, i64>>,
        /// Whole-unit transient failures still to answer.
        whole_failures: Mutex<u32>,
        /// Attempts still to find the database away.
        away: Mutex<u32>,
        /// Any attempt holding this message fails as a whole, transiently (a statement for
        /// all of a unit's messages that one of them breaks).
        whole_poison: Option<(i32, i64)>,
    }

    impl Effects for Script {
        async fn attempt(&self, messages: &[Incoming]) -> Result<Vec<Outcome>, Failure> {
            let ids: Vec<(i32, i64)> = messages.iter().map(|m| (m.partition, m.offset)).collect();
            self.attempts.lock().unwrap().push(ids.clone());
            if ids.len() == 1 {
                self.alone_started.lock().unwrap().push((ids[0], SystemTime::now()));
            }
            {
                let mut away = self.away.lock().unwrap();
                if *away > 0 {
                    *away -= 1;
                    return Err(Failure::Unavailable(HandlerError::Transient(anyhow::anyhow!(
                        "no connection"
                    ))));
                }
            }
            if self.whole_poison.is_some_and(|poison| ids.contains(&poison)) {
                return Err(Failure::Whole(HandlerError::Transient(anyhow::anyhow!(
                    "a trigger refuses it"
                ))));
            }
            {
                let mut whole = self.whole_failures.lock().unwrap();
                if *whole > 0 {
                    *whole -= 1;
                    return Err(Failure::Whole(HandlerError::Transient(anyhow::anyhow!(
                        "postgres away"
                    ))));
                }
            }
            for (at, id) in ids.iter().enumerate() {
                if let Some(failures) = self.failures.lock().unwrap().get_mut(id)
                    && !failures.is_empty()
                {
                    let error = if failures.remove(0) {
                        HandlerError::Transient(anyhow::anyhow!("dependency away"))
                    } else {
                        HandlerError::Permanent("poison".into())
                    };
                    // A failure takes time (a statement refused), so that "stamped before the
                    // attempt" and "after its failure" are told apart by the wall clock.
                    std::thread::sleep(Duration::from_millis(2));
                    return Err(Failure::At(at, error));
                }
            }
            self.committed.lock().unwrap().extend(ids);
            Ok(vec![Outcome::Processed; messages.len()])
        }

        async fn dead_letter(
            &self,
            message: &Incoming,
            _: &str,
            _: u32,
            first_failure: SystemTime,
        ) -> anyhow::Result<()> {
            self.first_failures.lock().unwrap().push(first_failure);
            self.dead_letters
                .lock()
                .unwrap()
                .push((message.partition, message.offset));
            Ok(())
        }

        fn store(&self, _topic: &str, partition: i32, offset: i64) {
            let mut stored = self.stored.lock().unwrap();
            let previous = stored.insert(partition, offset);
            assert!(previous.is_none_or(|p| p < offset), "offsets only move forward");
        }
    }

    fn message(partition: i32, offset: i64) -> Incoming {
        super::super::test_message("t", partition, offset)
    }

    fn worker(script: Arc<Script>, messages: &[(i32, i64)]) -> Arc<Worker<Script>> {
        let mut buffer = Buffer::new(Backpressure {
            pause_at: 1_000,
            resume_at: 10,
        });
        for &(partition, offset) in messages {
            buffer.push(message(partition, offset), Instant::now());
        }
        Arc::new(Worker {
            effects: script,
            buffer: Arc::new(Mutex::new(buffer)),
            wake: Arc::new(Notify::new()),
            in_flight: Arc::default(),
            limits: UnitLimits {
                max_messages: 100,
                max_bytes: usize::MAX,
            },
            linger: Linger {
                max_wait: Duration::ZERO,
                enough: 1,
            },
            retry: RetryPolicy {
                budget: Some(Duration::from_secs(60)),
                first: Duration::from_millis(50),
                max: Duration::from_secs(5),
            },
            group: "test".into(),
            progress: Arc::new(Progress::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Runs the worker until every message of `expected` partitions' offsets is stored.
    async fn run_until_stored(worker: &Arc<Worker<Script>>, script: &Script, expected: &[(i32, i64)]) {
        let running = tokio::spawn(worker.clone().run());
        for _ in 0..100_000 {
            if expected
                .iter()
                .all(|(p, o)| script.stored.lock().unwrap().get(p) == Some(o))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worker.shutdown.cancel();
        running.await.unwrap();
        worker.tasks.close();
        worker.tasks.wait().await;
        for (p, o) in expected {
            assert_eq!(
                script.stored.lock().unwrap().get(p),
                Some(o),
                "partition {p} done to {o}"
            );
        }
    }

    fn partition_order(committed: &[(i32, i64)], partition: i32) -> Vec<i64> {
        committed
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn messages_of_every_partition_commit_in_one_unit() {
        let script = Arc::new(Script::default());
        let all = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)];
        let worker = worker(script.clone(), &all);
        run_until_stored(&worker, &script, &[(0, 1), (1, 0), (2, 1)]).await;
        assert_eq!(script.attempts.lock().unwrap().len(), 1, "one transaction");
    }

    #[tokio::test(start_paused = true)]
    async fn a_poison_message_is_dead_lettered_alone_and_its_neighbours_commit_once() {
        let script = Arc::new(Script::default());
        script.failures.lock().unwrap().insert((0, 1), vec![false, false]);
        let all = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)];
        let worker = worker(script.clone(), &all);
        run_until_stored(&worker, &script, &[(0, 2), (1, 1)]).await;
        assert_eq!(*script.dead_letters.lock().unwrap(), [(0, 1)]);
        // Its first failure is when its first attempt alone had failed, never before that
        // attempt began (the header once said the moment the worker picked it up).
        let started = script
            .alone_started
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _)| *id == (0, 1))
            .expect("the poison message was attempted alone")
            .1;
        let first_failure = script.first_failures.lock().unwrap()[0];
        assert!(
            first_failure >= started + Duration::from_millis(2),
            "dlq.first_failure_at {first_failure:?} is after the failed attempt that began at {started:?}"
        );
        let committed = script.committed.lock().unwrap().clone();
        assert_eq!(
            partition_order(&committed, 0),
            [0, 2],
            "in order, the poison one left out"
        );
        assert_eq!(partition_order(&committed, 1), [0, 1]);
        assert_eq!(committed.len(), 4, "no neighbour committed twice");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_retrying_holds_up_only_its_partition() {
        let script = Arc::new(Script::default());
        // Fails transiently inside the unit, alone, and on three retries.
        script
            .failures
            .lock()
            .unwrap()
            .insert((0, 0), vec![true, true, true, true, true]);
        let worker = worker(script.clone(), &[(0, 0), (0, 1), (1, 0)]);
        // Partition 1 arrives later, while partition 0 is parked.
        let late = {
            let worker = worker.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                worker.buffer().push(message(1, 1), Instant::now());
                worker.wake.notify_one();
            })
        };
        run_until_stored(&worker, &script, &[(0, 1), (1, 1)]).await;
        late.await.unwrap();
        let committed = script.committed.lock().unwrap().clone();
        assert_eq!(partition_order(&committed, 0), [0, 1], "its partition waited for it");
        let first_of_0 = committed.iter().position(|m| *m == (0, 0)).unwrap();
        let late_of_1 = committed.iter().position(|m| *m == (1, 1)).unwrap();
        assert!(
            late_of_1 < first_of_0,
            "partition 1 flowed while partition 0 retried: {committed:?}"
        );
        assert!(script.dead_letters.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_failing_past_its_budget_is_dead_lettered_and_its_partition_flows() {
        let script = Arc::new(Script::default());
        script.failures.lock().unwrap().insert((0, 0), vec![true; 10_000]);
        let worker = worker(script.clone(), &[(0, 0), (0, 1)]);
        run_until_stored(&worker, &script, &[(0, 1)]).await;
        assert_eq!(*script.dead_letters.lock().unwrap(), [(0, 0)]);
        assert_eq!(*script.committed.lock().unwrap(), [(0, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_unit_that_fails_as_a_whole_for_a_moment_is_retried_whole_and_nothing_is_dead_lettered() {
        let script = Arc::new(Script::default());
        *script.whole_failures.lock().unwrap() = WHOLE_RETRIES;
        let worker = worker(script.clone(), &[(0, 0), (1, 0)]);
        run_until_stored(&worker, &script, &[(0, 0), (1, 0)]).await;
        assert!(script.dead_letters.lock().unwrap().is_empty());
        let attempts = script.attempts.lock().unwrap().clone();
        assert_eq!(attempts.len(), 4);
        assert!(
            attempts.iter().all(|a| a.len() == 2),
            "always the whole unit: {attempts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_away_for_minutes_is_waited_for_whole_and_nothing_is_dead_lettered() {
        let script = Arc::new(Script::default());
        // 40 attempts, backing off to 5 s and more: minutes, past the 60 s retry budget.
        *script.away.lock().unwrap() = 40;
        let worker = worker(script.clone(), &[(0, 0), (1, 0)]);
        run_until_stored(&worker, &script, &[(0, 0), (1, 0)]).await;
        assert!(script.dead_letters.lock().unwrap().is_empty());
        let attempts = script.attempts.lock().unwrap().clone();
        assert!(attempts.iter().all(|a| a.len() == 2), "never halved: {attempts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_keeps_failing_its_whole_unit_is_found_and_dead_lettered_alone() {
        let script = Arc::new(Script {
            whole_poison: Some((1, 1)),
            ..Script::default()
        });
        let all = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)];
        let worker = worker(script.clone(), &all);
        run_until_stored(&worker, &script, &[(0, 1), (1, 2), (2, 0)]).await;
        assert_eq!(*script.dead_letters.lock().unwrap(), [(1, 1)], "only the culprit");
        let committed = script.committed.lock().unwrap().clone();
        assert_eq!(partition_order(&committed, 1), [0, 2]);
        assert_eq!(committed.len(), 5, "every neighbour committed once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_retry_never_stores_its_offset_nor_lets_its_partition_move_on() {
        let script = Arc::new(Script::default());
        script.failures.lock().unwrap().insert((0, 0), vec![true; 10_000]);
        let worker = worker(script.clone(), &[(0, 0), (0, 1)]);
        let running = tokio::spawn(worker.clone().run());
        tokio::time::sleep(Duration::from_millis(500)).await;
        worker.in_flight.abandon(&[("t".to_owned(), 0)]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        worker.shutdown.cancel();
        running.await.unwrap();
        worker.tasks.close();
        worker.tasks.wait().await;
        assert!(script.stored.lock().unwrap().is_empty(), "nothing stored");
        assert!(
            script.committed.lock().unwrap().is_empty(),
            "(0, 1) never passed (0, 0)"
        );
    }
}
