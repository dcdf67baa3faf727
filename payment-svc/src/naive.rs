//! payment-svc's seam for the naive build (`naive` feature; without it this module does not
//! exist): the textbook gateway client's mistake.

/// The key of an authorization call: in naive mode a fresh one per call, so a retry after a
/// crash or a redelivery is a second charge at the gateway; otherwise the stable key.
pub(crate) fn authorization_key(order_id: uuid::Uuid) -> String {
    if orderflow_platform::naive::active() {
        format!("authorize:{order_id}:{}", uuid::Uuid::now_v7())
    } else {
        crate::executor::stable_authorization_key(order_id)
    }
}
