//! ordersctl's library part: what the CLI and the tests share.

pub mod bench;
pub mod dlq;
pub mod verify;
