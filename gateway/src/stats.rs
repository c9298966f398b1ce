//! `/api/v1/stats`: what the web UI plots: tasks per state now and over a
//! time window, and how much of each node is in use.

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::nodes::InUse;
use crate::AppState;

#[derive(Deserialize, IntoParams)]
pub struct StatsParams {
    /// Length of the window in minutes, 1-10080 (default 60).
    pub minutes: Option<i64>,
    /// Points in the window, 2-500 (default 60).
    pub points: Option<i64>,
}

/// Tasks per state at one moment.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TimelinePoint {
    pub at: DateTime<Utc>,
    /// Submitted and not finished (pending, assigned or running).
    pub unfinished: i64,
    /// Finished since the window began, by how they ended.
    pub succeeded: i64,
    pub failed: i64,
    pub timed_out: i64,
    pub cancelled: i64,
}

/// One node's capacity and what is in use.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct NodeUtilisation {
    pub id: String,
    pub name: String,
    pub status: ud_schemas::NodeStatus,
    pub scheduling: ud_schemas::SchedulingMode,
    pub cpu_millis: i64,
    pub memory_mb: i64,
    pub gpus: i64,
    pub in_use: InUse,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Tasks of the projects the token may see, by state, now.
    pub tasks_by_state: std::collections::BTreeMap<String, i64>,
    /// The same projects' tasks per state over the window, oldest first.
    pub timeline: Vec<TimelinePoint>,
    pub nodes: Vec<NodeUtilisation>,
    /// What the projects' tasks hold now and used this month, by project
    /// and by who submitted them.
    pub usage: UsageStats,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct UsageStats {
    /// The month `gpu_hours` counts (`YYYY-MM`, UTC).
    pub month: String,
    pub projects: std::collections::BTreeMap<String, crate::quotas::Usage>,
    /// By the token that submitted the tasks (`token:<name>`).
    pub users: std::collections::BTreeMap<String, crate::quotas::Usage>,
}

/// Tasks per state (now and over a window) and node utilisation.
#[utoipa::path(get, path = "/api/v1/stats", tag = "tasks", params(StatsParams),
    responses((status = 200, body = Stats), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<StatsParams>,
) -> Result<Json<Stats>, ApiError> {
    let minutes = p.minutes.unwrap_or(60);
    if !(1..=10_080).contains(&minutes) {
        return Err(ApiError::field("minutes", "must be between 1 and 10080"));
    }
    let points = p.points.unwrap_or(60);
    if !(2..=500).contains(&points) {
        return Err(ApiError::field("points", "must be between 2 and 500"));
    }
    let visible = caller.visible();
    let projects = visible.as_deref();
    let client = state.db.client().await?;
    let rows = ud_projections::db::tasks_by_state(&client, projects).await?;
    let mut tasks_by_state: std::collections::BTreeMap<String, i64> = ud_schemas::TaskStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    tasks_by_state.extend(rows);
    let timeline = ud_projections::db::task_timeline(&client, minutes * 60, points, projects)
        .await?
        .into_iter()
        .map(|t| TimelinePoint {
            at: t.at,
            unfinished: t.unfinished,
            succeeded: t.succeeded,
            failed: t.failed,
            timed_out: t.timed_out,
            cancelled: t.cancelled,
        })
        .collect();
    let usage = ud_projections::db::node_usage(&client).await?;
    let nodes = ud_projections::db::list_nodes(&client)
        .await?
        .into_iter()
        .filter(|n| n.status != ud_schemas::NodeStatus::Revoked)
        .map(|n| {
            let num = |k: &str| {
                n.resources
                    .get(k)
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0)
            };
            let gpus = n
                .resources
                .get("gpus")
                .and_then(serde_json::Value::as_array)
                .map_or(0, |g| g.len() as i64);
            NodeUtilisation {
                id: n.id.to_string(),
                name: n.name.clone(),
                status: n.status,
                scheduling: n.scheduling,
                cpu_millis: num("cpu_millis"),
                memory_mb: num("memory_mb"),
                gpus,
                in_use: usage.get(&n.id.0).copied().unwrap_or_default().into(),
            }
        })
        .collect();
    let (month, projects, users) = crate::quotas::usage(&client, projects).await?;
    Ok(Json(Stats {
        tasks_by_state,
        timeline,
        nodes,
        usage: UsageStats {
            month,
            projects,
            users,
        },
    }))
}
