//! The source's side of the runtime: what the poll thread fetched and the worker has not yet
//! taken, one queue per partition, and which unit of work comes next.
//!
//! Pure bookkeeping (no broker, no clock of its own: arrival times are handed in), so every
//! rule here is unit-tested:
//! - **Per-partition order.** A unit takes each partition's messages from the front of its
//!   queue; what it does not finish goes back to the front ([`Buffer::put_back`]), in order.
//! - **Backpressure.** A queue that reaches `pause_at` asks for its partition to be paused at
//!   the broker; once it has drained to `resume_at` it asks for it to be resumed.
//! - **Isolation.** A partition whose message failed inside a unit is *suspect*: its head is
//!   next taken alone. One whose head failed alone and waits for a retry is *parked*: no unit
//!   takes from it until the retry is done with. Its neighbours flow meanwhile.
//! - **Revocation.** A revoked partition's queue is dropped (its new owner reads from the
//!   committed offset); messages of it taken before the revoke are dropped when put back.
//!   Each queue has an epoch, so a partition revoked and assigned again is a new queue.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::Incoming;
use super::linger::Arrivals;

/// A partition: its topic and number.
pub type PartitionKey = (String, i32);

/// When a partition is paused and resumed.
#[derive(Debug, Clone, Copy)]
pub struct Backpressure {
    /// Messages queued for one partition at which it is paused.
    pub pause_at: usize,
    /// Messages queued at or below which a paused partition is resumed.
    pub resume_at: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Its messages join any unit.
    Normal,
    /// Its head failed inside a unit: the head is taken alone next.
    Suspect,
    /// Its head is being retried alone: nothing of it is taken.
    Parked,
}

struct Queue {
    epoch: u64,
    messages: VecDeque<(Incoming, Instant)>,
    paused: bool,
    standing: Standing,
    /// Whether a message of it was done with since it was assigned.
    flowing: bool,
}

/// A unit of work as taken from the buffer: messages of several partitions, each partition's
/// in its order, and the epoch of each partition's queue it came from.
#[derive(Debug)]
pub struct Taken {
    /// The messages, in the order the unit handles them.
    pub messages: Vec<Incoming>,
    /// Whether this is a suspect partition's head, to be handled alone.
    pub alone: bool,
    epochs: BTreeMap<PartitionKey, u64>,
    /// When the oldest of them arrived (what is put back keeps its age).
    arrived: Option<Instant>,
}

impl Taken {
    /// The queue epoch `message`'s partition had when it was taken.
    pub fn epoch_of(&self, key: &PartitionKey) -> Option<u64> {
        self.epochs.get(key).copied()
    }

    /// The partitions it holds messages of.
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionKey> {
        self.epochs.keys()
    }
}

/// The fetched messages not yet taken, per partition.
pub struct Buffer {
    queues: BTreeMap<PartitionKey, Queue>,
    backpressure: Backpressure,
    next_epoch: u64,
    arrivals: Arrivals,
}

/// The partition a message belongs to.
pub fn key_of(message: &Incoming) -> PartitionKey {
    (message.topic.clone(), message.partition)
}

impl Buffer {
    /// An empty buffer.
    pub fn new(backpressure: Backpressure) -> Self {
        Self {
            queues: BTreeMap::new(),
            backpressure,
            next_epoch: 0,
            arrivals: Arrivals::default(),
        }
    }

    fn queue(&mut self, key: PartitionKey) -> &mut Queue {
        let epoch = &mut self.next_epoch;
        self.queues.entry(key).or_insert_with(|| {
            *epoch += 1;
            Queue {
                epoch: *epoch,
                messages: VecDeque::new(),
                paused: false,
                standing: Standing::Normal,
                flowing: false,
            }
        })
    }

    /// Adds a message the poll thread fetched at `at`; true when its partition is to be
    /// paused now (its queue just reached `pause_at`).
    pub fn push(&mut self, message: Incoming, at: Instant) -> bool {
        let pause_at = self.backpressure.pause_at;
        self.arrivals.record(at);
        let queue = self.queue(key_of(&message));
        queue.messages.push_back((message, at));
        if !queue.paused && queue.messages.len() >= pause_at {
            queue.paused = true;
            return true;
        }
        false
    }

    /// The paused partitions whose queue drained to `resume_at`, now counted as resumed: the
    /// caller resumes them at the broker.
    pub fn drained_paused(&mut self) -> Vec<PartitionKey> {
        let resume_at = self.backpressure.resume_at;
        self.queues
            .iter_mut()
            .filter(|(_, queue)| queue.paused && queue.messages.len() <= resume_at)
            .map(|(key, queue)| {
                queue.paused = false;
                key.clone()
            })
            .collect()
    }

    /// Messages a unit could take now (none of a parked partition).
    pub fn ready(&self) -> usize {
        self.takeable().map(|queue| queue.messages.len()).sum()
    }

    /// When the oldest message a unit could take now arrived.
    pub fn oldest_ready(&self) -> Option<Instant> {
        self.takeable()
            .filter_map(|queue| queue.messages.front().map(|(_, at)| *at))
            .min()
    }

    fn takeable(&self) -> impl Iterator<Item = &Queue> {
        self.queues.values().filter(|queue| queue.standing != Standing::Parked)
    }

    /// The next unit of work: a suspect partition's head alone if there is one; otherwise
    /// messages of every partition not parked, one partition after another in turn, each in
    /// its order, up to `max_messages` and `max_bytes` of payload (at least one message when
    /// any is ready). None when nothing is ready.
    pub fn take(&mut self, max_messages: usize, max_bytes: usize) -> Option<Taken> {
        if let Some((key, queue)) = self
            .queues
            .iter_mut()
            .find(|(_, queue)| queue.standing == Standing::Suspect && !queue.messages.is_empty())
        {
            let (message, at) = queue.messages.pop_front()?;
            return Some(Taken {
                messages: vec![message],
                alone: true,
                epochs: BTreeMap::from([(key.clone(), queue.epoch)]),
                arrived: Some(at),
            });
        }
        let mut messages = Vec::new();
        let mut epochs = BTreeMap::new();
        let mut bytes = 0;
        let mut arrived: Option<Instant> = None;
        let max_messages = max_messages.max(1);
        'rounds: loop {
            let mut took_any = false;
            for (key, queue) in self
                .queues
                .iter_mut()
                .filter(|(_, queue)| queue.standing == Standing::Normal)
            {
                let Some((front, _)) = queue.messages.front() else {
                    continue;
                };
                let size = front.payload.len();
                if messages.len() >= max_messages || (!messages.is_empty() && bytes + size > max_bytes) {
                    break 'rounds;
                }
                let Some((message, at)) = queue.messages.pop_front() else {
                    continue;
                };
                arrived = Some(arrived.map_or(at, |oldest| oldest.min(at)));
                bytes += size;
                epochs.insert(key.clone(), queue.epoch);
                messages.push(message);
                took_any = true;
            }
            if !took_any {
                break;
            }
        }
        (!messages.is_empty()).then_some(Taken {
            messages,
            alone: false,
            epochs,
            arrived,
        })
    }

    /// Puts messages of `taken` that were not done with back at the front of their queues, in
    /// their order; those of a partition revoked since (or assigned again: another epoch) are
    /// dropped, their new owner reads them from the committed offset.
    pub fn put_back(&mut self, taken: &Taken, messages: Vec<Incoming>) {
        let arrived = taken.arrived.unwrap_or_else(Instant::now);
        for message in messages.into_iter().rev() {
            let key = key_of(&message);
            if let Some(queue) = self.queues.get_mut(&key)
                && Some(queue.epoch) == taken.epoch_of(&key)
            {
                queue.messages.push_front((message, arrived));
            }
        }
    }

    /// `key`'s head failed inside a unit: it is taken alone next.
    pub fn suspect(&mut self, key: &PartitionKey, epoch: u64) {
        self.set_standing(key, epoch, Standing::Suspect);
    }

    /// `key`'s head is retried alone: nothing of it is taken until [`Buffer::release`].
    pub fn park(&mut self, key: &PartitionKey, epoch: u64) {
        self.set_standing(key, epoch, Standing::Parked);
    }

    /// `key`'s isolated head is done with: its messages join units again.
    pub fn release(&mut self, key: &PartitionKey, epoch: u64) {
        self.set_standing(key, epoch, Standing::Normal);
    }

    fn set_standing(&mut self, key: &PartitionKey, epoch: u64, standing: Standing) {
        if let Some(queue) = self.queues.get_mut(key)
            && queue.epoch == epoch
        {
            queue.standing = standing;
        }
    }

    /// Notes that a message of `key` was done with; true the first time since it was
    /// assigned (the moment a partition that moved here flows again).
    pub fn first_done(&mut self, key: &PartitionKey, epoch: u64) -> bool {
        match self.queues.get_mut(key) {
            Some(queue) if queue.epoch == epoch => !std::mem::replace(&mut queue.flowing, true),
            _ => false,
        }
    }

    /// How often messages arrive.
    pub fn arrivals(&self) -> &Arrivals {
        &self.arrivals
    }

    /// Drops the queues of `keys` (revoked).
    pub fn revoke<'a>(&mut self, keys: impl IntoIterator<Item = &'a PartitionKey>) {
        for key in keys {
            self.queues.remove(key);
        }
    }

    /// Drops every queue (the consumer stops).
    pub fn clear(&mut self) {
        self.queues.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use super::super::test_message as message;

    fn buffer() -> Buffer {
        Buffer::new(Backpressure {
            pause_at: 3,
            resume_at: 1,
        })
    }

    fn offsets(taken: &Taken) -> Vec<(i32, i64)> {
        taken.messages.iter().map(|m| (m.partition, m.offset)).collect()
    }

    #[test]
    fn a_unit_takes_every_partition_in_turn_each_in_its_order() {
        let mut buffer = buffer();
        let now = Instant::now();
        for (partition, offset) in [(0, 10), (0, 11), (0, 12), (1, 5), (2, 7), (2, 8)] {
            buffer.push(message("t", partition, offset), now);
        }
        let taken = buffer.take(100, usize::MAX).unwrap();
        assert_eq!(offsets(&taken), [(0, 10), (1, 5), (2, 7), (0, 11), (2, 8), (0, 12)]);
        assert!(!taken.alone);
        assert!(buffer.take(100, usize::MAX).is_none());
    }

    #[test]
    fn a_unit_stops_at_its_message_and_byte_bounds_but_takes_at_least_one() {
        let mut buffer = buffer();
        let now = Instant::now();
        for offset in 0..5 {
            buffer.push(message("t", 0, offset), now);
        }
        assert_eq!(offsets(&buffer.take(2, usize::MAX).unwrap()), [(0, 0), (0, 1)]);
        // 4 bytes each: 10 bytes hold two.
        assert_eq!(offsets(&buffer.take(100, 10).unwrap()), [(0, 2), (0, 3)]);
        assert_eq!(offsets(&buffer.take(100, 1).unwrap()), [(0, 4)]);
    }

    #[test]
    fn what_a_unit_puts_back_comes_first_again_in_order() {
        let mut buffer = buffer();
        let now = Instant::now();
        for offset in 0..4 {
            buffer.push(message("t", 0, offset), now);
        }
        let taken = buffer.take(3, usize::MAX).unwrap();
        let back = taken.messages[1..].to_vec();
        buffer.put_back(&taken, back);
        assert_eq!(offsets(&buffer.take(10, usize::MAX).unwrap()), [(0, 1), (0, 2), (0, 3)]);
    }

    #[test]
    fn a_suspect_head_goes_alone_and_a_parked_partition_is_left_alone_until_released() {
        let mut buffer = buffer();
        let now = Instant::now();
        for (partition, offset) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            buffer.push(message("t", partition, offset), now);
        }
        let key = ("t".to_owned(), 0);
        let epoch = buffer.take(1, usize::MAX).unwrap().epoch_of(&key).unwrap();
        // (0, 0) taken and failed: put back, suspect.
        buffer.put_back(
            &Taken {
                messages: vec![],
                alone: false,
                epochs: BTreeMap::from([(key.clone(), epoch)]),
                arrived: None,
            },
            vec![message("t", 0, 0)],
        );
        buffer.suspect(&key, epoch);
        let alone = buffer.take(10, usize::MAX).unwrap();
        assert!(alone.alone);
        assert_eq!(offsets(&alone), [(0, 0)]);
        buffer.park(&key, epoch);
        assert_eq!(buffer.ready(), 2, "the parked partition's messages are not ready");
        assert_eq!(offsets(&buffer.take(10, usize::MAX).unwrap()), [(1, 0), (1, 1)]);
        assert!(buffer.take(10, usize::MAX).is_none());
        buffer.release(&key, epoch);
        assert_eq!(offsets(&buffer.take(10, usize::MAX).unwrap()), [(0, 1)]);
    }

    #[test]
    fn a_full_queue_pauses_its_partition_and_resumes_it_once_drained() {
        let mut buffer = buffer();
        let now = Instant::now();
        assert!(!buffer.push(message("t", 0, 0), now));
        assert!(!buffer.push(message("t", 0, 1), now));
        assert!(buffer.push(message("t", 0, 2), now), "the third message pauses");
        assert!(!buffer.push(message("t", 0, 3), now), "paused once");
        assert!(buffer.drained_paused().is_empty());
        buffer.take(3, usize::MAX).unwrap();
        assert_eq!(buffer.drained_paused(), [("t".to_owned(), 0)]);
        assert!(buffer.drained_paused().is_empty());
    }

    #[test]
    fn messages_of_a_revoked_partition_are_dropped_even_when_put_back() {
        let mut buffer = buffer();
        let now = Instant::now();
        buffer.push(message("t", 0, 0), now);
        buffer.push(message("t", 1, 0), now);
        let taken = buffer.take(10, usize::MAX).unwrap();
        let key = ("t".to_owned(), 0);
        buffer.revoke([&key]);
        // Assigned again: a new queue with the message redelivered from the committed offset.
        buffer.push(message("t", 0, 0), now);
        buffer.put_back(&taken, taken.messages.clone());
        let next = buffer.take(10, usize::MAX).unwrap();
        assert_eq!(offsets(&next), [(0, 0), (1, 0)], "the old epoch's copy is not put back");
    }

    #[test]
    fn the_oldest_ready_message_ignores_parked_partitions() {
        let mut buffer = buffer();
        let early = Instant::now();
        let late = early + std::time::Duration::from_millis(5);
        buffer.push(message("t", 0, 0), early);
        buffer.push(message("t", 1, 0), late);
        assert_eq!(buffer.oldest_ready(), Some(early));
        let epoch = buffer.queues[&("t".to_owned(), 0)].epoch;
        buffer.park(&("t".to_owned(), 0), epoch);
        assert_eq!(buffer.oldest_ready(), Some(late));
    }
}
