//! The edge every gRPC server of orderflow puts in front of its services (outermost layer),
//! so that what a client sees does not depend on which part of the stack refused its call:
//!
//! - **One deadline** (the server's request timeout, measured from arrival and including the
//!   wait for a concurrency slot) answered as DEADLINE_EXCEEDED. tonic's own timeout answers
//!   CANCELLED, which tells a client that someone gave up, not that the server was too slow.
//! - **Codes the contract lists.** A request over the size limit is RESOURCE_EXHAUSTED (tonic
//!   says OUT_OF_RANGE); bytes that are not the request message are INVALID_ARGUMENT (tonic
//!   says INTERNAL, which would page someone for a client's bug).
//! - **Every answer counted**, whoever produced it (the handler, the codec, the deadline), by
//!   method and code, with its duration.
//! - **The caller's trace continued**: a W3C `traceparent` in the request metadata makes this
//!   call's spans (and so the order's events, which carry the trace on) part of the caller's
//!   trace.
//!
//! - **A body that arrives in time**: with [`EdgeLayer::with_body_timeout`], a unary request
//!   whose body has not fully arrived that long after its headers fails to decode with
//!   DEADLINE_EXCEEDED, instead of holding its stream until the whole deadline (the server's
//!   permits are taken by the handlers, after the body: crate::fairness).
//!
//! Deadlines a client sets (`grpc-timeout`) are enforced by tonic before this layer sees the
//! request; the client then reports DEADLINE_EXCEEDED itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use tracing::Instrument as _;

use crate::telemetry;

/// The [`Edge`] layer with the server's request deadline.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLayer {
    deadline: Duration,
    body_timeout: Option<Duration>,
}

impl EdgeLayer {
    /// Every call is answered within `deadline`.
    pub fn new(deadline: Duration) -> Self {
        Self {
            deadline,
            body_timeout: None,
        }
    }

    /// A unary request's body must arrive within `timeout` of its headers (the streaming
    /// reflection service, whose client keeps its request stream open, is exempt).
    pub fn with_body_timeout(self, timeout: Duration) -> Self {
        Self {
            body_timeout: Some(timeout),
            ..self
        }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            deadline: self.deadline,
            body_timeout: self.body_timeout,
        }
    }
}

/// See the module.
#[derive(Debug, Clone)]
pub struct Edge<S> {
    inner: S,
    deadline: Duration,
    body_timeout: Option<Duration>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResponseBody> tower::Service<http::Request<tonic::body::Body>> for Edge<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let deadline = self.deadline;
        let method = method_of(request.uri().path());
        let request = match self.body_timeout {
            Some(timeout) if !request.uri().path().starts_with("/grpc.reflection.") => {
                request.map(|body| tonic::body::Body::new(BodyInTime::new(body, timeout)))
            }
            _ => request,
        };
        let span = tracing::info_span!("grpc", rpc.method = %method, rpc.grpc.status_code = tracing::field::Empty);
        if let Some(traceparent) = request
            .headers()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
        {
            telemetry::continue_trace(&span, traceparent);
        }
        Box::pin(async move {
            let started = Instant::now();
            let response = match tokio::time::timeout(deadline, inner.call(request).instrument(span.clone())).await {
                Ok(response) => normalise(response?),
                Err(_) => {
                    Status::deadline_exceeded(format!("not answered within the server's deadline of {deadline:?}"))
                        .into_http()
                }
            };
            let code = Status::from_header_map(response.headers()).map_or(Code::Ok, |status| status.code());
            span.record("rpc.grpc.status_code", code as i32);
            metrics::counter!(telemetry::GRPC_REQUESTS, "method" => method.clone(), "code" => format!("{code:?}"))
                .increment(1);
            metrics::histogram!(telemetry::GRPC_DURATION, "method" => method).record(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// A request body that fails with DEADLINE_EXCEEDED if it has not ended `timeout` after the
/// request's headers arrived.
struct BodyInTime {
    inner: tonic::body::Body,
    timeout: Duration,
    expires: Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

impl BodyInTime {
    fn new(inner: tonic::body::Body, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            expires: Box::pin(tokio::time::sleep(timeout)),
            ended: false,
        }
    }
}

impl http_body::Body for BodyInTime {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame)),
            Poll::Pending => match self.expires.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.ended = true;
                    Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "the request's body did not arrive within {:?} of its headers",
                        self.timeout
                    )))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The method's name (`PlaceOrder`) from the request path (`/package.Service/PlaceOrder`).
fn method_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

/// Rewrites the codes tonic's codec gives to a client's mistakes (see the module).
fn normalise<B>(mut response: http::Response<B>) -> http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let replacement = match status.code() {
        Code::OutOfRange if status.message().contains("message length too large") => Some(Status::resource_exhausted(
            format!("the request is larger than this server accepts: {}", status.message()),
        )),
        Code::Internal if status.message().starts_with("failed to decode") => Some(Status::invalid_argument(format!(
            "the request is not a valid message: {}",
            status.message()
        ))),
        _ => None,
    };
    if let Some(replacement) = replacement {
        let headers = response.headers_mut();
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            headers.remove(name);
        }
        if replacement.add_header(headers).is_err() {
            // The message could not be encoded as a header: the code alone still says it.
            let _ = Status::new(replacement.code(), "").add_header(headers);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers_only(status: Status) -> http::Response<()> {
        status.into_http()
    }

    #[test]
    fn codec_refusals_become_the_codes_a_client_can_act_on() {
        let code = |response: http::Response<()>| Status::from_header_map(response.headers()).map(|s| s.code());
        let too_large = trailers_only(Status::out_of_range(
            "Error, decoded message length too large: found 70000 bytes, the limit is: 65536 bytes",
        ));
        assert_eq!(code(normalise(too_large)), Some(Code::ResourceExhausted));
        let garbage = trailers_only(Status::internal("failed to decode Protobuf message: invalid wire type"));
        assert_eq!(code(normalise(garbage)), Some(Code::InvalidArgument));
        let bug = trailers_only(Status::internal("internal error"));
        assert_eq!(code(normalise(bug)), Some(Code::Internal));
        assert_eq!(method_of("/orderflow.orders.v1.OrderService/PlaceOrder"), "PlaceOrder");
    }
}

/// A client interceptor that sends the calling span's trace context (W3C `traceparent`) with
/// each call, so the server's spans join the caller's trace: payment-svc's gateway calls
/// appear in the order's trace. tonic runs it inside the call's future, so the span is the
/// one that future is instrumented with.
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagateTrace;

impl tonic::service::Interceptor for PropagateTrace {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = telemetry::current_traceparent().and_then(|traceparent| traceparent.parse().ok()) {
            request.metadata_mut().insert("traceparent", value);
        }
        Ok(request)
    }
}

/// A channel whose calls carry the caller's trace context.
pub type TracedChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, PropagateTrace>;
