//! `/api/v1/queues`: queue priorities and limits, set by admins while the
//! platform runs (the `ud_queues` bucket; the scheduler follows it at once),
//! beside what waits and runs in each queue.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use ud_schemas::api::QueueRecord;
use ud_schemas::streams;
use utoipa::ToSchema;

use crate::auth::{Admin, Caller};
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Tasks of higher-priority queues are considered first (-1000 to 1000).
    #[serde(default)]
    pub priority: i32,
    /// Most tasks of the queue assigned or running at once (absent: no limit).
    #[serde(default)]
    pub max_running: Option<u32>,
    /// Seconds a run of the queue's tasks stays `disconnected` when its node
    /// goes offline, unless the task says (absent: the platform's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_seconds: Option<u64>,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    /// Settings made through the API; null: the queue follows
    /// `UD_QUEUES_FILE` or the defaults (priority 0, no limit).
    pub settings: Option<QueueSettings>,
    pub updated_by: Option<String>,
    /// Milliseconds since the epoch.
    pub updated_at: Option<i64>,
    /// Unfinished tasks of the projects the token may see, by state.
    pub pending: i64,
    pub running: i64,
}

fn queue_name(name: &str) -> Result<(), ApiError> {
    ud_core::validate::queue_name("queue", name).map_err(|f| ApiError::fields(vec![f]))
}

async fn bucket(state: &AppState) -> Result<async_nats::jetstream::kv::Store, ApiError> {
    state
        .commands
        .store()
        .jetstream()
        .get_key_value(streams::QUEUES_BUCKET)
        .await
        .map_err(ApiError::unavailable)
}

async fn record(
    kv: &async_nats::jetstream::kv::Store,
    name: &str,
) -> Result<Option<QueueRecord>, ApiError> {
    let value = kv.get(name).await.map_err(ApiError::unavailable)?;
    Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
}

fn view(name: String, r: Option<QueueRecord>, pending: i64, running: i64) -> QueueView {
    QueueView {
        name,
        updated_by: r.as_ref().map(|r| r.updated_by.clone()),
        updated_at: r.as_ref().map(|r| r.updated_at),
        settings: r.map(|r| QueueSettings {
            priority: r.priority,
            max_running: r.max_running,
            lost_after_seconds: r.lost_after_seconds,
        }),
        pending,
        running,
    }
}

/// Counts of unfinished tasks per queue, of the projects the caller may see.
async fn counts(
    state: &AppState,
    caller: &Caller,
) -> Result<std::collections::BTreeMap<String, (i64, i64)>, ApiError> {
    let projects = caller.visible();
    let client = state.db.client().await?;
    let rows = client
        .query(
            "SELECT COALESCE(spec->>'queue', 'default'),
                    count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state IN ('assigned', 'running', 'disconnected', 'cancelling'))
             FROM tasks
             WHERE state IN ('pending', 'assigned', 'running', 'disconnected', 'cancelling')
               AND ($1::text[] IS NULL OR project = ANY($1))
             GROUP BY 1",
            &[&projects],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Queues with settings or unfinished tasks.
#[utoipa::path(get, path = "/api/v1/queues", tag = "queues",
    responses((status = 200, body = [QueueView])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<QueueView>>, ApiError> {
    let mut counts = counts(&state, &caller).await?;
    let kv = bucket(&state).await?;
    let mut names = std::collections::BTreeSet::new();
    let mut keys = kv.keys().await.map_err(ApiError::unavailable)?;
    while let Some(k) = futures::StreamExt::next(&mut keys).await {
        names.insert(k.map_err(ApiError::unavailable)?);
    }
    names.extend(counts.keys().cloned());
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let r = record(&kv, &name).await?;
        let (pending, running) = counts.remove(&name).unwrap_or((0, 0));
        out.push(view(name, r, pending, running));
    }
    Ok(Json(out))
}

/// Set a queue's priority and limit (admin); the scheduler applies it at once.
#[utoipa::path(put, path = "/api/v1/queues/{queue}", tag = "queues", params(("queue" = String, Path)),
    request_body = QueueSettings,
    responses((status = 200, body = QueueView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<QueueSettings>,
) -> Result<Json<QueueView>, ApiError> {
    queue_name(&name)?;
    if !(-1000..=1000).contains(&req.priority) {
        return Err(ApiError::field(
            "priority",
            "must be between -1000 and 1000",
        ));
    }
    if req.max_running == Some(0) {
        return Err(ApiError::field(
            "max_running",
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    let max = ud_core::validate::limits::MAX_LOST_AFTER_SECONDS.unsigned_abs();
    if req.lost_after_seconds.is_some_and(|s| s > max) {
        return Err(ApiError::field(
            "lost_after_seconds",
            format!("must be between 0 and {max}"),
        ));
    }
    let r = QueueRecord {
        priority: req.priority,
        max_running: req.max_running,
        lost_after_seconds: req.lost_after_seconds,
        updated_by: caller.actor(),
        updated_at: ud_schemas::now_millis(),
    };
    let value = serde_json::to_vec(&r).map_err(|e| ApiError::unavailable(e.to_string()))?;
    let kv = bucket(&state).await?;
    kv.put(&name, value.into())
        .await
        .map_err(ApiError::unavailable)?;
    let (pending, running) = counts(&state, &caller)
        .await?
        .remove(&name)
        .unwrap_or((0, 0));
    Ok(Json(view(name, Some(r), pending, running)))
}

/// Drop a queue's API settings (admin): back to `UD_QUEUES_FILE` or the defaults.
#[utoipa::path(delete, path = "/api/v1/queues/{queue}", tag = "queues", params(("queue" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn reset(
    State(state): State<AppState>,
    Admin(_caller): Admin,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    queue_name(&name)?;
    let kv = bucket(&state).await?;
    kv.delete(&name).await.map_err(ApiError::unavailable)?;
    Ok(StatusCode::NO_CONTENT)
}
