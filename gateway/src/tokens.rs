//! `/api/v1/tokens`: admins issue and revoke API tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use ud_schemas::streams;
use utoipa::ToSchema;

use crate::auth::Admin;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::tasks::WAIT_PROJECTED;
use crate::AppState;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    /// 1-100 bytes without control characters; what the token does is
    /// recorded as done by `token:<name>`.
    pub name: String,
    /// Projects the token may see and submit to.
    #[serde(default)]
    pub projects: Vec<String>,
    /// Admin tokens see every project and may issue tokens.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct IssuedTokenView {
    pub id: String,
    /// The secret: shown once, stored only as a SHA-256 digest.
    pub token: String,
}

/// Issue a token (admin). It works as soon as this call returns.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = IssueTokenRequest,
    responses((status = 201, body = IssuedTokenView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn issue(
    State(state): State<AppState>,
    Admin(caller): Admin,
    JsonBody(req): JsonBody<IssueTokenRequest>,
) -> Result<(StatusCode, Json<IssuedTokenView>), ApiError> {
    let issued = ud_core::commands::issue_token(
        state.commands.store(),
        &req.name,
        &req.projects,
        req.admin,
        &caller.actor(),
    )
    .await?;
    state
        .projected
        .wait(streams::AUTH, issued.seq, WAIT_PROJECTED)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(IssuedTokenView {
            id: issued.token_id.to_string(),
            token: issued.secret,
        }),
    ))
}

/// Revoke a token (admin).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: ud_schemas::TokenId = id.parse().map_err(|_| ApiError::not_found("token"))?;
    let seq = ud_core::commands::revoke_token(state.commands.store(), id, &caller.actor())
        .await
        .map_err(|e| match e {
            ud_core::CommandError::NotFound => ApiError::not_found("token"),
            other => other.into(),
        })?;
    state
        .projected
        .wait(streams::AUTH, seq, WAIT_PROJECTED)
        .await;
    state.tokens.forget(id.0);
    Ok(StatusCode::NO_CONTENT)
}
