//! Every error the control API returns, and the one mapping from domain errors to gRPC
//! status codes. Handlers return [`ApiError`]; nothing else in the daemon builds a
//! `tonic::Status`, so a code means the same thing on every call.

use tonic::{Code, Status};

use crate::apply::ApplyError;
use crate::bundle::BundleError;
use crate::target::TargetError;
use crate::wave::EngineError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(
        "bundle id mismatch: the client computed {sent}, the daemon computed {computed} from the same files"
    )]
    BundleIdMismatch { sent: String, computed: String },
    #[error(transparent)]
    Targets(#[from] TargetError),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// A request field that makes no sense, named.
    #[error("{0}")]
    Invalid(String),
    /// A tenant's log could not be read.
    #[error("tenant {tenant}: {error}")]
    Tenant { tenant: String, error: ApplyError },
    #[error("{0}")]
    Unauthenticated(String),
    /// A bug or a lost task: the daemon could not finish the call.
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Too much at once (concurrent plans): try again later.
    #[error("{0}")]
    Busy(String),
}

impl ApiError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Engine(e) => match e {
                EngineError::NotFound(_) | EngineError::TenantNotFound { .. } => Code::NotFound,
                EngineError::InvalidState { .. }
                | EngineError::NothingToRetry(_)
                | EngineError::Unloadable { .. }
                | EngineError::CanaryFailed { .. }
                | EngineError::AwaitingApproval { .. }
                | EngineError::NothingToApprove { .. }
                | EngineError::StageFailed { .. } => Code::FailedPrecondition,
                EngineError::Policy(_) | EngineError::Targets(_) | EngineError::Unsafe(_) => {
                    Code::InvalidArgument
                }
                EngineError::ShuttingDown => Code::Unavailable,
                EngineError::Store(_) | EngineError::Secret(_) => Code::Internal,
            },
            ApiError::Bundle(_)
            | ApiError::BundleIdMismatch { .. }
            | ApiError::Targets(_)
            | ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::Tenant { error, .. } => match error.retryability() {
                crate::failure::Retryability::Retryable => Code::Unavailable,
                crate::failure::Retryability::Permanent => Code::FailedPrecondition,
            },
            ApiError::Fleet(e) => {
                use crate::fleet::FleetError as F;
                match e {
                    F::BadName(_) | F::BadLabels(_) => Code::InvalidArgument,
                    F::Exists(_) => Code::AlreadyExists,
                    F::NotFound(_) | F::NoCensus(_) => Code::NotFound,
                    F::Unloadable { .. } | F::Dsn { .. } => Code::FailedPrecondition,
                    // A registered source that does not resolve now: not the caller's
                    // input, the fleet's state.
                    F::Targets { .. } | F::TooMany { .. } => Code::FailedPrecondition,
                    F::Secret { .. } | F::Store(_) => Code::Internal,
                }
            }
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::Internal(_) => Code::Internal,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Busy(_) => Code::ResourceExhausted,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error answering a call");
        }
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wave::WaveState;

    #[test]
    fn codes() {
        let code = |e: EngineError| ApiError::from(e).code();
        assert_eq!(code(EngineError::NotFound("w".into())), Code::NotFound);
        assert_eq!(
            code(EngineError::InvalidState {
                wave: "w".into(),
                state: WaveState::Completed,
                action: "resume"
            }),
            Code::FailedPrecondition
        );
        assert_eq!(code(EngineError::ShuttingDown), Code::Unavailable);
        assert_eq!(
            ApiError::Invalid("concurrency".into()).code(),
            Code::InvalidArgument
        );
        let status = Status::from(ApiError::Unauthenticated("missing bearer token".into()));
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "missing bearer token");
    }
}
