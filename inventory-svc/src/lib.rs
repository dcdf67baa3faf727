//! inventory-svc: stock per SKU, reserved for an order before any money moves
//! (docs/adr/0007). What is here so far: the pure domain, the store and the unit of work, and
//! the consumer's handler; the process around them (its configuration, relay and place in the
//! stack and the saga) follows ("Where this stands" in the ADR).

pub mod domain;
pub mod handler;
pub mod store;
pub mod unit;

/// The inventory database's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/inventory");
