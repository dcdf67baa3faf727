// Unit tests: a failed setup step stops the test with its reason.
#![allow(clippy::expect_used)]

use super::*;

fn eur() -> Currency {
    Currency::from_code("EUR").expect("EUR is an ISO-4217 code")
}

fn item(sku: &str, quantity: i32, unit_price: i64) -> LineItem {
    LineItem {
        sku: Sku::parse(sku).expect("valid sku"),
        quantity: Quantity::parse(quantity).expect("valid quantity"),
        unit_price: Money::new(unit_price, eur()).expect("valid price"),
    }
}

fn place(items: Vec<LineItem>, declared: i64) -> Command {
    Command::Place(PlaceOrder {
        order_id: OrderId::generate(),
        customer_id: CustomerId::parse(42).expect("positive"),
        items,
        declared_total: Money::new(declared, eur()).expect("positive"),
        payment_token: PaymentToken::parse("tok_visa").expect("printable"),
        max_total_minor: i64::MAX,
    })
}

#[test]
fn placing_a_new_order_makes_it_pending_and_awaiting_payment() {
    let events = decide(None, place(vec![item("A-1", 2, 1_250), item("B-2", 1, 500)], 3_000)).expect("valid order");
    let [Event::Placed { order }] = events.as_slice() else {
        panic!("one Placed event, got {events:?}")
    };
    assert_eq!(order.total.amount_minor(), 3_000);
    assert_eq!(order.status, OrderStatus::Pending);
    assert_eq!(order.saga_state, SagaState::AwaitingPayment);
    assert_eq!(order.version, 0);
    let state = apply(None, events[0].clone()).expect("placed");
    assert_eq!(&state, order);
}

fn placed() -> Order {
    let events = decide(None, place(vec![item("A-1", 1, 100)], 100)).expect("valid order");
    apply(None, events[0].clone()).expect("placed")
}

fn authorized() -> Command {
    Command::RecordPaymentAuthorized {
        payment_id: "p-1".into(),
    }
}

#[test]
fn an_authorization_confirms_a_pending_order_once() {
    let order = placed();
    let events = decide(Some(&order), authorized()).expect("pending order");
    assert_eq!(
        events,
        vec![Event::Confirmed {
            payment_id: "p-1".into()
        }]
    );
    let confirmed = apply(Some(order), events[0].clone()).expect("exists");
    assert_eq!(
        (confirmed.status, confirmed.saga_state, confirmed.version),
        (OrderStatus::Confirmed, SagaState::Completed, 1)
    );
    assert_eq!(
        decide(Some(&confirmed), authorized()),
        Ok(vec![]),
        "a duplicate changes nothing"
    );
}

#[test]
fn a_failed_payment_cancels_and_the_deadline_cancels_with_its_own_reason() {
    let failed = decide(
        Some(&placed()),
        Command::RecordPaymentFailed {
            detail: "declined".into(),
        },
    )
    .expect("pending");
    assert_eq!(
        failed,
        vec![Event::Cancelled {
            reason: CancellationReason::PaymentFailed,
            detail: "declined".into()
        }]
    );
    let expired = decide(Some(&placed()), Command::Expire { waited_secs: 30 }).expect("pending");
    assert!(matches!(
        expired.as_slice(),
        [Event::Cancelled {
            reason: CancellationReason::PaymentTimeout,
            ..
        }]
    ));
}

#[test]
fn a_terminal_order_is_never_resurrected() {
    let order = placed();
    let cancelled = apply(
        Some(order.clone()),
        decide(Some(&order), Command::Expire { waited_secs: 1 }).expect("pending")[0].clone(),
    )
    .expect("exists");
    assert_eq!(cancelled.status, OrderStatus::Cancelled);
    // A late authorization, a late failure, a second sweeper: nothing changes.
    for command in [
        authorized(),
        Command::RecordPaymentFailed { detail: "x".into() },
        Command::Expire { waited_secs: 2 },
    ] {
        assert_eq!(decide(Some(&cancelled), command), Ok(vec![]));
    }
    assert_eq!(decide(None, authorized()), Err(DomainError::NotFound));
}

#[test]
fn placing_an_existing_order_is_refused() {
    let events = decide(None, place(vec![item("A-1", 1, 100)], 100)).expect("valid order");
    let state = apply(None, events[0].clone()).expect("placed");
    assert_eq!(
        decide(Some(&state), place(vec![item("A-1", 1, 100)], 100)),
        Err(DomainError::AlreadyExists)
    );
}

#[test]
fn a_total_that_is_not_the_sum_is_refused() {
    assert_eq!(
        decide(None, place(vec![item("A-1", 3, 100)], 299)),
        Err(DomainError::TotalMismatch {
            declared: 299,
            computed: 300
        })
    );
}

#[test]
fn an_overflowing_total_is_refused() {
    let huge = item("A-1", Quantity::MAX, i64::MAX / 2);
    assert_eq!(decide(None, place(vec![huge], 1)), Err(DomainError::TotalOverflow));
    let half = item("A-1", 1, i64::MAX / 2 + 1);
    assert_eq!(
        decide(None, place(vec![half.clone(), half], 1)),
        Err(DomainError::TotalOverflow)
    );
}

#[test]
fn a_total_above_the_currency_limit_is_refused_and_one_at_it_is_accepted() {
    let limited = |declared| {
        let Command::Place(place) = place(vec![item("A-1", 1, declared)], declared) else {
            unreachable!("place() builds a Place command")
        };
        decide(
            None,
            Command::Place(PlaceOrder {
                max_total_minor: 10_000,
                ..place
            }),
        )
    };
    assert!(limited(10_000).is_ok());
    assert_eq!(limited(10_001), Err(DomainError::TotalTooLarge { max: 10_000 }));
    assert_eq!(limited(i64::MAX), Err(DomainError::TotalTooLarge { max: 10_000 }));
}

#[test]
fn empty_and_oversized_orders_are_refused() {
    assert_eq!(decide(None, place(vec![], 1)), Err(DomainError::NoItems));
    let many = vec![item("A-1", 1, 1); MAX_ITEMS + 1];
    assert_eq!(
        decide(None, place(many, (MAX_ITEMS + 1) as i64)),
        Err(DomainError::TooManyItems)
    );
}

#[test]
fn items_in_another_currency_are_refused() {
    let usd = Currency::from_code("USD").expect("USD is an ISO-4217 code");
    let mut dollars = item("A-1", 1, 100);
    dollars.unit_price = Money::new(100, usd).expect("positive");
    assert_eq!(
        decide(None, place(vec![item("B-1", 1, 100), dollars], 200)),
        Err(DomainError::CurrencyMismatch {
            index: 1,
            expected: "EUR",
            found: "USD"
        })
    );
}

#[test]
fn zero_values_are_missing_and_negatives_are_not_positive() {
    assert_eq!(CustomerId::parse(0), Err(ValueError::Missing));
    assert_eq!(CustomerId::parse(-3), Err(ValueError::NotPositive));
    assert_eq!(Quantity::parse(0), Err(ValueError::Missing));
    assert_eq!(Quantity::parse(-1), Err(ValueError::NotPositive));
    assert_eq!(
        Quantity::parse(Quantity::MAX + 1),
        Err(ValueError::TooLarge(i64::from(Quantity::MAX)))
    );
    assert_eq!(Money::new(0, eur()).map_err(ValueError::from), Err(ValueError::Missing));
    assert_eq!(
        Money::new(-5, eur()).map_err(ValueError::from),
        Err(ValueError::NotPositive)
    );
    assert_eq!(OrderId::parse(""), Err(ValueError::Missing));
    assert_eq!(
        OrderId::parse("00000000-0000-0000-0000-000000000000"),
        Err(ValueError::Missing)
    );
    assert_eq!(OrderId::parse("not-a-uuid"), Err(ValueError::NotUuid));
}

#[test]
fn strings_are_bounded_and_printable() {
    let sku = |raw: &str| Sku::parse(raw).map_err(ValueError::from);
    assert_eq!(sku(""), Err(ValueError::Missing));
    assert_eq!(sku(&"x".repeat(65)), Err(ValueError::TooLong(64)));
    assert!(sku(&"é".repeat(64)).is_ok(), "the bound counts characters, not bytes");
    assert_eq!(sku("A\n1"), Err(ValueError::NotPrintable));
    assert_eq!(sku("A\u{202E}1"), Err(ValueError::NotPrintable));
    assert_eq!(PaymentToken::parse("tok\u{0}"), Err(ValueError::NotPrintable));
    for invisible in ["A\u{2067}1", "A\u{00AD}1", "A\u{E0041}", " ", "A "] {
        assert_eq!(sku(invisible), Err(ValueError::NotPrintable), "{invisible:?}");
    }
    assert!(sku("👩\u{200D}💻").is_ok(), "an emoji sequence is a legitimate SKU");
    assert!(!format!("{:?}", PaymentToken::parse("tok_secret").expect("printable")).contains("secret"));
}

proptest::proptest! {
    #[test]
    fn decide_accepts_exactly_the_sums_that_fit(prices in proptest::collection::vec((1i64..=i64::MAX, 1i32..=Quantity::MAX), 1..5)) {
        let items: Vec<LineItem> = prices.iter().map(|&(p, q)| item("S", q, p)).collect();
        let exact = prices.iter().try_fold(0i64, |acc, &(p, q)| p.checked_mul(i64::from(q)).and_then(|l| acc.checked_add(l)));
        match (exact, decide(None, place(items, exact.unwrap_or(1)))) {
            (Some(sum), Ok(events)) => {
                let Event::Placed { order } = &events[0] else { panic!("Placed expected") };
                proptest::prop_assert_eq!(order.total.amount_minor(), sum);
            }
            (None, Err(DomainError::TotalOverflow)) => {}
            (expected, got) => proptest::prop_assert!(false, "sum {expected:?} but decide said {got:?}"),
        }
    }
}
