//! Failpoints for the chaos harness (`orderflow-tests`' `chaos` binary), compiled in only
//! under the `failpoints` feature: without it the `fail_point!` macros expand to nothing and
//! this module does not exist.
//!
//! Failpoints are named places where a process can be told (through the `FAILPOINTS`
//! environment variable, e.g. `FAILPOINTS=payment::before_gateway=2%return`) to die the way
//! `kill -9` kills it: [`crash`] aborts, with no unwinding, no destructor, no flush, no
//! offset commit and no graceful leave of the consumer group.

/// Dies at once, like `kill -9` (SIGABRT, which no handler here catches).
pub fn crash<T>() -> T {
    std::process::abort()
}
