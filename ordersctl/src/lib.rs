//! ordersctl's library part: what the CLI and the tests share.

pub mod access;
pub mod bench;
pub mod dlq;
pub mod pki;
pub mod relay_bench;
pub mod verify;
