//! Admission: beyond what the saga can finish in time, PlaceOrder refuses at once (with a
//! retry hint) instead of accepting orders that then wait behind each other for seconds.
//!
//! The bound comes from what the system does, measured, not from a fixed guess. Little's law:
//! orders in flight = completion rate × time in flight. Every `refresh` it reads, from the
//! orders database (so several order-svc instances see the same numbers), the orders in
//! flight (PENDING) and the orders placed in the last `window`; the orders completed in that
//! window are those placed minus the growth of the in-flight count. An order is admitted
//! while the orders in flight (plus those admitted since the last reading) stay below
//! `completion rate × target`: a new order then waits about `target` behind the others.
//!
//! When nothing completes at all (Kafka or a consumer away, or no saga running), the system
//! is stalled, not overloaded: refusing would protect no one, and the outbox exists so that
//! orders are taken while the rest is away. Orders are then admitted; they complete after
//! the outage, within the saga deadline.
//!
//! Orders the saga deadline cancelled (PAYMENT_TIMEOUT) are not completions: they leave the
//! in-flight count because the saga gave up on them, and counting them would make a gateway
//! outage longer than the deadline look like a system completing its load (and refuse
//! everything). A reading older than a few refreshes (the database not answering) is no
//! reading: orders are admitted, and find the database away themselves.
//!
//! **PlaceOrder's own latency.** On a machine the services share, the work an admitted order
//! brings (consumers, relays, Postgres) slows PlaceOrder itself before the saga falls behind.
//! So the room also shrinks while more than 1% of PlaceOrder calls take longer than
//! `latency_target` (a fifth off per reading), and grows back slowly while they do not: fewer
//! orders admitted, less work competing with the calls.
//!
//! The rate is measured only over a window the saga was busy throughout (at least half the
//! floor in flight at its start): a load that has just begun has completed little yet, and
//! that is the pipeline filling, not the system's capacity (measured: 100 of the first 400
//! orders of a 200/s step were refused before this rule).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The admission target unless configured (`ORDER_SVC_ADMISSION_TARGET_MS`).
pub const DEFAULT_TARGET_MS: u64 = 1_000;

/// The always-admitted orders in flight unless configured (`ORDER_SVC_ADMISSION_FLOOR`).
pub const DEFAULT_FLOOR: u64 = 100;

/// PlaceOrder's latency target unless configured (`ORDER_SVC_ADMISSION_LATENCY_MS`): under
/// the seeds' 50 ms p99, with room for what the client and the network add.
pub const DEFAULT_LATENCY_TARGET_MS: u64 = 35;

/// How admission decides.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a newly admitted order may expect to wait behind those in flight (zero:
    /// admission off, every order admitted).
    pub target: Duration,
    /// Orders in flight that are always admitted, whatever the rate (a burst on an idle
    /// system).
    pub floor: u64,
    /// Over how long completions are counted.
    pub window: Duration,
    /// How often the numbers are read.
    pub refresh: Duration,
    /// The saga deadline: orders cancelled by it are not completions.
    pub saga_deadline: Duration,
    /// PlaceOrder's own latency (the call's work in this process) that at most 1% of calls
    /// may exceed before the room shrinks (zero: not watched).
    pub latency_target: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(DEFAULT_TARGET_MS),
            floor: DEFAULT_FLOOR,
            window: Duration::from_secs(2),
            refresh: Duration::from_millis(200),
            saga_deadline: Duration::from_secs(90),
            latency_target: Duration::from_millis(DEFAULT_LATENCY_TARGET_MS),
        }
    }
}

/// Completions per second below which the saga counts as stalled rather than busy.
const STALLED_BELOW: f64 = 1.0;

/// Why an order is not admitted now, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    /// Orders in flight.
    pub in_flight: u64,
    /// Orders completing per second.
    pub completing_per_sec: f64,
    /// When a retry may find room.
    pub retry_after: Duration,
}

/// A reading older than this many refreshes is no reading.
const STALE_AFTER_REFRESHES: u32 = 5;

/// What the last reading said, and PlaceOrder's latency since.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// When it was read (None: never).
    at: Option<Instant>,
    in_flight: u64,
    /// None until a whole window has been read.
    completing_per_sec: Option<f64>,
    /// Orders admitted by this process since the reading.
    admitted_since: u64,
    /// The share of the room open to new orders, 0.05 to 1: shrunk while PlaceOrder is slow.
    open: f64,
    /// PlaceOrder calls since the reading, and those slower than the latency target.
    calls: u64,
    slow: u64,
}

impl Default for Reading {
    fn default() -> Self {
        Self {
            at: None,
            in_flight: 0,
            completing_per_sec: None,
            admitted_since: 0,
            open: 1.0,
            calls: 0,
            slow: 0,
        }
    }
}

/// The share of the room open after a reading period in which `slow` of `calls` PlaceOrder
/// calls were slower than the target: a fifth less while more than 1% were, a twentieth more
/// (back to all of it) while at most 0.2% were. Pure.
fn reopen(open: f64, calls: u64, slow: u64) -> f64 {
    if calls < 20 {
        return open;
    }
    let share = slow as f64 / calls as f64;
    if share > 0.01 {
        (open * 0.8).max(0.05)
    } else if share <= 0.002 {
        (open + 0.05).min(1.0)
    } else {
        open
    }
}

/// The decision at `now`: admit, or refuse with a retry hint. Pure.
fn decide(reading: &Reading, settings: &Settings, now: Instant) -> Result<(), Refusal> {
    let fresh = reading
        .at
        .is_some_and(|at| now.saturating_duration_since(at) <= settings.refresh * STALE_AFTER_REFRESHES);
    let Some(rate) = reading.completing_per_sec.filter(|_| fresh) else {
        return Ok(());
    };
    if settings.target.is_zero() || rate < STALLED_BELOW {
        return Ok(());
    }
    let in_flight = reading.in_flight + reading.admitted_since;
    let room = (rate * settings.target.as_secs_f64()).max(settings.floor as f64) * reading.open;
    if (in_flight as f64) < room {
        return Ok(());
    }
    // By then the excess has completed, at the measured rate.
    let excess = in_flight as f64 - room + 1.0;
    let retry_after = Duration::from_secs_f64((excess / rate).clamp(0.1, 5.0));
    Err(Refusal {
        in_flight,
        completing_per_sec: rate,
        retry_after,
    })
}

/// Admission control for PlaceOrder (cheap to clone).
#[derive(Debug, Clone)]
pub struct Admission {
    settings: Settings,
    reading: Arc<Mutex<Reading>>,
}

impl Admission {
    /// Admission that admits everything.
    pub fn off() -> Self {
        Self {
            settings: Settings {
                target: Duration::ZERO,
                ..Settings::default()
            },
            reading: Arc::default(),
        }
    }

    /// Starts reading `pool` every `settings.refresh` until `shutdown`.
    pub fn start(pool: PgPool, settings: Settings, shutdown: CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let admission = Self {
            settings,
            reading: Arc::default(),
        };
        let task = tokio::spawn(admission.clone().read_until(pool, shutdown));
        (admission, task)
    }

    /// Counts one PlaceOrder call's own latency.
    pub fn observe(&self, latency: Duration) {
        if self.settings.latency_target.is_zero() {
            return;
        }
        let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        reading.calls += 1;
        if latency > self.settings.latency_target {
            reading.slow += 1;
        }
    }

    /// Admits one order, or says why not.
    pub fn admit(&self) -> Result<(), Refusal> {
        let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(refusal) = decide(&reading, &self.settings, Instant::now()) {
            metrics::counter!(orderflow_platform::telemetry::PLACE_ORDER_REFUSED, "reason" => "saga_at_capacity")
                .increment(1);
            return Err(refusal);
        }
        reading.admitted_since += 1;
        Ok(())
    }

    async fn read_until(self, pool: PgPool, shutdown: CancellationToken) {
        if self.settings.target.is_zero() {
            return;
        }
        let mut history: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut tick = tokio::time::interval(self.settings.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match read(&pool, &self.settings).await {
                Ok((in_flight, placed, timed_out)) => {
                    let now = Instant::now();
                    history.push_back((now, in_flight));
                    while history
                        .front()
                        .is_some_and(|(at, _)| now.duration_since(*at) > self.settings.window)
                    {
                        history.pop_front();
                    }
                    // Completed in the window: placed, less the growth of the in-flight count,
                    // less those the deadline cancelled.
                    let busy_from = self.settings.floor / 2;
                    let completing_per_sec = history.front().and_then(|(at, then)| {
                        let span = now.duration_since(*at).as_secs_f64();
                        (span >= self.settings.window.as_secs_f64() * 0.8 && *then >= busy_from).then(|| {
                            let left = placed as f64 - (in_flight as f64 - *then as f64);
                            ((left - timed_out as f64) / self.settings.window.as_secs_f64()).max(0.0)
                        })
                    });
                    let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
                    let open = reopen(reading.open, reading.calls, reading.slow);
                    *reading = Reading {
                        at: Some(now),
                        in_flight,
                        completing_per_sec,
                        open,
                        ..Reading::default()
                    };
                    drop(reading);
                    metrics::gauge!(orderflow_platform::telemetry::ADMISSION_OPEN).set(open);
                    metrics::gauge!(orderflow_platform::telemetry::ADMISSION_IN_FLIGHT).set(in_flight as f64);
                    if let Some(rate) = completing_per_sec {
                        metrics::gauge!(orderflow_platform::telemetry::ADMISSION_COMPLETING).set(rate);
                    }
                }
                // The last reading stands until it is stale; then nothing is refused, and the
                // calls themselves find the database away.
                Err(error) => tracing::debug!(%error, "cannot read the saga's load"),
            }
        }
    }
}

/// The UUIDv7 that sorts before every id made at or after `at` (order ids are UUIDv7, so "placed
/// since" is a range of the primary key).
fn first_id_at(at: std::time::SystemTime) -> uuid::Uuid {
    let millis = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

/// Orders in flight now, orders placed in the last `window`, and orders the deadline
/// cancelled in that window (those placed one deadline before it).
async fn read(pool: &PgPool, settings: &Settings) -> Result<(u64, u64, u64), sqlx::Error> {
    let now = std::time::SystemTime::now();
    let ago = |span: Duration| first_id_at(now.checked_sub(span).unwrap_or(std::time::UNIX_EPOCH));
    // Names written out for the partial index on PENDING orders (see store.rs's sweeper
    // query; wire_states.rs checks them against the domain).
    let (in_flight, placed, timed_out): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE status = 'PENDING'),
                (SELECT count(*) FROM orders WHERE order_id >= $1),
                (SELECT count(*) FROM orders WHERE order_id >= $2 AND order_id < $3
                   AND status = 'CANCELLED' AND cancellation_reason = 'PAYMENT_TIMEOUT')",
    )
    .bind(ago(settings.window))
    .bind(ago(settings.saga_deadline + settings.window))
    .bind(ago(settings.saga_deadline))
    .fetch_one(pool)
    .await?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok((count(in_flight), count(placed), count(timed_out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(in_flight: u64, rate: Option<f64>) -> Reading {
        Reading {
            at: Some(Instant::now()),
            in_flight,
            completing_per_sec: rate,
            ..Reading::default()
        }
    }

    #[test]
    fn a_slow_place_order_closes_part_of_the_room_and_a_fast_one_reopens_it() {
        // 2% of 100 calls slow: a fifth off; none slow: a twentieth back.
        assert!((reopen(1.0, 100, 2) - 0.8).abs() < 1e-9);
        assert!((reopen(0.8, 100, 0) - 0.85).abs() < 1e-9);
        assert!((reopen(1.0, 100, 0) - 1.0).abs() < 1e-9, "never more than all of it");
        assert!((reopen(0.05, 100, 50) - 0.05).abs() < 1e-9, "never closed entirely");
        assert!((reopen(0.5, 10, 10) - 0.5).abs() < 1e-9, "too few calls to say");
        let settings = Settings::default();
        let half_open = Reading {
            open: 0.5,
            ..reading(300, Some(500.0))
        };
        assert!(decide(&reading(300, Some(500.0)), &settings, Instant::now()).is_ok());
        assert!(decide(&half_open, &settings, Instant::now()).is_err(), "room 250");
    }

    #[test]
    fn orders_are_admitted_while_they_can_complete_within_the_target() {
        let settings = Settings::default();
        // 500 completing a second, 1 s target: room for 500 in flight.
        assert!(decide(&reading(499, Some(500.0)), &settings, Instant::now()).is_ok());
        let refusal = decide(&reading(1_000, Some(500.0)), &settings, Instant::now()).unwrap_err();
        assert_eq!(refusal.in_flight, 1_000);
        // 501 over the room, at 500 a second: about a second.
        assert!((refusal.retry_after.as_secs_f64() - 1.002).abs() < 0.01, "{refusal:?}");
    }

    #[test]
    fn a_stalled_or_unmeasured_saga_refuses_nothing() {
        let settings = Settings::default();
        assert!(
            decide(&reading(50_000, Some(0.0)), &settings, Instant::now()).is_ok(),
            "an outage is not overload"
        );
        assert!(
            decide(&reading(50_000, None), &settings, Instant::now()).is_ok(),
            "nothing measured yet"
        );
        let off = Settings {
            target: Duration::ZERO,
            ..settings
        };
        assert!(decide(&reading(50_000, Some(500.0)), &off, Instant::now()).is_ok());
    }

    #[test]
    fn a_stale_reading_refuses_nothing() {
        let settings = Settings::default();
        let overloaded = reading(1_000, Some(500.0));
        let later = Instant::now() + settings.refresh * (STALE_AFTER_REFRESHES + 1);
        assert!(decide(&overloaded, &settings, Instant::now()).is_err());
        assert!(
            decide(&overloaded, &settings, later).is_ok(),
            "the database stopped answering"
        );
    }

    #[test]
    fn the_first_id_at_a_moment_sorts_between_the_ids_made_before_and_after_it() {
        let at = std::time::SystemTime::now();
        let before = uuid::Uuid::now_v7();
        std::thread::sleep(Duration::from_millis(2));
        let bound = first_id_at(std::time::SystemTime::now());
        std::thread::sleep(Duration::from_millis(2));
        let after = uuid::Uuid::now_v7();
        assert!(before < bound && bound < after);
        assert!(first_id_at(at) <= bound);
    }

    #[test]
    fn the_floor_admits_a_burst_on_a_slow_system() {
        let settings = Settings::default();
        // 2 a second completing: room for 2, but the floor holds 100.
        assert!(decide(&reading(99, Some(2.0)), &settings, Instant::now()).is_ok());
        assert!(decide(&reading(100, Some(2.0)), &settings, Instant::now()).is_err());
    }

    #[test]
    fn orders_admitted_since_the_reading_count_against_the_room() {
        let admission = Admission {
            settings: Settings::default(),
            reading: Arc::new(Mutex::new(reading(495, Some(500.0)))),
        };
        let admitted = (0..10).filter(|_| admission.admit().is_ok()).count();
        assert_eq!(admitted, 5);
    }
}
