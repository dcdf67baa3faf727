//! One unit of work of inventory: every order event of the unit, decided in message order over
//! the reservations and stock counts it locked once, written back with one statement per
//! table. The caller (the consumer's handler) owns the transaction, the inbox rows and the
//! outbox; this module owns the locks and the counts.
//!
//! Failure windows: everything here runs inside the unit's transaction. Dying anywhere before
//! the commit leaves nothing (the messages are redelivered and decided again over the same
//! counts); after it, the inbox rows make the redelivery a no-op.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, Command, DomainError, Event, Reservation, ReservationState};
use crate::store::{self, StoreError, Written};

/// What one message of the unit asks for one order.
#[derive(Debug, Clone)]
pub struct Asked {
    /// The order.
    pub order_id: Uuid,
    /// What inventory is to do.
    pub command: Command,
}

/// What the unit decided for one message, in the unit's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    /// The order.
    pub order_id: Uuid,
    /// Its events (none for a duplicate or a late event).
    pub events: Vec<Event>,
    /// Until when a reservation this message made is held.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Why a unit failed.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// The store failed: the whole unit (no one message is to blame).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The reservations' time to live does not fit the calendar: a setting to refuse at
    /// start-up ([`crate::handler::InventoryHandler::new`] does).
    #[error("a reservation time to live of {0:?} does not fit the calendar")]
    TtlOutOfRange(Duration),
    /// The message at this index cannot be honoured (a confirmation of an order inventory
    /// never heard of): permanent, for that message alone.
    #[error("message {index}: {error}")]
    Refused {
        /// Which message of the unit.
        index: usize,
        /// Why.
        error: DomainError,
    },
}

/// The expiry sweeper's pass, inside `tx`: releases at most `limit` reservations held past
/// their deadline (skipping any a unit is deciding) and returns what it decided, one entry per
/// reservation, for the caller to publish (StockReleased, EXPIRED). Dying before the commit
/// leaves them held; the next pass takes them.
pub async fn expire_due(tx: &mut PgConnection, limit: i64) -> Result<Vec<Decided>, UnitError> {
    let reservations = store::lock_due_reservations(tx, limit).await?;
    let due: BTreeSet<Uuid> = reservations.keys().copied().collect();
    let asked: Vec<Asked> = due
        .into_iter()
        .map(|order_id| Asked {
            order_id,
            command: Command::Expire,
        })
        .collect();
    // A sweep reserves nothing: the time to live a unit gives new reservations is not used.
    decide_locked(tx, reservations, &asked, Duration::ZERO).await
}

/// Decides `asked` (the unit's messages, in order) and writes the result, inside `tx`.
/// Reservations are held for `ttl` from the transaction's time.
pub async fn decide_and_write(
    tx: &mut PgConnection,
    asked: &[Asked],
    ttl: Duration,
) -> Result<Vec<Decided>, UnitError> {
    let orders: BTreeSet<Uuid> = asked.iter().map(|a| a.order_id).collect();
    let reservations = store::lock_reservations(tx, &orders).await?;
    decide_locked(tx, reservations, asked, ttl).await
}

/// Decides `asked` over `reservations` (every one of their orders, locked by the caller), the
/// stock they may change (locked here) and writes the result.
async fn decide_locked(
    tx: &mut PgConnection,
    mut reservations: HashMap<Uuid, Reservation>,
    asked: &[Asked],
    ttl: Duration,
) -> Result<Vec<Decided>, UnitError> {
    let existing: BTreeSet<Uuid> = reservations.keys().copied().collect();
    // Only the stock the unit may change: what new orders ask for, and what reservations hold
    // or had (an expired one may be taken again). Every other row stays unlocked for the
    // units beside this one.
    let skus = asked
        .iter()
        .filter(|a| !reservations.contains_key(&a.order_id))
        .filter_map(|a| match &a.command {
            Command::Reserve(demand) => Some(demand),
            _ => None,
        })
        .chain(
            reservations
                .values()
                .filter(|r| {
                    matches!(
                        r.state,
                        ReservationState::Reserved | ReservationState::Committed | ReservationState::Expired
                    )
                })
                .map(|r| &r.demand),
        )
        .flat_map(|demand| demand.lines().map(|(sku, _)| sku.clone()))
        .collect();
    let before = store::lock_stock(tx, &skus).await?;
    let mut stock = before.clone();
    let now = store::now(tx).await?;
    let expires_at = chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_add_signed(ttl))
        .ok_or(UnitError::TtlOutOfRange(ttl))?;

    // In order id order: the new rows are inserted in it, like every lock on the table.
    let mut changed: BTreeMap<Uuid, Option<DateTime<Utc>>> = BTreeMap::new();
    let mut decided = Vec::with_capacity(asked.len());
    for (index, Asked { order_id, command }) in asked.iter().enumerate() {
        let events = domain::decide(reservations.get(order_id), &stock, command.clone())
            .map_err(|error| UnitError::Refused { index, error })?;
        let mut held_until = None;
        for event in &events {
            let after = domain::apply(reservations.remove(order_id), &mut stock, event);
            held_until = (after.state == ReservationState::Reserved).then_some(expires_at);
            changed.insert(*order_id, held_until);
            reservations.insert(*order_id, after);
        }
        decided.push(Decided {
            order_id: *order_id,
            events,
            expires_at: held_until,
        });
    }

    store::write_stock(tx, &before, &stock).await?;
    let mut written: Vec<Written<'_>> = Vec::with_capacity(changed.len());
    for (order_id, expires_at) in &changed {
        // Every changed order was just put back in `reservations` by the loop above.
        let Some(reservation) = reservations.get(order_id) else {
            return Err(UnitError::Store(StoreError::Corrupt(format!(
                "the unit lost {order_id}"
            ))));
        };
        written.push(Written {
            order_id: *order_id,
            reservation,
            expires_at: *expires_at,
        });
    }
    store::write_reservations(tx, &existing, &written).await?;
    Ok(decided)
}
