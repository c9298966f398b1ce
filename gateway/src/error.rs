//! API errors: one JSON shape for every 4xx and 5xx.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
pub use ud_core::validate::FieldError;
use ud_core::CommandError;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, e.g. `invalid_request`, `not_found`, `conflict`.
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// The fields that were rejected, with the reason for each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                message: message.into(),
                fields: vec![],
            },
        }
    }

    pub fn fields(fields: Vec<FieldError>) -> Self {
        let message = fields
            .iter()
            .map(|f| format!("{}: {}", f.field, f.reason))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: "invalid_request".into(),
                message,
                fields,
            },
        }
    }

    pub fn field(field: &str, reason: impl Into<String>) -> Self {
        Self::fields(vec![FieldError::new(field, reason)])
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// The resource's state does not allow the request (409).
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_state", message)
    }

    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "dependency unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let status =
            StatusCode::from_u16(e.status_code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match e {
            CommandError::Invalid(fields) => Self::fields(fields),
            CommandError::Forbidden(_) => Self::new(status, "forbidden", e.to_string()),
            CommandError::NotFound => Self::not_found("task"),
            CommandError::NoPipeline => Self::not_found("pipeline"),
            CommandError::NoSchedule => Self::not_found("schedule"),
            CommandError::NoProject => Self::not_found("project"),
            CommandError::Rejected(_)
            | CommandError::PipelineRejected(_)
            | CommandError::ProjectRejected(_)
            | CommandError::ScheduleRejected(_) => {
                Self::new(status, "invalid_state", e.to_string())
            }
            CommandError::Conflict => Self::new(status, "conflict", e.to_string()),
            CommandError::IdempotencyMismatch => {
                Self::new(status, "idempotency_key_reused", e.to_string())
            }
            CommandError::Unavailable(_) | CommandError::Idempotency(_) => Self::unavailable(e),
        }
    }
}

impl From<ud_projections::ProjectionError> for ApiError {
    fn from(e: ud_projections::ProjectionError) -> Self {
        Self::unavailable(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::unavailable(ud_projections::ProjectionError::from(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status == StatusCode::CONFLICT {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
