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

#[derive(Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub labels: serde_json::Value,
    /// What the node declared: CPUs (thousandths), memory, disk, GPUs, OS, WSL, Docker and agent versions.
    pub resources: serde_json::Value,
    /// online or offline.
    pub status: String,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub running_tasks: i32,
}

impl From<NodeRow> for NodeView {
    fn from(r: NodeRow) -> Self {
        Self {
            id: r.id.to_string(),
            name: r.name,
            labels: r.labels,
            resources: r.resources,
            status: r.status,
            registered_at: r.registered_at,
            last_seen: r.last_seen,
            running_tasks: r.running_tasks,
        }
    }
}

/// Every enrolled node.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, body = [NodeView])), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Vec<NodeView>>, ApiError> {
    let client = state.db.client().await?;
    let rows = ud_projections::db::list_nodes(&client).await?;
    Ok(Json(rows.into_iter().map(NodeView::from).collect()))
}

/// One node.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = NodeView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, _caller: Caller, Path(id): Path<String>) -> Result<Json<NodeView>, ApiError> {
    let id = id.parse().map_err(|_| ApiError::not_found("node"))?;
    let client = state.db.client().await?;
    let row = ud_projections::db::get_node(&client, id)
        .await?
        .ok_or_else(|| ApiError::not_found("node"))?;
    Ok(Json(row.into()))
}
