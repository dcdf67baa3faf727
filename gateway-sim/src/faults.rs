//! Deterministic fault decisions: a hash of (seed, idempotency key, what, attempt), so the
//! same run with the same seed misbehaves the same way, and a retry is a new draw.

use orderflow::gateway::v1::Faults;

/// FNV-1a, 64 bit: stable across Rust releases and machines (unlike std's hasher).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A uniform number in [0, 1) for this decision.
pub fn draw(seed: u64, key: &str, what: &str, attempt: u32) -> f64 {
    let hash = fnv1a(&[
        &seed.to_le_bytes(),
        key.as_bytes(),
        what.as_bytes(),
        &attempt.to_le_bytes(),
    ]);
    // The top 53 bits make an exact f64 fraction.
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// Test card tokens with a fixed behaviour.
pub mod tokens {
    /// Always declined.
    pub const DECLINE: &str = "tok_decline";
    /// Authorized, but the first reply is lost (arrives after the caller gave up).
    pub const TIMEOUT: &str = "tok_timeout";
    /// Authorized, but the first `hang_attempts` calls never answer.
    pub const HANG: &str = "tok_hang";
}

/// Whether an authorization is declined.
pub fn declines(faults: &Faults, key: &str, token: &str) -> bool {
    token == tokens::DECLINE || draw(faults.seed, key, "decline", 0) < faults.decline_rate
}

/// What happens to the reply of the `attempt`-th call (1-based) with `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer normally.
    Now,
    /// Answer only after this many milliseconds (the caller has timed out).
    Late(u32),
    /// Never answer.
    Never,
}

/// Decides the reply's fate. Only first attempts time out; a hanging key hangs for its
/// first `hang_attempts` calls. Either way the money has already moved.
pub fn reply(faults: &Faults, key: &str, token: &str, attempt: u32) -> Reply {
    let hangs = token == tokens::HANG || draw(faults.seed, key, "hang", 0) < faults.hang_rate;
    if hangs && attempt <= faults.hang_attempts.max(1) {
        return Reply::Never;
    }
    let times_out = token == tokens::TIMEOUT || draw(faults.seed, key, "timeout", 0) < faults.timeout_rate;
    if times_out && attempt == 1 {
        return Reply::Late(faults.timeout_reply_delay_ms.max(1));
    }
    Reply::Now
}

/// Extra latency of one call, in milliseconds.
pub fn latency_ms(faults: &Faults, key: &str, attempt: u32) -> u64 {
    let jitter = (draw(faults.seed, key, "latency", attempt) * f64::from(faults.latency_jitter_ms)) as u64;
    u64::from(faults.latency_ms) + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_spread() {
        assert_eq!(draw(7, "k", "decline", 0), draw(7, "k", "decline", 0));
        assert_ne!(draw(7, "k", "decline", 0), draw(8, "k", "decline", 0));
        let declined = (0..10_000)
            .filter(|i| {
                declines(
                    &Faults {
                        decline_rate: 0.05,
                        seed: 1,
                        ..Default::default()
                    },
                    &format!("key-{i}"),
                    "tok",
                )
            })
            .count();
        assert!(
            (400..600).contains(&declined),
            "5% of 10,000 is about 500, got {declined}"
        );
    }

    #[test]
    fn test_tokens_behave_as_documented() {
        let faults = Faults {
            hang_attempts: 2,
            timeout_reply_delay_ms: 3_000,
            ..Default::default()
        };
        assert!(declines(&faults, "k", tokens::DECLINE));
        assert!(!declines(&faults, "k", "tok_visa"));
        assert_eq!(reply(&faults, "k", tokens::TIMEOUT, 1), Reply::Late(3_000));
        assert_eq!(reply(&faults, "k", tokens::TIMEOUT, 2), Reply::Now);
        assert_eq!(reply(&faults, "k", tokens::HANG, 1), Reply::Never);
        assert_eq!(reply(&faults, "k", tokens::HANG, 2), Reply::Never);
        assert_eq!(reply(&faults, "k", tokens::HANG, 3), Reply::Now);
        assert_eq!(reply(&faults, "k", "tok_visa", 1), Reply::Now);
    }
}
