//! `/api/v1/schedules`: a task or pipeline submitted at the times of a
//! cron expression; create, read, pause, resume, delete.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ud_core::schedule::commands::ScheduleAccepted;
use ud_core::schedule::{ScheduleCommand, When};
use ud_projections::rows::ScheduleRow;
use ud_schemas::api::CreateSchedule;
use ud_schemas::{streams, ScheduleId};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::tasks::WriteParams;
use crate::AppState;

/// The answer to an accepted schedule command.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ScheduleAcceptedView {
    pub schedule_id: String,
    /// False when the command changed nothing (a repeat).
    pub changed: bool,
    /// Stream sequence (`UD_SCHEDULES`) of the command's last event.
    pub seq: u64,
    /// True when the read models already include this write.
    pub projected: bool,
}

/// A schedule as the read model holds it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ScheduleView {
    pub id: String,
    pub project: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    /// `skip` or `catch_up`.
    pub missed: String,
    /// `active`, `paused` or `deleted`.
    pub state: String,
    pub paused_reason: Option<String>,
    /// The next time it submits (absent unless active).
    pub next_due: Option<DateTime<Utc>>,
    /// How many times it submitted (or tried: see `last_error`).
    pub fired: i64,
    /// How many times passed while no main server ran and were skipped.
    pub skipped: i64,
    pub last_due: Option<DateTime<Utc>>,
    pub last_task_id: Option<String>,
    pub last_pipeline_id: Option<String>,
    /// Why the last time submitted nothing.
    pub last_error: Option<String>,
    /// The body of `POST /api/v1/tasks` it submits.
    #[schema(value_type = Option<Object>)]
    pub task: Option<serde_json::Value>,
    /// Or of `POST /api/v1/pipelines`.
    #[schema(value_type = Option<Object>)]
    pub pipeline: Option<serde_json::Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Events applied to this schedule; grows with every change.
    pub version: i64,
}

impl ScheduleView {
    fn from_row(r: ScheduleRow) -> Self {
        let next_due = (r.state == "active")
            .then(|| When::parse(&r.cron, &r.timezone).ok())
            .flatten()
            .and_then(|w| w.next_after(r.done_until.timestamp_millis()))
            .map(ud_projections::rows::ts);
        Self {
            id: r.id.to_string(),
            project: r.project,
            name: r.name,
            cron: r.cron,
            timezone: r.timezone,
            missed: r.missed,
            state: r.state,
            paused_reason: r.paused_reason,
            next_due,
            fired: r.fired,
            skipped: r.skipped,
            last_due: r.last_due,
            last_task_id: r.last_task_id.map(|t| t.to_string()),
            last_pipeline_id: r.last_pipeline_id.map(|p| p.to_string()),
            last_error: r.last_error,
            task: r.body.get("task").cloned(),
            pipeline: r.body.get("pipeline").cloned(),
            created_by: r.created_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ScheduleList {
    pub items: Vec<ScheduleView>,
}

#[derive(Deserialize, IntoParams)]
pub struct ListParams {
    pub project: Option<String>,
    /// Deleted schedules too.
    #[serde(default)]
    pub deleted: bool,
    /// Answer once the read model includes `UD_SCHEDULES` up to this sequence.
    pub projected_seq: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
pub struct GetParams {
    /// Answer once the read model includes `UD_SCHEDULES` up to this
    /// sequence (waiting at most 5 s).
    pub projected_seq: Option<u64>,
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    pub reason: Option<String>,
}

fn parse_id(id: &str) -> Result<ScheduleId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("schedule"))
}

async fn respond(
    state: &AppState,
    a: ScheduleAccepted,
    wait: bool,
    status: StatusCode,
) -> Response {
    let location = format!("/api/v1/schedules/{}", a.schedule_id);
    crate::tasks::written(
        state,
        (streams::SCHEDULES, a.seq),
        wait,
        status,
        location,
        |projected| ScheduleAcceptedView {
            schedule_id: a.schedule_id.to_string(),
            changed: a.changed,
            seq: a.seq,
            projected,
        },
    )
    .await
}

/// Create a schedule: its task or pipeline is submitted at each time of
/// `cron` in `timezone`, once, whichever main servers run.
#[utoipa::path(post, path = "/api/v1/schedules", tag = "schedules",
    request_body = CreateSchedule,
    params(WriteParams),
    responses(
        (status = 201, description = "created", body = ScheduleAcceptedView),
        (status = 400, description = "a cron expression that does not parse, a time zone that does not exist, an invalid task or pipeline; `fields` names each rejected field", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<WriteParams>,
    JsonBody(req): JsonBody<CreateSchedule>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let accepted = state
        .schedules
        .create(&req, &caller.actor(), |p| {
            caller.may(p.as_str(), ud_schemas::Role::Member)
        })
        .await?;
    Ok(respond(&state, accepted, wait, StatusCode::CREATED).await)
}

/// One schedule, with its next time and what its last one submitted.
#[utoipa::path(get, path = "/api/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path), GetParams),
    responses((status = 200, body = ScheduleView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<GetParams>,
) -> Result<Json<ScheduleView>, ApiError> {
    let id = parse_id(&id)?;
    crate::paging::caught_up(&state, streams::SCHEDULES, q.projected_seq).await;
    let client = state.db.client().await?;
    let row = ud_projections::db::get_schedule(&client, id)
        .await?
        .filter(|r| caller.may_see(&r.project))
        .ok_or_else(|| ApiError::not_found("schedule"))?;
    Ok(Json(ScheduleView::from_row(row)))
}

/// Schedules the token may see, newest first (at most 1,000).
#[utoipa::path(get, path = "/api/v1/schedules", tag = "schedules", params(ListParams),
    responses((status = 200, body = ScheduleList)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Json<ScheduleList>, ApiError> {
    crate::paging::caught_up(&state, streams::SCHEDULES, p.projected_seq).await;
    let client = state.db.client().await?;
    let projects = caller.visible();
    let rows = ud_projections::db::list_schedules(
        &client,
        p.project.as_deref(),
        projects.as_deref(),
        p.deleted,
    )
    .await?;
    Ok(Json(ScheduleList {
        items: rows.into_iter().map(ScheduleView::from_row).collect(),
    }))
}

async fn execute(
    state: &AppState,
    caller: &Caller,
    id: &str,
    command: ScheduleCommand,
    wait: bool,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    crate::auth::may_change_made(state, caller, "schedules", "created_by", id.0).await?;
    let gate = crate::auth::Gate::new(caller, ud_schemas::Role::Member);
    let done = state
        .schedules
        .execute(id, command, &caller.actor(), |p| gate.check(p))
        .await;
    let accepted = gate.result(done)?;
    Ok(respond(state, accepted, wait, StatusCode::ACCEPTED).await)
}

/// Pause a schedule: nothing is submitted until it is resumed, and the
/// times that pass meanwhile are not run later.
#[utoipa::path(post, path = "/api/v1/schedules/{id}/pause", tag = "schedules",
    params(("id" = String, Path), WriteParams),
    request_body(content = Option<PauseRequest>),
    responses((status = 202, body = ScheduleAcceptedView), (status = 404, body = ErrorBody),
        (status = 409, description = "deleted, or changed concurrently", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let req: PauseRequest = crate::body::parse_or_default(&body)?;
    let reason = req
        .reason
        .unwrap_or_else(|| format!("paused by {}", caller.actor()));
    execute(
        &state,
        &caller,
        &id,
        ScheduleCommand::Pause { reason },
        wait,
    )
    .await
}

/// Resume a paused schedule from its next time.
#[utoipa::path(post, path = "/api/v1/schedules/{id}/resume", tag = "schedules",
    params(("id" = String, Path), WriteParams),
    responses((status = 202, body = ScheduleAcceptedView), (status = 404, body = ErrorBody),
        (status = 409, description = "deleted, or changed concurrently", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    execute(&state, &caller, &id, ScheduleCommand::Resume, wait).await
}

/// Delete a schedule: nothing more is submitted; it and its history stay
/// readable (`deleted=true` in the list).
#[utoipa::path(delete, path = "/api/v1/schedules/{id}", tag = "schedules",
    params(("id" = String, Path), WriteParams),
    responses((status = 202, body = ScheduleAcceptedView), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    execute(&state, &caller, &id, ScheduleCommand::Delete, wait).await
}
