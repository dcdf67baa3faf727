//! Reservations of stock, pure and synchronous: no database, broker or gRPC types here.
//!
//! A unit of work locks the counts of every SKU its orders touch (a [`Stock`]), then, order by
//! order, asks [`decide`] what a command does to that order's [`Reservation`] given the counts,
//! and folds the events into both with [`apply`]. Each order sees the counts the orders before
//! it left, so a unit of many orders never grants one unit of stock twice; the database's CHECK
//! on the counts (`reserved + sold <= on_hand`) is the second line, not the first.

use std::collections::BTreeMap;

use orderflow::stored_names;
pub use orderflow::text::Sku;

stored_names! {
    /// Where an order's reservation is (docs/adr/0007).
    pub enum ReservationState {
        /// Every line is held for the order.
        Reserved = "RESERVED",
        /// Some line was short when the order came: nothing was held.
        Rejected = "REJECTED",
        /// The order was confirmed: what was held is sold.
        Committed = "COMMITTED",
        /// The order was cancelled: nothing is held or sold for it. Also written when the
        /// cancellation arrives before the order, so that the order can no longer take stock.
        Released = "RELEASED",
        /// The saga did not settle in time: what was held is back on the shelf. A late
        /// confirmation may still take it.
        Expired = "EXPIRED",
        /// Confirmed after its reservation expired, when the stock was gone: nothing is sold
        /// and an operator decides (ship late or refund). Never an oversell.
        Short = "SHORT",
        /// What was sold left the warehouse. A cancellation can no longer put it back: that
        /// would be a return, which this system does not model.
        Dispatched = "DISPATCHED",
    }
}

/// A positive number of units of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Units(i64);

impl Units {
    /// The most units one order may ask of one SKU: the order service allows 100 lines of at
    /// most 1,000,000 each, so a bound far above it only refuses nonsense (and keeps every sum
    /// of a unit's orders far from overflowing).
    pub const MAX: i64 = 1_000_000_000;

    /// The count.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// What an order asks for: one line per SKU, in SKU order (an order naming a SKU twice asks
/// for the sum). The empty demand is what a reservation holds when it holds nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demand(BTreeMap<Sku, Units>);

impl Demand {
    /// The demand of an order's lines.
    pub fn new(lines: impl IntoIterator<Item = (Sku, i64)>) -> Result<Self, DomainError> {
        let demand = Self::recorded(lines)?;
        if demand.is_empty() {
            return Err(DomainError::NoLines);
        }
        Ok(demand)
    }

    /// A demand as a reservation records it: possibly empty (a cancellation that came before
    /// its order), every line positive.
    pub fn recorded(lines: impl IntoIterator<Item = (Sku, i64)>) -> Result<Self, DomainError> {
        let mut sums: BTreeMap<Sku, i64> = BTreeMap::new();
        for (sku, quantity) in lines {
            if quantity <= 0 {
                return Err(DomainError::NotPositive { sku });
            }
            let sum = sums.entry(sku.clone()).or_default();
            *sum = sum
                .checked_add(quantity)
                .filter(|&sum| sum <= Units::MAX)
                .ok_or(DomainError::TooManyUnits { sku })?;
        }
        Ok(Self(sums.into_iter().map(|(sku, sum)| (sku, Units(sum))).collect()))
    }

    /// Its lines, in SKU order.
    pub fn lines(&self) -> impl Iterator<Item = (&Sku, Units)> {
        self.0.iter().map(|(sku, &units)| (sku, units))
    }

    /// True for the demand of nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The counts of one SKU. What is available is what is on hand and neither held nor sold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Level {
    /// Units in the warehouse, held, sold or free; a dispatch takes sold units out.
    pub on_hand: i64,
    /// Units held for orders not yet settled.
    pub reserved: i64,
    /// Units of confirmed orders.
    pub sold: i64,
}

impl Level {
    /// Units another order may still take.
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved - self.sold
    }

    /// The rule the database's CHECK on `stock` states: never more held and sold than there is.
    pub fn is_consistent(&self) -> bool {
        self.reserved >= 0 && self.sold >= 0 && self.reserved + self.sold <= self.on_hand
    }
}

/// The counts a unit of work holds locked: every SKU its orders touch. A SKU with no row is
/// not stocked: nothing of it is available.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stock(BTreeMap<Sku, Level>);

impl Stock {
    /// Counts as read from the database.
    pub fn new(levels: impl IntoIterator<Item = (Sku, Level)>) -> Self {
        Self(levels.into_iter().collect())
    }

    /// The counts of `sku` (all zero when it is not stocked).
    pub fn level(&self, sku: &Sku) -> Level {
        self.0.get(sku).copied().unwrap_or_default()
    }

    /// Every SKU's counts, in SKU order: what the unit writes back.
    pub fn levels(&self) -> impl Iterator<Item = (&Sku, &Level)> {
        self.0.iter()
    }

    /// The lines of `demand` that are not available, in SKU order.
    fn shortages(&self, demand: &Demand) -> Vec<Shortage> {
        demand
            .lines()
            .filter_map(|(sku, requested)| {
                let available = self.level(sku).available();
                (available < requested.get()).then(|| Shortage {
                    sku: sku.clone(),
                    requested,
                    available: available.max(0),
                })
            })
            .collect()
    }

    /// Changes the counts of every SKU of `demand`. Each must be one the unit locked: a unit
    /// locks the SKUs of every order it decides, and a reservation holds only what its own
    /// order asked for. (Were one missing, its counts would start at zero; the store refuses
    /// to write counts for a SKU that has no row.)
    fn change(&mut self, demand: &Demand, change: impl Fn(&mut Level, i64)) {
        for (sku, units) in demand.lines() {
            change(self.0.entry(sku.clone()).or_default(), units.get());
        }
    }
}

/// A line that could not be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    /// Which SKU.
    pub sku: Sku,
    /// What the order asked for.
    pub requested: Units,
    /// What was available when it asked.
    pub available: i64,
}

/// An order's reservation as inventory records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Where it is.
    pub state: ReservationState,
    /// What the order asked for (empty for a cancellation that came before the order).
    pub demand: Demand,
}

/// What inventory is asked to do for one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// OrderPlaced: hold every line or none.
    Reserve(Demand),
    /// OrderConfirmed: what is held is sold.
    Commit,
    /// OrderCancelled: what is held or sold goes back on the shelf.
    Release,
    /// The reservation outlived its time to live (inventory's sweeper).
    Expire,
    /// ShipmentDispatched: what was sold left the warehouse.
    Dispatch,
}

/// What goes back on the shelf when an order is cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Returned {
    /// It held nothing (rejected, expired, short, or cancelled before it was placed).
    Nothing,
    /// Units it held.
    Held(Demand),
    /// Units it had bought (a cancellation after confirmation, the shipment stopped).
    Sold(Demand),
}

/// Facts inventory records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every line is held.
    Reserved {
        /// What.
        demand: Demand,
    },
    /// Nothing is held: these lines were short.
    Rejected {
        /// What the order asked for.
        demand: Demand,
        /// The lines that were short, in SKU order.
        shortages: Vec<Shortage>,
    },
    /// What was held is sold.
    Committed {
        /// What.
        demand: Demand,
    },
    /// Confirmed after its reservation expired, the stock still there: sold from the shelf.
    Retaken {
        /// What.
        demand: Demand,
    },
    /// Confirmed after its reservation expired, the stock gone: nothing sold.
    CameShort {
        /// The lines that were short, in SKU order.
        shortages: Vec<Shortage>,
    },
    /// What was held is back on the shelf: the saga did not settle in time.
    Expired {
        /// What.
        demand: Demand,
    },
    /// The order was cancelled.
    Released {
        /// What goes back on the shelf.
        returned: Returned,
    },
    /// What was sold left the warehouse.
    Dispatched {
        /// What.
        demand: Demand,
    },
}

/// Why a command or a demand is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// An order with no lines.
    #[error("an order needs at least one line")]
    NoLines,
    /// A line of zero or fewer units.
    #[error("the line of {sku} must ask for at least one unit")]
    NotPositive {
        /// Which SKU.
        sku: Sku,
    },
    /// More units of one SKU than any order may ask for.
    #[error("an order may ask for at most {} units of {sku}", Units::MAX)]
    TooManyUnits {
        /// Which SKU.
        sku: Sku,
    },
    /// A confirmation of an order inventory never heard of: the events of one order arrive
    /// in order on one partition, so this is a message from elsewhere, not a race.
    #[error("no reservation for this order")]
    NotFound,
}

/// Decides what a command does to an order's reservation (`None`: inventory has no row for
/// the order), given the counts the unit of work holds locked.
pub fn decide(reservation: Option<&Reservation>, stock: &Stock, command: Command) -> Result<Vec<Event>, DomainError> {
    use ReservationState as S;
    let state = reservation.map(|reservation| reservation.state);
    let held = || {
        reservation
            .map(|reservation| reservation.demand.clone())
            .unwrap_or_default()
    };
    Ok(match (command, state) {
        (Command::Reserve(demand), None) => {
            let shortages = stock.shortages(&demand);
            if shortages.is_empty() {
                vec![Event::Reserved { demand }]
            } else {
                vec![Event::Rejected { demand, shortages }]
            }
        }
        // A second OrderPlaced (a redrive past the inbox's window), or one that comes after its
        // cancellation: whatever the order has, it keeps, and it takes nothing more.
        (Command::Reserve(_), Some(_)) => vec![],

        (Command::Commit, None) => return Err(DomainError::NotFound),
        (Command::Commit, Some(S::Reserved)) => vec![Event::Committed { demand: held() }],
        (Command::Commit, Some(S::Expired)) => {
            let demand = held();
            let shortages = stock.shortages(&demand);
            if shortages.is_empty() {
                vec![Event::Retaken { demand }]
            } else {
                vec![Event::CameShort { shortages }]
            }
        }
        // Already sold, short or gone; or the order was never held (order-svc confirms only
        // after StockReserved, and never a cancelled order): nothing to do.
        (Command::Commit, Some(S::Committed | S::Short | S::Rejected | S::Released | S::Dispatched)) => vec![],

        (Command::Release, None) => vec![Event::Released {
            returned: Returned::Nothing,
        }],
        (Command::Release, Some(S::Reserved)) => vec![Event::Released {
            returned: Returned::Held(held()),
        }],
        (Command::Release, Some(S::Committed)) => vec![Event::Released {
            returned: Returned::Sold(held()),
        }],
        // Nothing is held; the cancellation settles the expired or short order's case.
        (Command::Release, Some(S::Expired | S::Short)) => vec![Event::Released {
            returned: Returned::Nothing,
        }],
        // A rejected order held nothing and its rejection is the better record; a released
        // one is released. A dispatched one cannot be cancelled (order-svc refuses it after
        // dispatch); were it asked, the goods are not on the shelf to put back.
        (Command::Release, Some(S::Rejected | S::Released | S::Dispatched)) => vec![],

        (Command::Expire, Some(S::Reserved)) => vec![Event::Expired { demand: held() }],
        // The sweeper picked a reservation that settled meanwhile (or was never there).
        (Command::Expire, _) => vec![],

        (Command::Dispatch, Some(S::Committed)) => vec![Event::Dispatched { demand: held() }],
        // Fulfilment dispatches only what inventory committed (docs/adr/0007): anything else
        // is a redelivery of a dispatch already counted.
        (Command::Dispatch, _) => vec![],
    })
}

/// The reservation after `event`, with the unit's counts changed to match.
pub fn apply(reservation: Option<Reservation>, stock: &mut Stock, event: &Event) -> Reservation {
    use ReservationState as S;
    let demand = reservation.map(|reservation| reservation.demand).unwrap_or_default();
    let (state, demand) = match event {
        Event::Reserved { demand } => {
            stock.change(demand, |level, units| level.reserved += units);
            (S::Reserved, demand.clone())
        }
        Event::Rejected { demand, .. } => (S::Rejected, demand.clone()),
        Event::Committed { demand } => {
            stock.change(demand, |level, units| {
                level.reserved -= units;
                level.sold += units;
            });
            (S::Committed, demand.clone())
        }
        Event::Retaken { demand } => {
            stock.change(demand, |level, units| level.sold += units);
            (S::Committed, demand.clone())
        }
        Event::CameShort { .. } => (S::Short, demand),
        Event::Expired { demand } => {
            stock.change(demand, |level, units| level.reserved -= units);
            (S::Expired, demand.clone())
        }
        Event::Released { returned } => {
            match returned {
                Returned::Nothing => {}
                Returned::Held(held) => stock.change(held, |level, units| level.reserved -= units),
                Returned::Sold(sold) => stock.change(sold, |level, units| level.sold -= units),
            }
            (S::Released, demand)
        }
        Event::Dispatched { demand } => {
            stock.change(demand, |level, units| {
                level.sold -= units;
                level.on_hand -= units;
            });
            (S::Dispatched, demand.clone())
        }
    };
    Reservation { state, demand }
}

#[cfg(test)]
mod tests;
