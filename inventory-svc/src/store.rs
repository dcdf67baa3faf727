//! inventory's tables, as a unit of work reads, locks and writes them. Locks are always taken
//! in one order (reservations by order id, then stock rows by SKU in byte order), so that two
//! units or two instances never wait on each other in a cycle. Whatever else locks these rows
//! (the expiry sweeper, a restock) must take them in the same order, or skip what is locked.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{Demand, Level, Reservation, ReservationState, Sku, Stock};

/// Why the store could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or refused (classified by the consumer runtime's one classifier).
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A stored value this build cannot read: a row written by something else, or a newer
    /// build's state name.
    #[error("corrupt {0}")]
    Corrupt(String),
}

/// Reads and locks the reservations of `orders` (any order; locked in id order).
pub async fn lock_reservations(
    tx: &mut PgConnection,
    orders: &BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, Reservation>, StoreError> {
    let ids: Vec<Uuid> = orders.iter().copied().collect();
    let rows: Vec<(Uuid, String, serde_json::Value)> = sqlx::query_as(
        "SELECT order_id, state, lines FROM reservations WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    reservations_of(rows)
}

/// Reservation rows as read.
fn reservations_of(rows: Vec<(Uuid, String, serde_json::Value)>) -> Result<HashMap<Uuid, Reservation>, StoreError> {
    rows.into_iter()
        .map(|(order_id, state, lines)| {
            let state = ReservationState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("reservation state {state:?} of {order_id}")))?;
            let demand =
                demand_of(&lines).ok_or_else(|| StoreError::Corrupt(format!("reservation lines of {order_id}")))?;
            Ok((order_id, Reservation { state, demand }))
        })
        .collect()
}

/// Reads and locks at most `limit` reservations held past their deadline (the transaction's
/// time), in id order, skipping any a unit holds: that unit is deciding it and the sweeper's
/// next pass will see what it left. Never waiting on a reservation, the sweeper can take part
/// in no lock cycle.
pub async fn lock_due_reservations(
    tx: &mut PgConnection,
    limit: i64,
) -> Result<HashMap<Uuid, Reservation>, StoreError> {
    let rows: Vec<(Uuid, String, serde_json::Value)> = sqlx::query_as(
        "SELECT order_id, state, lines FROM reservations WHERE state = $1 AND expires_at <= now()
         ORDER BY order_id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(ReservationState::Reserved.as_str())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    reservations_of(rows)
}

/// Reads and locks the counts of `skus`, in byte order (`COLLATE "C"`, the order of the
/// `BTreeSet` and of Rust's strings). A SKU with no row is not stocked and gets none.
pub async fn lock_stock(tx: &mut PgConnection, skus: &BTreeSet<Sku>) -> Result<Stock, StoreError> {
    let names: Vec<&str> = skus.iter().map(Sku::as_str).collect();
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        r#"SELECT sku, on_hand, reserved, sold FROM stock WHERE sku = ANY($1) ORDER BY sku COLLATE "C" FOR UPDATE"#,
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    let levels = rows
        .into_iter()
        .map(|(sku, on_hand, reserved, sold)| {
            let sku = Sku::parse(&sku).map_err(|_| StoreError::Corrupt(format!("sku {sku:?}")))?;
            Ok((
                sku,
                Level {
                    on_hand,
                    reserved,
                    sold,
                },
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Stock::new(levels))
}

/// Writes back the counts the unit changed (`after` against what it read, `before`), one
/// statement for all. Every changed SKU must have its row: counts that changed for a SKU with
/// none (its row deleted while a reservation held it) are refused, never dropped.
pub async fn write_stock(tx: &mut PgConnection, before: &Stock, after: &Stock) -> Result<(), StoreError> {
    let (mut skus, mut on_hand, mut reserved, mut sold) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (sku, level) in after.levels() {
        if before.level(sku) != *level {
            skus.push(sku.as_str());
            on_hand.push(level.on_hand);
            reserved.push(level.reserved);
            sold.push(level.sold);
        }
    }
    if skus.is_empty() {
        return Ok(());
    }
    let updated = sqlx::query(
        "UPDATE stock SET on_hand = u.on_hand, reserved = u.reserved, sold = u.sold
         FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) AS u(sku, on_hand, reserved, sold)
         WHERE stock.sku = u.sku",
    )
    .bind(&skus)
    .bind(&on_hand)
    .bind(&reserved)
    .bind(&sold)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated != skus.len() as u64 {
        return Err(StoreError::Corrupt(format!(
            "stock: {} SKUs changed, {updated} rows: a SKU held by a reservation has no row",
            skus.len()
        )));
    }
    Ok(())
}

/// A reservation as the unit leaves it, and until when a held one is held.
pub struct Written<'a> {
    /// The order.
    pub order_id: Uuid,
    /// Its reservation.
    pub reservation: &'a Reservation,
    /// Set exactly when the reservation is RESERVED (the table's CHECK).
    pub expires_at: Option<DateTime<Utc>>,
}

/// Writes the reservations the unit changed: `existing` ones (locked by
/// [`lock_reservations`]) updated, the others inserted, one statement each, in order id
/// order. A new row that another transaction inserted meanwhile (read as missing here: only a
/// second consumer of the same orders could) is not overwritten: the unit fails, transiently,
/// and its retry finds and locks the row.
pub async fn write_reservations(
    tx: &mut PgConnection,
    existing: &BTreeSet<Uuid>,
    written: &[Written<'_>],
) -> Result<(), StoreError> {
    let (old, new): (Vec<&Written<'_>>, Vec<&Written<'_>>) =
        written.iter().partition(|w| existing.contains(&w.order_id));
    for (rows, statement) in [
        (
            old,
            "UPDATE reservations r SET state = u.state, lines = u.lines, expires_at = u.expires_at, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[]) AS u(order_id, state, lines, expires_at)
             WHERE r.order_id = u.order_id",
        ),
        (
            new,
            "INSERT INTO reservations (order_id, state, lines, expires_at)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::timestamptz[]) ORDER BY 1
             ON CONFLICT (order_id) DO NOTHING",
        ),
    ] {
        if rows.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = rows.iter().map(|w| w.order_id).collect();
        let states: Vec<&str> = rows.iter().map(|w| w.reservation.state.as_str()).collect();
        let lines: Vec<serde_json::Value> = rows.iter().map(|w| lines_of(&w.reservation.demand)).collect();
        let expires: Vec<Option<DateTime<Utc>>> = rows.iter().map(|w| w.expires_at).collect();
        let affected = sqlx::query(statement)
            .bind(&ids)
            .bind(&states)
            .bind(&lines)
            .bind(&expires)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if affected != rows.len() as u64 {
            // Classified transient by the consumer runtime, as payment-svc's same race is.
            return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "{affected} of {} reservations written: some appeared concurrently",
                rows.len()
            ))));
        }
    }
    Ok(())
}

/// The transaction's time: what the sweeper compares deadlines with.
pub async fn now(tx: &mut PgConnection) -> Result<DateTime<Utc>, StoreError> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await?)
}

/// A demand as the `lines` column holds it: an object of SKU to units.
fn lines_of(demand: &Demand) -> serde_json::Value {
    serde_json::Value::Object(
        demand
            .lines()
            .map(|(sku, units)| (sku.as_str().to_owned(), serde_json::Value::from(units.get())))
            .collect(),
    )
}

/// The `lines` column read back; None for anything but an object of valid SKUs to positive
/// integers.
fn demand_of(lines: &serde_json::Value) -> Option<Demand> {
    let lines = lines.as_object()?;
    let parsed = lines
        .iter()
        .map(|(sku, units)| Some((Sku::parse(sku).ok()?, units.as_i64()?)))
        .collect::<Option<Vec<_>>>()?;
    Demand::recorded(parsed).ok()
}

#[cfg(test)]
mod tests {
    use super::{demand_of, lines_of};
    use crate::domain::{Demand, ReservationState, Sku};

    #[test]
    fn the_table_accepts_every_state_and_no_other() {
        let migration = include_str!("../../migrations/inventory/0001_inventory.sql");
        let check = migration
            .lines()
            .find(|line| line.contains("CHECK (state IN"))
            .expect("the reservations' state CHECK");
        let names: Vec<&str> = check.split('\'').skip(1).step_by(2).collect();
        let ours: Vec<&str> = ReservationState::ALL.iter().map(|state| state.as_str()).collect();
        assert_eq!(names, ours);
    }

    #[test]
    fn a_demand_round_trips_through_its_column_and_nonsense_does_not_read() {
        let demand = Demand::new([(Sku::parse("B").unwrap(), 2), (Sku::parse("A").unwrap(), 1)]).unwrap();
        assert_eq!(demand_of(&lines_of(&demand)), Some(demand));
        assert_eq!(
            demand_of(&serde_json::json!({})),
            Some(Demand::default()),
            "a tombstone holds nothing"
        );
        for nonsense in [
            serde_json::json!([]),
            serde_json::json!({"A": 0}),
            serde_json::json!({"A": "1"}),
            serde_json::json!({"": 1}),
            serde_json::json!({"A": 1.5}),
        ] {
            assert_eq!(demand_of(&nonsense), None, "{nonsense}");
        }
    }
}
