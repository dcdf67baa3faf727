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
    /// The thing to create exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A concurrent change won; retrying the call is safe.
    #[error("{0}")]
    Aborted(String),
    /// A dependency is unavailable; retrying later is safe.
    #[error("{0}")]
    Unavailable(String),
    /// A bug. The cause is logged with the request's correlation id, never sent.
    #[error("internal error")]
    Internal,
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => Self::Unavailable("the order database is unavailable; retry later".into()),
            StoreError::Conflict(_) => Self::Aborted("a concurrent change won; retry".into()),
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
                let summary = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, summary, details)
            }
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::AlreadyExists(message) => Status::already_exists(message),
            ApiError::Aborted(message) => Status::aborted(message),
            ApiError::Unavailable(message) => Status::unavailable(message),
            ApiError::Internal => Status::internal("internal error"),
        }
    }
}
