//! Hooks for the chaos harness (`orderflow-tests`' `chaos` binary), compiled in only under
//! the `failpoints` and `naive` features. A release build has neither: its failpoint macros
//! expand to nothing and `naive()` is a constant `false`.
//!
//! Failpoints are named places where a process can be told (through the `FAILPOINTS`
//! environment variable, e.g. `FAILPOINTS=payment::before_gateway=2%return`) to die the way
//! `kill -9` kills it: [`crash`] aborts, with no unwinding, no destructor, no flush, no
//! offset commit and no graceful leave of the consumer group.

/// Dies at once, like `kill -9` (SIGABRT, which no handler here catches).
pub fn crash<T>() -> T {
    std::process::abort()
}

/// Whether this process runs with the textbook mistakes (`ORDERFLOW_NAIVE=true`, and only in
/// a build with the `naive` feature): no inbox, no gateway idempotency key, offsets stored
/// before processing, a dual write instead of the outbox in PlaceOrder.
#[cfg(feature = "naive")]
pub fn naive() -> bool {
    static NAIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NAIVE.get_or_init(|| std::env::var("ORDERFLOW_NAIVE").is_ok_and(|v| v == "true" || v == "1"))
}

/// Whether this process runs with the textbook mistakes: never, without the `naive` feature.
#[cfg(not(feature = "naive"))]
pub const fn naive() -> bool {
    false
}
