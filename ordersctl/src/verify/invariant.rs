//! What `verify` checks, each named by a type. A program asks for a check by its variant
//! (the chaos harness counts double charges as `Invariant::ChargedAtMostOnce`), never by its
//! wording, so rewording a check cannot make it count zero; and `verify` computes each one
//! in an exhaustive `match`, so a check cannot be declared here and left uncomputed.

/// Declares the invariants once: the enum, its list and its words for people.
macro_rules! invariants {
    ($($(#[$doc:meta])* $variant:ident = $id:literal: $description:literal,)+) => {
        /// One promise of the system, checked across the stores.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Invariant {
            $($(#[$doc])* $variant,)+
        }

        impl Invariant {
            /// Every invariant, in the order `verify` reports them.
            pub const ALL: &'static [Invariant] = &[$(Invariant::$variant),+];

            /// Its identifier for programs (the JSON report, the chaos rows).
            pub fn id(self) -> &'static str {
                match self {
                    $(Invariant::$variant => $id,)+
                }
            }

            /// What a violation is, for people.
            pub fn description(self) -> &'static str {
                match self {
                    $(Invariant::$variant => $description,)+
                }
            }
        }
    };
}

invariants! {
    /// wal-message mode: a slot a database remembers creating is there and valid.
    ReplicationSlotsKept = "replication_slots_kept":
        "relay replication slots lost (missing or invalidated: the events in their WAL are gone)",
    /// Every saga ends within its deadline (plus the sweeper's grace).
    NoSagaStuck = "no_saga_stuck": "orders PENDING past the saga deadline",
    ConfirmedIsCaptured = "confirmed_is_captured": "CONFIRMED orders without a capture at the gateway",
    /// Never keep money for a cancelled order.
    CancelledHoldsNoMoney = "cancelled_holds_no_money":
        "CANCELLED orders whose money is still authorized or captured at the gateway",
    CapturedIsConfirmed = "captured_is_confirmed":
        "captures at the gateway for orders that are not CONFIRMED (or do not exist)",
    /// Money held past the deadline belongs to a saga still running (counted as stuck then).
    NoMoneyHeldPastDeadline = "no_money_held_past_deadline":
        "authorizations held past the deadline for orders that are not PENDING (or do not exist)",
    /// Never charge a card twice, counted at the gateway's ledger.
    ChargedAtMostOnce = "charged_at_most_once": "orders authorized or captured more than once at the gateway",
    NoGatewayCallOwedTooLong = "no_gateway_call_owed_too_long":
        "payments owing a gateway call for longer than the saga deadline",
    /// A second payment or shipment of one order is impossible by a constraint: what is
    /// checked is that the constraint is there, not that a count it forbids is zero.
    OneRowPerOrderByConstraint = "one_row_per_order_by_constraint":
        "UNIQUE (order_id) constraints missing (a second payment or shipment of an order becomes possible)",
    ConfirmedIsShipped = "confirmed_is_shipped": "CONFIRMED orders without a shipment",
    ShippedIsConfirmed = "shipped_is_confirmed": "shipments of orders that are not CONFIRMED",
    ReadModelAgrees = "read_model_agrees": "read model differs from the orders table",
}

/// The invariants as a Markdown table: what `ordersctl invariants` prints and what
/// docs/saga.md holds between its `invariants` markers (a test keeps the two equal).
pub fn markdown_table() -> String {
    let mut table = String::from("| invariant | a violation is |\n|---|---|\n");
    for invariant in Invariant::ALL {
        table.push_str(&format!("| `{}` | {} |\n", invariant.id(), invariant.description()));
    }
    table
}

impl serde::Serialize for Invariant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.id())
    }
}

impl std::fmt::Display for Invariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_descriptions_are_distinct() {
        let mut ids: Vec<_> = Invariant::ALL.iter().map(|i| i.id()).collect();
        let mut descriptions: Vec<_> = Invariant::ALL.iter().map(|i| i.description()).collect();
        ids.sort_unstable();
        ids.dedup();
        descriptions.sort_unstable();
        descriptions.dedup();
        assert_eq!(ids.len(), Invariant::ALL.len());
        assert_eq!(descriptions.len(), Invariant::ALL.len());
    }

    #[test]
    fn docs_saga_md_lists_the_invariants_verify_checks() {
        let doc = include_str!("../../../docs/saga.md");
        let (begin, end) = ("<!-- invariants: begin -->\n", "<!-- invariants: end -->");
        let start = doc.find(begin).expect("docs/saga.md has the invariants' begin marker") + begin.len();
        let stop = doc[start..].find(end).expect("and its end marker") + start;
        assert_eq!(
            &doc[start..stop],
            markdown_table(),
            "docs/saga.md's list of invariants is not what verify checks: paste `ordersctl invariants` between the markers"
        );
    }
}
