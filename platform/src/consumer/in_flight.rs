//! Which partitions have work in flight (the worker's unit of work, a parked message's
//! retries), so that a revoke can wait for it: a partition is given up only once its work in
//! flight has committed and stored its offsets, or has been abandoned (offsets unstored, so
//! the new owner redelivers it and its inbox absorbs whatever did commit).
//!
//! The revoke callback runs on the poll thread and blocks it on purpose; the work it waits
//! for runs on the async workers.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::buffer::PartitionKey;

struct Entry {
    id: u64,
    partitions: Vec<PartitionKey>,
    abandon: CancellationToken,
}

#[derive(Default)]
struct State {
    next_id: u64,
    entries: Vec<Entry>,
}

/// The work in flight, per partition.
#[derive(Default)]
pub struct InFlight {
    state: Mutex<State>,
    changed: Condvar,
}

/// Work in flight until dropped.
pub struct Guard {
    registry: Arc<InFlight>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        state.entries.retain(|entry| entry.id != self.id);
        self.registry.changed.notify_all();
    }
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers work on `partitions`; `abandon` is cancelled when one of them is revoked and
    /// the work does not finish within the grace.
    pub fn enter(self: &Arc<Self>, partitions: Vec<PartitionKey>, abandon: CancellationToken) -> Guard {
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.entries.push(Entry {
            id,
            partitions,
            abandon,
        });
        Guard {
            registry: self.clone(),
            id,
        }
    }

    fn busy(state: &State, keys: &[PartitionKey]) -> bool {
        state
            .entries
            .iter()
            .any(|entry| entry.partitions.iter().any(|p| keys.contains(p)))
    }

    /// Waits until no work in flight touches `keys`, at most `limit`; whether it is so.
    pub fn wait_idle(&self, keys: &[PartitionKey], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        while Self::busy(&state, keys) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Tells the work in flight on `keys` to stop where it can (a retry's backoff): its
    /// offsets are then never stored.
    pub fn abandon(&self, keys: &[PartitionKey]) {
        for entry in &self.lock().entries {
            if entry.partitions.iter().any(|p| keys.contains(p)) {
                entry.abandon.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(partition: i32) -> PartitionKey {
        ("t".to_owned(), partition)
    }

    #[test]
    fn a_revoke_waits_only_for_work_on_its_partitions() {
        let registry = Arc::new(InFlight::default());
        let token = CancellationToken::new();
        let guard = registry.enter(vec![key(0), key(1)], token.clone());
        assert!(registry.wait_idle(&[key(2)], Duration::ZERO), "partition 2 has no work");
        assert!(!registry.wait_idle(&[key(1)], Duration::from_millis(10)));
        let waiter = {
            let registry = registry.clone();
            std::thread::spawn(move || registry.wait_idle(&[key(1)], Duration::from_secs(10)))
        };
        drop(guard);
        assert!(waiter.join().unwrap_or(false), "the wait ends when the work is done");
    }

    #[test]
    fn abandoning_cancels_only_the_work_on_the_revoked_partitions() {
        let registry = Arc::new(InFlight::default());
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        let _first = registry.enter(vec![key(0)], a.clone());
        let _second = registry.enter(vec![key(1), key(2)], b.clone());
        registry.abandon(&[key(2)]);
        assert!(!a.is_cancelled());
        assert!(b.is_cancelled());
    }
}
