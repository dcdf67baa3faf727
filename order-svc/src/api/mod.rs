//! The gRPC edge: parses wire messages into domain values, runs the domain, stores the
//! result, and maps every failure through [`ApiError`].

mod convert;
mod error;

use std::time::Duration;

use orderflow::envelope::{EventMeta, seal};
use orderflow::events::v1::{OrderPlaced, event_envelope::Payload};
use orderflow::money::TotalLimits;
use orderflow::orders::v1::order_service_server::OrderService;
use orderflow::orders::v1::{
    GetOrderRequest, GetOrderResponse, OrderStatus as WireStatus, PlaceOrderRequest, PlaceOrderResponse,
};
use orderflow_platform::auth::Caller;
use orderflow_platform::fairness::{CallPermit, Callers};
use orderflow_platform::outbox::OutboxMessage;
use orderflow_platform::telemetry;
use prost::Message as _;
use sqlx::PgPool;
use tracing::Instrument as _;

pub use error::{ApiError, FieldViolation};

use crate::admission::Admission;
use crate::domain::{self, Command, Event, OrderId};
use crate::placing::{Placement, Placer};
use crate::store::{self, IdempotencyKey, PlaceOutcome};

/// The `OrderService` implementation.
#[derive(Debug, Clone)]
pub struct OrderApi {
    pool: PgPool,
    orders_topic: String,
    idempotency_retention: Duration,
    limits: TotalLimits,
    /// Writes the orders, many calls to a transaction.
    placer: Placer,
    /// Refuses what the saga cannot finish in time.
    admission: Admission,
    /// The naive build's dual write (`crate::naive`), set only when it runs naive.
    #[cfg(feature = "naive")]
    dual_write: Option<crate::naive::DualWrite>,
    /// The server's permits and each caller's share, taken once a request has arrived.
    callers: Callers,
}

impl OrderApi {
    /// An API reading from `pool`, writing orders through `placer` and publishing their events
    /// to `orders_topic`, admitting what `admission` admits.
    pub fn new(
        pool: PgPool,
        orders_topic: String,
        idempotency_retention: Duration,
        limits: TotalLimits,
        placer: Placer,
        admission: Admission,
        callers: Callers,
    ) -> Self {
        Self {
            pool,
            orders_topic,
            idempotency_retention,
            limits,
            placer,
            admission,
            #[cfg(feature = "naive")]
            dual_write: None,
            callers,
        }
    }

    /// Lets a call of `caller` in (its request has arrived: tonic decoded it), or refuses it
    /// at once when that caller already has its share in flight.
    async fn enter(&self, caller: Option<&Caller>) -> Result<CallPermit, ApiError> {
        self.callers
            .enter(caller.map(Caller::party).as_deref())
            .await
            .map_err(|refused| ApiError::Overloaded {
                message: refused.to_string(),
                retry_after: Duration::from_millis(100),
            })
    }

    /// The naive build's dual write: publish from the request instead of the outbox.
    #[cfg(feature = "naive")]
    #[must_use]
    pub(crate) fn with_dual_write(mut self, dual_write: crate::naive::DualWrite) -> Self {
        self.dual_write = Some(dual_write);
        self
    }

    async fn place_order(
        &self,
        caller: Option<Caller>,
        request: PlaceOrderRequest,
    ) -> Result<PlaceOrderResponse, ApiError> {
        let started = std::time::Instant::now();
        let order_id = OrderId::generate();
        let (request_id, command) = convert::parse_place_order(&request, order_id, &self.limits)?;
        // A customer places orders for itself only; operators do not shop. (No caller: the
        // server runs without tokens, explicitly.)
        match &caller {
            None => {}
            Some(Caller::Customer(id)) if *id == command.customer_id.get() => {}
            Some(Caller::Customer(_)) => {
                return Err(ApiError::PermissionDenied(
                    "a customer places orders for itself only".into(),
                ));
            }
            Some(Caller::Operator(_)) => {
                return Err(ApiError::PermissionDenied("operators do not place orders".into()));
            }
        }
        // Refused before anything is written: the saga cannot finish more in time.
        self.admission.admit()?;
        let events = domain::decide(None, Command::Place(command)).map_err(convert::domain_error)?;
        let Some(Event::Placed { order }) = events.into_iter().next() else {
            tracing::error!("decide(Place) returned no Placed event");
            return Err(ApiError::Internal);
        };
        let correlation_id = uuid::Uuid::now_v7();
        tracing::Span::current()
            .record("order_id", tracing::field::display(order.id))
            .record("correlation_id", tracing::field::display(correlation_id))
            .record("trace_id", telemetry::current_trace_id().unwrap_or_default());

        let key = request_id.map(|request_id| IdempotencyKey {
            request_id,
            fingerprint: PlaceOrderRequest {
                request_id: String::new(),
                ..request.clone()
            }
            .encode_to_vec(),
            retention: self.idempotency_retention,
        });
        let response = PlaceOrderResponse {
            order_id: order.id.to_string(),
            status: WireStatus::Pending as i32,
            correlation_id: correlation_id.to_string(),
        };
        let event = OutboxMessage {
            topic: self.orders_topic.clone(),
            envelope: seal(
                EventMeta {
                    message_id: uuid::Uuid::now_v7(),
                    aggregate_id: order.id.as_uuid(),
                    correlation_id,
                    causation_id: None,
                    // The trace of this call travels with the event to every service.
                    traceparent: telemetry::current_traceparent(),
                    occurred_at: orderflow_platform::outbox::now_timestamp(),
                },
                Payload::OrderPlaced(OrderPlaced {
                    order_id: order.id.to_string(),
                    customer_id: order.customer_id.get(),
                    items: order.items.iter().map(convert::wire_item).collect(),
                    total: Some(convert::wire_money(order.total)),
                    payment_token: order.payment_token.as_str().to_owned(),
                }),
            ),
        };
        let placement = Placement {
            order,
            correlation_id,
            key,
            event: event.clone(),
            response,
        };
        let placed = self.placer.place(placement).await;
        // The call's own latency, for admission (a refused call's is not: it did no work).
        self.admission.observe(started.elapsed());
        match placed? {
            PlaceOutcome::Created(response) => {
                #[cfg(feature = "naive")]
                if let Some(dual_write) = &self.dual_write {
                    dual_write.publish(&event).await?;
                }
                tracing::info!("order placed");
                Ok(response)
            }
            PlaceOutcome::Replayed(response) => {
                tracing::info!(original_order_id = %response.order_id, "idempotent replay: original response returned");
                Ok(response)
            }
        }
    }

    async fn get_order(&self, caller: Option<Caller>, request: GetOrderRequest) -> Result<GetOrderResponse, ApiError> {
        let id = OrderId::parse(&request.order_id)
            .map_err(|error| ApiError::InvalidArgument(vec![FieldViolation::new("order_id", error)]))?;
        tracing::Span::current().record("order_id", tracing::field::display(id));
        let not_found = || ApiError::NotFound(format!("order {id} not found"));
        // Another customer's order is answered exactly like a missing one: whether an id
        // exists is not for other customers to learn.
        let visible = |customer_id: Option<i64>| match &caller {
            None | Some(Caller::Operator(_)) => true,
            Some(Caller::Customer(id)) => customer_id == Some(*id),
        };
        // The read model first; an order placed a moment ago may not be projected yet, and
        // then the write model answers (without history).
        if let Some(view) = store::get_order_view(&self.pool, id).await?
            && view.customer_id.is_some()
        {
            if !visible(view.customer_id) {
                return Err(not_found());
            }
            return Ok(GetOrderResponse {
                order: Some(convert::wire_order_view(&view)),
            });
        }
        let record = store::get_order(&self.pool, id).await?.ok_or_else(not_found)?;
        if !visible(Some(record.order.customer_id.get())) {
            return Err(not_found());
        }
        Ok(GetOrderResponse {
            order: Some(convert::wire_order(&record)),
        })
    }
}

/// The interceptor in front of the order API: with a verifier, every call must carry a
/// valid bearer token (UNAUTHENTICATED otherwise: missing, expired, forged, wrongly signed),
/// and the verified caller travels in the request's extensions to the handlers; without one
/// (INSECURE_NO_AUTH, explicitly), calls pass anonymous.
pub fn authenticate(
    verifier: Option<orderflow_platform::auth::Verifier>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        if let Some(verifier) = &verifier {
            match verifier.verify_metadata(request.metadata()) {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                }
                Err(error) => {
                    tracing::info!(%error, "call refused: not authenticated");
                    return Err(tonic::Status::unauthenticated("a valid bearer token is required"));
                }
            }
        }
        Ok(request)
    }
}

/// Maps the result through the one `ApiError` → `Status` mapping (the gRPC edge layer
/// counts and times every answer).
fn respond<T>(result: Result<T, ApiError>) -> Result<tonic::Response<T>, tonic::Status> {
    result.map(tonic::Response::new).map_err(tonic::Status::from)
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn place_order(
        &self,
        request: tonic::Request<PlaceOrderRequest>,
    ) -> Result<tonic::Response<PlaceOrderResponse>, tonic::Status> {
        let span = tracing::info_span!(
            "PlaceOrder",
            order_id = tracing::field::Empty,
            correlation_id = tracing::field::Empty,
            trace_id = tracing::field::Empty
        );
        let caller = request.extensions().get::<Caller>().cloned();
        let call = async {
            let _permit = self.enter(caller.as_ref()).await?;
            self.place_order(caller, request.into_inner()).await
        };
        respond(call.instrument(span).await)
    }

    async fn get_order(
        &self,
        request: tonic::Request<GetOrderRequest>,
    ) -> Result<tonic::Response<GetOrderResponse>, tonic::Status> {
        let span = tracing::info_span!("GetOrder", order_id = tracing::field::Empty);
        let caller = request.extensions().get::<Caller>().cloned();
        let call = async {
            let _permit = self.enter(caller.as_ref()).await?;
            self.get_order(caller, request.into_inner()).await
        };
        respond(call.instrument(span).await)
    }
}
