//! `/api/v1/pipelines`: submit, read, cancel, rerun.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ud_core::pipeline::commands::PipelineAccepted;
use ud_projections::rows::PipelineRow;
use ud_schemas::api::{PipelineStepView, SubmitPipeline};
use ud_schemas::{streams, PipelineId};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::tasks::WriteParams;
use crate::AppState;

/// The answer to an accepted pipeline command.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PipelineAcceptedView {
    pub pipeline_id: String,
    /// False when the command changed nothing (a repeat).
    pub changed: bool,
    /// Stream sequence (`UD_PIPELINES`) of the command's last event.
    pub seq: u64,
    /// True when the read models already include this write.
    pub projected: bool,
}

/// A pipeline as the read model holds it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PipelineView {
    pub id: String,
    pub project: String,
    pub name: Option<String>,
    /// running, succeeded, failed or cancelled.
    pub status: String,
    /// A cancel was asked for and running steps are being stopped.
    pub cancelling: bool,
    /// Each step as it runs, in the order listed (a matrix step: one per
    /// combination of values).
    pub steps: Vec<PipelineStepView>,
    /// The steps as submitted, each with its task spec (in
    /// `GET /api/v1/pipelines/{id}`; empty in lists).
    #[schema(value_type = Vec<Object>)]
    pub definition: Vec<serde_json::Value>,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Events applied to this pipeline; grows with every change.
    pub version: i64,
}

impl PipelineView {
    fn from_row(r: PipelineRow, full: bool) -> Self {
        let definition = match (full, r.definition) {
            (true, serde_json::Value::Array(a)) => a,
            _ => vec![],
        };
        Self {
            id: r.id.to_string(),
            project: r.project,
            name: r.name,
            status: r.status,
            cancelling: r.cancelling,
            steps: serde_json::from_value(r.steps).unwrap_or_default(),
            definition,
            submitted_by: r.submitted_by,
            submitted_at: r.submitted_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            version: r.version,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PipelinePage {
    pub items: Vec<PipelineView>,
    /// Pass as `before` to get the next (older) page; null on the last page.
    pub next: Option<String>,
}

#[derive(Deserialize, IntoParams)]
pub struct ListParams {
    /// running, succeeded, failed or cancelled.
    pub status: Option<String>,
    pub project: Option<String>,
    /// Pipelines submitted before this pipeline id (paging cursor).
    pub before: Option<String>,
    /// Page size, 1-500 (default 50).
    pub limit: Option<i64>,
    /// Answer once the read model includes `UD_PIPELINES` up to this sequence.
    pub projected_seq: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
pub struct GetParams {
    /// Answer once the read model includes `UD_PIPELINES` up to this
    /// sequence (waiting at most 5 s).
    pub projected_seq: Option<u64>,
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RerunPipeline {
    /// Run this step (a listed name: all of a matrix step; or one
    /// combination, `train[0.1]`) and every step after it again; absent:
    /// every step. Steps not run again keep their outputs, which the ones
    /// run again read.
    pub step: Option<String>,
}

fn parse_id(id: &str) -> Result<PipelineId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("pipeline"))
}

async fn respond(
    state: &AppState,
    a: PipelineAccepted,
    wait: bool,
    status: StatusCode,
) -> Response {
    let location = format!("/api/v1/pipelines/{}", a.pipeline_id);
    let seq = (streams::PIPELINES, a.seq);
    crate::tasks::written(state, seq, wait, status, location, |projected| {
        PipelineAcceptedView {
            pipeline_id: a.pipeline_id.to_string(),
            changed: a.changed,
            seq: a.seq,
            projected,
        }
    })
    .await
}

/// Submit a pipeline: steps that run once the steps they need have ended.
#[utoipa::path(post, path = "/api/v1/pipelines", tag = "pipelines",
    request_body = SubmitPipeline,
    params(WriteParams),
    responses(
        (status = 202, description = "accepted; the first steps have started", body = PipelineAcceptedView),
        (status = 400, description = "invalid pipeline (a cycle, an unknown need, a matrix too large, an invalid step); `fields` names each rejected field", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<WriteParams>,
    JsonBody(req): JsonBody<SubmitPipeline>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let accepted = state
        .pipelines
        .submit(&req, &caller.actor(), |p| {
            caller.may(p.as_str(), ud_schemas::Role::Member)
        })
        .await?;
    Ok(respond(&state, accepted, wait, StatusCode::ACCEPTED).await)
}

/// A pipeline with each step's state and task.
#[utoipa::path(get, path = "/api/v1/pipelines/{id}", tag = "pipelines",
    params(("id" = String, Path), GetParams),
    responses((status = 200, body = PipelineView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<GetParams>,
) -> Result<Json<PipelineView>, ApiError> {
    let id = parse_id(&id)?;
    crate::paging::caught_up(&state, streams::PIPELINES, q.projected_seq).await;
    let client = state.db.client().await?;
    let row = ud_projections::db::get_pipeline(&client, id)
        .await?
        .filter(|r| caller.may_see(&r.project))
        .ok_or_else(|| ApiError::not_found("pipeline"))?;
    Ok(Json(PipelineView::from_row(row, true)))
}

/// Pipelines the token may see, newest first.
#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines", params(ListParams),
    responses((status = 200, body = PipelinePage), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Json<PipelinePage>, ApiError> {
    let limit = crate::paging::limit(p.limit)?;
    if let Some(s) = &p.status {
        if ud_core::pipeline::PipelineStatus::parse(s).is_none() {
            return Err(ApiError::field(
                "status",
                "use running, succeeded, failed or cancelled",
            ));
        }
    }
    let before = crate::paging::before(p.before.as_deref(), "pipeline")?;
    crate::paging::caught_up(&state, streams::PIPELINES, p.projected_seq).await;
    let filter = ud_projections::db::PipelineFilter {
        status: p.status.clone(),
        project: p.project.clone(),
        projects: caller.visible(),
        before,
        limit: limit + 1,
    };
    let client = state.db.client().await?;
    let mut rows = ud_projections::db::list_pipelines(&client, &filter).await?;
    let next = crate::paging::cut(&mut rows, limit, |r| r.id.to_string());
    Ok(Json(PipelinePage {
        items: rows
            .into_iter()
            .map(|r| PipelineView::from_row(r, false))
            .collect(),
        next,
    }))
}

/// Cancel a pipeline: waiting steps are skipped, running ones cancelled.
#[utoipa::path(post, path = "/api/v1/pipelines/{id}/cancel", tag = "pipelines",
    params(("id" = String, Path), WriteParams),
    request_body(content = Option<crate::tasks::CancelRequest>),
    responses((status = 202, body = PipelineAcceptedView), (status = 404, body = ErrorBody),
        (status = 409, description = "ended already, or changed concurrently", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let id = parse_id(&id)?;
    crate::auth::may_change_made(&state, &caller, "pipelines", "submitted_by", id.0).await?;
    let req: crate::tasks::CancelRequest = crate::body::parse_or_default(&body)?;
    let reason = req
        .reason
        .unwrap_or_else(|| format!("cancelled by {}", caller.actor()));
    let gate = crate::auth::Gate::new(&caller, ud_schemas::Role::Member);
    let done = state
        .pipelines
        .cancel(id, &reason, &caller.actor(), |p| gate.check(p))
        .await;
    let accepted = gate.result(done)?;
    Ok(respond(&state, accepted, wait, StatusCode::ACCEPTED).await)
}

/// Run an ended pipeline again, or one step of it and every step after it.
#[utoipa::path(post, path = "/api/v1/pipelines/{id}/rerun", tag = "pipelines",
    params(("id" = String, Path), WriteParams),
    request_body(content = Option<RerunPipeline>),
    responses((status = 202, body = PipelineAcceptedView), (status = 404, body = ErrorBody),
        (status = 409, description = "still running, no such step, or changed concurrently", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let id = parse_id(&id)?;
    crate::auth::may_change_made(&state, &caller, "pipelines", "submitted_by", id.0).await?;
    let req: RerunPipeline = crate::body::parse_or_default(&body)?;
    let gate = crate::auth::Gate::new(&caller, ud_schemas::Role::Member);
    let done = state
        .pipelines
        .rerun(id, req.step, &caller.actor(), |p| gate.check(p))
        .await;
    let accepted = gate.result(done)?;
    Ok(respond(&state, accepted, wait, StatusCode::ACCEPTED).await)
}
