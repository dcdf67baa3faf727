//! inventory-svc: stock per SKU, reserved for an order before any money moves
//! (docs/adr/0007). What is here so far is the pure domain; the service around it (its
//! database, consumer, outbox and relay) follows.

pub mod domain;
