//! One unit of work of inventory: every order event of the unit, decided in message order over
//! the reservations and stock counts it locked once, written back with one statement per
//! table. The caller (the consumer's handler) owns the transaction, the inbox rows and the
//! outbox; this module owns the locks and the counts.
//!
//! Failure windows: everything here runs inside the unit's transaction. Dying anywhere before
//! the commit leaves nothing (the messages are redelivered and decided again over the same
//! counts); after it, the inbox rows make the redelivery a no-op.

use std::collections::{BTreeSet, HashMap};
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

/// Decides `asked` (the unit's messages, in order) and writes the result, inside `tx`.
/// Reservations are held for `ttl` from the transaction's time.
pub async fn decide_and_write(
    tx: &mut PgConnection,
    asked: &[Asked],
    ttl: Duration,
) -> Result<Vec<Decided>, UnitError> {
    let orders: BTreeSet<Uuid> = asked.iter().map(|a| a.order_id).collect();
    let mut reservations = store::lock_reservations(tx, &orders).await?;
    let skus = asked
        .iter()
        .filter_map(|a| match &a.command {
            Command::Reserve(demand) => Some(demand),
            _ => None,
        })
        .chain(reservations.values().map(|r| &r.demand))
        .flat_map(|demand| demand.lines().map(|(sku, _)| sku.clone()))
        .collect();
    let mut stock = store::lock_stock(tx, &skus).await?;
    let now = store::now(tx).await?;
    let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);

    let mut changed: HashMap<Uuid, Option<DateTime<Utc>>> = HashMap::new();
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

    store::write_stock(tx, &stock).await?;
    let written: Vec<Written<'_>> = changed
        .iter()
        .filter_map(|(order_id, expires_at)| {
            let reservation: &Reservation = reservations.get(order_id)?;
            Some(Written {
                order_id: *order_id,
                reservation,
                expires_at: *expires_at,
            })
        })
        .collect();
    store::write_reservations(tx, &written).await?;
    Ok(decided)
}
