use proptest::prelude::*;

use super::*;

fn sku(raw: &str) -> Sku {
    Sku::parse(raw).expect("a valid SKU")
}

fn demand(lines: &[(&str, i64)]) -> Demand {
    Demand::new(lines.iter().map(|&(raw, units)| (sku(raw), units))).expect("a valid demand")
}

fn stock(levels: &[(&str, i64)]) -> Stock {
    Stock::new(levels.iter().map(|&(raw, on_hand)| {
        (
            sku(raw),
            Level {
                on_hand,
                ..Level::default()
            },
        )
    }))
}

/// Decides and applies, as a unit of work does for one order.
fn run(reservation: Option<Reservation>, stock: &mut Stock, command: Command) -> (Option<Reservation>, Vec<Event>) {
    let events = decide(reservation.as_ref(), stock, command).expect("decided");
    let after = events
        .iter()
        .fold(reservation, |reservation, event| Some(apply(reservation, stock, event)));
    (after, events)
}

#[test]
fn an_order_holds_every_line_or_none() {
    let mut shelf = stock(&[("A", 5), ("B", 1)]);
    let (reservation, events) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2), ("B", 2)])));
    assert_eq!(
        events,
        vec![Event::Rejected {
            demand: demand(&[("A", 2), ("B", 2)]),
            shortages: vec![Shortage {
                sku: sku("B"),
                requested: Units(2),
                available: 1,
            }],
        }]
    );
    assert_eq!(reservation.map(|r| r.state), Some(ReservationState::Rejected));
    assert_eq!(
        shelf,
        stock(&[("A", 5), ("B", 1)]),
        "a rejected order holds nothing, not even its available lines"
    );

    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2), ("B", 1)])));
    assert_eq!(reservation.map(|r| r.state), Some(ReservationState::Reserved));
    assert_eq!(shelf.level(&sku("A")).reserved, 2);
    assert_eq!(shelf.level(&sku("B")).available(), 0);
}

#[test]
fn orders_of_one_unit_see_what_the_orders_before_them_took() {
    let mut shelf = stock(&[("HOT", 5)]);
    let (first, _) = run(None, &mut shelf, Command::Reserve(demand(&[("HOT", 3)])));
    let (second, events) = run(None, &mut shelf, Command::Reserve(demand(&[("HOT", 3)])));
    assert_eq!(first.map(|r| r.state), Some(ReservationState::Reserved));
    assert_eq!(second.map(|r| r.state), Some(ReservationState::Rejected));
    assert!(matches!(&events[0], Event::Rejected { shortages, .. } if shortages[0].available == 2));
}

#[test]
fn a_sku_named_twice_asks_for_the_sum_and_an_unknown_sku_is_not_stocked() {
    assert_eq!(demand(&[("A", 2), ("A", 3)]), demand(&[("A", 5)]));
    let mut shelf = stock(&[("A", 5)]);
    let (_, events) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2), ("NEW", 1)])));
    assert!(matches!(&events[0], Event::Rejected { shortages, .. }
        if shortages == &vec![Shortage { sku: sku("NEW"), requested: Units(1), available: 0 }]));
}

#[test]
fn a_demand_refuses_nothing_nonpositive_and_absurd_lines() {
    assert_eq!(Demand::new([]), Err(DomainError::NoLines));
    assert_eq!(
        Demand::new([(sku("A"), 0)]),
        Err(DomainError::NotPositive { sku: sku("A") })
    );
    assert_eq!(
        Demand::new([(sku("A"), -1)]),
        Err(DomainError::NotPositive { sku: sku("A") })
    );
    assert_eq!(
        Demand::new([(sku("A"), Units::MAX), (sku("A"), 1)]),
        Err(DomainError::TooManyUnits { sku: sku("A") })
    );
    assert_eq!(
        Demand::new([(sku("A"), i64::MAX), (sku("A"), i64::MAX)]),
        Err(DomainError::TooManyUnits { sku: sku("A") }),
        "a sum that overflows is refused, not wrapped"
    );
}

#[test]
fn a_confirmation_sells_what_is_held_and_a_cancellation_after_it_puts_it_back() {
    let mut shelf = stock(&[("A", 5)]);
    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (reservation, _) = run(reservation, &mut shelf, Command::Commit);
    assert_eq!(reservation.as_ref().map(|r| r.state), Some(ReservationState::Committed));
    assert_eq!(
        shelf.level(&sku("A")),
        Level {
            on_hand: 5,
            reserved: 0,
            sold: 2
        }
    );
    let (reservation, events) = run(reservation, &mut shelf, Command::Release);
    assert_eq!(
        events,
        vec![Event::Released {
            returned: Returned::Sold(demand(&[("A", 2)]))
        }]
    );
    assert_eq!(reservation.map(|r| r.state), Some(ReservationState::Released));
    assert_eq!(
        shelf.level(&sku("A")),
        Level {
            on_hand: 5,
            reserved: 0,
            sold: 0
        }
    );
}

#[test]
fn a_cancellation_before_confirmation_releases_what_is_held() {
    let mut shelf = stock(&[("A", 5)]);
    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (reservation, _) = run(reservation, &mut shelf, Command::Release);
    assert_eq!(reservation.as_ref().map(|r| r.state), Some(ReservationState::Released));
    assert_eq!(shelf.level(&sku("A")).available(), 5);
    let (_, events) = run(reservation, &mut shelf, Command::Release);
    assert!(events.is_empty(), "a second cancellation changes nothing");
}

#[test]
fn a_cancellation_that_comes_before_the_order_leaves_the_order_nothing_to_take() {
    let mut shelf = stock(&[("A", 5)]);
    let (reservation, events) = run(None, &mut shelf, Command::Release);
    assert_eq!(
        events,
        vec![Event::Released {
            returned: Returned::Nothing
        }]
    );
    let (reservation, events) = run(reservation, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    assert!(events.is_empty());
    assert_eq!(reservation.map(|r| r.state), Some(ReservationState::Released));
    assert_eq!(shelf.level(&sku("A")).available(), 5);
}

#[test]
fn a_redelivered_order_takes_nothing_more() {
    let mut shelf = stock(&[("A", 5)]);
    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (_, events) = run(reservation, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    assert!(events.is_empty());
    assert_eq!(shelf.level(&sku("A")).reserved, 2);
}

#[test]
fn an_expired_reservation_goes_back_and_a_late_confirmation_takes_it_again_if_it_is_there() {
    let mut shelf = stock(&[("A", 3)]);
    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (reservation, _) = run(reservation, &mut shelf, Command::Expire);
    assert_eq!(reservation.as_ref().map(|r| r.state), Some(ReservationState::Expired));
    assert_eq!(shelf.level(&sku("A")).available(), 3);
    let (reservation, events) = run(reservation, &mut shelf, Command::Commit);
    assert_eq!(
        events,
        vec![Event::Retaken {
            demand: demand(&[("A", 2)])
        }]
    );
    assert_eq!(reservation.map(|r| r.state), Some(ReservationState::Committed));
    assert_eq!(
        shelf.level(&sku("A")),
        Level {
            on_hand: 3,
            reserved: 0,
            sold: 2
        }
    );
}

#[test]
fn a_late_confirmation_whose_stock_is_gone_comes_short_and_never_oversells() {
    let mut shelf = stock(&[("A", 3)]);
    let (late, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (late, _) = run(late, &mut shelf, Command::Expire);
    run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (late, events) = run(late, &mut shelf, Command::Commit);
    assert!(matches!(&events[0], Event::CameShort { shortages } if shortages[0].available == 1));
    assert_eq!(late.as_ref().map(|r| r.state), Some(ReservationState::Short));
    assert_eq!(
        shelf.level(&sku("A")),
        Level {
            on_hand: 3,
            reserved: 2,
            sold: 0
        }
    );
    let (late, events) = run(late, &mut shelf, Command::Release);
    assert_eq!(
        events,
        vec![Event::Released {
            returned: Returned::Nothing
        }],
        "refunding a short order puts nothing back: it never took anything"
    );
    assert_eq!(late.map(|r| r.state), Some(ReservationState::Released));
}

#[test]
fn the_sweeper_leaves_settled_reservations_alone() {
    let mut shelf = stock(&[("A", 3)]);
    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (reservation, _) = run(reservation, &mut shelf, Command::Commit);
    let (_, events) = run(reservation, &mut shelf, Command::Expire);
    assert!(events.is_empty());
    assert_eq!(decide(None, &shelf, Command::Expire), Ok(vec![]));
}

#[test]
fn a_dispatch_takes_what_was_sold_out_of_the_warehouse_for_good() {
    let mut shelf = stock(&[("A", 5)]);
    let (reservation, _) = run(None, &mut shelf, Command::Reserve(demand(&[("A", 2)])));
    let (reservation, events) = run(reservation, &mut shelf, Command::Dispatch);
    assert!(events.is_empty(), "nothing is dispatched before it is sold");
    let (reservation, _) = run(reservation, &mut shelf, Command::Commit);
    let (reservation, _) = run(reservation, &mut shelf, Command::Dispatch);
    assert_eq!(
        reservation.as_ref().map(|r| r.state),
        Some(ReservationState::Dispatched)
    );
    assert_eq!(
        shelf.level(&sku("A")),
        Level {
            on_hand: 3,
            reserved: 0,
            sold: 0
        }
    );
    let (_, events) = run(reservation, &mut shelf, Command::Release);
    assert!(events.is_empty(), "dispatched goods are not on the shelf to put back");
    assert_eq!(shelf.level(&sku("A")).available(), 3);
}

#[test]
fn a_confirmation_of_an_order_never_seen_is_refused() {
    assert_eq!(
        decide(None, &Stock::default(), Command::Commit),
        Err(DomainError::NotFound)
    );
}

/// One step of an arbitrary history: which of a few orders, and what happens to it.
#[derive(Debug, Clone)]
enum Step {
    Reserve(usize, Vec<(usize, i64)>),
    Commit(usize),
    Release(usize),
    Expire(usize),
    Dispatch(usize),
}

const SKUS: [&str; 3] = ["HOT", "WARM", "COLD"];
const ORDERS: usize = 6;

fn step() -> impl Strategy<Value = Step> {
    let order = 0..ORDERS;
    prop_oneof![
        (order.clone(), prop::collection::vec((0..SKUS.len(), 1i64..4), 1..4))
            .prop_map(|(o, lines)| Step::Reserve(o, lines)),
        order.clone().prop_map(Step::Commit),
        order.clone().prop_map(Step::Release),
        order.clone().prop_map(Step::Expire),
        order.prop_map(Step::Dispatch),
    ]
}

proptest! {
    /// Whatever the orders do, in whatever order (one after another, as a unit of work decides
    /// them over the counts it locked; concurrency is the locks' business), the counts always
    /// match the reservations (what is held is exactly what RESERVED reservations hold, what is
    /// sold exactly what COMMITTED ones bought, what left exactly what DISPATCHED ones took)
    /// and never exceed what is on hand; and stock is refused only when it is short.
    #[test]
    fn no_history_oversells_or_loses_a_unit(
        on_hand in prop::collection::vec(0i64..6, SKUS.len()),
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let mut shelf = Stock::new(SKUS.iter().zip(&on_hand).map(|(&raw, &on_hand)| (sku(raw), Level { on_hand, ..Level::default() })));
        let mut reservations: Vec<Option<Reservation>> = vec![None; ORDERS];
        for step in steps {
            let (order, command) = match step {
                Step::Reserve(order, lines) => (
                    order,
                    Command::Reserve(Demand::new(lines.into_iter().map(|(index, units)| (sku(SKUS[index]), units))).expect("valid")),
                ),
                Step::Commit(order) => (order, Command::Commit),
                Step::Release(order) => (order, Command::Release),
                Step::Expire(order) => (order, Command::Expire),
                Step::Dispatch(order) => (order, Command::Dispatch),
            };
            let before = shelf.clone();
            match decide(reservations[order].as_ref(), &shelf, command.clone()) {
                Ok(events) => {
                    for event in &events {
                        // Refused or short only when some line really had less available.
                        let refused = match event {
                            Event::Rejected { demand, .. } => Some(demand.clone()),
                            Event::CameShort { .. } => reservations[order].as_ref().map(|r| r.demand.clone()),
                            _ => None,
                        };
                        if let Some(wanted) = refused {
                            prop_assert!(
                                wanted.lines().any(|(line, units)| before.level(line).available() < units.get()),
                                "refused with every line available: {:?}", event
                            );
                        }
                        reservations[order] = Some(apply(reservations[order].take(), &mut shelf, event));
                    }
                }
                Err(error) => {
                    prop_assert_eq!(error, DomainError::NotFound);
                    prop_assert!(reservations[order].is_none() && command == Command::Commit);
                }
            }
            for raw in SKUS {
                let level = shelf.level(&sku(raw));
                prop_assert!(level.is_consistent(), "{} oversold or negative: {:?}", raw, level);
                let owed = |state: ReservationState| -> i64 {
                    reservations
                        .iter()
                        .flatten()
                        .filter(|reservation| reservation.state == state)
                        .flat_map(|reservation| reservation.demand.lines())
                        .filter(|(line, _)| line.as_str() == raw)
                        .map(|(_, units)| units.get())
                        .sum()
                };
                prop_assert_eq!(level.reserved, owed(ReservationState::Reserved), "{} held", raw);
                prop_assert_eq!(level.sold, owed(ReservationState::Committed), "{} sold", raw);
                let initial = on_hand[SKUS.iter().position(|&s| s == raw).expect("one of SKUS")];
                prop_assert_eq!(level.on_hand, initial - owed(ReservationState::Dispatched), "{} dispatched", raw);
            }
        }
    }
}
