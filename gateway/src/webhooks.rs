//! `/api/v1/projects/{project}/webhooks`: the task events a project wants
//! POSTed to its URL (the `ud_webhooks` bucket), and each delivery's log
//! (`UD_WEBHOOK_LOG`). Deliveries are made by the main servers' webhook
//! service (`ud-notify`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use ud_schemas::api::{WebhookDelivery, WebhookRecord};
use ud_schemas::streams;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// 1-63 of a-z, 0-9, - and _; unique in the project.
    pub name: String,
    /// Where deliveries are POSTed: http or https.
    pub url: String,
    /// Event types to deliver: task.succeeded, task.failed, task.timed_out,
    /// task.cancelled, task.lost, task.retrying, node.offline (any node),
    /// quota.reached (a task of the project waits on its quota; once an
    /// hour at most per limit).
    pub events: Vec<String>,
    /// `json` (default: the event with its task), `slack` (`{"text": ...}`
    /// for a Slack-compatible incoming webhook) or `email` (the URL is
    /// `mailto:ADDRESS[,ADDRESS...]`, up to 10; sent through the main
    /// server's SMTP server, `UD_SMTP_URL`).
    #[serde(default)]
    pub format: Option<String>,
}

/// A webhook as listed: never its key.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct WebhookView {
    pub project: String,
    pub name: String,
    /// Whole for the project's owners; others see only where it goes
    /// (`https://hooks.slack.com/…`, `mailto:2 addresses`).
    pub url: String,
    pub events: Vec<String>,
    pub format: String,
    pub created_by: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

/// A webhook just made, with the key of its signatures: shown this once.
#[derive(Deserialize, Serialize, ToSchema)]
pub struct WebhookCreated {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// Verify `UniDesk-Signature: t=<unix seconds>,v1=<hex>`: the hex is
    /// HMAC-SHA256 under this key of `<t>.<body>`.
    pub secret: String,
}

impl From<&WebhookRecord> for WebhookView {
    fn from(r: &WebhookRecord) -> Self {
        Self {
            project: r.project.clone(),
            name: r.name.clone(),
            url: r.url.clone(),
            events: r.events.clone(),
            format: r.format.clone(),
            created_by: r.created_by.clone(),
            created_at: r.created_at,
        }
    }
}

async fn bucket(state: &AppState) -> Result<async_nats::jetstream::kv::Store, ApiError> {
    state
        .commands
        .store()
        .jetstream()
        .get_key_value(streams::WEBHOOKS_BUCKET)
        .await
        .map_err(ApiError::unavailable)
}

/// Make a webhook of the project: the key of its signatures is in the
/// answer, and only there.
#[utoipa::path(post, path = "/api/v1/projects/{project}/webhooks", tag = "webhooks",
    params(("project" = String, Path)), request_body = NewWebhook,
    responses((status = 201, body = WebhookCreated), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    JsonBody(req): JsonBody<NewWebhook>,
) -> Result<(StatusCode, Json<WebhookCreated>), ApiError> {
    let project = crate::auth::project_of(&caller, &project, ud_schemas::Role::Owner)?.to_string();
    let format = req.format.unwrap_or_else(|| "json".into());
    let mut bad = ud_notify::validate(&req.name, &req.url, &req.events, &format);
    if format == "email" && !state.email {
        bad.push(ud_schemas::api::FieldError::new(
            "format",
            "e-mail needs the main server's SMTP server (UD_SMTP_URL)",
        ));
    }
    if !bad.is_empty() {
        return Err(ApiError::fields(bad));
    }
    let mut events = req.events;
    events.sort();
    events.dedup();
    let record = WebhookRecord {
        project: project.clone(),
        name: req.name.clone(),
        url: req.url,
        events,
        format,
        secret: ud_notify::sign::new_secret(),
        created_by: caller.actor(),
        created_at: ud_schemas::now_millis(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| ApiError::unavailable(e.to_string()))?;
    bucket(&state)
        .await?
        .create(
            ud_notify::deliver::hook_key(&project, &req.name),
            value.into(),
        )
        .await
        .map_err(|e| match e.kind() {
            async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("project {project} has a webhook named {} already", req.name),
            ),
            _ => ApiError::unavailable(e),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(WebhookCreated {
            webhook: WebhookView::from(&record),
            secret: record.secret,
        }),
    ))
}

/// The project's webhooks.
#[utoipa::path(get, path = "/api/v1/projects/{project}/webhooks", tag = "webhooks",
    params(("project" = String, Path)),
    responses((status = 200, body = [WebhookView]), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<Vec<WebhookView>>, ApiError> {
    let project = crate::auth::project_of(&caller, &project, ud_schemas::Role::Viewer)?.to_string();
    let found = ud_notify::deliver::project_hooks(&bucket(&state).await?, Some(&project))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    // A webhook's URL can be a credential (a Slack incoming webhook is):
    // only owners see it whole, others where it goes.
    let whole = caller.may(&project, ud_schemas::Role::Owner);
    Ok(Json(
        found
            .iter()
            .map(WebhookView::from)
            .map(|mut v| {
                if !whole {
                    v.url = ud_notify::where_to(&v.url);
                }
                v
            })
            .collect(),
    ))
}

/// Stop delivering to a webhook (its log stays for its 7 days).
#[utoipa::path(delete, path = "/api/v1/projects/{project}/webhooks/{name}", tag = "webhooks",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let project = crate::auth::project_of(&caller, &project, ud_schemas::Role::Owner)?.to_string();
    if !ud_notify::valid_name(&name) {
        return Err(ApiError::not_found("webhook"));
    }
    let kv = bucket(&state).await?;
    let key = ud_notify::deliver::hook_key(&project, &name);
    if kv.get(&key).await.map_err(ApiError::unavailable)?.is_none() {
        return Err(ApiError::not_found("webhook"));
    }
    kv.purge(&key).await.map_err(ApiError::unavailable)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The webhook's deliveries of the last 7 days, newest first (at most 100).
#[utoipa::path(get, path = "/api/v1/projects/{project}/webhooks/{name}/deliveries", tag = "webhooks",
    params(("project" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = [WebhookDelivery]), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<Vec<WebhookDelivery>>, ApiError> {
    use async_nats::jetstream::consumer;
    let project = crate::auth::project_of(&caller, &project, ud_schemas::Role::Viewer)?.to_string();
    if !ud_notify::valid_name(&name) {
        return Err(ApiError::not_found("webhook"));
    }
    let js = state.commands.store().jetstream();
    let stream = js
        .get_stream(streams::WEBHOOK_LOG)
        .await
        .map_err(ApiError::unavailable)?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: ud_notify::deliver::log_subject(&project, &name),
            ..Default::default()
        })
        .await
        .map_err(ApiError::unavailable)?;
    let mut pending = c.cached_info().num_pending;
    let mut out = std::collections::VecDeque::new();
    if pending > 0 {
        let mut messages = c.messages().await.map_err(ApiError::unavailable)?;
        while pending > 0 {
            let Some(m) = messages.next().await else {
                break;
            };
            let m = m.map_err(ApiError::unavailable)?;
            pending = m.info().map(|i| i.pending).unwrap_or(0);
            if let Ok(d) = serde_json::from_slice::<WebhookDelivery>(&m.payload) {
                out.push_front(d);
                out.truncate(100);
            }
        }
    }
    Ok(Json(out.into_iter().collect()))
}
