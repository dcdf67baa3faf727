//! Fair sharing of a gRPC server between its callers: what one connection, one caller and
//! one idle socket can hold, so that one abusive caller cannot take the server from the
//! others (docs/security.md, "One caller can starve the others").
//!
//! - **Per connection**: at most `max_streams_per_connection` streams open at once, advertised
//!   in HTTP/2 SETTINGS (a client queues the others itself).
//! - **Per request**: its body must arrive within `body_timeout` of its headers, or the call is
//!   answered DEADLINE_EXCEEDED ([`crate::grpc::EdgeLayer::with_body_timeout`]); the server's
//!   permits are taken by the handler, after the request has arrived, never by a stream that
//!   sent its headers and nothing else.
//! - **Per caller** (a customer, an operator: whoever the token or certificate proves): at
//!   most `max_calls_per_caller` calls in flight ([`Callers`]); one more is refused at once,
//!   RESOURCE_EXHAUSTED, instead of queueing in front of everyone else. And at most
//!   `calls_per_second_per_caller` calls started a second (with a burst of `caller_burst`):
//!   beyond it a call waits for its turn before it takes a server permit. A share of the
//!   permits alone keeps one caller from making the others wait for a permit, not from taking
//!   every core with calls that each hold one briefly; the rate bounds the CPU one caller's
//!   calls can use, and a call waiting for its turn costs nothing (no permit, no CPU; its
//!   client waits too instead of coming back).
//! - **Per socket**: the TLS handshake must finish within `tls_handshake_timeout`, a
//!   connection on which nothing moves (read or written) for `idle_timeout` is closed, and at most `max_connections`
//!   are open at once (the next waits in the kernel's accept queue): [`incoming`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

const DEFAULT_MAX_CALLS_PER_CALLER: usize = 32;
const DEFAULT_CALLS_PER_SECOND: u32 = 500;
const DEFAULT_CALLER_BURST: u32 = 100;

/// The limits of one server (flattened into each server's `Config`).
#[derive(Debug, Clone, clap::Args)]
pub struct FairnessArgs {
    /// Streams one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "GRPC_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: u32,
    /// How long a request's body may take to arrive after its headers, in milliseconds
    /// (shorter than the request deadline: a stream that sends headers and waits is answered
    /// DEADLINE_EXCEEDED early, having held no permit).
    #[arg(long, env = "GRPC_BODY_TIMEOUT_MS", default_value_t = 1_000)]
    pub body_timeout_ms: u64,
    /// Calls one caller (one customer, one operator) may have in flight at once; one more is
    /// refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, env = "GRPC_MAX_CALLS_PER_CALLER", default_value_t = DEFAULT_MAX_CALLS_PER_CALLER)]
    pub max_calls_per_caller: usize,
    /// Calls one caller may start per second, sustained; beyond it (and its burst) each call
    /// waits for its turn, within its deadline, holding its place in the caller's share.
    #[arg(long, env = "GRPC_CALLS_PER_SECOND_PER_CALLER", default_value_t = DEFAULT_CALLS_PER_SECOND,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub calls_per_second_per_caller: u32,
    /// Calls one caller may start at once above that rate.
    #[arg(long, env = "GRPC_CALLER_BURST", default_value_t = DEFAULT_CALLER_BURST,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub caller_burst: u32,
    /// How long a client may take to complete the TLS handshake, in milliseconds.
    #[arg(long, env = "GRPC_TLS_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000)]
    pub tls_handshake_timeout_ms: u64,
    /// Connections open at once; the next waits in the kernel's accept queue until one closes.
    #[arg(long, env = "GRPC_MAX_CONNECTIONS", default_value_t = 1_024)]
    pub max_connections: usize,
    /// A connection on which nothing is read or written for this long is closed, in milliseconds
    /// (clients reconnect on their next call).
    #[arg(long, env = "GRPC_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
}

impl Default for FairnessArgs {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            body_timeout_ms: 1_000,
            max_calls_per_caller: DEFAULT_MAX_CALLS_PER_CALLER,
            calls_per_second_per_caller: DEFAULT_CALLS_PER_SECOND,
            caller_burst: DEFAULT_CALLER_BURST,
            tls_handshake_timeout_ms: 5_000,
            max_connections: 1_024,
            idle_timeout_ms: 60_000,
        }
    }
}

impl FairnessArgs {
    /// How long a request's body may take.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms.max(1))
    }

    /// How long a TLS handshake may take.
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms.max(1))
    }

    /// The per-caller limit of a server whose handlers wait for one of `permits` slots.
    pub fn callers(&self, permits: usize) -> Callers {
        Callers::new(permits, self.max_calls_per_caller).with_rate(self.calls_per_second_per_caller, self.caller_burst)
    }

    /// Refuses, by name, per-caller settings given to a server that has no per-caller limit
    /// (gateway-sim: its one caller is payment-svc): a setting silently ignored is one an
    /// operator believes in.
    pub fn check_no_per_caller_limits(&self) -> anyhow::Result<()> {
        crate::refuse_unread_settings(
            &[
                (
                    "GRPC_MAX_CALLS_PER_CALLER",
                    self.max_calls_per_caller != DEFAULT_MAX_CALLS_PER_CALLER,
                ),
                (
                    "GRPC_CALLS_PER_SECOND_PER_CALLER",
                    self.calls_per_second_per_caller != DEFAULT_CALLS_PER_SECOND,
                ),
                ("GRPC_CALLER_BURST", self.caller_burst != DEFAULT_CALLER_BURST),
            ],
            "a server with per-caller limits (order-svc); this one has none",
        )
    }

    /// The server's connections, accepted from `listener` within these limits.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl futures::Stream<Item = std::io::Result<Guarded>> + Send + 'static {
        incoming(
            listener,
            self.max_connections.max(1),
            Duration::from_millis(self.idle_timeout_ms.max(1)),
        )
    }
}

/// Who may call, and how much at once: a global pool of permits (the server's concurrency,
/// waited for), a bound per caller (refused at once when reached) and a rate per caller
/// (waited for).
#[derive(Clone)]
pub struct Callers {
    permits: Arc<Semaphore>,
    per_caller: usize,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    rate: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    entered: Arc<AtomicU64>,
}

impl std::fmt::Debug for Callers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callers")
            .field("per_caller", &self.per_caller)
            .field("rate_limited", &self.rate.is_some())
            .finish_non_exhaustive()
    }
}

/// How often (in calls let in) the rate limiter forgets callers whose allowance is full
/// again: its memory follows the callers of the last seconds, not every caller ever seen.
const FORGET_IDLE_CALLERS_EVERY: u64 = 4_096;

/// Why a call was not let in.
#[derive(Debug, thiserror::Error)]
#[error("this caller has {0} calls in flight, the most one caller may have; retry once one ends")]
pub struct TooManyCalls(pub usize);

/// A call's place: its caller's count and a server permit, both released when dropped.
#[derive(Debug)]
pub struct CallPermit {
    _server: OwnedSemaphorePermit,
    _caller: Option<CallerSlot>,
}

#[derive(Debug)]
struct CallerSlot {
    caller: String,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        // A poisoned lock means a panic while counting: the count is lost either way.
        if let Ok(mut in_flight) = self.in_flight.lock()
            && let Some(count) = in_flight.get_mut(&self.caller)
        {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.caller);
            }
        }
    }
}

impl Callers {
    /// `permits` calls at once in all, at most `per_caller` of one caller.
    pub fn new(permits: usize, per_caller: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(permits.max(1))),
            per_caller: per_caller.max(1),
            in_flight: Arc::default(),
            rate: None,
            entered: Arc::default(),
        }
    }

    /// At most `per_second` calls of one caller started a second, `burst` of them at once.
    #[must_use]
    pub fn with_rate(mut self, per_second: u32, burst: u32) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        self.rate = Some(Arc::new(RateLimiter::keyed(
            Quota::per_second(per_second).allow_burst(burst),
        )));
        self
    }

    /// Lets a call of `caller` in: refused at once if the caller already has its share in
    /// flight; otherwise waits for its turn in the caller's rate, then for a server permit
    /// (the call's deadline bounds both waits). A call with no caller (a development server
    /// without tokens: every call would be the same party) takes a server permit only.
    pub async fn enter(&self, caller: Option<&str>) -> Result<CallPermit, TooManyCalls> {
        let slot = match caller {
            Some(caller) => {
                let slot = self.count(caller)?;
                self.wait_for_turn(&slot.caller).await;
                Some(slot)
            }
            None => None,
        };
        // Closed never: the semaphore lives as long as `self`.
        let server = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TooManyCalls(self.per_caller))?;
        Ok(CallPermit {
            _server: server,
            _caller: slot,
        })
    }

    /// Waits until `caller` may start one more call within its rate. Before the server
    /// permit: a call waiting here holds nothing the other callers need.
    async fn wait_for_turn(&self, caller: &String) {
        let Some(rate) = &self.rate else { return };
        // Jittered: a caller's waiting calls do not all wake at the same instant, find one
        // turn, and sleep again together.
        rate.until_key_ready_with_jitter(caller, governor::Jitter::up_to(Duration::from_millis(5)))
            .await;
        if self.entered.fetch_add(1, Ordering::Relaxed) % FORGET_IDLE_CALLERS_EVERY == FORGET_IDLE_CALLERS_EVERY - 1 {
            rate.retain_recent();
        }
    }

    /// Counts a call of `caller`, unless it has its share in flight already.
    fn count(&self, caller: &str) -> Result<CallerSlot, TooManyCalls> {
        let slot = {
            let mut in_flight = self.in_flight.lock().map_err(|_| TooManyCalls(self.per_caller))?;
            let count = in_flight.entry(caller.to_owned()).or_default();
            if *count >= self.per_caller {
                return Err(TooManyCalls(*count));
            }
            *count += 1;
            CallerSlot {
                caller: caller.to_owned(),
                in_flight: self.in_flight.clone(),
            }
        };
        Ok(slot)
    }
}

/// Accepts connections from `listener`, at most `max_connections` open at once, each closed
/// after `idle_timeout` with nothing read from it.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    idle_timeout: Duration,
) -> impl futures::Stream<Item = std::io::Result<Guarded>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max_connections));
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        // Waits for a connection to close when all slots are taken: the next client waits in
        // the kernel's accept queue (or times out there), it is not accepted and dropped.
        let permit = slots.clone().acquire_owned().await.ok()?;
        let accepted = listener.accept().await.map(|(stream, _)| {
            // Small unary calls: no Nagle delay (serve_with_incoming leaves sockets as given).
            let _ = stream.set_nodelay(true);
            Guarded::new(stream, permit, idle_timeout)
        });
        Some((accepted, (listener, slots)))
    })
}

/// An accepted connection holding its slot, closed when nothing moves on it (nothing read,
/// nothing written) for too long.
pub struct Guarded {
    stream: TcpStream,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Guarded {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, idle_timeout: Duration) -> Self {
        Self {
            stream,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let filled = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > filled {
                    self.active();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "nothing arrived on the connection within the idle timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Guarded {
    /// Something moved on the connection: the idle count starts again.
    fn active(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        // An answer going out (a call that took long, a stream of messages) is not idleness.
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // hyper and rustls write this way: the answers going out are counted here.
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_caller_at_its_share_is_refused_at_once_and_others_still_get_in() {
        let callers = Callers::new(8, 2);
        let a1 = callers.enter(Some("customer:1")).await.unwrap();
        let _a2 = callers.enter(Some("customer:1")).await.unwrap();
        assert!(
            callers.enter(Some("customer:1")).await.is_err(),
            "a third call of one caller"
        );
        let _b = callers.enter(Some("customer:2")).await.unwrap();
        drop(a1);
        let _a3 = callers
            .enter(Some("customer:1"))
            .await
            .expect("room again once one ended");
    }

    #[tokio::test]
    async fn the_server_permits_are_waited_for_not_refused() {
        let callers = Callers::new(1, 4);
        let first = callers.enter(Some("customer:1")).await.unwrap();
        let waiting = tokio::spawn({
            let callers = callers.clone();
            async move { callers.enter(Some("customer:2")).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits for the one permit");
        drop(first);
        waiting.await.unwrap().expect("gets in once the permit is free");
    }

    #[test]
    fn per_caller_settings_given_to_a_server_without_them_are_refused_by_name() {
        assert!(FairnessArgs::default().check_no_per_caller_limits().is_ok());
        let error = FairnessArgs {
            calls_per_second_per_caller: 10,
            ..FairnessArgs::default()
        }
        .check_no_per_caller_limits()
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("GRPC_CALLS_PER_SECOND_PER_CALLER apply only"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_caller_beyond_its_rate_waits_for_its_turn_and_others_do_not() {
        // 2 calls a second, 2 at once: the third call of one caller waits about 500 ms (the
        // time between two calls at that rate is what is tested here, so it is measured).
        let callers = Callers::new(8, 8).with_rate(2, 2);
        let started = std::time::Instant::now();
        drop(callers.enter(Some("customer:1")).await.unwrap());
        drop(callers.enter(Some("customer:1")).await.unwrap());
        let third = tokio::spawn({
            let callers = callers.clone();
            async move { callers.enter(Some("customer:1")).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "the third call within its burst's time waits");
        drop(
            callers
                .enter(Some("customer:2"))
                .await
                .expect("another caller's allowance is its own"),
        );
        let other_in = started.elapsed();
        assert!(
            other_in < Duration::from_millis(250),
            "another caller got in at once ({other_in:?}), not behind the first one's turn"
        );
        third.await.unwrap().expect("its turn comes");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "the third call waited for its turn: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let idle = Duration::from_millis(300);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener, 4, idle));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = futures::StreamExt::next(&mut accepted).await.unwrap().unwrap();
        let mut byte = [0u8; 1];
        // Each byte restarts the count: 400 ms after the first, the connection is still open.
        for message in [b"x", b"y", b"z"] {
            client.write_all(message).await.unwrap();
            server.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let started = tokio::time::Instant::now();
        let error = server.read(&mut byte).await.expect_err("idle");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < idle, "closed 300 ms after the last byte, not later");
    }
}
