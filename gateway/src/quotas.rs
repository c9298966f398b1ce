//! Compute quotas per project (`/api/v1/quotas`,
//! `/api/v1/projects/{project}/quota`): set by admins in the `ud_quotas`
//! bucket, followed by the scheduler at once, shown beside what each
//! project's tasks hold now and the GPU-hours they used this month.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use ud_core::edge::scheduler::quota;
use ud_schemas::api::QuotaRecord;
use ud_schemas::streams;
use utoipa::ToSchema;

use crate::auth::{Admin, Caller};
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody, FieldError};
use crate::AppState;

/// A project's limits; each left out (or null): no limit. A task that would
/// pass one waits, saying which, until the project's tasks free enough.
#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// Most tasks assigned or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tasks: Option<i64>,
    /// Most CPU, in thousandths of a CPU, its live tasks hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_millis: Option<i64>,
    /// Most memory, in MiB, its live tasks hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<i64>,
    /// Most GPUs its live tasks hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<i64>,
    /// GPU-hours its runs may use in a calendar month (UTC); once used,
    /// its GPU tasks wait for the next month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hours_per_month: Option<i64>,
}

/// What a project's (or a user's) tasks hold now and used this month.
#[derive(Deserialize, Serialize, ToSchema, Default, Clone, Debug, PartialEq)]
pub struct Usage {
    /// Tasks assigned or running.
    pub tasks: i64,
    pub cpu_millis: i64,
    pub memory_mb: i64,
    pub gpus: i64,
    /// GPU-hours of runs this calendar month (UTC), runs still going included.
    pub gpu_hours: f64,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct QuotaView {
    pub project: String,
    /// Null: the project has no quota.
    pub quota: Option<QuotaSettings>,
    pub updated_by: Option<String>,
    /// Milliseconds since the epoch.
    pub updated_at: Option<i64>,
    /// The month `usage.gpu_hours` counts (`YYYY-MM`, UTC).
    pub month: String,
    pub usage: Usage,
}

/// Usage this month by project and by who submitted, of the projects given
/// (all when `None`): the month's name and the two maps.
pub(crate) async fn usage(
    client: &deadpool_postgres::Object,
    projects: Option<&[String]>,
) -> Result<(String, BTreeMap<String, Usage>, BTreeMap<String, Usage>), ApiError> {
    let (month, start) = quota::month_at(ud_schemas::now_millis());
    let name = quota::month_name(month);
    let start = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(start).unwrap_or_default();
    let rows = client
        .query(
            "SELECT project, submitted_by,
                    count(*) FILTER (WHERE live),
                    COALESCE(sum((spec->'resources'->>'cpu_millis')::bigint) FILTER (WHERE live), 0)::bigint,
                    COALESCE(sum((spec->'resources'->>'memory_mb')::bigint) FILTER (WHERE live), 0)::bigint,
                    COALESCE(sum((spec->'resources'->>'gpus')::bigint) FILTER (WHERE live), 0)::bigint,
                    COALESCE(sum(COALESCE((gpu_ms->>$2)::bigint, 0)
                        + CASE WHEN started_at IS NULL THEN 0
                          ELSE (spec->'resources'->>'gpus')::bigint
                               * GREATEST(0, (extract(epoch FROM now() - GREATEST(started_at, $3)) * 1000)::bigint)
                          END), 0)::bigint
             FROM (SELECT *, state IN ('assigned', 'running', 'disconnected', 'cancelling') AS live
                   FROM tasks
                   WHERE (state IN ('assigned', 'running', 'disconnected', 'cancelling') OR gpu_ms ? $2)
                     AND ($1::text[] IS NULL OR project = ANY($1))) t
             GROUP BY project, submitted_by",
            &[&projects, &name, &start],
        )
        .await?;
    let (mut by_project, mut by_user) = (BTreeMap::new(), BTreeMap::<String, Usage>::new());
    for r in rows {
        let u = Usage {
            tasks: r.get(2),
            cpu_millis: r.get(3),
            memory_mb: r.get(4),
            gpus: r.get(5),
            gpu_hours: r.get::<_, i64>(6) as f64 / 3_600_000.0,
        };
        for (map, key) in [
            (&mut by_project, r.get::<_, String>(0)),
            (&mut by_user, r.get::<_, String>(1)),
        ] {
            let e: &mut Usage = map.entry(key).or_default();
            e.tasks += u.tasks;
            e.cpu_millis += u.cpu_millis;
            e.memory_mb += u.memory_mb;
            e.gpus += u.gpus;
            e.gpu_hours += u.gpu_hours;
        }
    }
    Ok((name, by_project, by_user))
}

async fn bucket(state: &AppState) -> Result<async_nats::jetstream::kv::Store, ApiError> {
    state
        .commands
        .store()
        .jetstream()
        .get_key_value(streams::QUOTAS_BUCKET)
        .await
        .map_err(ApiError::unavailable)
}

async fn record(
    kv: &async_nats::jetstream::kv::Store,
    project: &str,
) -> Result<Option<QuotaRecord>, ApiError> {
    let value = kv.get(project).await.map_err(ApiError::unavailable)?;
    Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
}

fn view(project: String, r: Option<QuotaRecord>, month: String, usage: Usage) -> QuotaView {
    let n = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    QuotaView {
        project,
        updated_by: r.as_ref().map(|r| r.updated_by.clone()),
        updated_at: r.as_ref().map(|r| r.updated_at),
        quota: r.map(|r| QuotaSettings {
            max_tasks: r.max_tasks.map(i64::from),
            max_cpu_millis: n(r.max_cpu_millis),
            max_memory_mb: n(r.max_memory_mb),
            max_gpus: r.max_gpus.map(i64::from),
            gpu_hours_per_month: r.gpu_hours_per_month.map(i64::from),
        }),
        month,
        usage,
    }
}

/// Each limit at least 0 and within its type; every field that is not.
fn record_of(s: &QuotaSettings, actor: String) -> Result<QuotaRecord, ApiError> {
    let mut bad = Vec::new();
    let mut small = |field: &str, v: Option<i64>| -> Option<u32> {
        let v = v?;
        match u32::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                bad.push(FieldError::new(
                    field,
                    format!(
                        "must be between 0 and {} (leave it out for no limit)",
                        u32::MAX
                    ),
                ));
                None
            }
        }
    };
    let max_tasks = small("max_tasks", s.max_tasks);
    let max_gpus = small("max_gpus", s.max_gpus);
    let gpu_hours_per_month = small("gpu_hours_per_month", s.gpu_hours_per_month);
    let mut large = |field: &str, v: Option<i64>| -> Option<u64> {
        let v = v?;
        match u64::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                bad.push(FieldError::new(
                    field,
                    "must be 0 or more (leave it out for no limit)",
                ));
                None
            }
        }
    };
    let max_cpu_millis = large("max_cpu_millis", s.max_cpu_millis);
    let max_memory_mb = large("max_memory_mb", s.max_memory_mb);
    if !bad.is_empty() {
        return Err(ApiError::fields(bad));
    }
    Ok(QuotaRecord {
        max_tasks,
        max_cpu_millis,
        max_memory_mb,
        max_gpus,
        gpu_hours_per_month,
        updated_by: actor,
        updated_at: ud_schemas::now_millis(),
    })
}

/// Projects with a quota or live tasks, of those the token may see, with
/// what they hold and used this month.
#[utoipa::path(get, path = "/api/v1/quotas", tag = "quotas",
    responses((status = 200, body = [QuotaView])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<QuotaView>>, ApiError> {
    let visible = caller.visible();
    let projects = visible.as_deref();
    let client = state.db.client().await?;
    let (month, mut used, _) = usage(&client, projects).await?;
    let kv = bucket(&state).await?;
    let mut names: std::collections::BTreeSet<String> = used.keys().cloned().collect();
    let mut keys = kv.keys().await.map_err(ApiError::unavailable)?;
    while let Some(k) = futures::StreamExt::next(&mut keys).await {
        let k = k.map_err(ApiError::unavailable)?;
        if caller.may_see(&k) {
            names.insert(k);
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let r = record(&kv, &name).await?;
        let u = used.remove(&name).unwrap_or_default();
        out.push(view(name, r, month.clone(), u));
    }
    Ok(Json(out))
}

/// A project's quota and usage.
#[utoipa::path(get, path = "/api/v1/projects/{project}/quota", tag = "quotas",
    params(("project" = String, Path)),
    responses((status = 200, body = QuotaView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<QuotaView>, ApiError> {
    let project = crate::auth::project_of(&caller, &project, ud_schemas::Role::Viewer)?.to_string();
    one(&state, project).await.map(Json)
}

async fn one(state: &AppState, project: String) -> Result<QuotaView, ApiError> {
    let client = state.db.client().await?;
    let (month, mut used, _) = usage(&client, Some(std::slice::from_ref(&project))).await?;
    let r = record(&bucket(state).await?, &project).await?;
    let u = used.remove(&project).unwrap_or_default();
    Ok(view(project, r, month, u))
}

/// Set a project's quota (admin); the scheduler applies it at once. Tasks
/// already running keep running.
#[utoipa::path(put, path = "/api/v1/projects/{project}/quota", tag = "quotas",
    params(("project" = String, Path)),
    request_body = QuotaSettings,
    responses((status = 200, body = QuotaView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(project): Path<String>,
    JsonBody(req): JsonBody<QuotaSettings>,
) -> Result<Json<QuotaView>, ApiError> {
    let project = project
        .parse::<ud_schemas::ProjectId>()
        .map_err(|e| ApiError::field("project", e.to_string()))?
        .to_string();
    let r = record_of(&req, caller.actor())?;
    let value = serde_json::to_vec(&r).map_err(|e| ApiError::unavailable(e.to_string()))?;
    bucket(&state)
        .await?
        .put(&project, value.into())
        .await
        .map_err(ApiError::unavailable)?;
    one(&state, project).await.map(Json)
}

/// Drop a project's quota (admin): its tasks are limited by nodes alone.
#[utoipa::path(delete, path = "/api/v1/projects/{project}/quota", tag = "quotas",
    params(("project" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn reset(
    State(state): State<AppState>,
    Admin(_caller): Admin,
    Path(project): Path<String>,
) -> Result<StatusCode, ApiError> {
    project
        .parse::<ud_schemas::ProjectId>()
        .map_err(|e| ApiError::field("project", e.to_string()))?;
    bucket(&state)
        .await?
        .delete(&project)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(StatusCode::NO_CONTENT)
}
