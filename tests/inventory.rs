//! inventory's units of work against the real Postgres: concurrent units on hot SKUs never
//! oversell, never deadlock, and leave counts that match the reservations exactly.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use inventory_svc::domain::{Command, Demand, Event, Sku};
use inventory_svc::unit::{self, Asked};
use orderflow_tests::{TestDb, fresh_db};
use ordersctl::bench::workload::{Rng, Zipf};

/// The catalogue: SKU-0000 is the most demanded, and every unit locks the hottest rows. The
/// five after them (SKU-0005..0009) have little stock: they run out during the test, and
/// orders are refused on them while other units hold their rows.
const SKUS: u64 = 200;
const SCARCE: std::ops::RangeInclusive<u64> = 6..=10;
const SCARCE_STOCK: i64 = 40;
const PLENTY: i64 = 100_000;
/// Concurrent units (as many consumer instances, each with its own partitions' orders).
const WORKERS: u64 = 8;
const UNITS_PER_WORKER: u64 = 40;
const ORDERS_PER_UNIT: u64 = 16;

fn sku(rank: u64) -> String {
    format!("SKU-{:04}", rank - 1)
}

async fn seed(db: &TestDb) {
    let skus: Vec<String> = (1..=SKUS).map(sku).collect();
    let on_hand: Vec<i64> = (1..=SKUS)
        .map(|rank| if SCARCE.contains(&rank) { SCARCE_STOCK } else { PLENTY })
        .collect();
    sqlx::query("INSERT INTO stock (sku, on_hand) SELECT * FROM unnest($1::text[], $2::int8[])")
        .bind(&skus)
        .bind(&on_hand)
        .execute(&db.pool)
        .await
        .unwrap();
}

/// One order's lines: one to three SKUs drawn from a Zipfian demand, one to three units each.
fn demand(zipf: &Zipf, rng: &mut Rng) -> Demand {
    let lines = (0..=rng.below(3)).map(|_| {
        let sku = Sku::parse(&sku(zipf.sample(rng))).unwrap();
        (sku, 1 + i64::try_from(rng.below(3)).unwrap())
    });
    Demand::new(lines).unwrap()
}

/// Runs one unit in its own transaction, again if Postgres broke a deadlock by aborting it
/// (what the consumer runtime does with that transient error); how many attempts it took.
async fn run_unit(db: &TestDb, asked: &[Asked]) -> (Vec<unit::Decided>, u64) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut tx = db.pool.begin().await.unwrap();
        match unit::decide_and_write(&mut tx, asked, Duration::from_secs(900)).await {
            Ok(decided) => {
                tx.commit().await.unwrap();
                return (decided, attempts);
            }
            Err(unit::UnitError::Store(inventory_svc::store::StoreError::Database(sqlx::Error::Database(error))))
                if error.code().as_deref() == Some("40P01") =>
            {
                tx.rollback().await.unwrap();
            }
            Err(error) => panic!("unit failed: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_units_on_hot_skus_never_oversell_never_deadlock_and_count_exactly() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    seed(&db).await;
    let db = Arc::new(db);
    let zipf = Arc::new(Zipf::new(SKUS, 1.1));
    let retries = Arc::new(AtomicU64::new(0));
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (db, zipf, retries) = (db.clone(), zipf.clone(), retries.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x5EED ^ worker);
            let mut mine: Vec<uuid::Uuid> = Vec::new();
            let (mut reserved, mut rejected) = (0u64, 0u64);
            for _ in 0..UNITS_PER_WORKER {
                // New orders, and settlements of this worker's earlier ones: some confirmed,
                // some cancelled, as a unit of orders.events holds them.
                let mut asked: Vec<Asked> = (0..ORDERS_PER_UNIT)
                    .map(|_| Asked {
                        order_id: uuid::Uuid::now_v7(),
                        command: Command::Reserve(demand(&zipf, &mut rng)),
                    })
                    .collect();
                for _ in 0..ORDERS_PER_UNIT / 2 {
                    if mine.is_empty() {
                        break;
                    }
                    let earlier = mine.swap_remove(usize::try_from(rng.below(mine.len() as u64)).unwrap());
                    let command = if rng.below(4) == 0 {
                        Command::Release
                    } else {
                        Command::Commit
                    };
                    asked.push(Asked {
                        order_id: earlier,
                        command,
                    });
                }
                let (decided, attempts) = run_unit(&db, &asked).await;
                retries.fetch_add(attempts - 1, Ordering::Relaxed);
                for decided in decided {
                    match decided.events.first() {
                        Some(Event::Reserved { .. }) => {
                            reserved += 1;
                            mine.push(decided.order_id);
                        }
                        Some(Event::Rejected { .. }) => rejected += 1,
                        _ => {}
                    }
                }
            }
            (reserved, rejected)
        }));
    }
    let (mut reserved, mut rejected) = (0, 0);
    for worker in workers {
        let (r, j) = worker.await.unwrap();
        reserved += r;
        rejected += j;
    }
    let elapsed = started.elapsed();
    let units = WORKERS * UNITS_PER_WORKER;
    println!(
        "{units} units of {ORDERS_PER_UNIT} new orders and up to {} settlements, {WORKERS} at once: \
         {reserved} reserved, {rejected} rejected, {} deadlock retries, {:.0} units/s",
        ORDERS_PER_UNIT / 2,
        retries.load(Ordering::Relaxed),
        units as f64 / elapsed.as_secs_f64()
    );

    assert!(rejected > 0, "the scarce SKUs ran out");
    assert!(reserved > rejected, "most orders found their stock");
    assert_eq!(
        retries.load(Ordering::Relaxed),
        0,
        "units lock in one order (reservations by id, stock by SKU): no deadlock"
    );

    // The counts are exactly what the reservations hold, and never more than there is.
    let held: HashMap<String, (i64, i64)> = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT l.key, coalesce(sum(l.value::bigint) FILTER (WHERE r.state = 'RESERVED'), 0)::bigint,
                coalesce(sum(l.value::bigint) FILTER (WHERE r.state = 'COMMITTED'), 0)::bigint
         FROM reservations r, jsonb_each_text(r.lines) l GROUP BY l.key",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(sku, reserved, sold)| (sku, (reserved, sold)))
    .collect();
    let stock: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT sku, on_hand, reserved, sold FROM stock ORDER BY sku")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (sku, on_hand, reserved, sold) in &stock {
        assert!(reserved + sold <= *on_hand, "{sku} oversold");
        assert_eq!(
            held.get(sku).copied().unwrap_or((0, 0)),
            (*reserved, *sold),
            "{sku}: the counts match the reservations"
        );
    }
    let taken = |sku: &str| {
        let (_, _, reserved, sold) = stock.iter().find(|row| row.0 == sku).expect("stocked");
        reserved + sold
    };
    assert!(taken("SKU-0000") > 1_000, "every unit took from the hottest row");
    assert!(
        taken("SKU-0005") > SCARCE_STOCK / 2,
        "the scarce SKU was mostly taken before orders were refused on it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_an_oversell_whatever_the_code_above_it_does() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    seed(&db).await;
    let refused = sqlx::query("UPDATE stock SET reserved = on_hand, sold = 1 WHERE sku = 'SKU-0000'")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("stock_never_oversold"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_unit_changes_nothing_and_a_cancellation_before_its_order_leaves_nothing_to_take() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    seed(&db).await;
    let (placed, cancelled_first) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let two = || Demand::new([(Sku::parse("SKU-0000").unwrap(), 2)]).unwrap();
    let unit = vec![
        Asked {
            order_id: placed,
            command: Command::Reserve(two()),
        },
        Asked {
            order_id: cancelled_first,
            command: Command::Release,
        },
    ];
    let (first, _) = run_unit(&db, &unit).await;
    assert!(matches!(first[0].events[..], [Event::Reserved { .. }]), "{first:?}");
    assert!(matches!(first[1].events[..], [Event::Released { .. }]), "{first:?}");
    // The same messages again (past the inbox's window), and the cancelled order's placement.
    let (again, _) = run_unit(&db, &unit).await;
    assert!(again.iter().all(|d| d.events.is_empty()), "{again:?}");
    let (late, _) = run_unit(
        &db,
        &[Asked {
            order_id: cancelled_first,
            command: Command::Reserve(two()),
        }],
    )
    .await;
    assert!(late[0].events.is_empty(), "a cancelled order takes no stock");
    let reserved: i64 = sqlx::query_scalar("SELECT reserved FROM stock WHERE sku = 'SKU-0000'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(reserved, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_units_sell_release_expire_and_take_again_what_earlier_units_held() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    seed(&db).await;
    let scarce = "SKU-0005";
    let lines = |n| Demand::new([(Sku::parse(scarce).unwrap(), n)]).unwrap();
    let (sold, cancelled, late) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let ask = |order_id, command| Asked { order_id, command };
    run_unit(
        &db,
        &[
            ask(sold, Command::Reserve(lines(10))),
            ask(cancelled, Command::Reserve(lines(10))),
            ask(late, Command::Reserve(lines(10))),
        ],
    )
    .await;
    let (second, _) = run_unit(
        &db,
        &[
            ask(sold, Command::Commit),
            ask(cancelled, Command::Release),
            ask(late, Command::Expire),
        ],
    )
    .await;
    assert!(matches!(second[2].events[..], [Event::Expired { .. }]), "{second:?}");
    let counts = || async {
        sqlx::query_as::<_, (i64, i64)>("SELECT reserved, sold FROM stock WHERE sku = $1")
            .bind(scarce)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(counts().await, (0, 10), "one sold, one released, one expired");
    // The late confirmation finds its stock still there and takes it again; then the sold
    // order is cancelled after confirmation and its units go back.
    let (third, _) = run_unit(&db, &[ask(late, Command::Commit), ask(sold, Command::Release)]).await;
    assert!(matches!(third[0].events[..], [Event::Retaken { .. }]), "{third:?}");
    assert_eq!(counts().await, (0, 10));
    let deadline: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT expires_at FROM reservations WHERE order_id = $1")
            .bind(late)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(deadline, None, "only a held reservation has a deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_refuses_lines_that_are_not_units() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    for lines in [
        r#"{"A": 0}"#,
        r#"{"A": -1}"#,
        r#"{"A": 1.5}"#,
        r#"{"A": "1"}"#,
        "[]",
        "{}",
    ] {
        let refused =
            sqlx::query("INSERT INTO reservations (order_id, state, lines) VALUES ($1, 'REJECTED', $2::jsonb)")
                .bind(uuid::Uuid::now_v7())
                .bind(lines)
                .execute(&db.pool)
                .await;
        assert!(refused.is_err(), "{lines} was accepted");
    }
    sqlx::query("INSERT INTO reservations (order_id, state, lines) VALUES ($1, 'REJECTED', '{\"A\": 2}')")
        .bind(uuid::Uuid::now_v7())
        .execute(&db.pool)
        .await
        .expect("whole positive units are lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_another_transaction_inserted_meanwhile_is_never_overwritten() {
    use inventory_svc::domain::{Reservation, ReservationState};
    use inventory_svc::store::{self, Written};
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    let order = uuid::Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    let found = store::lock_reservations(&mut tx, &[order].into()).await.unwrap();
    assert!(found.is_empty());
    // A second consumer of the same order (a zombie instance) records it meanwhile.
    sqlx::query("INSERT INTO reservations (order_id, state, lines) VALUES ($1, 'REJECTED', '{\"SKU-0005\": 2}')")
        .bind(order)
        .execute(&db.pool)
        .await
        .unwrap();
    let ours = Reservation {
        state: ReservationState::Released,
        demand: Demand::default(),
    };
    let written = store::write_reservations(
        &mut tx,
        &Default::default(),
        &[Written {
            order_id: order,
            reservation: &ours,
            expires_at: None,
        }],
    )
    .await;
    assert!(
        written
            .as_ref()
            .is_err_and(|error| error.to_string().contains("appeared concurrently")),
        "{:?}",
        written.map(drop)
    );
    tx.rollback().await.unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
        .bind(order)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "REJECTED", "the other transaction's row stands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_of_a_sku_whose_row_is_gone_are_refused_not_dropped() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    seed(&db).await;
    let order = uuid::Uuid::now_v7();
    let two = Demand::new([(Sku::parse("SKU-0005").unwrap(), 2)]).unwrap();
    run_unit(
        &db,
        &[Asked {
            order_id: order,
            command: Command::Reserve(two),
        }],
    )
    .await;
    sqlx::query("DELETE FROM stock WHERE sku = 'SKU-0005'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let released = unit::decide_and_write(
        &mut tx,
        &[Asked {
            order_id: order,
            command: Command::Release,
        }],
        Duration::from_secs(900),
    )
    .await;
    assert!(
        matches!(
            &released,
            Err(unit::UnitError::Store(inventory_svc::store::StoreError::Corrupt(_)))
        ),
        "{released:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_releases_what_outlived_its_deadline_and_skips_what_a_unit_is_deciding() {
    let db = fresh_db(&inventory_svc::MIGRATOR).await;
    seed(&db).await;
    let orders: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    let asked: Vec<Asked> = orders
        .iter()
        .map(|&order_id| Asked {
            order_id,
            command: Command::Reserve(Demand::new([(Sku::parse("SKU-0005").unwrap(), 2)]).unwrap()),
        })
        .collect();
    run_unit(&db, &asked).await;
    // Two deadlines pass (moved back rather than waited for); the third is still ahead.
    sqlx::query("UPDATE reservations SET expires_at = now() - interval '1 second' WHERE order_id = ANY($1)")
        .bind(&orders[..2])
        .execute(&db.pool)
        .await
        .unwrap();
    // A unit is deciding the first one: it holds its row.
    let mut unit_tx = db.pool.begin().await.unwrap();
    inventory_svc::store::lock_reservations(&mut unit_tx, &[orders[0]].into())
        .await
        .unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    // A bound only on the failing path: a sweeper that waited for the unit would wait until
    // the unit ends, which here is after this call.
    let swept = tokio::time::timeout(Duration::from_secs(10), unit::expire_due(&mut tx, 100))
        .await
        .expect("the sweeper waited for a reservation a unit holds")
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(swept.len(), 1, "the held one is skipped: {swept:?}");
    assert_eq!(swept[0].order_id, orders[1]);
    assert!(matches!(swept[0].events[..], [Event::Expired { .. }]));
    unit_tx.rollback().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let swept = unit::expire_due(&mut tx, 100).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        swept.iter().map(|d| d.order_id).collect::<Vec<_>>(),
        [orders[0]],
        "the next pass takes it"
    );
    let (reserved, expired): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT reserved FROM stock WHERE sku = 'SKU-0005'),
                (SELECT count(*) FROM reservations WHERE state = 'EXPIRED' AND expires_at IS NULL)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (reserved, expired),
        (2, 2),
        "only the third order still holds its units"
    );
}
