//! `/api/v1/nodes`: compute nodes from the read model.

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ud_projections::rows::NodeRow;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;
use ud_schemas::SchedulingMode;

#[derive(Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub labels: serde_json::Value,
    /// What the node declared: CPUs (thousandths), memory, disk, GPUs, OS, WSL, Docker and agent versions.
    pub resources: serde_json::Value,
    /// enrolled (never seen), online, offline or revoked.
    pub status: ud_schemas::NodeStatus,
    pub enrolled_at: Option<DateTime<Utc>>,
    pub registered_at: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub running_tasks: i32,
    /// Free space where the node keeps caches and workspaces, from its last heartbeat.
    pub disk_free_mb: Option<i64>,
    /// Below its free-space threshold: the node takes no new tasks.
    pub low_disk: bool,
    /// active, cordoned (no new tasks) or draining (no new tasks; running
    /// ones finish: drained when `running_tasks` is 0).
    pub scheduling: ud_schemas::SchedulingMode,
    /// What the node's assigned and running tasks hold of it.
    pub in_use: InUse,
}

/// Resources held on a node by the tasks placed on it.
#[derive(Serialize, Deserialize, ToSchema, Default, Clone, Copy)]
pub struct InUse {
    /// Thousandths of a CPU core.
    pub cpu_millis: i64,
    pub memory_mb: i64,
    pub gpus: i64,
}

impl From<ud_projections::db::NodeUsage> for InUse {
    fn from(u: ud_projections::db::NodeUsage) -> Self {
        Self {
            cpu_millis: u.cpu_millis,
            memory_mb: u.memory_mb,
            gpus: u.gpus,
        }
    }
}

impl From<NodeRow> for NodeView {
    fn from(r: NodeRow) -> Self {
        Self {
            id: r.id.to_string(),
            name: r.name,
            labels: r.labels,
            resources: r.resources,
            status: r.status,
            enrolled_at: r.enrolled_at,
            registered_at: r.registered_at,
            last_seen: r.last_seen,
            running_tasks: r.running_tasks,
            disk_free_mb: r.disk_free_mb,
            low_disk: r.low_disk,
            scheduling: r.scheduling,
            in_use: InUse::default(),
        }
    }
}

/// One node as the read model has it, with what its tasks hold of it.
async fn node_view(state: &AppState, id: ud_schemas::NodeId) -> Result<NodeView, ApiError> {
    let client = state.db.client().await?;
    let row = ud_projections::db::get_node(&client, id)
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    let used = ud_projections::db::node_usage(&client)
        .await?
        .get(&row.id.0)
        .copied()
        .unwrap_or_default();
    let mut view = NodeView::from(row);
    view.in_use = used.into();
    Ok(view)
}

/// Every enrolled node.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, body = [NodeView])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    let client = state.db.client().await?;
    let rows = ud_projections::db::list_nodes(&client).await?;
    let usage = ud_projections::db::node_usage(&client).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| {
                let used = usage.get(&r.id.0).copied().unwrap_or_default();
                let mut view = NodeView::from(r);
                view.in_use = used.into();
                view
            })
            .collect(),
    ))
}

/// One node.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let id = id.parse().map_err(|_| ApiError::not_found("node"))?;
    Ok(Json(node_view(&state, id).await?))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub name: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct Enrolled {
    pub node_id: String,
    /// Start the node's Provider Gateway with this; shown once, stored only as a hash.
    pub token: String,
}

/// Enroll a compute node (admin).
#[utoipa::path(post, path = "/api/v1/nodes", tag = "nodes", request_body = EnrollRequest,
    responses((status = 201, body = Enrolled), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enroll(
    State(state): State<AppState>,
    crate::auth::Admin(caller): crate::auth::Admin,
    crate::body::JsonBody(req): crate::body::JsonBody<EnrollRequest>,
) -> Result<(axum::http::StatusCode, Json<Enrolled>), ApiError> {
    let (token, seq) = ud_core::edge::enroll::enroll(
        state.commands.store(),
        &req.name,
        req.labels,
        &caller.actor(),
    )
    .await
    .map_err(edge_error)?;
    state
        .projected
        .wait(
            ud_schemas::streams::NODES,
            seq,
            crate::tasks::WAIT_PROJECTED,
        )
        .await;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(Enrolled {
            node_id: token.node_id.to_string(),
            token: token.encode(),
        }),
    ))
}

/// Revoke a node (admin): its connection is closed and it cannot reconnect.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/revoke", tag = "nodes", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<AppState>,
    crate::auth::Admin(caller): crate::auth::Admin,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let id = id.parse().map_err(|_| ApiError::not_found("node"))?;
    if let Some(seq) = ud_core::edge::enroll::revoke(state.commands.store(), id, &caller.actor())
        .await
        .map_err(edge_error)?
    {
        state
            .projected
            .wait(
                ud_schemas::streams::NODES,
                seq,
                crate::tasks::WAIT_PROJECTED,
            )
            .await;
    }
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct SchedulingRequest {
    /// Why, for the node's history.
    #[serde(default)]
    pub reason: Option<String>,
}

async fn set_scheduling(
    state: &AppState,
    caller: &Caller,
    id: &str,
    mode: SchedulingMode,
    body: &[u8],
) -> Result<Json<NodeView>, ApiError> {
    let id: ud_schemas::NodeId = id.parse().map_err(|_| ApiError::not_found("node"))?;
    let req: SchedulingRequest = crate::body::parse_or_default(body)?;
    let reason = req.reason.unwrap_or_default();
    ud_core::validate::reason("reason", &reason).map_err(|f| ApiError::fields(vec![f]))?;
    if let Some(seq) = ud_core::edge::enroll::set_scheduling(
        state.commands.store(),
        id,
        mode,
        &reason,
        &caller.actor(),
    )
    .await
    .map_err(edge_error)?
    {
        state
            .projected
            .wait(
                ud_schemas::streams::NODES,
                seq,
                crate::tasks::WAIT_PROJECTED,
            )
            .await;
    }
    Ok(Json(node_view(state, id).await?))
}

/// Cordon a node (admin): it takes no new tasks; running ones go on.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/cordon", tag = "nodes", params(("id" = String, Path)), request_body(content = SchedulingRequest, description = "optional"),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn cordon(
    State(state): State<AppState>,
    crate::auth::Admin(caller): crate::auth::Admin,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<NodeView>, ApiError> {
    set_scheduling(&state, &caller, &id, SchedulingMode::Cordoned, &body).await
}

/// Drain a node (admin): no new tasks; running ones finish, then it is empty.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", tag = "nodes", params(("id" = String, Path)), request_body(content = SchedulingRequest, description = "optional"),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn drain(
    State(state): State<AppState>,
    crate::auth::Admin(caller): crate::auth::Admin,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<NodeView>, ApiError> {
    set_scheduling(&state, &caller, &id, SchedulingMode::Draining, &body).await
}

/// Put a cordoned or draining node back into service (admin).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/resume", tag = "nodes", params(("id" = String, Path)), request_body(content = SchedulingRequest, description = "optional"),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    crate::auth::Admin(caller): crate::auth::Admin,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<NodeView>, ApiError> {
    set_scheduling(&state, &caller, &id, SchedulingMode::Active, &body).await
}

fn edge_error(e: ud_core::edge::EdgeError) -> ApiError {
    use ud_core::edge::EdgeError;
    use ud_core::node::NodeError;
    match e {
        EdgeError::Node(NodeError::Unknown) => ApiError::not_found("node"),
        EdgeError::Node(e) => ApiError::invalid_state(e.to_string()),
        EdgeError::Invalid { field, reason } => ApiError::field(field, reason),
        other => ApiError::unavailable(other),
    }
}
