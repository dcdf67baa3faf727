//! ordersctl's library part: what the CLI and the tests share.

pub mod access;
pub mod bench;
pub mod dlq;
pub mod events;
pub mod explain;
pub mod pki;
pub mod relay_bench;
pub mod trace;
pub mod verify;
