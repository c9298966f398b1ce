//! `/api/v1/tokens`: admins issue tokens; people list and revoke their own.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ud_schemas::streams;
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Admin, Caller};
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::tasks::WAIT_PROJECTED;
use crate::AppState;

/// Longest life a token can be given.
pub const MAX_EXPIRY_DAYS: u32 = 3650;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueTokenRequest {
    /// 1-100 bytes without control characters: names the token in
    /// listings and for revoking it.
    pub name: String,
    /// The person the token belongs to: it carries that user's roles in
    /// the projects they are a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Projects a token without a user may see and submit to (as owner).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<String>,
    /// Admin tokens see every project and may issue tokens.
    #[serde(default)]
    pub admin: bool,
    /// Days until the token stops working (1-3650); left out: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct IssuedTokenView {
    pub id: String,
    /// The secret: shown once, stored only as a SHA-256 digest.
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
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
    let expires_at = match req.expires_in_days {
        None => None,
        Some(d) if (1..=MAX_EXPIRY_DAYS).contains(&d) => {
            Some(ud_schemas::now_millis() + i64::from(d) * 86_400_000)
        }
        Some(_) => {
            return Err(ApiError::field(
                "expires_in_days",
                format!("must be 1-{MAX_EXPIRY_DAYS}"),
            ))
        }
    };
    let token = ud_core::commands::NewToken {
        name: req.name,
        projects: req.projects,
        admin: req.admin,
        user: req.user,
        expires_at,
    };
    let issued =
        ud_core::commands::issue_token(state.commands.store(), &token, &caller.actor()).await?;
    state
        .projected
        .wait(streams::AUTH, issued.seq, WAIT_PROJECTED)
        .await;
    Ok((
        StatusCode::CREATED,
        Json(IssuedTokenView {
            id: issued.token_id.to_string(),
            token: issued.secret,
            expires_at: expires_at.and_then(DateTime::from_timestamp_millis),
        }),
    ))
}

/// A token as listed: never its secret.
#[derive(Deserialize, Serialize, ToSchema, Debug)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub user: Option<String>,
    pub projects: Vec<String>,
    pub admin: bool,
    pub issued_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last used (recorded at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Revoked or expired.
    pub active: bool,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Also revoked and expired tokens.
    #[serde(default)]
    pub all: bool,
    /// Only this user's tokens (admins).
    pub user: Option<String>,
}

/// Tokens: an admin sees every one, a person their own, a token without a
/// user itself.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", params(ListParams),
    responses((status = 200, body = [TokenView])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<ListParams>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let client = state.db.client().await?;
    let (user, own_id): (Option<String>, Option<uuid::Uuid>) = if caller.admin {
        (q.user, None)
    } else if let Some(u) = &caller.user {
        (Some(u.clone()), None)
    } else {
        (None, Some(caller.token_id))
    };
    let rows = client
        .query(
            "SELECT t.id, t.name, t.user_name, t.projects, t.admin, t.issued_at, t.expires_at,
                    u.last_used_at, t.revoked_at,
                    t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())
             FROM api_tokens t LEFT JOIN token_use u ON u.token_id = t.id
             WHERE ($1::text IS NULL OR t.user_name = $1)
               AND ($2::uuid IS NULL OR t.id = $2)
               AND ($3 OR (t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())))
             ORDER BY t.issued_at, t.id",
            &[&user, &own_id, &q.all],
        )
        .await?;
    Ok(Json(
        rows.iter()
            .map(|r| TokenView {
                id: r.get::<_, uuid::Uuid>(0).to_string(),
                name: r.get(1),
                user: r.get(2),
                projects: r.get(3),
                admin: r.get(4),
                issued_at: r.get(5),
                expires_at: r.get(6),
                last_used_at: r.get(7),
                revoked_at: r.get(8),
                active: r.get(9),
            })
            .collect(),
    ))
}

/// Revoke a token by its id or, when that is unambiguous, its name: an
/// admin any token, a person their own.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "the token's id, or the name of one active token")),
    responses((status = 204), (status = 404, body = ErrorBody),
        (status = 409, description = "several active tokens have this name", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = resolve(&state, &caller, &id).await?;
    let seq = ud_core::commands::revoke_token(
        state.commands.store(),
        ud_schemas::TokenId(id),
        &caller.actor(),
    )
    .await
    .map_err(|e| match e {
        ud_core::CommandError::NotFound => ApiError::not_found("token"),
        other => other.into(),
    })?;
    state
        .projected
        .wait(streams::AUTH, seq, WAIT_PROJECTED)
        .await;
    state.tokens.forget(id);
    Ok(StatusCode::NO_CONTENT)
}

/// The id of the token `id_or_name` names among those the caller may
/// revoke (a name: among the active ones).
async fn resolve(
    state: &AppState,
    caller: &Caller,
    id_or_name: &str,
) -> Result<uuid::Uuid, ApiError> {
    let client = state.db.client().await?;
    let by_id = uuid::Uuid::parse_str(id_or_name).ok();
    let rows = client
        .query(
            "SELECT id, user_name FROM api_tokens
             WHERE ($1::uuid IS NOT NULL AND id = $1)
                OR ($1::uuid IS NULL AND name = $2 AND revoked_at IS NULL)",
            &[&by_id, &id_or_name],
        )
        .await?;
    let mine: Vec<uuid::Uuid> = rows
        .iter()
        .filter(|r| {
            let (id, user): (uuid::Uuid, Option<String>) = (r.get(0), r.get(1));
            caller.admin || id == caller.token_id || (caller.user.is_some() && user == caller.user)
        })
        .map(|r| r.get(0))
        .collect();
    match mine.as_slice() {
        [] => Err(ApiError::not_found("token")),
        [one] => Ok(*one),
        many => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ambiguous",
            format!(
                "{} active tokens are named {id_or_name:?}: revoke one by its id ({})",
                many.len(),
                many.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
