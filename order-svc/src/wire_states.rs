//! The order's stored names and the published language's enums, mapped both ways in one
//! place (the names themselves are spelled once, in `domain`). `UNSPECIFIED` on the wire
//! maps to no value: it is what an absent field reads as, never a state.

use orderflow::orders::v1 as wire;

use crate::domain::{CancellationReason, OrderStatus, PaymentState, SagaState};

/// Declares `From<domain> for wire` and `TryFrom<wire> for domain` from one list of pairs.
macro_rules! both_ways {
    ($domain:ident <-> $wire:ident { $($variant:ident <-> $wire_variant:ident,)+ }) => {
        impl From<$domain> for wire::$wire {
            fn from(value: $domain) -> Self {
                match value {
                    $($domain::$variant => Self::$wire_variant,)+
                }
            }
        }

        impl TryFrom<wire::$wire> for $domain {
            type Error = Unspecified;

            fn try_from(value: wire::$wire) -> Result<Self, Unspecified> {
                match value {
                    $(wire::$wire::$wire_variant => Ok(Self::$variant),)+
                    wire::$wire::Unspecified => Err(Unspecified),
                }
            }
        }
    };
}

/// The wire said `UNSPECIFIED`: no value was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unspecified")]
pub struct Unspecified;

both_ways!(OrderStatus <-> OrderStatus {
    Pending <-> Pending,
    Confirmed <-> Confirmed,
    Cancelled <-> Cancelled,
});

both_ways!(SagaState <-> SagaState {
    AwaitingPayment <-> AwaitingPayment,
    Completed <-> Completed,
    Compensated <-> Compensated,
});

both_ways!(CancellationReason <-> CancellationReason {
    PaymentFailed <-> PaymentFailed,
    PaymentTimeout <-> PaymentTimeout,
    CustomerRequest <-> CustomerRequest,
});

both_ways!(PaymentState <-> PaymentState {
    Authorized <-> Authorized,
    Failed <-> Failed,
    Captured <-> Captured,
    Voided <-> Voided,
});

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stored name parses back to its value, maps to a wire value and back, and every
    /// wire value but UNSPECIFIED maps to a stored name: both directions, exhaustively.
    macro_rules! round_trips {
        ($test:ident, $domain:ident, $wire:ident) => {
            #[test]
            fn $test() {
                for &value in $domain::ALL {
                    assert_eq!($domain::parse(value.as_str()), Some(value));
                    assert_eq!($domain::try_from(wire::$wire::from(value)), Ok(value));
                }
                let mut mapped = 0;
                for number in 0..64 {
                    let Ok(on_wire) = wire::$wire::try_from(number) else {
                        continue;
                    };
                    match $domain::try_from(on_wire) {
                        Ok(value) => {
                            assert_eq!(wire::$wire::from(value), on_wire);
                            // The stored name is the wire name without its enum's prefix.
                            assert!(on_wire.as_str_name().ends_with(value.as_str()), "{on_wire:?}");
                            mapped += 1;
                        }
                        Err(Unspecified) => assert_eq!(on_wire, wire::$wire::Unspecified),
                    }
                }
                assert_eq!(mapped, $domain::ALL.len(), "every wire value has a stored name");
                assert_eq!($domain::parse("NOT_A_STATE"), None);
            }
        };
    }

    /// The SQL in this crate may spell a state name where a parameter would cost an index (the
    /// sweeper's partial index `WHERE status = 'PENDING'` needs the literal); each name so
    /// spelled must be one of `domain`'s.
    #[test]
    fn every_name_the_sql_spells_is_a_domain_name() {
        let known: Vec<&str> = OrderStatus::ALL
            .iter()
            .map(|v| v.as_str())
            .chain(SagaState::ALL.iter().map(|v| v.as_str()))
            .chain(CancellationReason::ALL.iter().map(|v| v.as_str()))
            .chain(PaymentState::ALL.iter().map(|v| v.as_str()))
            .collect();
        let mut spelled = Vec::new();
        let mut files = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // A name in SQL: two or more capitals or underscores between single quotes.
            for (at, _) in text.match_indices('\'') {
                let rest = &text[at + 1..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                if name.len() >= 2 && rest[name.len()..].starts_with('\'') {
                    spelled.push((path.display().to_string(), name));
                }
            }
        }
        assert!(
            spelled
                .iter()
                .any(|(file, name)| file.ends_with("store.rs") && name == "PENDING"),
            "the scan finds the sweeper's literal in store.rs: {spelled:?}"
        );
        for (file, name) in spelled {
            assert!(
                known.contains(&name.as_str()),
                "{file} spells '{name}', which no domain enum defines"
            );
        }
    }

    round_trips!(order_status_both_ways, OrderStatus, OrderStatus);
    round_trips!(saga_state_both_ways, SagaState, SagaState);
    round_trips!(cancellation_reason_both_ways, CancellationReason, CancellationReason);
    round_trips!(payment_state_both_ways, PaymentState, PaymentState);
}
