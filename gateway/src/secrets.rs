//! `/api/v1/projects/{project}/secrets` and `/api/v1/secrets`: project
//! secrets, write-only. Anyone who may use a project may set, list and
//! delete its secrets; no one reads a value back through the API (a run
//! gets them, see [`ud_core::secrets`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use ud_core::secrets::{SecretError, Secrets};
use ud_schemas::api::{SecretInfo, SetSecret};
use ud_schemas::ProjectId;
use utoipa::ToSchema;

use crate::auth::{project_of, Caller};
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;
use ud_schemas::Role;

impl From<SecretError> for ApiError {
    fn from(e: SecretError) -> Self {
        match e {
            SecretError::Invalid { field, reason } => ApiError::field(field, reason),
            SecretError::NotSet(_) => ApiError::not_found("secret"),
            SecretError::Key { .. } | SecretError::Unreadable { .. } | SecretError::Store(_) => {
                ApiError::unavailable(e)
            }
        }
    }
}

fn secrets(state: &AppState) -> Result<&Secrets, ApiError> {
    state.commands.secrets().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_secret_key",
            "this platform holds no key for secrets (UD_SECRETS_KEY_FILE)",
        )
    })
}

/// A project's secret, without its value.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ProjectSecret {
    pub project: String,
    #[serde(flatten)]
    pub secret: SecretInfo,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SecretList {
    pub secrets: Vec<ProjectSecret>,
}

fn list_of(found: Vec<(ProjectId, SecretInfo)>) -> SecretList {
    SecretList {
        secrets: found
            .into_iter()
            .map(|(p, secret)| ProjectSecret {
                project: p.to_string(),
                secret,
            })
            .collect(),
    }
}

/// Set a project secret (a new version when it is set already). Tasks name
/// it in `secrets` and get it as the environment variable of its name.
#[utoipa::path(put, path = "/api/v1/projects/{project}/secrets/{name}", tag = "secrets",
    params(("project" = String, Path), ("name" = String, Path)),
    request_body = SetSecret,
    responses((status = 200, body = SecretInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, name)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetSecret>,
) -> Result<Json<SecretInfo>, ApiError> {
    let project = project_of(&caller, &project, Role::Owner)?;
    let info = secrets(&state)?
        .set(&project, &name, &req.value, &caller.actor())
        .await?;
    Ok(Json(info))
}

/// Delete a project secret. Tasks that name it and have not started fail to start.
#[utoipa::path(delete, path = "/api/v1/projects/{project}/secrets/{name}", tag = "secrets",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = SecretInfo), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<SecretInfo>, ApiError> {
    let project = project_of(&caller, &project, Role::Owner)?;
    let info = secrets(&state)?
        .delete(&project, &name, &caller.actor())
        .await?;
    Ok(Json(info))
}

/// A project's secrets: names and versions, never values.
#[utoipa::path(get, path = "/api/v1/projects/{project}/secrets", tag = "secrets",
    params(("project" = String, Path)),
    responses((status = 200, body = SecretList), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<SecretList>, ApiError> {
    let project = project_of(&caller, &project, Role::Viewer)?;
    let found = secrets(&state)?.list(|p| p == &project).await?;
    Ok(Json(list_of(found)))
}

/// The secrets of every project the token may use.
#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    responses((status = 200, body = SecretList), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_all(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SecretList>, ApiError> {
    let found = secrets(&state)?
        .list(|p| caller.may_see(p.as_str()))
        .await?;
    Ok(Json(list_of(found)))
}
