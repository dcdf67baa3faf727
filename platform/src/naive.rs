//! The textbook mistakes, for the chaos harness to show their damage beside the hardened
//! build's. Compiled only under the `naive` feature: a build without it has no such module,
//! so production code cannot ask "am I naive?", only pass through a seam that the naive
//! build replaces: the consumer runtime's in `consumer::naive`, payment-svc's in its `naive`
//! module; order-svc's dual write is its `naive` module too, wired into PlaceOrder by
//! `cfg(feature = "naive")` lines in `lib.rs`, `api` and `placing` (compiled out of every
//! other build).

/// Whether this process runs with the mistakes: `ORDERFLOW_NAIVE=true`. A naive build
/// started without it behaves as the hardened one, so one build serves both chaos modes.
pub fn active() -> bool {
    static ACTIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ACTIVE.get_or_init(|| std::env::var("ORDERFLOW_NAIVE").is_ok_and(|v| v == "true" || v == "1"))
}
