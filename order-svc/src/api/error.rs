//! The gRPC boundary's one error type and its one mapping to `tonic::Status`.

use tonic_types::{ErrorDetails, StatusExt as _};

use crate::store::StoreError;

/// A field that failed validation, named by its path in the request (`items[2].quantity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request message.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            description: description.to_string(),
        }
    }
}

/// The most violations one answer reports. The violations travel in response metadata
/// (`grpc-status-details-bin` and `grpc-message`), and gRPC clients refuse metadata over
/// 8–16 KiB (grpc-core's default is 8 KiB soft, 16 KiB hard): a request with a hundred bad
/// items would otherwise get RESOURCE_EXHAUSTED instead of its violations. 20 violations of
/// bounded length stay under 4 KiB; the last one reported says how many more there are.
pub const MAX_REPORTED_VIOLATIONS: usize = 20;

/// The longest description or field path reported (all of ours are far shorter).
const MAX_VIOLATION_CHARS: usize = 120;

/// The summary message and the violations to report, bounded as explained above.
fn reportable(mut violations: Vec<FieldViolation>) -> (String, Vec<FieldViolation>) {
    let total = violations.len();
    if total > MAX_REPORTED_VIOLATIONS {
        violations.truncate(MAX_REPORTED_VIOLATIONS - 1);
        violations.push(FieldViolation::new(
            "request",
            format!(
                "{} more violations not reported; fix the ones above and retry",
                total - (MAX_REPORTED_VIOLATIONS - 1)
            ),
        ));
    }
    let bound = |text: &str| text.chars().take(MAX_VIOLATION_CHARS).collect::<String>();
    for violation in &mut violations {
        violation.field = bound(&violation.field);
        violation.description = bound(&violation.description);
    }
    let mut summary = violations
        .iter()
        .take(3)
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    if total > 3 {
        summary.push_str(&format!(" (and {} more, in the BadRequest details)", total - 3));
    }
    (summary, violations)
}

/// Every way a call can fail, in the client's terms.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; each violation names a field.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but not allowed in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The thing to create exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A concurrent change won; retrying the call is safe.
    #[error("{0}")]
    Aborted(String),
    /// A dependency is unavailable; retrying later is safe.
    #[error("{0}")]
    Unavailable(String),
    /// More work than the system can finish in time: refused at once, retry after the hint.
    #[error("{message}")]
    Overloaded {
        /// Why, in numbers.
        message: String,
        /// When a retry may find room.
        retry_after: std::time::Duration,
    },
    /// A bug. The cause is logged with the request's correlation id, never sent.
    #[error("internal error")]
    Internal,
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => Self::Unavailable("the order database is unavailable; retry later".into()),
            StoreError::Conflict(_) => Self::Aborted("a concurrent change won; retry".into()),
            StoreError::Busy => Self::Overloaded {
                message: "every order writer is busy with a full batch; retry shortly".into(),
                retry_after: std::time::Duration::from_millis(100),
            },
            StoreError::IdempotencyKeyReused => {
                Self::FailedPrecondition("request_id was already used with a different request".into())
            }
            StoreError::Corrupt(_) | StoreError::Other(_) => {
                tracing::error!(error = %error, cause = ?std::error::Error::source(&error), "store error");
                Self::Internal
            }
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        use tonic::{Code, Status};
        match error {
            ApiError::InvalidArgument(violations) => {
                let (summary, reported) = reportable(violations);
                let details = ErrorDetails::with_bad_request(
                    reported
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, summary, details)
            }
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::AlreadyExists(message) => Status::already_exists(message),
            ApiError::PermissionDenied(message) => Status::permission_denied(message),
            ApiError::Aborted(message) => Status::aborted(message),
            ApiError::Unavailable(message) => Status::unavailable(message),
            ApiError::Overloaded { message, retry_after } => {
                let mut status = Status::with_error_details(
                    Code::ResourceExhausted,
                    message,
                    ErrorDetails::with_retry_info(Some(retry_after)),
                );
                // gRPC's own retry pushback (honoured by clients with a retry policy).
                if let Ok(value) = retry_after.as_millis().to_string().parse() {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", value);
                }
                status
            }
            ApiError::Internal => Status::internal("internal error"),
        }
    }
}

impl From<crate::admission::Refusal> for ApiError {
    fn from(refusal: crate::admission::Refusal) -> Self {
        Self::Overloaded {
            message: format!(
                "the saga is at capacity: {} orders in flight, {:.0} completing a second; retry later",
                refusal.in_flight, refusal.completing_per_sec
            ),
            retry_after: refusal.retry_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_answer_says_when_to_retry() {
        let status = tonic::Status::from(ApiError::Overloaded {
            message: "busy".into(),
            retry_after: std::time::Duration::from_millis(250),
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("250")
        );
        let retry = tonic_types::StatusExt::get_details_retry_info(&status).and_then(|r| r.retry_delay);
        assert_eq!(retry, Some(std::time::Duration::from_millis(250)));
    }

    #[test]
    fn a_hundred_violations_fit_in_the_metadata_a_client_accepts() {
        let violations: Vec<FieldViolation> = (0..300)
            .map(|i| FieldViolation::new(format!("items[{i}].unit_price.currency_code"), "x".repeat(500)))
            .collect();
        let status = tonic::Status::from(ApiError::InvalidArgument(violations));
        let mut headers = http::HeaderMap::new();
        assert!(status.add_header(&mut headers).is_ok());
        let metadata_bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        assert!(metadata_bytes < 8 * 1024, "{metadata_bytes} bytes of metadata");
        let details = tonic_types::StatusExt::get_error_details(&status);
        let reported = details.bad_request().map(|b| b.field_violations.len());
        assert_eq!(reported, Some(MAX_REPORTED_VIOLATIONS));
        let last = details.bad_request().and_then(|b| b.field_violations.last().cloned());
        assert!(last.is_some_and(|v| v.description.starts_with("281 more violations")));
    }
}
