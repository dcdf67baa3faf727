//! inventory's consumer of `orders.events` (group `inventory`): OrderPlaced reserves,
//! OrderConfirmed sells, OrderCancelled releases. The consumer runtime records the inbox rows
//! in the unit's transaction; this handler decides the whole unit at once ([`crate::unit`]) and
//! writes its events to the outbox in the same transaction.

use std::time::Duration;

use orderflow::envelope::OpenedEvent;
use orderflow::events::v1::event_envelope::Payload;
use orderflow::events::v1::{
    StockCameShort, StockCommitted, StockLine, StockRejected, StockReleaseReason, StockReleased, StockReserved,
    StockShortage,
};
use orderflow_platform::consumer::{Fresh, Handler, HandlerError};
use orderflow_platform::outbox::{self, Outbox, OutboxMessage};
use sqlx::{Postgres, Transaction};

use crate::domain::{Command, Demand, Event, Returned, Shortage, Sku};
use crate::store::StoreError;
use crate::unit::{self, Asked, Decided, UnitError};

/// The name this consumer records in the inbox.
pub const INBOX: &str = "inventory";

/// Reserves, sells and releases stock for the order events it consumes.
pub struct InventoryHandler {
    topic: String,
    outbox: Outbox,
    reservation_ttl: Duration,
}

impl InventoryHandler {
    /// The longest time a reservation may be held: a bound that keeps every deadline in the
    /// calendar (and a hold of more than a month is a misconfiguration, not a saga).
    pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

    /// A handler that writes its events for `topic` through `outbox` and holds reservations
    /// for `reservation_ttl` (docs/adr/0007: longer than the saga deadline and the outages
    /// it rides through). A time to live of zero or beyond [`Self::MAX_RESERVATION_TTL`] is
    /// refused.
    pub fn new(topic: String, outbox: Outbox, reservation_ttl: Duration) -> Result<Self, String> {
        if reservation_ttl.is_zero() || reservation_ttl > Self::MAX_RESERVATION_TTL {
            return Err(format!(
                "a reservation's time to live must be more than 0 and at most {:?}, not {reservation_ttl:?}",
                Self::MAX_RESERVATION_TTL
            ));
        }
        Ok(Self {
            topic,
            outbox,
            reservation_ttl,
        })
    }
}

impl Handler for InventoryHandler {
    type Committed = ();

    // The unit locks every reservation and stock row it needs once, in one order; in rounds
    // of one message per order it would lock more in each round, in no global order (two
    // instances' units could then deadlock).
    const ONE_PER_KEY: bool = false;

    fn inbox(&self) -> &'static str {
        INBOX
    }

    fn wants(&self, event: &OpenedEvent) -> bool {
        matches!(
            event.payload,
            Payload::OrderPlaced(_) | Payload::OrderConfirmed(_) | Payload::OrderCancelled(_)
        )
    }

    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        batch: &[Fresh<'_>],
    ) -> Result<Vec<()>, (usize, HandlerError)> {
        let whole = batch.len();
        let asked = batch
            .iter()
            .enumerate()
            .map(|(at, fresh)| asked_of(fresh.event).map_err(|why| (at, HandlerError::Permanent(why))))
            .collect::<Result<Vec<_>, _>>()?;
        let decided = unit::decide_and_write(tx, &asked, self.reservation_ttl)
            .await
            .map_err(|error| match error {
                UnitError::Refused { index, error } => (index, HandlerError::Permanent(error.to_string())),
                UnitError::Store(StoreError::Database(error)) => (whole, error.into()),
                UnitError::Store(StoreError::Corrupt(what)) => {
                    (whole, HandlerError::Permanent(format!("corrupt {what}")))
                }
                // `new` refuses such a setting; were it reached, stalling the partition (and
                // its alert) is better than dead-lettering every order.
                error @ UnitError::TtlOutOfRange(_) => (whole, HandlerError::Transient(error.into())),
            })?;
        let mut messages: Vec<OutboxMessage> = Vec::new();
        for (decided, fresh) in decided.iter().zip(batch) {
            // The event continues the trace of the message that caused it.
            let _entered = fresh.span.enter();
            for event in &decided.events {
                if let Some(payload) = payload_of(decided, event) {
                    messages.push(outbox::caused_by(&self.topic, fresh.event, payload));
                }
            }
        }
        self.outbox
            .write_all(tx, &messages)
            .await
            .map_err(|error| (whole, error.into()))?;
        Ok(Vec::new())
    }
}

/// What an order event asks of inventory. A line that is no SKU or no quantity is refused for
/// good (order-svc validated it; this is a message from elsewhere). The card token of an
/// OrderPlaced is never read.
fn asked_of(event: &OpenedEvent) -> Result<Asked, String> {
    let command = match &event.payload {
        Payload::OrderPlaced(placed) => {
            let lines = placed
                .items
                .iter()
                .map(|item| {
                    let sku = Sku::parse(&item.sku).map_err(|why| format!("sku {why}"))?;
                    Ok((sku, i64::from(item.quantity)))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Command::Reserve(Demand::new(lines).map_err(|why| why.to_string())?)
        }
        Payload::OrderConfirmed(_) => Command::Commit,
        Payload::OrderCancelled(_) => Command::Release,
        other => {
            return Err(format!(
                "not an event inventory takes: {}",
                orderflow::envelope::event_type_of(other)
            ));
        }
    };
    Ok(Asked {
        order_id: event.aggregate_id,
        command,
    })
}

/// The published event of a decided one (None: a fact inventory keeps to itself).
fn payload_of(decided: &Decided, event: &Event) -> Option<Payload> {
    let order_id = decided.order_id.to_string();
    Some(match event {
        Event::Reserved { demand } => Payload::StockReserved(StockReserved {
            order_id,
            lines: lines(demand),
            expires_at: decided.expires_at.map(orderflow_platform::outbox::timestamp),
        }),
        Event::Rejected { shortages, .. } => Payload::StockRejected(StockRejected {
            order_id,
            shortages: shortages_of(shortages),
        }),
        Event::Committed { demand } => Payload::StockCommitted(StockCommitted {
            order_id,
            lines: lines(demand),
            after_expiry: false,
        }),
        Event::Retaken { demand } => Payload::StockCommitted(StockCommitted {
            order_id,
            lines: lines(demand),
            after_expiry: true,
        }),
        Event::CameShort { shortages } => Payload::StockCameShort(StockCameShort {
            order_id,
            shortages: shortages_of(shortages),
        }),
        Event::Expired { demand } => Payload::StockReleased(StockReleased {
            order_id,
            reason: StockReleaseReason::Expired as i32,
            lines: lines(demand),
            sold: false,
        }),
        Event::Released { returned } => {
            let (back, sold) = match returned {
                Returned::Nothing => (Vec::new(), false),
                Returned::Held(demand) => (lines(demand), false),
                Returned::Sold(demand) => (lines(demand), true),
            };
            Payload::StockReleased(StockReleased {
                order_id,
                reason: StockReleaseReason::OrderCancelled as i32,
                lines: back,
                sold,
            })
        }
        // Nobody waits on it: the shipment that left is fulfilment's own event.
        Event::Dispatched { .. } => return None,
    })
}

fn lines(demand: &Demand) -> Vec<StockLine> {
    demand
        .lines()
        .map(|(sku, units)| StockLine {
            sku: sku.as_str().to_owned(),
            quantity: units.get(),
        })
        .collect()
}

fn shortages_of(shortages: &[Shortage]) -> Vec<StockShortage> {
    shortages
        .iter()
        .map(|shortage| StockShortage {
            sku: shortage.sku.as_str().to_owned(),
            requested: shortage.requested.get(),
            available: shortage.available,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use orderflow::envelope::OpenedEvent;
    use orderflow::events::v1::event_envelope::Payload;
    use orderflow::events::v1::{OrderConfirmed, OrderPlaced, PaymentAuthorized, StockReleaseReason};
    use orderflow::orders::v1::OrderItem;

    use super::{asked_of, payload_of};
    use crate::domain::{Command, Demand, Event, Returned, Sku};
    use crate::unit::Decided;

    fn opened(payload: Payload) -> OpenedEvent {
        OpenedEvent {
            message_id: uuid::Uuid::now_v7(),
            aggregate_id: uuid::Uuid::from_u128(7),
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: None,
            traceparent: None,
            signing_key_id: None,
            schema_version: 1,
            occurred_at: None,
            payload,
        }
    }

    fn item(sku: &str, quantity: i32) -> OrderItem {
        OrderItem {
            sku: sku.into(),
            quantity,
            unit_price: None,
        }
    }

    fn demand(lines: &[(&str, i64)]) -> Demand {
        Demand::new(lines.iter().map(|&(sku, n)| (Sku::parse(sku).unwrap(), n))).unwrap()
    }

    #[test]
    fn an_order_asks_for_its_lines_summed_per_sku_and_nonsense_is_refused() {
        let placed = |items| {
            opened(Payload::OrderPlaced(OrderPlaced {
                items,
                payment_token: "tok_secret".into(),
                ..OrderPlaced::default()
            }))
        };
        let asked = asked_of(&placed(vec![item("A", 2), item("B", 1), item("A", 1)])).unwrap();
        assert_eq!(asked.order_id, uuid::Uuid::from_u128(7));
        assert_eq!(asked.command, Command::Reserve(demand(&[("A", 3), ("B", 1)])));
        assert!(
            !format!("{asked:?}").contains("tok_secret"),
            "the card token is never read"
        );
        for bad in [vec![], vec![item("", 1)], vec![item("A", 0)], vec![item("A", -2)]] {
            assert!(asked_of(&placed(bad.clone())).is_err(), "{bad:?}");
        }
        assert_eq!(
            asked_of(&opened(Payload::OrderConfirmed(OrderConfirmed::default())))
                .unwrap()
                .command,
            Command::Commit
        );
        assert!(asked_of(&opened(Payload::PaymentAuthorized(PaymentAuthorized::default()))).is_err());
    }

    #[test]
    fn each_fact_is_published_as_its_event_with_what_it_moved() {
        let expires_at = chrono::DateTime::from_timestamp(1_764_000_900, 0).unwrap();
        let decided = Decided {
            order_id: uuid::Uuid::from_u128(7),
            events: vec![],
            expires_at: Some(expires_at),
        };
        let Some(Payload::StockReserved(reserved)) = payload_of(
            &decided,
            &Event::Reserved {
                demand: demand(&[("A", 3)]),
            },
        ) else {
            panic!("StockReserved");
        };
        assert_eq!(reserved.order_id, uuid::Uuid::from_u128(7).to_string());
        assert_eq!((reserved.lines[0].sku.as_str(), reserved.lines[0].quantity), ("A", 3));
        assert_eq!(reserved.expires_at.map(|at| at.seconds), Some(1_764_000_900));

        let released = |returned| match payload_of(&decided, &Event::Released { returned }) {
            Some(Payload::StockReleased(released)) => (released.lines.len(), released.sold, released.reason),
            other => panic!("StockReleased, not {other:?}"),
        };
        let cancelled = StockReleaseReason::OrderCancelled as i32;
        assert_eq!(released(Returned::Held(demand(&[("A", 3)]))), (1, false, cancelled));
        assert_eq!(released(Returned::Sold(demand(&[("A", 3)]))), (1, true, cancelled));
        assert_eq!(released(Returned::Nothing), (0, false, cancelled));
        assert!(matches!(
            payload_of(&decided, &Event::Retaken { demand: demand(&[("A", 1)]) }),
            Some(Payload::StockCommitted(committed)) if committed.after_expiry
        ));
        assert_eq!(
            payload_of(
                &decided,
                &Event::Dispatched {
                    demand: demand(&[("A", 1)])
                }
            ),
            None
        );
    }
}
